"""Trust: an output never destroys an input; an interrupted or killed run leaves the old output
or the new one and, after the next run, no leftovers; concurrent writers are refused; bad
options are refused before any work; the same command writes the same bytes."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import many_as_ordinary_user, run_cli

from many_cli import files
from many_cli.errors import InputError, Terminated
from many_cli.merge import outputs as merge_outputs


def digest(path: Path) -> dict[str, str]:
    """sha256 of every file under `path` (or of the file itself), by path relative to it."""
    paths = [path] if path.is_file() else sorted(item for item in path.rglob("*") if item.is_file())
    return {
        str(item.relative_to(path) if path.is_dir() else item.name): hashlib.sha256(item.read_bytes()).hexdigest()
        for item in paths
    }


def hidden(folder: Path) -> list[str]:
    return sorted(item.name for item in folder.iterdir() if item.name.startswith("."))


@pytest.fixture
def adapters(world, tmp_path) -> Path:
    """A folder holding copies of two of the world's adapters (with their stats)."""
    folder = tmp_path / "adapters"
    for adapter in world.adapters[:2]:
        shutil.copytree(adapter, folder / adapter.name)
    return folder


def test_an_output_that_is_contains_or_lies_inside_an_input_is_refused(world, adapters, tmp_path, capsys):
    first = sorted(adapters.iterdir())[0]
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "hello"}\n')
    before = digest(tmp_path)
    cases = [
        ["merge", adapters, "--out", adapters, "--force"],  # the folder holding the inputs
        ["merge", *sorted(adapters.iterdir()), "--out", first, "--force"],  # one of the inputs
        ["merge", adapters, "--out", adapters / "merged"],  # inside the inputs' folder
        ["merge", first, "--out", tmp_path, "--force"],  # a folder that contains the inputs
        [
            "stats",
            "--model",
            world.base,
            "--adapter",
            first,
            "--data",
            data,
            "--out",
            first / "adapter_model.safetensors",
            "--force",
        ],
        ["stats", "--model", world.base, "--adapter", first, "--data", data, "--out", data, "--force"],
        [
            "stats",
            "--model",
            world.base,
            "--adapter",
            first,
            "--data",
            data,
            "--out",
            world.base / "many_stats.safetensors",
        ],
        ["convert", first, "--out", first, "--force"],
    ]
    for args in cases:
        code, err = run_cli(capsys, *args)
        assert code == 2 and "would overwrite the input" in err and err.count("\n") == 1, (args, err)
    assert digest(tmp_path) == before


def test_the_current_directory_and_files_are_not_replaced_by_a_directory(adapters, tmp_path, capsys, monkeypatch):
    first = sorted(adapters.iterdir())[0]
    elsewhere = tmp_path / "a" / "b"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    for out in (".", ".."):
        code, err = run_cli(capsys, "merge", first, "--out", out, "--force")
        assert code == 2 and "current directory" in err, err
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    code, err = run_cli(capsys, "merge", first, "--out", a_file, "--force")
    assert code == 2 and "not a directory" in err and a_file.read_text() == "mine"
    assert hidden(tmp_path) == [] and sorted(os.listdir(elsewhere)) == []


@pytest.mark.parametrize(
    "signal_exception,code,line", [(KeyboardInterrupt, 130, "interrupted"), (Terminated, 143, "terminated")]
)
def test_an_interrupted_merge_keeps_the_old_output_and_leaves_nothing(
    world, tmp_path, capsys, monkeypatch, signal_exception, code, line
):
    out = tmp_path / "merged"
    assert run_cli(capsys, "merge", *world.adapters, "--out", out)[0] == 0
    before = digest(out)

    def interrupted(*args, **kwargs):
        raise signal_exception()

    monkeypatch.setattr(merge_outputs, "write_bundle", interrupted)  # late: the staging copy is nearly whole
    status, err = run_cli(capsys, "merge", world.adapters[0], "--out", out, "--force")
    assert (status, err) == (code, f"many: error: {line}\n")
    assert digest(out) == before and hidden(tmp_path) == []


KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
from many_cli import files

out, moment = Path(sys.argv[1]), sys.argv[2]
files._exchange = lambda first, second: False  # the two-rename path, where a kill can fall between
rename = Path.rename

def rename_then_die(self, target):
    result = rename(self, target)
    if Path(target).name.endswith(".many-old"):
        os.kill(os.getpid(), signal.SIGKILL)
    return result

Path.rename = rename_then_die
with files.atomic_output_dir(out, force=True) as staging:
    (staging / "version.txt").write_text("new")
    if moment == "writing":
        os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("moment", ["writing", "between renames"])
