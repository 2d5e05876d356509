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
    read = [(r.images, r.prompt.replace("<image>", "").strip(), r.answer, r.history) for r in records]
    assert read == [((Path(row["image"]),), row["prompt"], row["answer"], ()) for row in rows]


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
      "images": ["x.png", "y.png"]}, "has 1 <image> tags for 2 images"),
    ({"conversations": [{"from": "human", "value": "<image>a"}, {"from": "gpt", "value": "b"}]},
     "has 1 <image> tags for 0 images"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "c"}]}, "has the turns"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "has the turns"),
    ({"question": "a", "image": "x.png"}, "of no shape"),
    ({"prompt": "a", "videos": "v.mp4"}, "field videos is not a list"),
    ({"prompt": "a", "videos": ["v.mp4", "w.mp4"]}, "names 2 videos"),
    ({"prompt": "<video> a"}, "holds <video> but the record names no video"),
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


def test_a_conversation_of_several_turns_and_images_against_a_brute_force_forward(tmp_path, capsys):
    """Stats over LLaMA-Factory sharegpt records of two images and two exchanges equal Σ x xᵀ of
    every adapted layer's input in base + adapter, fed the whole conversation as the chat
    template writes it (built here by hand) with both images, one record at a time; each image is
    one exemplar."""
    import shutil

    from peft import PeftModel
    from PIL import Image
    from safetensors import safe_open
    from transformers import AutoProcessor

    from conftest import load_base, lora_input_sums

    rows = own_records(6)
    entries = []
    for first, second in zip(rows[0::2], rows[1::2]):
        entries.append({"messages": [
            {"role": "user", "content": f"<image>{first['prompt']}"}, {"role": "assistant", "content": first["answer"]},
            {"role": "user", "content": f"and here ? <image> {second['prompt']}"},
            {"role": "assistant", "content": second["answer"]}], "images": [first["image"], second["image"]]})
    data = write(tmp_path / "conversations.json", entries)
    adapter = shutil.copytree(SAMPLE / "adapters" / "1_colour", tmp_path / "adapter")
    code, err = run_cli(capsys, "stats", "--model", SAMPLE / "base", "--adapter", adapter, "--data", data,
                        "--batch-size", 2)
    assert code == 0 and "3 records" in err and "6 images" in err, err

    processor = AutoProcessor.from_pretrained(SAMPLE / "base")
    model = PeftModel.from_pretrained(load_base(SAMPLE / "base"), adapter).eval()

    def run():
        for entry in entries:
            turns = entry["messages"]
            conversation = [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": turns[0]["content"][7:]}]},
                {"role": "assistant", "content": [{"type": "text", "text": turns[1]["content"]}]},
                {"role": "user", "content": [{"type": "text", "text": "and here ?"}, {"type": "image"},
                                             {"type": "text", "text": turns[2]["content"].split("<image> ")[1]}]},
                {"role": "assistant", "content": [{"type": "text", "text": turns[3]["content"]}]}]
            text = processor.apply_chat_template(conversation, tokenize=False)
            images = [Image.open(path).convert("RGB") for path in entry["images"]]
            model(**processor(text=[text], images=[images], return_tensors="pt"))

    expected = lora_input_sums(model, run)
    got = stats_covariances(adapter / "many_stats.safetensors")
    assert len(expected) == 14 and set(expected) <= set(got)
    for name, covariance in expected.items():
        mine = got[name]
        assert torch.linalg.norm(mine - covariance) <= 1e-5 * torch.linalg.norm(covariance), name
    with safe_open(str(adapter / "many_stats.safetensors"), "pt") as handle:
        assert handle.get_tensor("exemplars").shape[0] == 6


def test_infer_routes_each_image_of_a_record_and_answers_its_last_turn(tmp_path, capsys):
    """A record with a colour image and a count image: two routing decisions, each what the image
    gets alone; the answer is scored against the last assistant turn."""
    import shutil

    adapters = []
    for task in ("1_colour", "2_count"):
        adapters.append(shutil.copytree(SAMPLE / "adapters" / task, tmp_path / task))
        code, err = run_cli(capsys, "stats", "--model", SAMPLE / "base", "--adapter", adapters[-1], "--data",
                            SAMPLE / "data" / task / "calibration.jsonl")
        assert code == 0, err
    merged = tmp_path / "merged"
    assert run_cli(capsys, "merge", *adapters, "--out", merged)[0] == 0
    evaluation = [SAMPLE / "data" / task / "evaluation.jsonl" for task in ("1_colour", "2_count")]
    colour, count = ([{**row, "image": str(path.parent / row["image"])} for row in map(json.loads, path.read_text().splitlines()[:2])]
                     for path in evaluation)
    pairs = write(tmp_path / "pairs.json", [{"messages": [
        {"role": "user", "content": f"<image>{a['prompt']}"}, {"role": "assistant", "content": a["answer"]},
        {"role": "user", "content": f"<image>{b['prompt']}"}, {"role": "assistant", "content": b["answer"]}],
        "images": [a["image"], b["image"]]} for a, b in zip(colour, count)])
    alone = write(tmp_path / "alone.jsonl", [row for pair in zip(colour, count) for row in pair])
    infer = ["infer", "--model", SAMPLE / "base", "--merged", merged, "--max-new-tokens", 2]
    assert run_cli(capsys, *infer, "--data", pairs, "--out", tmp_path / "pairs.out")[0] == 0
    assert run_cli(capsys, *infer, "--data", alone, "--out", tmp_path / "alone.out")[0] == 0
    paired = [json.loads(line) for line in (tmp_path / "pairs.out").read_text().splitlines()]
    single = [json.loads(line) for line in (tmp_path / "alone.out").read_text().splitlines()]
    assert len(paired) == 2 and all(len(row["routing"]) == 2 and len(row["images"]) == 2 for row in paired)
    for index, row in enumerate(paired):
        for image in range(2):
            expected = single[2 * index + image]["routing"]
            assert row["routing"][image].keys() == expected.keys()
            assert all(abs(row["routing"][image][task] - expected[task]) < 1e-6 for task in expected)
        assert row["answer"] == count[index]["answer"] and row["prompt"].endswith(count[index]["prompt"])
    assert [max(routing, key=routing.get) for row in paired for routing in row["routing"]] == ["1_colour", "2_count"] * 2
