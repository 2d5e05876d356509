"""The README's quickstart, each tool's block run as written, on two of the sample's tasks laid out
as LLaMA-Factory, ms-swift and a PEFT script lay out their adapters and data. The three layouts
hold the same adapters and the same records, so they must give the same merge and the same
answers; the report must say what the prediction rows say."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # three runs of five `many` processes

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample_adapters"
TASKS = {"colour": "1_colour", "count": "2_count"}  # the quickstart's name -> the sample's task
RECORDS = 8  # of each split, enough to merge and score
SWIFT_RUNS = {"colour": "v0-20261201-090000", "count": "v0-20261202-090000"}
ROLE_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}


def _block(tool: str) -> str:
    readme = (ROOT / "README.md").read_text()
    return re.search(rf"<!-- quickstart: {tool} -->\n```bash\n(.*?)```", readme, re.S).group(1)


def _records(task: str, split: str) -> list[dict]:
    lines = (SAMPLE / "data" / TASKS[task] / f"{split}.jsonl").read_text().splitlines()[:RECORDS]
    return [json.loads(line) for line in lines]


def _conversation(record: dict, image: str) -> dict:
    """A record as LLaMA-Factory's sharegpt entries and ms-swift's JSONL write one."""
    return {
        "messages": [
            {"role": "user", "content": f"<image>{record['prompt']}"},
            {"role": "assistant", "content": record["answer"]},
        ],
        "images": [image],
    }


def _copy_images(task: str, split: str, folder: Path) -> None:
    for record in _records(task, split):
        target = folder / record["image"]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(SAMPLE / "data" / TASKS[task] / record["image"], target)


def _lay_out(tool: str, work: Path) -> None:
    splits = {"train": "calibration", "test": "evaluation"}
    for task, sample_task in TASKS.items():
        adapter = SAMPLE / "adapters" / sample_task
        if tool == "llamafactory":  # output_dir saves/TASK: the final adapter, its checkpoints beside
            shutil.copytree(adapter, work / "saves" / task)
            shutil.copytree(adapter, work / "saves" / task / "checkpoint-20")
            info_path = work / "data" / "dataset_info.json"
            info = json.loads(info_path.read_text()) if info_path.exists() else {}
            for split, sample_split in splits.items():
                _copy_images(task, sample_split, work / "data" / task)
                entries = [_conversation(r, f"{task}/{r['image']}") for r in _records(task, sample_split)]
                (work / "data" / f"{task}_{split}.json").write_text(json.dumps(entries))
                info[f"{task}_{split}"] = {
                    "file_name": f"{task}_{split}.json",
                    "formatting": "sharegpt",
                    "columns": {"messages": "messages", "images": "images"},
                    "tags": ROLE_TAGS,
                }
            info_path.write_text(json.dumps(info, indent=2))
        elif tool == "ms-swift":  # --output_dir output/TASK: vN-TIMESTAMP/checkpoint-N per run
            run = work / "output" / task / SWIFT_RUNS[task]
            shutil.copytree(adapter, run / "checkpoint-40")
            (run / "args.json").write_text(json.dumps({"model": "BASE", "train_type": "lora"}))
            for split, sample_split in splits.items():
                _copy_images(task, sample_split, work / "images" / task)
                rows = [_conversation(r, f"images/{task}/{r['image']}") for r in _records(task, sample_split)]
                (work / f"{task}_{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        else:  # a PEFT script: save_pretrained folders, many's JSONL
            shutil.copytree(adapter, work / "adapters" / task)
            for split, sample_split in splits.items():
                _copy_images(task, sample_split, work / "data" / task)
                rows = [{key: r[key] for key in ("image", "prompt", "answer")} for r in _records(task, sample_split)]
                (work / "data" / task / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    environment = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "BASE": str(SAMPLE / "base"),
        "TEMPLATE": "base",  # the sample's adapters trained on the base's own chat template
    }
    works = {}
    for tool in ("llamafactory", "ms-swift", "peft"):  # one after another, as a user runs them
        works[tool] = tmp_path_factory.mktemp(tool)
        _lay_out(tool, works[tool])
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", _block(tool)],
            cwd=works[tool],
            env=environment,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, (tool, done.stderr[-3000:])
    return works


@pytest.mark.parametrize("tool", ["llamafactory", "ms-swift", "peft"])
def test_each_quickstart_reports_what_its_rows_say(runs, tool):
    work = runs[tool]
    report = json.loads((work / "report" / "report.json").read_text())
    assert report["tasks"] == list(TASKS)
    rows = [json.loads(line) for line in (work / "step.jsonl").read_text().splitlines()]
    assert [row["task"] for row in rows] == [task for task in TASKS for _ in range(RECORDS)]
    for index, task in enumerate(TASKS):
        mine = [row for row in rows if row["task"] == task]
        expected = [r["answer"] for r in _records(task, "evaluation")]
        assert [row["answer"] for row in mine] == expected
        right = sum(row["prediction"].strip().lower() == answer for row, answer in zip(mine, expected))
        assert report["accuracy_matrix"][0][index] == pytest.approx(right / RECORDS)
    assert report["final_average_accuracy"] > 0.5  # the sample's merged model answers most of both tasks


def test_the_three_layouts_merge_and_answer_alike(runs):
    """Same adapters, same records: the same merged LoRA and the same answers, whichever tool's
    layout they came in."""
    from safetensors.torch import load_file

    merged = {tool: load_file(work / "merged" / "adapter_model.safetensors") for tool, work in runs.items()}
    answers = {
        tool: [json.loads(line)["prediction"] for line in (work / "step.jsonl").read_text().splitlines()]
        for tool, work in runs.items()
    }
    assert answers["llamafactory"] == answers["ms-swift"] == answers["peft"]
    # The same tensors to float32 rounding: bit for bit almost always, but one full run of the
    # suite (2026-12-07) gave one layout's statistics 1e-5 (relative) apart, the same records
    # read; an open reproducibility bug (CONTRIBUTING, Reliability), not a layout's.
    for tool in ("ms-swift", "peft"):
        assert merged[tool].keys() == merged["llamafactory"].keys()
        for key, tensor in merged["llamafactory"].items():
            torch.testing.assert_close(merged[tool][key], tensor, rtol=1e-3, atol=1e-3)
