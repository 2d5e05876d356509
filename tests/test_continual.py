"""The synthetic world, the shipped sample, `many demo`, and the continual benchmark in its
reduced CI form (one seed, the blank base, few steps, no sweeps)."""

from __future__ import annotations

import random
import re
import shlex
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_cli_output

from many_cli.bench.continual import (
    BASELINES,
    CPM,
    ETA,
    EXPERTS,
    EXPERTS_SOFT,
    JOINT,
    LEAD_UNDER,
    LPM,
    MANY,
    MANY_HARD,
    MANY_SOFT,
    REFINEMENTS,
    REGMEAN,
    REGMEAN_CPM,
    SEQUENTIAL,
    SYSTEMS,
    UPPER,
    ContinualOptions,
    markdown,
    run_world,
)
from many_cli.bench.training import TrainOptions
from many_cli.bench.world import TASKS
from many_cli.formats import read_records
from many_cli.merge import DEFAULT_ETA, DEFAULT_RIDGE
from many_cli.models import load_base_model
from many_cli.options import Placement

SAMPLE = Path(__file__).resolve().parent.parent / "sample_adapters"


def test_world_images_are_a_function_of_the_seed_and_tasks_look_apart():
    for task in TASKS:
        first, again = task.example(random.Random(7)), task.example(random.Random(7))
        assert np.array_equal(np.asarray(first.image), np.asarray(again.image)) and first.answer == again.answer
    # Tasks are told apart by their pictures: the mean colour of every task's images differs.
    means = [
        np.mean(
            [np.asarray(task.example(random.Random(seed)).image, dtype=float).mean(axis=(0, 1)) for seed in range(20)],
            axis=0,
        )
        for task in TASKS
    ]
    gaps = [np.abs(means[i] - means[j]).max() for i in range(len(TASKS)) for j in range(i + 1, len(TASKS))]
    assert min(gaps) > 20


def test_sample_is_small_and_complete():
    size = sum(path.stat().st_size for path in SAMPLE.rglob("*") if path.is_file())
    assert size < 20e6
    assert (SAMPLE / "base" / "chat_template.jinja").is_file() or "chat_template" in (
        SAMPLE / "base" / "processor_config.json"
    ).read_text() + (SAMPLE / "base" / "tokenizer_config.json").read_text()
    for task in TASKS:
        assert (SAMPLE / "adapters" / task.name / "adapter_model.safetensors").is_file()
        for split in ("calibration", "evaluation"):
            assert len(list(read_records(SAMPLE / "data" / task.name / f"{split}.jsonl"))) >= 32


def _greedy_accuracy(model, processor, jsonl: Path) -> float:
    from many_cli.data import encode_records, load_image

    records = list(read_records(jsonl))
    processor.tokenizer.padding_side = "left"
    encoded = encode_records(
        processor, records, [load_image(record.source, record.image) for record in records], with_answers=False
    )
    with torch.inference_mode():
        logits = model(**encoded).logits[:, -1]
    words = processor.tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())
    return statistics.fmean(word == record.answer for word, record in zip(words, records))


def test_shipped_adapters_know_their_task_and_the_base_does_not():
    """Independent of `many infer`: the first answer word by one forward pass."""
    from peft import PeftModel
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(SAMPLE / "base")
    base = load_base_model(str(SAMPLE / "base"), torch.device("cpu"), Placement(dtype="float32"))
    for task in TASKS:
        data = SAMPLE / "data" / task.name / "evaluation.jsonl"
        assert _greedy_accuracy(base, processor, data) <= 0.5
    for task in TASKS:
        data = SAMPLE / "data" / task.name / "evaluation.jsonl"
        model = PeftModel.from_pretrained(
            load_base_model(str(SAMPLE / "base"), torch.device("cpu"), Placement(dtype="float32")),
            str(SAMPLE / "adapters" / task.name),
        ).eval()
        assert _greedy_accuracy(model, processor, data) >= 0.85, task.name


def test_demo_merges_the_sample_and_routes_every_task(capsys, tmp_path, monkeypatch):
    """Run from an empty folder, with no --sample: the sample that ships with many."""
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli_output(capsys, "demo")
    assert code == 0, err
    assert f"--model {SAMPLE.resolve() / 'base'}" in err, err
    assert (tmp_path / "many-demo" / "merged" / "adapter_model.safetensors").is_file()
    assert not list(SAMPLE.rglob("many_stats.safetensors"))  # the sample stays as shipped
    rows = [line for line in out.splitlines() if "evaluation/" in line]
    assert len(rows) == len(TASKS)
    for row in rows:  # each image, from its task's evaluation folder, is routed to that task
        image_task = re.search(r"data/(\w+)/evaluation/", row)[1]
        assert re.search(r"routed to (\w+),", row)[1] == image_task, row
    assert sorted(re.search(r"data/(\w+)/", row)[1] for row in rows) == sorted(task.name for task in TASKS)
    # each `many infer` line it prints runs as it is and answers as the demo did
    commands = [line.removeprefix("$ ") for line in err.splitlines() if line.startswith("$ many infer ")]
    assert len(commands) == len(TASKS)
    for command, row in zip(commands, rows):
        code, printed, failed = run_cli_output(capsys, *shlex.split(command)[1:])
        assert code == 0, failed
        assert f"-> {printed.strip()!r}" in row, (printed, row)