def test_a_killed_writer_is_recovered_by_the_next_run(tmp_path, moment):
    out = tmp_path / "out"
    out.mkdir()
    (out / "version.txt").write_text("old")
    run = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(out), moment], capture_output=True)
    assert run.returncode == -signal.SIGKILL
    assert hidden(tmp_path), "the kill should have left something behind"
    # The next writer puts the old output back first, so without --force it does not replace it.
    with pytest.raises(InputError, match="--force"), files.atomic_output_dir(out, force=False) as staging:
        (staging / "version.txt").write_text("unwanted")
    assert (out / "version.txt").read_text() == "old" and hidden(tmp_path) == []
    # A later writer that fails still finds (and leaves) the old output, and cleans up.
    with pytest.raises(RuntimeError), files.atomic_output_dir(out, force=True):
        raise RuntimeError("failed")
    assert (out / "version.txt").read_text() == "old" and hidden(tmp_path) == []
    with files.atomic_output_dir(out, force=True) as staging:
        (staging / "version.txt").write_text("newer")
    assert (out / "version.txt").read_text() == "newer" and hidden(tmp_path) == []


def test_a_second_writer_of_one_output_is_refused(world, tmp_path, capsys):
    out = tmp_path / "merged"
    with files.atomic_output_dir(out, force=True) as staging:  # another process, as far as flock knows
        (staging / "x").write_text("first")
        code, err = run_cli(capsys, "merge", world.adapters[0], "--out", out, "--force")
        assert code == 2 and "another many process is writing" in err, err
    assert (out / "x").read_text() == "first" and hidden(tmp_path) == []


def console_script() -> list[str]:
    script = Path(sys.executable).with_name("many")
    return [str(script)] if script.exists() else [sys.executable, "-m", "many_cli"]


