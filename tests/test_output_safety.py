"""Output safety: an output never destroys an input nor the current directory; a second writer
of one output is refused; a failed write leaves the old file; the same command writes the same
bytes; what an ordinary user cannot read or write is named in one line."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import console_script, digest, hidden, many_as_ordinary_user, run_cli

from many_cli import files
from many_cli.errors import OutputError


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
    stats = ["stats", "--model", world.base, "--adapter", first, "--data", data]
    cases = [
        ["merge", adapters, "--out", adapters, "--force"],  # the folder holding the inputs
        ["merge", *sorted(adapters.iterdir()), "--out", first, "--force"],  # one of the inputs
        ["merge", adapters, "--out", adapters / "merged"],  # inside the inputs' folder
        ["merge", first, "--out", tmp_path, "--force"],  # a folder that contains the inputs
        [*stats, "--out", first / "adapter_model.safetensors", "--force"],
        [*stats, "--out", data, "--force"],
        [*stats, "--out", world.base / "many_stats.safetensors"],
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


def test_a_second_writer_of_one_output_is_refused(world, tmp_path, capsys):
    out = tmp_path / "merged"
    with files.atomic_output_dir(out, force=True) as staging:  # another process, as far as flock knows
        (staging / "x").write_text("first")
        code, err = run_cli(capsys, "merge", world.adapters[0], "--out", out, "--force")
        assert code == 2 and "another many process is writing" in err, err
    assert (out / "x").read_text() == "first" and hidden(tmp_path) == []


def test_a_failed_file_write_leaves_the_old_file_and_nothing_else(tmp_path):
    out = tmp_path / "preds.jsonl"
    out.write_text("old\n")
    with pytest.raises(OutputError, match=f"{out}: cannot be written"), files.atomic_output_file(out) as partial:
        partial.write_text("half")
        raise OSError(28, "No space left on device")
    assert out.read_text() == "old\n" and hidden(tmp_path) == []


@pytest.mark.slow
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


@pytest.mark.slow
def test_what_an_ordinary_user_cannot_read_or_write_is_named_in_one_line(world, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    unreadable = shutil.copytree(world.adapters[0], tmp_path / "unreadable")
    (unreadable / "adapter_model.safetensors").chmod(0)
    data = tmp_path / "data.jsonl"
    data.write_text("{}\n")
    data.chmod(0)
    readable = tmp_path / "readable.jsonl"
    readable.write_text("{}\n")
    base = shutil.copytree(world.base, tmp_path / "base")
    (base / "model.safetensors").chmod(0)
    stats = ["stats", "--data", readable, "--out", tmp_path / "s.safetensors"]
    cases = [
        (
            [*stats, "--model", world.base, "--adapter", unreadable],
            "adapter_model.safetensors: cannot be read (Permission denied)",
        ),
        (
            [*stats, "--model", base, "--adapter", world.adapters[0]],
            "base/model.safetensors: cannot be read (Permission denied)",
        ),
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


@pytest.mark.slow
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


def _image(path: Path) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path)
    return path


def test_no_file_the_records_lead_to_is_ever_an_output_even_with_force(world, tmp_path, capsys):
    """Every media file the records name, the annotation files and dataset_info.json followed, under
    whatever --media-dir: refused as an --out, with --force or without (never suggesting it)."""
    data = tmp_path / "d"
    calibration = _image(data / "calibration" / "000.png")
    evaluation = _image(data / "evaluation" / "047.png")
    media = _image(tmp_path / "media" / "m.png")
    (data / "many.jsonl").write_text(
        '{"image": "calibration/000.png", "prompt": "colour?"}\n{"image": "evaluation/047.png", "prompt": "x"}\n'
    )
    (data / "media.jsonl").write_text('{"image": "m.png", "prompt": "colour?"}\n')
    (data / "train.json").write_text(
        '[{"conversations": [{"from": "human", "value": "<image>colour?"}, {"from": "gpt", "value": "red"}], '
        '"images": ["calibration/000.png"]}]'
    )
    (data / "dataset_info.json").write_text('{"colours": {"file_name": "train.json", "formatting": "sharegpt"}}')
    (data / "annotation.jsonl").write_text(
        '{"image": "047.png", "conversations": [{"from": "human", "value": "<image>x"}]}\n'
    )
    (data / "meta.json").write_text('{"eval": {"root": "evaluation", "annotation": "annotation.jsonl"}}')
    stats = ["stats", "--model", world.base, "--adapter", world.adapters[0]]
    infer = ["infer", "--model", world.base, "--merged", world.adapters[0]]
    cases = [
        ([*stats, "--data", data / "many.jsonl", "--out", calibration], calibration),
        ([*infer, "--data", data / "many.jsonl", "--out", evaluation], evaluation),
        ([*stats, "--data", f"{data}/dataset_info.json:colours", "--out", calibration], calibration),
        ([*stats, "--data", f"{data}/dataset_info.json:colours", "--out", data / "dataset_info.json"], None),
        ([*stats, "--data", f"{data}/dataset_info.json:colours", "--out", data / "train.json"], None),
        ([*infer, "--data", data / "meta.json", "--out", data / "annotation.jsonl"], None),
        ([*infer, "--data", data / "meta.json", "--out", evaluation], evaluation),
        ([*stats, "--data", data / "media.jsonl", "--media-dir", media.parent, "--out", media], media),
    ]
    before = digest(tmp_path)
    for args, _ in cases:
        for force in ([], ["--force"]):
            code, err = run_cli(capsys, *args, *force)
            assert code == 2 and "would overwrite the input" in err and "--force" not in err, (args, err)
            assert err.count("\n") == 1, err
    assert digest(tmp_path) == before


def test_force_replaces_only_an_empty_folder_or_many_own_output(world, tmp_path, capsys, monkeypatch):
    home = tmp_path / "home"
    (home / "Documents").mkdir(parents=True)
    (home / "Documents" / "thesis.txt").write_text("four years")
    (home / "Documents" / "zz.txt").write_text("more")
    monkeypatch.setenv("HOME", str(home))
    adapter = world.adapters[0]
    code, err = run_cli(capsys, "merge", adapter, "--out", home, "--force")
    assert code == 2 and f"holds {home / 'Documents'}, which many did not write" in err, err
    assert (home / "Documents" / "thesis.txt").read_text() == "four years"

    out = tmp_path / "merged"
    out.mkdir()  # an empty folder: replaced
    assert run_cli(capsys, "merge", adapter, "--out", out, "--force")[0] == 0
    first = digest(out)
    assert run_cli(capsys, "merge", adapter, "--out", out, "--force")[0] == 0  # many's own output
    assert digest(out) == first
    (out / "experts" / "mine.txt").parent.mkdir(exist_ok=True)
    (out / "experts" / "mine.txt").write_text("a note of mine")
    code, err = run_cli(capsys, "merge", adapter, "--out", out, "--force")
    assert code == 2 and f"holds {out / 'experts' / 'mine.txt'}, which many did not write" in err, err
    (out / "experts" / "mine.txt").unlink()
    (out / "README.md").write_text("my own card")  # a file many wrote, changed since
    code, err = run_cli(capsys, "merge", adapter, "--out", out, "--force")
    assert code == 2 and f"holds {out / 'README.md'} (changed since)" in err, err
    assert (out / "README.md").read_text() == "my own card"
    # Every folder output (merge, export, report, convert, demo) is written by atomic_output_dir.
    stranger = tmp_path / "stranger"
    (stranger / "sub").mkdir(parents=True)
    (stranger / "sub" / "a.txt").write_text("x")
    for own in (None, lambda path: True):
        with pytest.raises(files.InputError, match="sub, which many did not write"):
            with files.atomic_output_dir(stranger, force=True, is_own_output=own):
                pass
    assert (stranger / "sub" / "a.txt").read_text() == "x"


def test_force_keeps_what_appeared_in_the_output_while_the_new_one_was_written(world, tmp_path, capsys, monkeypatch):
    """The folder is checked again at the swap: a note saved into the old output meanwhile (a 7B
    merge leaves minutes for it) refuses the run, and the old output and the note stay."""
    from many_cli.merge import outputs as merge_outputs

    out = tmp_path / "M"
    assert run_cli(capsys, "merge", world.adapters[0], "--out", out)[0] == 0
    before = digest(out)
    write_bundle = merge_outputs.write_bundle

    def bundle_then_a_user_note(*args, **kwargs):
        write_bundle(*args, **kwargs)
        (out / "notes.txt").write_text("notes")

    monkeypatch.setattr(merge_outputs, "write_bundle", bundle_then_a_user_note)
    code, err = run_cli(capsys, "merge", *world.adapters[:2], "--out", out, "--force")
    assert code == 2 and f"{out / 'notes.txt'} appeared in it while many was writing" in err, err
    assert err.count("\n") == 1 and (out / "notes.txt").read_text() == "notes"
    assert {name: sha for name, sha in digest(out).items() if name != "notes.txt"} == before
    assert hidden(tmp_path) == []
    # A folder made at the output's name meanwhile is the user's too.
    fresh = tmp_path / "fresh"
    with pytest.raises(files.InputError, match="appeared in it while many was writing"):
        with files.atomic_output_dir(fresh, force=False) as staging:
            (staging / "x").write_text("new")
            fresh.mkdir()
            (fresh / "mine.txt").write_text("mine")
    assert os.listdir(fresh) == ["mine.txt"] and hidden(tmp_path) == []


def test_nothing_beside_an_output_is_removed_unless_many_marked_it(world, tmp_path, capsys):
    """Hidden siblings named as many names its staging copies are removed only when they carry
    many's own mark, whether the run is refused or succeeds."""
    out = tmp_path / "X"
    out.mkdir()
    (out / "own.txt").write_text("m")
    siblings = {
        ".X.many-old/a": "t",
        ".X.many-partial-mine/b": "u",
        ".X.many-partial-file": "v",
        ".S.many-old/a": "w",
        ".S.many-partial-1234": "x",
    }
    for name, text in siblings.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)

    def kept() -> bool:
        return all((tmp_path / name).read_text() == text for name, text in siblings.items())

    code, err = run_cli(capsys, "merge", world.adapters[0], "--out", out)
    assert code == 2 and "own.txt" in err and kept() and (out / "own.txt").read_text() == "m"
    (out / "own.txt").unlink()
    assert run_cli(capsys, "merge", world.adapters[0], "--out", out, "--force")[0] == 0
    assert kept() and (out / "adapter_model.safetensors").is_file()
    stats = tmp_path / "S"
    for _ in range(2):  # written, then replaced
        with files.atomic_output_file(stats) as partial:
            partial.write_text("new")
    assert kept() and stats.read_text() == "new"
    assert hidden(tmp_path) == sorted({name.split("/")[0] for name in siblings})


