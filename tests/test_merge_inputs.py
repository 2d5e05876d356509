"""Bad input: exit 2, one line naming the file and the fault, nothing left behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import (
    LM_TARGETS,
    brute_force_covariances,
    build_base,
    calibration_records,
    input_key,
    make_adapter,
    run_cli,
    write_task_stats,
)
from peft import IA3Config, LoraConfig
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from many_cli.state import read_bundle_header


def copy_adapters(world, root: Path) -> list[Path]:
    copies = []
    for adapter in world.adapters[:2]:
        copies.append(root / "in" / adapter.name)
        shutil.copytree(adapter, copies[-1])
    return copies


def other_width_adapter(world, root: Path) -> Path:
    base = build_base(root / "wide_base", hidden=48)
    adapter = make_adapter(base, root / "in" / "wide", LoraConfig(r=2, target_modules=LM_TARGETS), 7)
    write_task_stats(adapter, brute_force_covariances(base, adapter, calibration_records(2, 0)), 24)
    return adapter


def stats_without_down_proj(world, root: Path) -> Path:
    adapter = root / "in" / "nodown"
    shutil.copytree(world.adapters[0], adapter)
    covariances = {name: value for name, value in world.covariances[0].items() if "down_proj" not in name}
    write_task_stats(adapter, covariances, 36)
    return adapter


def stale_stats(world, root: Path) -> Path:
    adapter = root / "in" / "stale"
    shutil.copytree(world.adapters[0], adapter)
    weights = load_file(adapter / "adapter_model.safetensors")
    first = sorted(weights)[0]
    weights[first] = weights[first] + 1
    save_file(weights, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    return adapter


def missing_stats(world, root: Path) -> Path:
    adapter = root / "in" / "nostats"
    shutil.copytree(world.adapters[0], adapter)
    (adapter / "many_stats.safetensors").unlink()
    return adapter


def corrupt_weights(world, root: Path) -> Path:
    adapter = root / "in" / "corrupt"
    shutil.copytree(world.adapters[0], adapter)
    (adapter / "adapter_model.safetensors").write_bytes(b"\x00\x01not a safetensors file" * 10)
    return adapter


def truncated_stats(world, root: Path) -> Path:
    adapter = root / "in" / "truncated"
    shutil.copytree(world.adapters[0], adapter)
    stats = adapter / "many_stats.safetensors"
    stats.write_bytes(stats.read_bytes()[: stats.stat().st_size // 2])
    return adapter


def nan_stats(world, root: Path) -> Path:
    adapter = root / "in" / "nan"
    shutil.copytree(world.adapters[0], adapter)
    covariances = dict(world.covariances[0])
    key = input_key(sorted(covariances)[-1])
    covariances[key] = covariances[key].clone()
    covariances[key][0, 0] = float("nan")
    write_task_stats(adapter, covariances, 36)
    return adapter


def rewritten_lora(world, root: Path, name: str, change) -> Path:
    """A copy of the second adapter whose last layer's down_proj.lora_B is `change`d, with fresh
    stats (so only the weights are wrong)."""
    adapter = root / "in" / name
    shutil.copytree(world.adapters[1], adapter)
    weights = load_file(adapter / "adapter_model.safetensors")
    key = max(key for key in weights if "down_proj.lora_B" in key)
    weights[key] = change(weights[key])
    save_file(weights, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    write_task_stats(adapter, world.covariances[1], 36)
    return adapter


def nan_lora(world, root: Path) -> Path:
    return rewritten_lora(world, root, "nanlora", lambda b: b.index_fill(0, torch.tensor([0]), float("nan")))


def integer_lora(world, root: Path) -> Path:
    return rewritten_lora(world, root, "intlora", lambda b: (b * 100).to(torch.int64))


def stats_with_metadata(world, root: Path, name: str, index: int, change) -> Path:
    """A copy of adapter `index` whose stats file's metadata is `change`d (tensors as they are)."""
    adapter = root / "in" / name
    shutil.copytree(world.adapters[index], adapter)
    stats = adapter / "many_stats.safetensors"
    with safe_open(str(stats), "pt") as handle:
        metadata, tensors = handle.metadata(), {key: handle.get_tensor(key) for key in handle.keys()}
    save_file(tensors, stats, metadata=change(metadata))
    return adapter


def malformed_stats_metadata(world, root: Path) -> Path:
    def without_dims(metadata):
        inputs = json.loads(metadata["inputs"])
        for entry in inputs.values():
            del entry["dim"]
        return {**metadata, "inputs": json.dumps(inputs)}

    return stats_with_metadata(world, root, "badmeta", 0, without_dims)


def other_answer_weight(world, root: Path) -> Path:
    return stats_with_metadata(world, root, "weighted", 1, lambda metadata: {**metadata, "answer_weight": "4.0"})


def dora_adapter(world, root: Path) -> Path:
    return make_adapter(world.base, root / "in" / "dora", LoraConfig(r=2, target_modules=LM_TARGETS, use_dora=True), 8)


def ia3_adapter(world, root: Path) -> Path:
    return make_adapter(
        world.base,
        root / "in" / "ia3",
        IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]),
        9,
    )


def lm_head_saved_whole(world, root: Path) -> Path:
    adapter = make_adapter(
        world.base,
        root / "in" / "lmhead",
        LoraConfig(r=2, target_modules=LM_TARGETS, modules_to_save=["multi_modal_projector", "lm_head"]),
        10,
    )
    write_task_stats(adapter, world.covariances[0], 36)
    return adapter


