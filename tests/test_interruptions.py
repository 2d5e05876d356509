"""Interruptions: a run interrupted, terminated or killed at any moment leaves the old output
or the new one and, after the next run, no leftovers; a signal or a closed standard output
ends in one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import console_script, digest, hidden, run_cli

from many_cli import files
from many_cli.errors import InputError, Terminated
from many_cli.merge import outputs as merge_outputs


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
    with files.atomic_output_dir(out, force=False) as staging:  # an earlier output of many's
        (staging / "version.txt").write_text("old")
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


@pytest.mark.slow
@pytest.mark.parametrize("sent,code,line", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_a_signal_during_start_up_ends_in_one_line(world, tmp_path, sent, code, line):
    # The moments fall inside the imports of torch and transformers, where torch runs Python from
    # C++ (a signal's exception there was lost, or aborted the process); the runs go side by side.
    # The child's dispositions are set here: a suite started in the background runs with SIGINT ignored.
    moments = (0.3, 0.5, 0.7, 0.9)
    processes = [
        subprocess.Popen(
            [*console_script(), "merge", *world.adapters, "--out", tmp_path / f"m{index}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: [signal.signal(s, signal.SIG_DFL) for s in (signal.SIGINT, signal.SIGTERM)],
        )
        for index in range(len(moments))
    ]
    start = time.monotonic()
    for moment, process in zip(moments, processes):
        time.sleep(max(0.0, start + moment - time.monotonic()))
        process.send_signal(sent)
    for moment, process in zip(moments, processes):
        _, err = process.communicate(timeout=60)
        assert process.returncode == code and err == f"many: error: {line}\n", (moment, err)
    assert not any(tmp_path.iterdir()) and hidden(tmp_path) == []


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