def test_a_merge_is_read_as_one_whole(world, tmp_path, capsys, monkeypatch):
    """Another merge's LoRA copied into a merge folder, or a merge replaced while it is read, is
    refused in one line: a reader never answers with one merge's bundle and another's LoRA."""
    from many_cli.infer import load as infer_load

    first, second = tmp_path / "A", tmp_path / "B"
    assert run_cli(capsys, "merge", world.adapters[0], "--out", first)[0] == 0
    assert run_cli(capsys, "merge", *world.adapters[:2], "--out", second)[0] == 0
    mixed = shutil.copytree(first, tmp_path / "mixed")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        shutil.copy(second / name, mixed / name)
    infer = ["infer", "--model", world.base, "--prompt", "hi", "--max-new-tokens", "1"]
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "hello"}\n')
    cases = [
        [*infer, "--merged", mixed],
        ["export", "--model", world.base, "--merged", mixed, "--out", tmp_path / "exported"],
        ["stats", "--model", world.base, "--adapter", world.adapters[0], "--data", data, "--under", mixed],
    ]
    for args in cases:
        code, err = run_cli(capsys, *args)
        assert code == 2 and err.count("\n") == 1, err
        assert f"{mixed / 'adapter_config.json'}: is not the file this merge wrote" in err, err
    assert not (tmp_path / "exported").exists()

    load_base_model = infer_load.load_base_model

    def loaded_while_the_merge_is_replaced(*args, **kwargs):
        model = load_base_model(*args, **kwargs)
        shutil.rmtree(first)
        shutil.copytree(second, first)
        return model

    monkeypatch.setattr(infer_load, "load_base_model", loaded_while_the_merge_is_replaced)
    code, err = run_cli(capsys, *infer, "--merged", first)
    assert code == 2 and f"{first}: was replaced while it was being read" in err and err.count("\n") == 1, err