def test_demo_replaces_only_its_own_untouched_output(capsys, tmp_path):
    """The README's first command runs twice in a row; a folder of the user's is never emptied."""
    out = tmp_path / "demo"
    assert run_cli_output(capsys, "demo", "--sample", SAMPLE, "--out", out)[0] == 0
    first = {path.relative_to(out): path.read_bytes() for path in out.rglob("*") if path.is_file()}
    assert run_cli_output(capsys, "demo", "--sample", SAMPLE, "--out", out)[0] == 0  # its own output
    assert {path.relative_to(out): path.read_bytes() for path in out.rglob("*") if path.is_file()} == first
    for change in (
        lambda: (out / "thesis.txt").write_text("years of work"),
        lambda: (out / "merged" / "notes").mkdir(),
        lambda: (out / "merged" / "README.md").write_text("my own card"),
    ):
        change()
        kept = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
        code, _, err = run_cli_output(capsys, "demo", "--sample", SAMPLE, "--out", out)
        assert code == 2 and "--force" in err and err.count("\n") == 1, err
        assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == kept
    user = tmp_path / "mine"
    user.mkdir()
    (user / "thesis.txt").write_text("years of work")
    code, _, err = run_cli_output(capsys, "demo", "--sample", SAMPLE, "--out", user)
    assert code == 2 and (user / "thesis.txt").read_text() == "years of work"


@pytest.fixture(scope="module")
def reduced_run(tmp_path_factory):
    # One point per sweep, at the defaults where a second path can check it.
    options = ContinualOptions(
        seeds=(0,),
        bases=("blank",),
        orders=("forward",),
        train=TrainOptions(task_steps=150),
        calibration=16,
        evaluation=24,
        ridges=(DEFAULT_RIDGE,),
        etas=(DEFAULT_ETA,),
        calibration_sizes=(16,),
        ranks=(32,),
        alphas=(1.0,),
        answer_weights=(1.0,),
    )
    [run] = run_world(tmp_path_factory.mktemp("continual"), "blank", 0, options)
    return run, options


@pytest.mark.slow
def test_reduced_continual_benchmark_keeps_its_ordering(reduced_run):
    run, _ = reduced_run
    upper = run.faa(UPPER)
    assert upper >= 0.8  # the tasks are learnable
    assert run.forgetting(SEQUENTIAL) >= 0.5  # and conflict: fine-tuning on later tasks forgets
    assert statistics.fmean(run.prototype_routing.values()) >= 0.9  # and look apart to the prototypes
    # The nearest calibration image routes at least as well, and the defaults that follow it are
    # at least as good as the paper's soft routing, in the merged model and in routed experts.
    assert statistics.fmean(run.routing.values()) >= statistics.fmean(run.prototype_routing.values())
    assert run.faa(MANY) >= max(run.faa(MANY_SOFT), run.faa(MANY_HARD))
    assert run.faa(EXPERTS) >= run.faa(EXPERTS_SOFT)
    for system in (SEQUENTIAL, LPM, CPM, *BASELINES.values(), REGMEAN, REGMEAN_CPM):
        assert run.faa(MANY) > run.faa(system), system
    # The other ceiling, one model of the merged rank trained on every task at once, holds them all
    # and at least what the merge keeps; its rows are one step over every task.
    assert run.faa(JOINT) >= 0.8 and run.faa(JOINT) >= run.faa(MANY)
    assert [len(step) for step in run.steps[JOINT]] == [len(TASKS) * 24]
    assert run.faa(EXPERTS) >= run.faa(MANY) - 0.01
    # Accuracy after a step is over the tasks seen so far, and only those, read from the rows by
    # `many report`: its final average accuracy is the mean over tasks of the rows' correctness.
    assert [len({row["task"] for row in step}) for step in run.steps[MANY]] == list(range(1, len(TASKS) + 1))
    by_task = {}
    for row in run.steps[MANY][-1]:
        by_task.setdefault(row["task"], []).append(row["prediction"].strip().lower() == row["answer"].lower())
    assert run.faa(MANY) == pytest.approx(statistics.fmean(statistics.fmean(marks) for marks in by_task.values()))


