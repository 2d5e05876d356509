"""`many stats`, `merge` and `infer` end to end on each supported model family: covariances
against a brute force, and a one-task merge at --ridge 0 against base + adapter run directly."""

from __future__ import annotations

import json
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel
from PIL import Image
from safetensors import safe_open
from transformers import AutoProcessor

from conftest import LM_TARGETS, load_base, lora_input_sums, make_adapter, run_cli, stats_covariances
from families import AUDIO_FAMILIES, FAMILIES
from many_cli.bench.tiny import WORDS
from many_cli.state import STATS_FILE


def family_adapter(base: Path, out: Path, seed: int) -> Path:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=LM_TARGETS, modules_to_save=["multi_modal_projector"])
    return make_adapter(base, out, config, seed)


def write_records(folder: Path, name: str, count: int, seed: int, audio: bool) -> Path:
    """Noise images (or one-second 16 kHz noise clips) and prompts of varied words, so that
    calibration spans every layer's input."""
    rng = np.random.default_rng(seed)
    (folder / name).mkdir(parents=True)
    with open(folder / f"{name}.jsonl", "w") as handle:
        for index in range(count):
            if audio:
                media = {"audio": f"{name}/{index}.wav"}
                with wave.open(str(folder / media["audio"]), "wb") as clip:
                    clip.setnchannels(1), clip.setsampwidth(2), clip.setframerate(16000)
                    clip.writeframes((rng.normal(0, 3000, 16000)).astype("<i2").tobytes())
            else:
                media = {"image": f"{name}/{index}.png"}
                Image.fromarray(rng.integers(0, 256, (20, 20, 3)).astype("uint8")).save(folder / media["image"])
            handle.write(json.dumps({**media, "prompt": " ".join(rng.choice(WORDS, 12)),
                                     "answer": str(rng.choice(WORDS))}) + "\n")
    return folder / f"{name}.jsonl"


def encode_one(processor, entry: dict, root: Path, with_answer: bool):
    kind = "audio" if "audio" in entry else "image"
    turns = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": entry["prompt"]}]}]
    if with_answer:
        turns.append({"role": "assistant", "content": [{"type": "text", "text": entry["answer"]}]})
    text = processor.apply_chat_template(turns, add_generation_prompt=not with_answer, tokenize=False)
    if kind == "audio":
        with wave.open(str(root / entry["audio"])) as clip:
            samples = np.frombuffer(clip.readframes(clip.getnframes()), dtype="<i2").astype(np.float32) / 32768
        return processor(text=[text], audio=[samples], return_tensors="pt")
    image = Image.open(root / entry["image"]).convert("RGB")
    return processor(text=[text], images=[[image]], return_tensors="pt")


def brute_force(base: Path, adapter: Path, records: Path) -> dict[str, torch.Tensor]:
    """Σ x xᵀ of every adapted layer's input, float64, one record at a time, no padding."""
    processor = AutoProcessor.from_pretrained(base)
    model = PeftModel.from_pretrained(load_base(base), adapter).eval()
    lines = [json.loads(line) for line in open(records)]
    return lora_input_sums(model, lambda: [model(**encode_one(processor, entry, records.parent, with_answer=True))
                                           for entry in lines])


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    base = FAMILIES[request.param](root / "base")
    adapters = [family_adapter(base, root / "adapters" / f"task{index}", seed=index) for index in range(2)]
    audio = request.param in AUDIO_FAMILIES
    calibration = [write_records(root / "calibration", f"task{index}", 8, index, audio) for index in range(2)]
    heldout = write_records(root / "heldout", "task0", 3, 100, audio)
    return root, base, adapters, calibration, heldout


def test_covariances_equal_brute_force_and_two_tasks_merge(family, tmp_path, capsys):
    root, base, adapters, calibration, _ = family
    for adapter, records in zip(adapters, calibration, strict=True):
        code, err = run_cli(capsys, "stats", "--model", base, "--adapter", adapter, "--data", records,
                            "--batch-size", "3")
        assert code == 0, err
        expected = brute_force(base, adapter, records)
        measured = stats_covariances(adapter / STATS_FILE)
        assert measured.keys() == expected.keys()
        for module, matrix in expected.items():
            assert torch.linalg.norm(measured[module] - matrix) <= 1e-5 * torch.linalg.norm(matrix), module
    code, err = run_cli(capsys, "merge", *adapters, "--out", tmp_path / "merged")
    assert code == 0, err


