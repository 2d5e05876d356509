"""Plain causal language models (a tiny Llama, text JSONL records): `many stats` against a
brute-force covariance, LPM-only `many merge`, and `many infer` on a text prompt against
base + adapter run directly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import input_sums, make_adapter, run_cli, run_cli_output, stats_covariances
from peft import LoraConfig, PeftModel
from safetensors import safe_open
from transformers import AutoTokenizer, LlamaForCausalLM

from many_cli.bench.tiny import LLAMA_PROJECTIONS, WORDS, build_tiny_llama
from many_cli.state import BUNDLE_FILE, STATS_FILE, read_bundle_header


def write_text_records(path: Path, count: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    with open(path, "w") as handle:
        for _ in range(count):
            handle.write(
                json.dumps({"prompt": " ".join(rng.choice(WORDS, 14)), "answer": str(rng.choice(WORDS))}) + "\n"
            )
    return path


def make_text_adapter(base: Path, out: Path, seed: int, targets: list[str] = LLAMA_PROJECTIONS) -> Path:
    return make_adapter(base, out, LoraConfig(r=4, lora_alpha=8, target_modules=targets), seed)


@pytest.fixture(scope="module")
def text_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("causal_lm")
    base = build_tiny_llama(root / "base")
    adapters = [make_text_adapter(base, root / f"task{index}", seed=index) for index in range(2)]
    data = [write_text_records(root / f"task{index}.jsonl", 10, seed=index) for index in range(2)]
    return root, base, adapters, data


def brute_force(base: Path, adapter: Path, data: Path) -> dict[str, torch.Tensor]:
    """Σ x xᵀ of every adapted layer's input, float64, one record at a time, no padding."""
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), adapter).eval()
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": entry["prompt"]}, {"role": "assistant", "content": entry["answer"]}],
            tokenize=False,
        )
        for entry in map(json.loads, open(data))
    ]
    return input_sums(
        model, lambda: [model(**tokenizer(text, return_tensors="pt", add_special_tokens=False)) for text in texts]
    )


def test_text_stats_equal_brute_force(text_world, capsys):
    root, base, adapters, data = text_world
    for adapter, records in zip(adapters, data):
        code, err = run_cli(
            capsys, "stats", "--model", base, "--adapter", adapter, "--data", records, "--batch-size", "3"
        )
        assert code == 0, err
        expected = brute_force(base, adapter, records)
        with safe_open(str(adapter / STATS_FILE), "pt") as handle:
            assert "prototype" not in handle.keys()
        measured = stats_covariances(adapter / STATS_FILE)
        assert measured.keys() == expected.keys()
        for module, matrix in expected.items():
            assert torch.linalg.norm(measured[module] - matrix) <= 1e-5 * torch.linalg.norm(matrix), module


def test_an_adapted_output_layer_counts_every_position(text_world, tmp_path, capsys):
    root, base, _, data = text_world
    adapter = make_text_adapter(base, tmp_path / "with_head", seed=5, targets=["q_proj", "lm_head"])
    code, err = run_cli(capsys, "stats", "--model", base, "--adapter", adapter, "--data", data[0], "--batch-size", "4")
    assert code == 0, err
    expected = brute_force(base, adapter, data[0])
    measured = stats_covariances(adapter / STATS_FILE)["lm_head"]
    assert torch.linalg.norm(measured - expected["lm_head"]) <= 1e-5 * torch.linalg.norm(expected["lm_head"])
    assert run_cli(capsys, "merge", adapter, "--out", tmp_path / "merged")[0] == 0  # PEFT saved lm_head's base weight

    from safetensors.torch import load_file, save_file

    resized = shutil.copytree(adapter, tmp_path / "own_head")  # a head of its own would be lost in the merge
    weights = load_file(resized / "adapter_model.safetensors")
    weights["base_model.model.lm_head.base_layer.weight"] += 1
    save_file(weights, resized / "adapter_model.safetensors")
    code, err = run_cli(capsys, "stats", "--model", base, "--adapter", resized, "--data", data[0], "--force")
    assert code == 2 and "carries its own weight for lm_head" in err and err.count("\n") == 1, err


def direct_greedy(base: Path, adapter: Path, prompt: str, max_new_tokens: int) -> str:
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), adapter).eval()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    encoded = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def test_one_task_text_merge_answers_like_its_adapter(text_world, tmp_path, capsys):
    root, base, adapters, data = text_world
    code, err = run_cli(capsys, "stats", "--model", base, "--adapter", adapters[0], "--data", data[0])
    assert code == 0, err
    code, err = run_cli(capsys, "merge", adapters[0], "--out", tmp_path / "merged", "--ridge", "0")
    assert code == 0, err
    bundle = read_bundle_header(tmp_path / "merged" / BUNDLE_FILE)
    assert bundle.projector_module is None and not any(key.startswith("projector/") for key in bundle.shapes)
    for line in open(data[0]).readlines()[:3]:
        prompt = json.loads(line)["prompt"]
        code, out, err = run_cli_output(
            capsys,
            "infer",
            "--model",
            base,
            "--merged",
            tmp_path / "merged",
            "--prompt",
            prompt,
            "--max-new-tokens",
            "4",
            "--json",
        )
        assert code == 0, err
        answer = json.loads(out)
        assert answer["prediction"] == direct_greedy(base, adapters[0], prompt, 4)
        assert answer["routing"] == {} and "image" not in answer


def test_two_task_text_merge_and_scored_data_set(text_world, tmp_path, capsys):
    root, base, adapters, data = text_world
    for adapter, records in zip(adapters, data):
        assert run_cli(capsys, "stats", "--model", base, "--adapter", adapter, "--data", records)[0] == 0
    code, err = run_cli(capsys, "merge", *adapters, "--out", tmp_path / "merged")
    assert code == 0, err
    code, out, err = run_cli_output(
        capsys,
        "infer",
        "--model",
        base,
        "--merged",
        tmp_path / "merged",
        "--data",
        data[0],
        "--data",
        data[1],
        "--out",
        tmp_path / "answers.jsonl",
        "--max-new-tokens",
        "2",
    )
    assert code == 0, err
    rows = [json.loads(line) for line in open(tmp_path / "answers.jsonl")]
    assert [row["task"] for row in rows] == ["task0"] * 10 + ["task1"] * 10


def test_an_image_record_for_a_text_model_is_refused(text_world, tmp_path, capsys):
    root, base, adapters, _ = text_world
    records = tmp_path / "images.jsonl"
    records.write_text(json.dumps({"image": "x.png", "prompt": "what is it ?"}) + "\n")
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    code, err = run_cli(
        capsys,
        "stats",
        "--model",
        base,
        "--adapter",
        adapters[0],
        "--data",
        records,
        "--out",
        tmp_path / "stats.safetensors",
    )
    assert code == 2 and "plain language model" in err and len(err.strip().splitlines()) == 1
