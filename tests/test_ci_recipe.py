"""The README's CI job after each fine-tune, run as written on the sample with three of its tasks
arriving one at a time; the report's numbers are checked against the prediction rows, and the
upper bounds against PEFT's own model."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from many_cli.bench.world import TASKS

pytestmark = pytest.mark.slow  # the CI job as written: the full suite runs it

ROOT = Path(__file__).resolve().parent.parent
EVALUATED = 12  # records per task scored at each step
STEPS = 3  # enough for forgetting and backward transfer; each step is five `many` processes
SAMPLE = ROOT / "sample_adapters"


def _block(kind: str) -> str:
    readme = (ROOT / "README.md").read_text()
    return re.search(rf"<!-- recipe: {kind} -->\n```\w+\n(.*?)```", readme, re.S).group(1)


def test_the_github_actions_job_runs_the_same_commands():
    job = yaml.safe_load(_block("github-actions"))
    runs = [step["run"] for step in job["jobs"]["merge-and-report"]["steps"] if "stats" in step.get("run", "")]
    assert runs == [_block("shell")]
    env = job["jobs"]["merge-and-report"]["env"]
    assert set(env) == {"BASE", "TASK", "STEP", "PREVIOUS_STEP", "SEEN", "ONE_PASS", "MANY_WHEEL"}
    installs = [
        step["run"] for step in job["jobs"]["merge-and-report"]["steps"] if "pip install" in step.get("run", "")
    ]
    assert installs == ['pip install "$MANY_WHEEL"'] and env["MANY_WHEEL"].endswith("-py3-none-any.whl")


def _words(text: str) -> str:
    return " ".join(text.lower().split())


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
    """The shell recipe, run once per task in a folder laid out as the README says."""
    work = tmp_path_factory.mktemp("continual")
    shutil.copytree(SAMPLE / "adapters", work / "adapters")
    names = [task.name for task in TASKS[:STEPS]]
    for task in names:  # the sample's data, the first 12 evaluation records of each task
        shutil.copytree(SAMPLE / "data" / task, work / "data" / task)
        evaluation = work / "data" / task / "evaluation.jsonl"
        evaluation.write_text("".join(evaluation.read_text().splitlines(keepends=True)[:EVALUATED]))
    environment = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "BASE": str(SAMPLE / "base"),
    }
    for step, task in enumerate(names, start=1):
        environment |= {
            "TASK": task,
            "STEP": f"{step:02d}",
            "PREVIOUS_STEP": f"{step - 1:02d}" if step > 1 else "",
            "SEEN": " ".join(names[:step]),
        }
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", _block("shell")],
            cwd=work,
            env=environment,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    return work, names


def test_the_recipe_reports_what_the_rows_say(recipe_run):
    work, names = recipe_run
    report = json.loads((work / "report" / "report.json").read_text())
    assert report["tasks"] == names
    for step, row in enumerate(report["accuracy_matrix"], start=1):
        rows = [json.loads(line) for line in (work / "predictions" / f"{step:02d}.jsonl").read_text().splitlines()]
        assert {tuple(r["merge"]["tasks"]) for r in rows} == {tuple(names[:step])}  # the resumed merge of the step
        for index, task in enumerate(names):
            mine = [r for r in rows if r["task"] == task]
            if index >= step:
                assert not mine and row[index] is None
                continue
            assert all(r["correct"] == (_words(r["prediction"]) == _words(r["answer"])) for r in mine)
            assert row[index] == pytest.approx(
                sum(_words(r["prediction"]) == _words(r["answer"]) for r in mine) / len(mine)
            )
    matrix = report["accuracy_matrix"]
    final = matrix[-1]
    assert report["final_average_accuracy"] == pytest.approx(sum(final) / len(final))
    for index, task in enumerate(names[:-1]):
        best = max(matrix[step][index] for step in range(index, len(names) - 1))
        assert report["forgetting"][task] == pytest.approx(best - final[index])
    assert report["backward_transfer"] == pytest.approx(
        sum(final[index] - matrix[index][index] for index in range(len(names) - 1)) / (len(names) - 1)
    )
    assert (work / "report" / "index.html").stat().st_size > 10_000
    assert f"| {STEPS} |" in (work / "report" / "report.md").read_text()


def test_each_upper_bound_is_the_adapter_alone_as_peft_loads_it(recipe_run):
    """`infer --adapter` against PeftModel with the adapter's own projector, on inputs built as
    transformers' documentation builds them (none of many's readers or encoders): the first
    answer word of one forward pass (the sample's answers are one word)."""
    import torch
    from peft import PeftModel
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    work, names = recipe_run
    report = json.loads((work / "report" / "report.json").read_text())
    processor = AutoProcessor.from_pretrained(SAMPLE / "base")
    processor.tokenizer.padding_side = "left"
    for task in names:
        folder = work / "data" / task
        records = [json.loads(line) for line in (folder / "evaluation.jsonl").read_text().splitlines()]
        model = PeftModel.from_pretrained(
            LlavaForConditionalGeneration.from_pretrained(SAMPLE / "base", dtype=torch.float32),
            str(SAMPLE / "adapters" / task),
        ).eval()
        texts = [
            processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["prompt"]}]}],
                add_generation_prompt=True,
            )
            for r in records
        ]
        images = [[Image.open(folder / r["image"]).convert("RGB")] for r in records]
        encoded = processor(text=texts, images=images, padding=True, return_tensors="pt")
        with torch.inference_mode():
            words = processor.tokenizer.convert_ids_to_tokens(model(**encoded).logits[:, -1].argmax(-1).tolist())
        rows = [json.loads(line) for line in (work / "upper" / f"{task}.jsonl").read_text().splitlines()]
        assert [r["prediction"].split()[0] for r in rows] == words
        assert {r["adapter"]["tasks"][0] for r in rows} == {r["lm"] for r in rows} == {task}
        assert report["upper_accuracy"][task] == pytest.approx(
            sum(w == r["answer"] for w, r in zip(words, records)) / len(records)
        )