def test_one_task_merge_answers_like_its_adapter(family, tmp_path, capsys):
    root, base, adapters, calibration, heldout = family
    assert run_cli(capsys, "stats", "--model", base, "--adapter", adapters[0], "--data", calibration[0])[0] == 0
    code, err = run_cli(capsys, "merge", adapters[0], "--out", tmp_path / "merged", "--ridge", "0")
    assert code == 0, err
    code, err = run_cli(capsys, "infer", "--model", base, "--merged", tmp_path / "merged", "--data", heldout,
                        "--out", tmp_path / "answers.jsonl", "--max-new-tokens", "4")
    assert code == 0, err
    answers = [json.loads(line)["prediction"] for line in open(tmp_path / "answers.jsonl")]
    assert all(answers)  # words to compare, not empty strings
    processor = AutoProcessor.from_pretrained(base)
    model = PeftModel.from_pretrained(load_base(base), adapters[0]).eval()
    for line, answer in zip(open(heldout), answers, strict=True):
        encoded = encode_one(processor, json.loads(line), heldout.parent, with_answer=False)
        with torch.no_grad():
            output = model.generate(**encoded, max_new_tokens=4, do_sample=False)
        direct = processor.batch_decode(output[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)[0]
        assert answer == direct.strip()


@pytest.fixture(scope="module")
def cropped(tmp_path_factory):
    """LLaVA-NeXT with images of three shapes, so images are cut into different numbers of crops."""
    root = tmp_path_factory.mktemp("crops")
    base = FAMILIES["llava_next"](root / "base")
    adapters = [family_adapter(base, root / "adapters" / f"task{index}", seed=10 + index) for index in range(2)]
    data = []
    for index in range(2):
        rng = np.random.default_rng(index)
        (root / f"task{index}").mkdir()
        lines = []
        for number, shape in enumerate([(20, 20, 3), (20, 40, 3), (40, 20, 3)] * 2):
            colour = np.array([200, 40, 40]) if index == 0 else np.array([40, 40, 200])
            pixels = np.clip(colour + rng.normal(0, 30, shape), 0, 255).astype("uint8")
            Image.fromarray(pixels).save(root / f"task{index}" / f"{number}.png")
            lines.append(json.dumps({"image": f"task{index}/{number}.png", "prompt": " ".join(rng.choice(WORDS, 10)),
                                     "answer": str(rng.choice(WORDS))}))
        (root / f"task{index}.jsonl").write_text("\n".join(lines) + "\n")
        data.append(root / f"task{index}.jsonl")
    return root, base, adapters, data


def test_prototype_pools_every_crop_of_an_image(cropped, capsys):
    root, base, adapters, data = cropped
    code, err = run_cli(capsys, "stats", "--model", base, "--adapter", adapters[0], "--data", data[0],
                        "--batch-size", "4")
    assert code == 0, err
    processor = AutoProcessor.from_pretrained(base)
    model = PeftModel.from_pretrained(load_base(base), adapters[0]).eval()
    directions, crops = [], []

    def record_input(_module, args):
        features = args[0].to(torch.float64)  # (crops of this one image, tokens, width)
        crops.append(features.shape[0])
        directions.append(torch.nn.functional.normalize(features.mean(dim=(0, 1)), dim=0))

    projector = model.base_model.model.model.multi_modal_projector
    handle = projector.register_forward_pre_hook(record_input)
    with torch.no_grad():
        for line in open(data[0]):
            model(**encode_one(processor, json.loads(line), data[0].parent, with_answer=True))
    handle.remove()
    assert len(set(crops)) > 1  # the images were cut into different numbers of crops
    with safe_open(str(adapters[0] / STATS_FILE), "pt") as stats:
        prototype = stats.get_tensor("prototype").to(torch.float64)
        assert stats.metadata()["images"] == str(len(directions))
    assert torch.allclose(prototype, torch.stack(directions).mean(0), atol=1e-5)


def test_mixed_batches_of_cropped_images_route_per_image(cropped, tmp_path, capsys):
    root, base, adapters, data = cropped
    for adapter, records in zip(adapters, data, strict=True):
        assert run_cli(capsys, "stats", "--model", base, "--adapter", adapter, "--data", records)[0] == 0
    assert run_cli(capsys, "merge", *adapters, "--out", tmp_path / "merged")[0] == 0
    outputs = {}
    for batch in ("1", "5"):
        code, err = run_cli(capsys, "infer", "--model", base, "--merged", tmp_path / "merged", "--data", data[0],
                            "--data", data[1], "--batch-size", batch, "--max-new-tokens", "3",
                            "--out", tmp_path / f"batch{batch}.jsonl")
        assert code == 0, err
        outputs[batch] = [json.loads(line) for line in open(tmp_path / f"batch{batch}.jsonl")]
    for alone, mixed in zip(outputs["1"], outputs["5"], strict=True):
        assert alone["prediction"] == mixed["prediction"]
        assert list(mixed["routing"]) == ["task0", "task1"]
        for task in ("task0", "task1"):
            assert mixed["routing"][task] == pytest.approx(alone["routing"][task], abs=1e-5)
    # Each image goes to its own task (the two tasks' pictures differ in colour).
    assert all(max(row["routing"], key=row["routing"].get) == row["task"] for row in outputs["5"])
