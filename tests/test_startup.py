"""Start-up: `--help` and every refusal answer without importing torch, and `merge` imports neither
transformers nor PEFT. What a process imported is read from Python's own `-X importtime` report,
not from the code under test."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from peft.utils.other import get_pattern_key

from many_cli.adapters import pattern_key
from many_cli.bench.startup import imports_torch


def _imported(*arguments: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "many_cli", *arguments], capture_output=True, text=True
    )
    modules = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    return done, modules


@pytest.mark.slow
def test_the_quick_startup_bench_finds_no_torch_import():
    done = subprocess.run(
        [sys.executable, "-m", "many_cli", "bench", "startup", "--quick"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "IMPORTS TORCH" not in done.stdout
    for case in ("many --help", "many merge --help", "a bad --method", "a missing adapter"):
        assert case in done.stdout
    assert "(exit 2)" in done.stdout and "x import torch" in done.stdout


def test_the_bench_reads_a_torch_import_from_python_s_own_report():
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", "import torch"], capture_output=True, text=True)
    assert imports_torch(done.stderr)
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", "import json"], capture_output=True, text=True)
    assert not imports_torch(done.stderr)


@pytest.mark.parametrize(
    "arguments",
    [
        ["stats", "--model", "m", "--adapter", "a", "--data", "d", "--padding-side", "middle"],
        ["infer", "--model", "m", "--merged", "/nonexistent", "--image", "/nonexistent.png"],
        ["export", "--model", "/nonexistent", "--merged", "/nonexistent", "--out", "o"],
        ["merge", "/nonexistent", "--out", "o", "--method", "average", "--ridge", "0.5"],
    ],
)
def test_refusals_answer_in_one_line_before_torch(arguments):
    done, modules = _imported(*arguments)
    assert done.returncode == 2
    assert "torch" not in modules
    lines = [line for line in done.stderr.splitlines() if not line.startswith("import time:")]
    assert lines and (len(lines) == 1 or "Usage:" in lines[0]), lines


@pytest.mark.slow
def test_merge_imports_neither_transformers_nor_peft(world, tmp_path):
    done, modules = _imported("merge", *map(str, world.adapters), "--out", str(tmp_path / "merged"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "torch" in modules  # the merge ran
    assert not modules & {"transformers", "peft", "accelerate"}


PATTERNS = [
    "v_proj",
    "q_proj",
    "down_proj",
    r".*\.layers\.0\..*",
    "model.layers.1.self_attn.q_proj",
    "layers.1.self_attn.q_proj",
    "self_attn",
    r"^model\.layers\.0\.mlp\.down_proj",
    "proj",
    r"(q|k)_proj",
    "language_model.model.layers.0.self_attn.v_proj",
    ".*vision_tower.*",
]
MODULES = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.v_proj",
    "model.layers.0.mlp.down_proj",
    "model.layers.1.self_attn.q_proj",
    "vision_tower.model.layers.0.self_attn.q_proj",
    "language_model.model.layers.0.self_attn.v_proj",
    "model.layers.10.self_attn.k_proj",
    "lm_head",
]


@pytest.mark.parametrize("module", MODULES)
def test_the_pattern_key_agrees_with_peft(module):
    for start in range(len(PATTERNS)):  # every key order: the first match wins in both
        keys = PATTERNS[start:] + PATTERNS[:start]
        assert pattern_key(keys, module) == get_pattern_key(keys, module)
    assert pattern_key([], module) == get_pattern_key([], module) == module


@pytest.mark.slow
def test_the_wheel_ships_every_module_and_the_sample(tmp_path):
    """`pip wheel .` of the tracked files: every module of many_cli and every file of the sample
    (so that `many demo` runs from a wheel in an empty folder)."""
    import zipfile

    root = Path(__file__).resolve().parent.parent
    tracked = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout.split()
    source = tmp_path / "source"
    for name in tracked:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, source / name)
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp_path, source]
    subprocess.run(list(map(str, build)), check=True, capture_output=True)
    [wheel] = tmp_path.glob("*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    expected = {name for name in tracked if name.startswith("many_cli/") and name.endswith(".py")}
    expected |= {"many_cli/" + name for name in tracked if name.startswith("sample_adapters/")}
    assert expected <= shipped, sorted(expected - shipped)[:5]
