"""A merge output is checked as a whole when it is read: bundle, state and experts agree on the
tasks, their order, their count and their widths; a resume copies nothing it has not checked."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import run_cli
from safetensors import safe_open
from safetensors.torch import load_file, save_file

BUNDLE, STATE = "many_bundle.safetensors", "many_state.safetensors"


@pytest.fixture(scope="module")
def merges(world, tmp_path_factory):
    """A merge of the world's first two tasks, and another of its first task alone."""
    from helpers import invoke

    root = tmp_path_factory.mktemp("merges")
    assert invoke("merge", *world.adapters[:2], "--out", root / "two") == 0
    assert invoke("merge", world.adapters[0], "--out", root / "one") == 0
    return root


def rewrite(path, metadata=None, tensors=None):
    with safe_open(str(path), "pt") as handle:
        saved = handle.metadata()
    values = load_file(path)
    save_file(tensors(values) if tensors else values, path, metadata={**saved, **(metadata or {})})


@pytest.mark.parametrize(
    "tasks, fault",
    [
        (["task0"], "tensors disagree"),  # fewer names than tasks
        (["task0", "task0"], "distinct task names"),
        ({"a": 1}, "distinct task names"),
        ([1, 2], "distinct task names"),
        ([], "distinct task names"),
        (["task1", "task0"], "not the files of one merge"),  # permuted: the state disagrees
        (["task0", "../../elsewhere"], "distinct task names"),  # a path, where experts are written by name
    ],
)
def test_a_bundle_whose_tasks_disagree_is_refused(merges, world, tmp_path, capsys, tasks, fault):
    merged = shutil.copytree(merges / "two", tmp_path / "merged")
    rewrite(merged / BUNDLE, {"tasks": json.dumps(tasks)})
    code, err = run_cli(capsys, "merge", world.adapters[2], "--resume", merged, "--out", tmp_path / "out")
    assert code == 2 and fault in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_a_prototype_of_another_width_is_refused(merges, world, tmp_path, capsys):
    merged = shutil.copytree(merges / "two", tmp_path / "merged")
    rewrite(merged / BUNDLE, tensors=lambda values: {**values, "prototype/1": torch.ones(3)})
    code, err = run_cli(capsys, "merge", world.adapters[2], "--resume", merged, "--out", tmp_path / "out")
    assert code == 2 and "different widths" in err and str(merged / BUNDLE) in err, err


def test_a_state_from_another_merge_is_refused(merges, world, tmp_path, capsys):
    merged = shutil.copytree(merges / "two", tmp_path / "merged")
    shutil.copy(merges / "one" / STATE, merged / STATE)
    code, err = run_cli(capsys, "merge", world.adapters[2], "--resume", merged, "--out", tmp_path / "out")
    assert code == 2 and "not the files of one merge" in err and str(merged / STATE) in err, err


def test_an_expert_that_is_not_the_states_is_not_copied(merges, world, tmp_path, capsys):
    merged = shutil.copytree(merges / "two", tmp_path / "merged")
    expert = merged / "experts" / "task1" / "adapter_model.safetensors"
    values = load_file(expert)
    key = next(key for key in values if "lora_B" in key)
    values[key] = values[key] + 1
    save_file(values, expert, metadata={"format": "pt"})
    code, err = run_cli(capsys, "merge", world.adapters[2], "--resume", merged, "--out", tmp_path / "out")
    assert code == 2 and "not this merge's expert" in err and "task1" in err, err
    shutil.rmtree(merged / "experts" / "task1")
    shutil.copytree(merges / "one" / "experts" / "task0", merged / "experts" / "task1")  # another task's
    code, err = run_cli(capsys, "merge", world.adapters[2], "--resume", merged, "--out", tmp_path / "out")
    assert code == 2 and "not this merge's expert" in err, err


def test_a_state_whose_task_names_are_paths_is_refused(merges, world, tmp_path, capsys):
    merged = shutil.copytree(merges / "two", tmp_path / "merged")
    with safe_open(str(merged / STATE), "pt") as handle:
        tasks = json.loads(handle.metadata()["tasks"])
    tasks[1]["name"] = "../../elsewhere"
    rewrite(merged / STATE, {"tasks": json.dumps(tasks)})
    rewrite(merged / BUNDLE, {"tasks": json.dumps(["task0", "../../elsewhere"])})
    code, err = run_cli(capsys, "merge", world.adapters[2], "--resume", merged, "--out", tmp_path / "out")
    assert code == 2 and "are not folder names" in err and not (tmp_path.parent / "elsewhere").exists(), err