@pytest.mark.parametrize("sent,code,line", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_a_signal_during_start_up_ends_in_one_line(world, tmp_path, sent, code, line):
    # The child's dispositions are set here: a suite started in the background (`nohup`, `&`)
    # runs with SIGINT ignored, and a child would inherit that.
    process = subprocess.Popen(
        [*console_script(), "merge", *world.adapters, "--out", tmp_path / "m"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: [signal.signal(s, signal.SIG_DFL) for s in (signal.SIGINT, signal.SIGTERM)],
    )
    time.sleep(0.5)  # inside the imports of torch and transformers
    process.send_signal(sent)
    _, err = process.communicate(timeout=60)
    assert process.returncode == code and err == f"many: error: {line}\n", err
    assert not (tmp_path / "m").exists() and hidden(tmp_path) == []


@pytest.mark.parametrize(
    "args,option",
    [
        (["infer", "--image", "x.png", "--eta", "inf"], "--eta"),
        (["infer", "--image", "x.png", "--confidence", "1.5", "--lm-routing", "experts"], "--confidence"),
        (["infer", "--data", "x.jsonl", "--batch-size", "0"], "--batch-size"),
        (["infer", "--data", "x.jsonl", "--min-accuracy", "nan"], "--min-accuracy"),
        (["infer", "--data", "x.jsonl", "--min-accuracy", "1.5"], "--min-accuracy"),
        (["infer", "--image", "x.png", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["infer", "--image", "x.png", "--device", "tpu"], "--device"),
        (["infer", "--image", "x.png", "--out", "p.jsonl"], "--out or --min-accuracy does not apply"),
        (["infer", "--prompt", "hi", "--min-accuracy", "0.5"], "--out or --min-accuracy does not apply"),
        (["infer", "--data", "x.jsonl", "--json"], "--json does not apply"),
        (["infer", "--image", "x.png", "--eta", "0.1"], "--eta does not apply to --routing nearest"),
        (["infer", "--image", "x.png", "--confidence", "0.9"], "--confidence does not apply to --lm-routing merged"),
        (["merge", "nowhere", "--out", "m", "--eta", "inf"], "--eta"),
        (["merge", "nowhere", "--out", "m", "--ridge", "nan"], "--ridge"),
        (["stats", "--adapter", "nowhere", "--data", "x.jsonl", "--batch-size", "0"], "--batch-size"),
        (["stats", "--adapter", "nowhere", "--data", "x.jsonl", "--dtype", "float8"], "--dtype"),
        (["stats", "--adapter", "nowhere", "--data", "x.jsonl", "--device-map", ""], "--device-map is empty"),
    ],
)
def test_bad_options_are_refused_before_any_work(tmp_path, capsys, args, option):
    command, rest = args[0], args[1:]
    model = [] if command == "merge" else ["--model", tmp_path / "no-model"]
    merged = ["--merged", tmp_path / "no-merge"] if command == "infer" else []
    code, err = run_cli(capsys, command, *model, *merged, *rest)
    assert code == 2 and option in err and "no-model" not in err and err.count("\n") == 1, err


def test_the_same_merge_writes_the_same_bytes(world, tmp_path):
    """Two processes with different string hashing (set order) and fresh safetensors state."""
    for seed in ("1", "2"):
        run = subprocess.run(
            [*console_script(), "merge", *map(str, world.adapters), "--out", str(tmp_path / seed)],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        )
        assert run.returncode == 0, run.stderr
    first, second = digest(tmp_path / "1"), digest(tmp_path / "2")
    assert len(first) > 6 and first == second


def test_a_failed_file_write_leaves_the_old_file_and_nothing_else(tmp_path):
    out = tmp_path / "preds.jsonl"
    out.write_text("old\n")
    with pytest.raises(OSError), files.atomic_output_file(out) as partial:
        partial.write_text("half")
        raise OSError(28, "No space left on device")
    assert out.read_text() == "old\n" and hidden(tmp_path) == []


def test_what_an_ordinary_user_cannot_read_or_write_is_named_in_one_line(world, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    unreadable = shutil.copytree(world.adapters[0], tmp_path / "unreadable")
    (unreadable / "adapter_model.safetensors").chmod(0)
    data = tmp_path / "data.jsonl"
    data.write_text("{}\n")
    data.chmod(0)
    cases = [
        (
            [
                "stats",
                "--model",
                world.base,
                "--adapter",
                world.adapters[0],
                "--data",
                data,
                "--out",
                tmp_path / "s.safetensors",
            ],
            "data.jsonl: cannot be read (Permission denied)",
        ),
        (["merge", world.adapters[0], "--out", locked / "m"], "locked/m: cannot write here (Permission denied)"),
        (["merge", world.adapters[0], "--out", locked / "sub" / "m"], "cannot create its folder (Permission denied)"),
        (
            ["merge", unreadable, "--out", tmp_path / "m"],
            "adapter_model.safetensors: cannot be read (Permission denied)",
        ),
    ]
    for args, message in cases:
        run = subprocess.run([*many_as_ordinary_user(), *map(str, args)], capture_output=True, text=True)
        assert run.returncode == 2 and message in run.stderr and run.stderr.count("\n") == 1, run.stderr
    assert hidden(tmp_path) == [] and list(locked.iterdir()) == []


def test_force_over_an_output_the_user_may_not_empty_is_refused_and_leaves_nothing(world, tmp_path):
    """As an ordinary user: the old output cannot be removed (mode 555), so it cannot be replaced;
    it used to be swapped out and left hidden beside the new one, one more each run."""
    out = tmp_path / "M"
    merge = [*many_as_ordinary_user(), "merge", str(world.adapters[0]), "--out", str(out)]
    assert subprocess.run(merge, capture_output=True).returncode == 0
    out.chmod(0o555)
    try:
        before = sorted(path.name for path in out.iterdir())
        run = subprocess.run([*merge, "--force"], capture_output=True, text=True)
        assert run.returncode == 2 and "cannot be replaced" in run.stderr and run.stderr.count("\n") == 1, run.stderr
        assert sorted(path.name for path in out.iterdir()) == before and hidden(tmp_path) == []
    finally:
        out.chmod(0o755)


def test_standard_output_closed_early_full_or_closed(tmp_path):
    """`many … | head` stops quietly with status 0, as other tools do; a full disk or a closed
    standard output is one line naming it."""
    command = [*console_script(), "merge", "--help"]
    reader = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    reader.stdout.close()  # gone before the child writes its first byte
    _, err = reader.communicate(timeout=120)
    assert reader.returncode == 0 and err == b"", err
    with open("/dev/full", "w") as full:
        run = subprocess.run(command, stdout=full, capture_output=False, stderr=subprocess.PIPE, text=True)
    assert (
        run.returncode == 1 and run.stderr == "many: error: standard output: cannot write (No space left on device)\n"
    )
    run = subprocess.run(command, stderr=subprocess.PIPE, text=True, preexec_fn=lambda: os.close(1))
    assert run.returncode == 1 and run.stderr == "many: error: standard output: cannot write (it is closed)\n"


def test_a_base_without_a_processor_is_refused_by_every_command(world, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(world.base / name, bare / name)
    merged = tmp_path / "merged"
    assert run_cli(capsys, "merge", *world.adapters, "--out", merged)[0] == 0
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "hi"}\n')
    for args in (
        ["stats", "--model", bare, "--adapter", world.adapters[0], "--data", data, "--out", tmp_path / "s"],
        ["infer", "--model", bare, "--merged", merged, "--prompt", "hi"],
        ["export", "--model", bare, "--merged", merged, "--out", tmp_path / "exported"],
    ):
        code, err = run_cli(capsys, *args)
        assert code == 2 and f"{bare}: has no processor or tokenizer" in err and err.count("\n") == 1, (args, err)
    assert not (tmp_path / "exported").exists() and not (tmp_path / "s").exists()
