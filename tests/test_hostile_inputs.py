"""What a careless or hostile user tries beyond the data: forged manifests, absurd numbers,
symbolic link loops, paths through folders that do not exist, terminal escapes in file names, a
full disk, another user's output in /tmp, and the Python API given what it never expects. Each is
one line naming the file or option (exit 2, or 1 for the machine's faults), never a Python
exception's name, and nothing is left behind."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from helpers import console_script, digest, hidden, run_cli

import many_cli

SAMPLE = Path(__file__).parent.parent / "sample_adapters"
ADAPTER = SAMPLE / "adapters" / "1_colour"
CALIBRATION = SAMPLE / "data" / "1_colour" / "calibration.jsonl"
STATS = ["stats", "--model", SAMPLE / "base", "--adapter", ADAPTER, "--data", CALIBRATION]
AVERAGE = ["merge", ADAPTER, "--method", "average"]  # needs no statistics


def one_line(code: int, err: str, expected: int = 2) -> bool:
    return code == expected and err.count("\n") == 1 and "Error:" not in err and "Traceback" not in err


def test_absurd_numbers_links_and_paths_are_one_line(tmp_path, capsys):
    forged = tmp_path / "forged"
    forged.mkdir()
    (forged / "x.txt").write_text("mine")
    (forged / ".many-output.json").write_text("[" * 200_000 + "]" * 200_000)
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    cases = [
        ([*AVERAGE, "--out", forged, "--force"], f"holds {forged / 'x.txt'}, which many did not write"),
        ([*STATS, "--max-samples", str(10**23), "--out", tmp_path / "s"], "--max-samples is too large"),
        ([*STATS, "--batch-size", str(10**23), "--out", tmp_path / "s"], "--batch-size is too large"),
        ([*AVERAGE, "--out", loop / "m"], f"{loop / 'm'}: cannot be resolved"),
        ([*AVERAGE, "--out", tmp_path / "sub" / ".."], f"passes through {tmp_path / 'sub'}, which does not exist"),
    ]
    for args, line in cases:
        code, err = run_cli(capsys, *args)
        assert one_line(code, err) and line in err, (args, err)
    assert sorted(os.listdir(tmp_path)) == ["forged", "loop"] and (forged / "x.txt").read_text() == "mine"


def test_control_characters_in_a_file_name_are_shown_not_obeyed(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"image": "clear\x1b[2J\x07.png", "prompt": "colour?"}) + "\n")
    code, err = run_cli(capsys, *STATS[:-1], data, "--out", tmp_path / "s.safetensors")
    assert one_line(code, err) and "clear\\x1b[2J\\x07.png" in err, err
    assert all(c.isprintable() for c in err.rstrip("\n")), err


def test_a_full_disk_names_the_output_and_keeps_the_old_one(world, tmp_path, capsys, monkeypatch):
    from many_cli.merge import outputs as merge_outputs

    out = tmp_path / "M"
    assert run_cli(capsys, "merge", world.adapters[0], "--out", out)[0] == 0
    before = digest(out)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(merge_outputs, "write_bundle", disk_full)
    code, err = run_cli(capsys, "merge", *world.adapters[:2], "--out", out, "--force")
    assert one_line(code, err, expected=1), err
    assert f"{out}: cannot be written (No space left on device); nothing was replaced" in err, err
    assert digest(out) == before and hidden(tmp_path) == []


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="making another user's output needs root")
def test_another_users_output_in_a_sticky_folder_is_refused_before_any_work(tmp_path):
    """In /tmp only an entry's owner may replace it: refused at once, not after the work."""
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all"]
    if subprocess.run([*nobody, *console_script(), "--version"], capture_output=True).returncode != 0:
        pytest.skip("user nobody cannot run this environment's many (its Python lies in a folder only root may enter)")
    sticky = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        sticky.chmod(0o1777)
        out = sticky / "M"
        many = [*console_script(), *map(str, AVERAGE), "--out", str(out)]
        assert subprocess.run(many, capture_output=True).returncode == 0
        for path in [out, *out.rglob("*")]:
            path.chmod(0o777 if path.is_dir() else 0o666)
        before = digest(out)
        run = subprocess.run([*nobody, *many, "--force"], capture_output=True, text=True)
        assert one_line(run.returncode, run.stderr) and "it belongs to another user" in run.stderr, run.stderr
        assert digest(out) == before and sorted(os.listdir(sticky)) == ["M"]
    finally:
        shutil.rmtree(sticky)


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda: many_cli.MergeOptions(scale=10**400).check(), "--scale is too large"),
        (lambda: many_cli.MergeOptions(ridge=10**400).check(), "--ridge is too large"),
        (lambda: many_cli.StatsOptions(answer_weight=10**400).check(), "--answer-weight is too large"),
        (lambda: many_cli.InferOptions(eta=10**400).check(), "--eta is too large"),
        (lambda: many_cli.StatsOptions(batch_size=10**30).check(), "--batch-size is too large"),
        (lambda: many_cli.StatsOptions(media_dir="a\0b").check(), "--media-dir holds a NUL byte"),
        (lambda: many_cli.merge_adapters(["a\0b"], "out"), "adapters: holds a NUL byte"),
        (lambda: many_cli.merge_adapters([ADAPTER], "out", bogus=1), "bogus: is not an argument of many_cli's merge"),
        (lambda: many_cli.export_model("b", "m", "o", colour=1), "colour: is not an argument of many_cli's export"),
    ],
)
def test_the_python_api_raises_only_its_own_exceptions(call, error):
    with pytest.raises(many_cli.InputError) as raised:
        call()
    assert str(raised.value).startswith(error), raised.value


def test_a_str_where_the_api_takes_a_folder_is_a_path(tmp_path):
    for options in (many_cli.StatsOptions(media_dir=str(tmp_path)), many_cli.InferOptions(media_dir=str(tmp_path))):
        options.check()
        assert options.media_dir == tmp_path
    options = many_cli.StatsOptions(under=str(tmp_path / "merge"))
    options.check()
    assert options.under == tmp_path / "merge"