CASES = {
    "different base": (other_width_adapter, "was computed on another base model"),
    "missing covariance": (stats_without_down_proj, "no covariance for the input of"),
    "stale stats": (stale_stats, "stale"),
    "missing stats": (missing_stats, "many_stats.safetensors: file not found"),
    "corrupt safetensors": (corrupt_weights, "adapter_model.safetensors: not a readable safetensors"),
    "truncated safetensors": (truncated_stats, "many_stats.safetensors: not a readable safetensors"),
    "NaN statistics": (nan_stats, "NaN"),
    "NaN in LoRA weights": (nan_lora, "layers.1.mlp.down_proj.lora_B.weight' holds NaN or Inf"),
    "integer LoRA weights": (integer_lora, "is I64, not floating point"),
    "malformed stats metadata": (malformed_stats_metadata, "metadata is malformed"),
    "DoRA": (dora_adapter, "DoRA is not supported"),
    "not LoRA": (ia3_adapter, "peft_type 'IA3' is not supported"),
    "stats of another answer weight": (other_answer_weight, "re-run many stats with one --answer-weight"),
    "a module saved whole besides the projector": (lm_head_saved_whole, "can merge nothing else saved whole"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_line_and_no_output(world, tmp_path, capsys, case):
    make_bad, message = CASES[case]
    bad = make_bad(world, tmp_path)
    out = tmp_path / "out" / "merged"
    code, err = run_cli(capsys, "merge", world.adapters[0], bad, "--out", out)
    assert code == 2
    assert err.startswith("many: error: ") and err.count("\n") == 1, err
    assert message in err and bad.name in err
    assert not out.exists()
    assert not (tmp_path / "out").exists()  # nor the folder made for it


def test_an_existing_merge_is_replaced_only_with_force(world, tmp_path, capsys):
    out = tmp_path / "merged"
    assert run_cli(capsys, "merge", world.adapters[1], "--out", out)[0] == 0
    code, err = run_cli(capsys, "merge", world.adapters[0], "--out", out)
    assert code == 2 and "--force" in err
    code, err = run_cli(capsys, "merge", world.adapters[0], "--out", out, "--force")
    assert code == 0, err
    assert read_bundle_header(out / "many_bundle.safetensors").tasks == (world.adapters[0].name,)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


@pytest.mark.parametrize("field, value", [("lora_alpha", 160), ("use_rslora", True), ("rank_pattern", {"q_proj": 2})])
def test_stats_go_stale_when_the_config_rescales_the_weights(world, tmp_path, capsys, field, value):
    """The stats fingerprint covers the config fields that scale the weights, not the weights alone."""
    adapter = shutil.copytree(world.adapters[0], tmp_path / "task0")
    assert run_cli(capsys, "merge", adapter, "--out", tmp_path / "before")[0] == 0
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, field: value}))
    code, err = run_cli(capsys, "merge", adapter, "--out", tmp_path / "after")
    assert code == 2 and "is stale" in err and str(adapter / "many_stats.safetensors") in err, err


@pytest.mark.parametrize("name", ["merged", "mean", "routed", "v1.5"])
def test_a_task_name_infer_or_export_could_not_use_is_refused(world, tmp_path, capsys, name):
    adapter = shutil.copytree(world.adapters[0], tmp_path / name)
    code, err = run_cli(capsys, "merge", adapter, "--out", tmp_path / "out")
    assert code == 2 and f"task name {name!r} cannot be used" in err and "rename the directory" in err, err


def test_overflowing_statistics_name_the_answer_weight(tmp_path, capsys):
    sample = Path(__file__).parent.parent / "sample_adapters"
    code, err = run_cli(
        capsys,
        "stats",
        "--model",
        sample / "base",
        "--adapter",
        sample / "adapters" / "1_colour",
        "--data",
        sample / "data" / "1_colour" / "calibration.jsonl",
        "--answer-weight",
        "1e38",
        "--out",
        tmp_path / "stats.safetensors",
        "--max-samples",
        4,
    )
    assert code == 2 and "holds NaN or Inf" in err and "smaller --answer-weight than 1e+38" in err, err
    assert "--dtype float32" not in err  # the sample runs in float32 already


def test_a_task_is_named_on_the_command_line(world, tmp_path, capsys):
    """TASK=ADAPTER names a task (ms-swift's checkpoint-N folders would all be `checkpoint-40`);
    a folder whose own name holds `=` is still a folder."""
    from many_cli.state import read_bundle_header

    first = shutil.copytree(world.adapters[0], tmp_path / "run1" / "checkpoint-40")
    second = shutil.copytree(world.adapters[1], tmp_path / "run2" / "checkpoint-40")
    code, err = run_cli(capsys, "merge", first, second, "--out", tmp_path / "clash")
    assert code == 2 and "'checkpoint-40' is already taken" in err and f"TASK={second}" in err, err
    code, err = run_cli(capsys, "merge", f"colour={first}", f"count={second}", "--out", tmp_path / "named")
    assert code == 0, err
    assert read_bundle_header(tmp_path / "named" / "many_bundle.safetensors").tasks == ("colour", "count")
    literal = shutil.copytree(world.adapters[0], tmp_path / "a=b")
    code, err = run_cli(capsys, "merge", literal, "--out", tmp_path / "literal")
    assert code == 0, err
    assert read_bundle_header(tmp_path / "literal" / "many_bundle.safetensors").tasks == ("a=b",)
    code, err = run_cli(capsys, "merge", f"merged={first}", "--out", tmp_path / "reserved")
    assert code == 2 and "task name 'merged' cannot be used" in err, err
