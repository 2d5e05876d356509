"""Training data as the tools write it: the same records in LLaVA's JSON, LLaMA-Factory's sharegpt
(both tag styles) and alpaca, and ms-swift's JSONL read as many's own JSONL does, give the same
statistics; no media a record names is ever dropped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import run_cli, stats_covariances
from many_cli.data import BadRecord, read_records

SAMPLE = Path(__file__).parent.parent / "sample_adapters"
CALIBRATION = SAMPLE / "data" / "1_colour" / "calibration.jsonl"


def own_records(count: int = 6) -> list[dict]:
    rows = [json.loads(line) for line in CALIBRATION.read_text().splitlines()[:count]]
    return [{**row, "image": str(CALIBRATION.parent / row["image"])} for row in rows]


def in_format(name: str, row: dict) -> dict:
    """One many record as each tool writes it (their documented examples' fields)."""
    image, prompt, answer = row["image"], row["prompt"], row["answer"]
    return {
        "llava": {"id": "0", "image": image, "conversations": [
            {"from": "human", "value": f"<image>\n{prompt}"}, {"from": "gpt", "value": answer}]},
        "sharegpt": {"conversations": [{"from": "human", "value": f"<image>{prompt}"},
                                       {"from": "gpt", "value": answer}], "images": [image]},
        "sharegpt-messages": {"messages": [{"role": "user", "content": f"<image>{prompt}"},
                                           {"role": "assistant", "content": answer}], "images": [image]},
        "alpaca": {"instruction": prompt, "input": "", "output": answer, "images": [image]},
        "swift": {"messages": [{"role": "user", "content": f"<image>{prompt}"},
                               {"role": "assistant", "content": answer}], "images": [{"path": image}]},
    }[name]


FORMATS = {"llava": ".json", "sharegpt": ".json", "sharegpt-messages": ".json", "alpaca": ".json", "swift": ".jsonl"}


def write(path: Path, entries: list[dict]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(entry) + "\n" for entry in entries))
    else:
        path.write_text(json.dumps(entries))
    return path


@pytest.mark.parametrize("name", FORMATS)
def test_each_format_reads_as_the_same_records(name, tmp_path):
    rows = own_records()
    path = write(tmp_path / f"{name}{FORMATS[name]}", [in_format(name, row) for row in rows])
    records = list(read_records(path))
    assert not [record for record in records if isinstance(record, BadRecord)], records
    assert [(str(r.image), r.prompt, r.answer) for r in records] == [(row["image"], row["prompt"], row["answer"])
                                                                      for row in rows]


def test_sharegpt_statistics_equal_many_jsonl_statistics(tmp_path, capsys):
    import shutil

    rows = own_records()
    own = write(tmp_path / "own.jsonl", rows)
    sharegpt = write(tmp_path / "sharegpt.json", [in_format("sharegpt", row) for row in rows])
    results = []
    for data in (own, sharegpt):
        adapter = shutil.copytree(SAMPLE / "adapters" / "1_colour", tmp_path / data.stem)
        code, err = run_cli(capsys, "stats", "--model", SAMPLE / "base", "--adapter", adapter, "--data", data)
        assert code == 0, err
        results.append(stats_covariances(adapter / "many_stats.safetensors"))
    assert results[0].keys() == results[1].keys()
    for key in results[0]:
        torch.testing.assert_close(results[1][key], results[0][key], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("entry, fault", [
    ({"conversations": [{"from": "human", "value": "<image>a"}, {"from": "gpt", "value": "b"}],
      "images": ["x.png", "y.png"]}, "names 2 images"),
    ({"prompt": "a", "image": "x.png", "images": ["y.png"]}, "names 2 images"),
    ({"conversations": [{"from": "human", "value": "<image>a"}, {"from": "gpt", "value": "b"}]}, "holds <image>"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                   {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}, "turns"),
    ({"question": "a", "image": "x.png"}, "of no shape"),
    ({"prompt": "a", "videos": "v.mp4"}, "field videos is not a list"),
])
def test_what_cannot_be_read_is_refused_naming_the_record(entry, fault, tmp_path, capsys):
    data = write(tmp_path / "data.json", [entry])
    [record] = list(read_records(data))
    assert isinstance(record, BadRecord) and fault in record.fault and record.source == f"{data}[0]"
    code, err = run_cli(capsys, "stats", "--model", SAMPLE / "base", "--adapter", SAMPLE / "adapters" / "1_colour",
                        "--data", data, "--out", tmp_path / "stats.safetensors")
    assert code == 2 and str(data) in err and fault in err and err.count("\n") == 1, err


def test_data_without_any_media_is_refused_for_a_multimodal_model(tmp_path, capsys):
    text = write(tmp_path / "text.jsonl", [{"prompt": row["prompt"], "answer": row["answer"]} for row in own_records()])
    args = ["stats", "--model", SAMPLE / "base", "--adapter", SAMPLE / "adapters" / "1_colour", "--data", text,
            "--out", tmp_path / "stats.safetensors"]
    code, err = run_cli(capsys, *args)
    assert code == 2 and str(text) in err and "--text-only" in err and err.count("\n") == 1, err
    assert not (tmp_path / "stats.safetensors").exists()
    assert run_cli(capsys, *args, "--text-only")[0] == 0