@pytest.mark.slow
def test_sweeps_at_the_defaults_repeat_the_main_run(reduced_run):
    run, _ = reduced_run
    # A fresh merge at the default ridge and fresh stats over all 16 calibration records
    # (--max-samples 16) merged in one batch are MAny; the final merge read with soft routing at
    # the default η is MAny as the paper routes.
    assert run.sweeps[("ridge", DEFAULT_RIDGE)] == pytest.approx(run.faa(MANY))
    assert run.sweeps[(ETA, DEFAULT_ETA)] == pytest.approx(run.faa(MANY_SOFT))
    assert run.sweeps[("calibration", 16)] == pytest.approx(run.faa(MANY))
    # A rank budget of Σ r_i (four rank-8 adapters) is exact: zero-padded, the same answers.
    assert run.sweeps[("rank", 32)] == pytest.approx(run.faa(MANY))
    # α = 1 is LPM's own least squares; answer weight 1 counts every token as `many stats` does.
    assert run.sweeps[("alpha", 1.0)] == pytest.approx(run.faa(MANY))
    assert run.sweeps[("answer weight", 1.0)] == pytest.approx(run.faa(MANY))


def test_sample_data_is_what_the_world_writes(tmp_path):
    """The shipped calibration and evaluation sets regenerate byte for byte (the weights take a
    minute to retrain, so CI checks the data only)."""
    from many_cli.bench.sample import CALIBRATION, EVALUATION, SEED
    from many_cli.bench.world import write_split

    for task in TASKS:
        for split, count in (("calibration", CALIBRATION), ("evaluation", EVALUATION)):
            written = write_split(tmp_path / task.name, task, split, count, SEED)
            shipped = SAMPLE / "data" / task.name / f"{split}.jsonl"
            assert written.read_bytes() == shipped.read_bytes()
            for image in (tmp_path / task.name / split).iterdir():
                assert image.read_bytes() == (shipped.parent / split / image.name).read_bytes()


@pytest.mark.slow
def test_markdown_table_agrees_with_the_runs(reduced_run):
    run, options = reduced_run
    table = markdown([run], options)
    for system in SYSTEMS:
        row = next(
            line
            for line in table.splitlines()
            if line.startswith(f"| {system} |") or line.startswith(f"| **{system}** |")
        )
        cells = [cell.strip("* ") for cell in row.strip("|").split("|")]
        tasks = [float(cell) for cell in cells[1 : 1 + len(TASKS)]]
        assert tasks == [round(100 * run.final(system)[task.name], 1) for task in TASKS]
        assert float(cells[1 + len(TASKS)]) == pytest.approx(statistics.fmean(tasks), abs=0.06)
    routing = next(line for line in table.splitlines() if line.startswith("| routing accuracy"))
    cells = [float(cell) for cell in routing.strip("|").split("|")[1 : 1 + len(TASKS)]]
    assert cells == [round(100 * run.routing[task.name], 1) for task in TASKS]
    # MAny's worst forgetting, worked out from its rows: per task, its best accuracy before the
    # last step minus its final one, the largest over the tasks learned before the last step.
    accuracy = [
        {task.name: statistics.fmean(r["correct"] for r in rows if r["task"] == task.name) for task in TASKS[:k]}
        for k, rows in enumerate(run.steps[MANY], start=1)
    ]
    worst = max(max(step[t.name] for step in accuracy[i:-1]) - accuracy[-1][t.name] for i, t in enumerate(TASKS[:-1]))
    row = next(line for line in table.splitlines() if line.startswith(f"| **{MANY}** |"))
    assert float(row.strip("|").split("|")[3 + len(TASKS)].strip("* ")) == round(100 * worst, 1)
    # The refined merge re-takes every task seen so far, REFINEMENTS times, after the new task's pass.
    row = next(
        line for line in table.splitlines() if line.startswith(f"| {LEAD_UNDER} |") and "(" in line.split("|")[2]
    )
    passes = [1 + REFINEMENTS * step for step in range(1, len(TASKS) + 1)]
    assert row.split("|")[2].strip() == f"{statistics.fmean(passes):g} ({passes[-1]})"


def test_demo_on_a_broken_sample_says_so_and_leaves_nothing(capsys, tmp_path):
    sample = shutil.copytree(SAMPLE, tmp_path / "sample")
    (sample / "adapters" / "3_shape" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    code, _, err = run_cli_output(capsys, "demo", "--sample", sample, "--out", tmp_path / "demo")
    errors = [line for line in err.splitlines() if line.startswith("many: error:")]  # beside the $ command lines
    assert code == 2 and len(errors) == 1 and str(sample / "adapters" / "3_shape") in errors[0]
    assert not (tmp_path / "demo").exists()
    assert not list(tmp_path.glob(".demo*"))  # no staging folder left either
