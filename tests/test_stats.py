"""`many stats` against brute force: one record at a time, no padding, float64 hooks."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import LM_TARGETS, input_sums, make_adapter, run_cli
from peft import LoraConfig, PeftModel
from PIL import Image
from safetensors import safe_open
from transformers import AutoProcessor, LlavaForConditionalGeneration

from many_cli.bench.tiny import build_tiny_llava
from many_cli.state import unpack_symmetric


def write_images(folder: Path, count: int, seed: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        pixels = (rng.random((20, 18, 3)) * 255).astype("uint8")
        paths.append(folder / f"img{index}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("stats")
    base = build_tiny_llava(root / "base")
    adapter = make_adapter(
        base,
        root / "adapter",
        LoraConfig(r=2, target_modules=LM_TARGETS, modules_to_save=["multi_modal_projector"]),
        seed=3,
    )
    images = write_images(root / "data" / "images", 5, seed=4)
    prompts = ["what colour is the shape ?", "how many dots", "where is it", "describe", "what is this picture"]
    answers = ["red", None, "top left", None, "a star"]
    with open(root / "data" / "calib.jsonl", "w") as handle:
        for image, prompt, answer in zip(images, prompts, answers):
            entry = {"image": f"images/{image.name}", "prompt": prompt}
            if answer is not None:
                entry["answer"] = answer
            handle.write(json.dumps(entry) + "\n")
    return root, base, adapter


def encode_entry(processor, entry: dict, root: Path):
    """One JSONL record as the token rule encodes it, alone (no padding)."""
    turns = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": entry["prompt"]}]}]
    if "answer" in entry:
        turns.append({"role": "assistant", "content": [{"type": "text", "text": entry["answer"]}]})
    text = processor.apply_chat_template(turns, add_generation_prompt="answer" not in entry, tokenize=False)
    return processor(text=[text], images=[Image.open(root / entry["image"]).convert("RGB")], return_tensors="pt")


def deciding_positions(processor, entry: dict, root: Path) -> slice:
    """The positions that decide the answer, from the prompt encoded alone with its generation
    prompt: its last position (which predicts the answer's first token) to the record's end."""
    turns = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": entry["prompt"]}]}]
    text = processor.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    prompt = processor(text=[text], images=[Image.open(root / entry["image"]).convert("RGB")], return_tensors="pt")
    return slice(prompt["input_ids"].shape[1] - 1, None)


def brute_force(
    base: Path,
    adapter: Path,
    data: Path,
    rows: dict | None = None,
    answer_weight: float = 1.0,
    exemplars: list | None = None,
):
    """Per-module Σ w x xᵀ (float64) and the prototype, one record at a time, no padding (so every
    row of every adapted layer counts; w = `answer_weight` at the positions that decide the
    answer of the language model's layers, else 1); `rows`, if given, receives each module's row count,
    `exemplars` each image's normalised pooled projector input."""
    processor = AutoProcessor.from_pretrained(base)
    model = PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(base), adapter).eval()
    pooled = [] if exemplars is None else exemplars
    rows = {} if rows is None else rows
    current = {}  # the record being run: the weight of each of its positions
    projector = model.get_base_model().model.multi_modal_projector
    pooling = projector.register_forward_pre_hook(
        lambda _, args: pooled.append(torch.nn.functional.normalize(args[0][0].double().mean(0), dim=0))
    )

    def run():
        for line in open(data):
            entry = json.loads(line)
            encoded = encode_entry(processor, entry, data.parent)
            current["weights"] = torch.ones(encoded["input_ids"].shape[1], dtype=torch.float64)
            current["weights"][deciding_positions(processor, entry, data.parent)] = answer_weight
            model(**encoded)

    sums = input_sums(
        model, run, weight=lambda name: current["weights"] if "language_model" in name else None, rows=rows
    )
    pooling.remove()
    return sums, torch.stack(pooled).mean(0)


def read_stats(path: Path):
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
        inputs = json.loads(metadata["inputs"])
        per_module = {}
        for key, entry in inputs.items():
            matrix = unpack_symmetric(handle.get_tensor(f"covariance/{key}"))
            for module in entry["modules"]:
                per_module[module] = matrix
        return per_module, inputs, handle.get_tensor("prototype"), metadata


@pytest.mark.parametrize("batch_size,padding_side", [(1, "right"), (3, "right"), (3, "left"), (5, "left")])
def test_covariances_equal_brute_force(task, tmp_path, capsys, batch_size, padding_side):
    root, base, adapter = task
    data = root / "data" / "calib.jsonl"
    out = tmp_path / "stats.safetensors"
    code, err = run_cli(
        capsys,
        "stats",
        "--model",
        base,
        "--adapter",
        adapter,
        "--data",
        data,
        "--out",
        out,
        "--batch-size",
        batch_size,
        "--padding-side",
        padding_side,
        "--device",
        "cpu",
    )
    assert code == 0, err
    rows, exemplars = {}, []
    expected, prototype = brute_force(base, adapter, data, rows, exemplars=exemplars)
    per_module, inputs, stored_prototype, metadata = read_stats(out)
    with safe_open(str(out), "pt") as handle:  # each image's direction, in record order
        assert torch.allclose(handle.get_tensor("exemplars").double(), torch.stack(exemplars), atol=1e-6)
    assert set(per_module) == set(expected)  # every adapted layer, nothing else
    assert len(inputs) == 2 * 4  # q/k/v and gate/up found to share their input
    for module, matrix in expected.items():
        error = (per_module[module] - matrix).norm() / matrix.norm()
        assert error <= 1e-5, module
    assert torch.allclose(stored_prototype.double(), prototype, atol=1e-6)
    assert metadata["images"] == "5"
    assert all(entry["tokens"] == rows[module] for entry in inputs.values() for module in entry["modules"])
    assert int(metadata["tokens"]) == rows["model.language_model.layers.0.self_attn.q_proj"]


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_answer_positions_weigh_as_asked(task, tmp_path, capsys, padding_side):
    """--answer-weight 5: the last prompt position and the answer's tokens count five times
    (found here from the prompt encoded alone); records without an answer weigh their last
    prompt position; the vision tower and the prototype are untouched."""
    root, base, adapter = task
    data = root / "data" / "calib.jsonl"
    out = tmp_path / "stats.safetensors"
    code, err = run_cli(
        capsys,
        "stats",
        "--model",
        base,
        "--adapter",
        adapter,
        "--data",
        data,
        "--out",
        out,
        "--batch-size",
        "3",
        "--padding-side",
        padding_side,
        "--answer-weight",
        "5",
    )
    assert code == 0, err
    expected, _ = brute_force(base, adapter, data, answer_weight=5.0)
    unweighted, _ = brute_force(base, adapter, data)
    per_module, _, _, metadata = read_stats(out)
    for module, matrix in expected.items():
        assert (per_module[module] - matrix).norm() / matrix.norm() <= 1e-5, module
        assert (unweighted[module] - matrix).norm() / matrix.norm() >= 1e-3, module
    assert metadata["answer_weight"] == "5.0" and "weigh 5" in metadata["token_rule"]


def test_stats_feed_merge(task, tmp_path, capsys):
    root, base, adapter = task
    code, err = run_cli(
        capsys,
        "stats",
        "--model",
        base,
        "--adapter",
        adapter,
        "--data",
        root / "data" / "images",
        "--prompt",
        "what colour",
        "--device",
        "cpu",
    )
    assert code == 0, err
    assert "5 records" in err
    code, err = run_cli(capsys, "merge", adapter, "--out", tmp_path / "merged")
    assert code == 0, err


def test_bfloat16_model_accumulates_in_float32(task, tmp_path, capsys):
    root, base, adapter = task
    data = root / "data" / "calib.jsonl"
    out = tmp_path / "stats.safetensors"
    code, err = run_cli(
        capsys,
        "stats",
        "--model",
        base,
        "--adapter",
        adapter,
        "--data",
        data,
        "--out",
        out,
        "--dtype",
        "bfloat16",
        "--batch-size",
        2,
    )
    assert code == 0, err
    with safe_open(str(out), "pt") as handle:
        assert all(handle.get_tensor(key).dtype == torch.float32 for key in handle.keys())
    expected, _ = brute_force(base, adapter, data)
    per_module, _, _, _ = read_stats(out)
    for module, matrix in expected.items():
        assert (per_module[module] - matrix).norm() / matrix.norm() <= 0.05, module


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bad_records_stop_with_a_line_naming_them_or_are_skipped(task, tmp_path, capsys):
    root, base, adapter = task
    (tmp_path / "broken.png").write_bytes(b"not an image")
    good = json.dumps({"image": str(root / "data" / "images" / "img0.png"), "prompt": "what"})
    cases = {
        "not json": (["{oops"], "bad.jsonl:2: not JSON"),
        "no prompt": ([json.dumps({"image": "x.png"})], "bad.jsonl:2: lacks the string field(s) prompt"),
        "corrupt image": ([json.dumps({"image": "broken.png", "prompt": "what"})], "cannot be read"),
        "missing image": ([json.dumps({"image": "nowhere.png", "prompt": "what"})], "not found"),
    }
    for name, (lines, message) in cases.items():
        data = write_jsonl(tmp_path / "bad.jsonl", [good] + lines)
        out = tmp_path / "s.safetensors"
        code, err = run_cli(capsys, "stats", "--model", base, "--adapter", adapter, "--data", data, "--out", out)
        assert code == 2 and message in err and err.count("\n") == 1, (name, err)
        assert not out.exists()
        code, err = run_cli(
            capsys, "stats", "--model", base, "--adapter", adapter, "--data", data, "--out", out, "--skip-bad"
        )
        assert code == 0, (name, err)
        with safe_open(str(out), "pt") as handle:
            assert handle.metadata()["skipped"] == "1" and handle.metadata()["records"] == "1"
        out.unlink()
    (tmp_path / "empty").mkdir()
    for data, message in [(tmp_path / "empty", "holds no images"), (tmp_path / "nope.jsonl", "data not found")]:
        code, err = run_cli(capsys, "stats", "--model", base, "--adapter", adapter, "--data", data)
        assert code == 2 and message in err, err


@pytest.mark.slow
def test_torchrun_shards_equal_a_single_process(task, tmp_path):
    root, base, adapter = task
    data = root / "data" / "calib.jsonl"
    single, sharded = tmp_path / "single.safetensors", tmp_path / "sharded.safetensors"
    arguments = [
        "stats",
        "--model",
        str(base),
        "--adapter",
        str(adapter),
        "--data",
        str(data),
        "--batch-size",
        "2",
        "--device",
        "cpu",
    ]
    # One thread per process, as torchrun gives each rank: the math library then adds in one order.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "many_cli", *arguments, "--out", str(single)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # many, with torch's object collectives (which pickle) made to fail: ranks must exchange tensors only.
    without_pickling = tmp_path / "many_without_pickling.py"
    without_pickling.write_text(
        "import sys\n"
        "import torch.distributed.distributed_c10d as c10d\n"
        "def refuse(*args, **kwargs):\n"
        "    raise RuntimeError('a rank pickled an object for the others')\n"
        "c10d._object_to_tensor = c10d._tensor_to_object = refuse\n"
        "from many_cli.entry import main\n"
        "main()\n"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29517",
            str(without_pickling),
            "stats",
            "--model",
            str(base),
            "--adapter",
            str(adapter),
            "--data",
            str(data),
            "--out",
            str(sharded),
            "--batch-size",
            "2",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # Shards of whole batches, reduced as one process adds its batches: the very same file.
    assert sharded.read_bytes() == single.read_bytes()
    one, inputs_one, prototype_one, metadata_one = read_stats(single)
    two, inputs_two, prototype_two, metadata_two = read_stats(sharded)
    assert inputs_one == inputs_two
    for module in one:
        assert (one[module] - two[module]).norm() / one[module].norm() <= 1e-6, module
    assert torch.allclose(prototype_one, prototype_two, atol=1e-6)
    assert metadata_two["records"] == "5" and metadata_two["images"] == "5"
    with safe_open(str(single), "pt") as one_file, safe_open(str(sharded), "pt") as two_file:
        exemplars_one, exemplars_two = one_file.get_tensor("exemplars"), two_file.get_tensor("exemplars")
    # The same images' directions in record order: the i-th image of the data is row i.
    assert exemplars_one.shape == exemplars_two.shape == (5, prototype_one.numel())
    assert torch.equal(exemplars_one, exemplars_two)


def test_a_device_map_gathers_the_same_statistics(task, tmp_path, capsys, monkeypatch):
    root, base, adapter = task
    data = root / "data" / "calib.jsonl"
    single, placed = tmp_path / "single.safetensors", tmp_path / "placed.safetensors"
    layer_by_layer = tmp_path / "device_map.json"
    layer_by_layer.write_text(
        json.dumps(
            {
                "model.vision_tower": "cpu",
                "model.multi_modal_projector": "cpu",
                "model.language_model.embed_tokens": "cpu",
                "model.language_model.layers.0": "cpu",
                "model.language_model.layers.1": 0,
                "model.language_model.norm": "cpu",
                "lm_head": "cpu",
            }
        )
    )
    assert run_cli(capsys, "stats", "--model", base, "--adapter", adapter, "--data", data, "--out", single)[0] == 0
    one, inputs_one, prototype_one, _ = read_stats(single)
    for device_map in ["auto", layer_by_layer]:
        if device_map == layer_by_layer and not torch.cuda.is_available():
            layer_by_layer.write_text(layer_by_layer.read_text().replace(": 0", ': "cpu"'))
        assert (
            run_cli(
                capsys,
                "stats",
                "--model",
                base,
                "--adapter",
                adapter,
                "--data",
                data,
                "--out",
                placed,
                "--device-map",
                device_map,
                "--force",
            )[0]
            == 0
        )
        two, inputs_two, prototype_two, _ = read_stats(placed)
        assert inputs_one == inputs_two
        for module in one:
            assert (one[module] - two[module]).norm() / one[module].norm() <= 1e-6, module
        assert torch.allclose(prototype_one, prototype_two, atol=1e-6)

    placed_stats = ["stats", "--model", base, "--adapter", adapter, "--data", data, "--out", placed, "--force"]
    for device, fault in [("disk", "does not offload to disk"), ("gpu7", "'gpu7'"), (torch.cuda.device_count(), "GPU")]:
        bad = tmp_path / "bad_map.json"
        bad.write_text(json.dumps({"model": device, "lm_head": "cpu"}))
        code, err = run_cli(capsys, *placed_stats, "--device-map", bad)
        assert code == 2 and str(bad) in err and fault in err and len(err.strip().splitlines()) == 1, err
    misspelt = tmp_path / "misspelt_map.json"  # transformers ignores a key that names no module
    misspelt.write_text(json.dumps({"model": "cpu", "lm_head": "cpu", "model.langauge_model.layers.1": "cpu"}))
    code, err = run_cli(capsys, *placed_stats, "--device-map", misspelt)
    assert code == 2 and str(misspelt) in err and "'model.langauge_model.layers.1'" in err, err
    assert len(err.strip().splitlines()) == 1
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, err = run_cli(
        capsys,
        "stats",
        "--model",
        base,
        "--adapter",
        adapter,
        "--data",
        data,
        "--out",
        placed,
        "--device-map",
        "auto",
        "--force",
    )
    assert code == 2 and "torchrun" in err


def test_bench_stats_runs_and_counts_the_covariance_work():
    from many_cli.bench.stats_bench import bench_stats

    result = bench_stats(layers=1, hidden=64, intermediate=128, records=2, batch_size=1, device="cpu", repeats=1)
    # Four distinct inputs per Llama layer (q/k/v, o, gate/up, down), found by the hooks.
    assert result.covariance_flops == result.tokens * (3 * 64 * 65 + 128 * 129)
    assert result.tokens > 2 * 576  # two records, each 576 image tokens plus text


def test_nan_activation_names_the_layer(task, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    root, base, adapter = task
    broken = tmp_path / "broken"
    shutil.copytree(adapter, broken)
    weights = load_file(broken / "adapter_model.safetensors")
    key = "base_model.model.model.language_model.layers.1.mlp.gate_proj.lora_A.weight"
    out = tmp_path / "s.safetensors"
    # Finite weights whose activations overflow: the covariance of down_proj's input is Inf.
    weights[key] = torch.full_like(weights[key], 1e30)
    save_file(weights, broken / "adapter_model.safetensors", metadata={"format": "pt"})
    code, err = run_cli(
        capsys, "stats", "--model", base, "--adapter", broken, "--data", root / "data" / "calib.jsonl", "--out", out
    )
    assert code == 2 and "holds NaN or Inf" in err and "layers.1.mlp.down_proj" in err, err
    assert err.count("\n") == 1 and not out.exists()
    # Inf in the weights themselves is found where they are read, naming the tensor.
    weights[key] = torch.full_like(weights[key], float("inf"))
    save_file(weights, broken / "adapter_model.safetensors", metadata={"format": "pt"})
    code, err = run_cli(
        capsys, "stats", "--model", base, "--adapter", broken, "--data", root / "data" / "calib.jsonl", "--out", out
    )
    assert code == 2 and "holds NaN or Inf" in err and key in err, err
    assert err.count("\n") == 1 and not out.exists()


def test_shared_inputs_are_detected_whatever_the_layer_names():
    """Layers are grouped by what they read, not by what they are called."""
    from torch import nn

    from many_cli.state import unpack_symmetric
    from many_cli.stats import InputCovariances

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.alpha, self.beta, self.gamma, self.delta = (nn.Linear(6, 6) for _ in range(4))

        def forward(self, x):
            shared = torch.tanh(x)
            mixed = self.alpha(shared) + self.gamma(shared)  # alpha and gamma read one tensor
            return self.delta(self.beta(mixed).sin())

    torch.manual_seed(0)
    block = Block()
    layers = {name: getattr(block, name) for name in ("alpha", "beta", "gamma", "delta")}
    collector = InputCovariances(layers, torch.device("cpu"), set(layers))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    expected = {name: torch.zeros(6, 6, dtype=torch.float64) for name in layers}
    batches = [torch.randn(2, 5, 6) for _ in range(3)]
    with torch.no_grad():
        for x in batches:
            collector.begin_batch(mask)
            block(x)
            collector.end_batch()
        collector.remove_hooks()
        for x in batches:
            shared = torch.tanh(x)
            mixed = block.alpha(shared) + block.gamma(shared)
            for name, value in (
                ("alpha", shared),
                ("gamma", shared),
                ("beta", mixed),
                ("delta", block.beta(mixed).sin()),
            ):
                rows = value[mask].double()
                expected[name] += rows.T @ rows
    groups = sorted(sorted(members) for members in collector.members.values())
    assert groups == [["alpha", "gamma"], ["beta"], ["delta"]]
    for key, triangle in collector.sums.items():
        measured = unpack_symmetric(triangle.packed())
        for name in collector.members[key]:
            assert (measured - expected[name]).norm() / expected[name].norm() <= 1e-5, name


def test_llava_json_and_max_samples_read_the_same_records(task, tmp_path, capsys):
    """A LLaVA-style conversation list and --max-samples, against brute force over the
    equivalent JSONL records."""
    root, base, adapter = task
    lines = (root / "data" / "calib.jsonl").read_text().splitlines()
    conversations = []
    for index, line in enumerate(lines):
        entry = json.loads(line)
        turns = [{"from": "human", "value": "<image>\n" + entry["prompt"]}]
        if "answer" in entry:
            turns.append({"from": "gpt", "value": entry["answer"]})
        conversations.append({"id": str(index), "image": entry["image"], "conversations": turns})
    llava = root / "data" / "calib_llava.json"
    llava.write_text(json.dumps(conversations))
    first_three = root / "data" / "first_three.jsonl"
    first_three.write_text("\n".join(lines[:3]) + "\n")
    for data, extra, reference, records in [
        (llava, [], root / "data" / "calib.jsonl", "5"),
        (root / "data" / "calib.jsonl", ["--max-samples", 3], first_three, "3"),
    ]:
        out = tmp_path / f"{data.stem}.safetensors"
        code, err = run_cli(
            capsys,
            "stats",
            "--model",
            base,
            "--adapter",
            adapter,
            "--data",
            data,
            "--out",
            out,
            "--batch-size",
            2,
            *extra,
        )
        assert code == 0, err
        expected, prototype = brute_force(base, adapter, reference)
        per_module, _, stored_prototype, metadata = read_stats(out)
        assert metadata["records"] == records
        for module, matrix in expected.items():
            assert (per_module[module] - matrix).norm() / matrix.norm() <= 1e-5, module
        assert torch.allclose(stored_prototype.double(), prototype, atol=1e-6)


def test_a_vision_tower_lora_counts_every_patch(task, tmp_path, capsys):
    """List-style target_modules also hit CLIP's q_proj/v_proj: their inputs are image patches,
    every one of which counts (no text mask), and the merge folds them like any other layer."""
    root, base, _ = task
    adapter = make_adapter(
        base,
        tmp_path / "both",
        LoraConfig(r=2, target_modules=["q_proj", "v_proj"], modules_to_save=["multi_modal_projector"]),
        seed=5,
    )
    data = root / "data" / "calib.jsonl"
    code, err = run_cli(
        capsys,
        "stats",
        "--model",
        base,
        "--adapter",
        adapter,
        "--data",
        data,
        "--batch-size",
        3,
        "--padding-side",
        "left",
        "--device",
        "cpu",
    )
    assert code == 0, err
    rows = {}
    expected, _ = brute_force(base, adapter, data, rows)
    per_module, inputs, _, _ = read_stats(adapter / "many_stats.safetensors")
    assert any("vision_tower" in module for module in expected) and set(per_module) == set(expected)
    for module, matrix in expected.items():
        assert (per_module[module] - matrix).norm() / matrix.norm() <= 1e-5, module
    assert all(entry["tokens"] == rows[module] for entry in inputs.values() for module in entry["modules"])
    merged = tmp_path / "merged"
    assert run_cli(capsys, "merge", adapter, "--out", merged)[0] == 0
    image = next((root / "data" / "images").iterdir())
    common = ["infer", "--model", base, "--merged", merged, "--image", image, "--max-new-tokens", 2]
    assert run_cli(capsys, *common)[0] == 0
    code, err = run_cli(capsys, *common, "--lm-routing", "experts")
    assert code == 2 and "outside the language model" in err and err.count("\n") == 1, err


def test_stats_out_replaces_only_a_stats_file_and_writes_the_same_bytes(task, tmp_path, capsys):
    root, base, adapter = task
    common = ["stats", "--model", base, "--adapter", adapter, "--data", root / "data" / "calib.jsonl"]
    foreign = tmp_path / "notes.txt"
    foreign.write_text("mine")
    code, err = run_cli(capsys, *common, "--out", foreign)
    assert code == 2 and "not a many stats file" in err and foreign.read_text() == "mine"
    code, err = run_cli(capsys, *common, "--out", tmp_path)
    assert code == 2 and "is a directory" in err
    assert run_cli(capsys, *common, "--out", foreign, "--force")[0] == 0
    first = foreign.read_bytes()
    assert run_cli(capsys, *common, "--out", foreign)[0] == 0  # a stats file now: replaced freely
    assert foreign.read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_an_adapter_many_cannot_merge_is_refused_before_the_model_loads(task, tmp_path, capsys):
    from peft import IA3Config

    root, base, _ = task
    ia3 = make_adapter(
        base,
        tmp_path / "ia3",
        IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]),
        seed=6,
    )
    code, err = run_cli(capsys, "stats", "--model", base, "--adapter", ia3, "--data", root / "data" / "calib.jsonl")
    assert (
        code == 2
        and err
        == f"many: error: {ia3 / 'adapter_config.json'}: peft_type 'IA3' is not supported; "
        "many merges PEFT LoRA adapters on linear layers (peft_type LORA, no DoRA, no lora_bias)\n"
    )


def covariances_of(base: Path, adapter: Path, data: Path, modules: list[str]) -> dict[str, torch.Tensor]:
    """Σ x xᵀ (float64) of the inputs of `modules` in base + adapter, one record at a time."""
    processor = AutoProcessor.from_pretrained(base)
    model = PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(base), adapter).eval()
    return input_sums(
        model,
        lambda: [model(**encode_entry(processor, json.loads(line), data.parent)) for line in open(data)],
        select=lambda name: name in modules,
    )


def test_adapters_of_other_modules_merge_once_stats_cover_their_union(task, tmp_path, capsys):
    """Task q adapts q/v_proj, task d down_proj: the merge names the command that fixes the
    missing covariances; with it, down_proj's merge is τ_d C_d (C_q + C_d)⁻¹ by brute force."""
    root, base, _ = task
    data = root / "data" / "calib.jsonl"
    adapters = {
        name: make_adapter(base, tmp_path / name, LoraConfig(r=2, target_modules=targets), seed=seed)
        for name, targets, seed in [
            ("q", r".*language_model.*\.(q_proj|v_proj)", 11),
            ("d", r".*language_model.*\.down_proj", 12),
        ]
    }
    for adapter in adapters.values():
        assert run_cli(capsys, "stats", "--model", base, "--adapter", adapter, "--data", data)[0] == 0
    code, err = run_cli(capsys, "merge", *adapters.values(), "--out", tmp_path / "merged")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    pattern = re.search(r"--modules '(.*)'", err).group(1)
    assert f"--adapter {adapters['q']}" in err
    for adapter in adapters.values():
        code, err = run_cli(
            capsys, "stats", "--model", base, "--adapter", adapter, "--data", data, "--modules", pattern
        )
        assert code == 0, err
    code, err = run_cli(capsys, "merge", *adapters.values(), "--out", tmp_path / "merged", "--ridge", "0")
    assert code == 0, err

    module = "model.language_model.layers.1.mlp.down_proj"
    covariance = {name: covariances_of(base, adapter, data, [module])[module] for name, adapter in adapters.items()}
    stored, _, _, metadata = read_stats(adapters["q"] / "many_stats.safetensors")
    assert metadata["modules_pattern"] == pattern
    assert (stored[module] - covariance["q"]).norm() <= 1e-5 * covariance["q"].norm()
    with safe_open(str(adapters["d"] / "adapter_model.safetensors"), "pt") as weights:
        a, b = (weights.get_tensor(f"base_model.model.{module}.lora_{part}.weight").double() for part in "AB")
    task_vector = LoraConfig().lora_alpha / 2 * b @ a  # PEFT's default alpha over r = 2
    gram = covariance["q"] + covariance["d"]
    expected = task_vector @ covariance["d"] @ torch.linalg.inv(gram)
    merged = PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(base), tmp_path / "merged")
    delta = merged.get_base_model().get_submodule(module).get_delta_weight("default").double()
    root_gram = torch.linalg.cholesky(gram)
    assert ((delta - expected) @ root_gram).norm() <= 1e-5 * (expected @ root_gram).norm()


def test_tensor_cores_are_chosen_only_where_half_precision_products_are_exact(monkeypatch):
    from many_cli.stats import tensor_core_products

    cuda = torch.device("cuda")
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert not tensor_core_products(dtype, torch.device("cpu"))
    for capability, chosen in [
        ((9, 0), {torch.float16, torch.bfloat16}),
        ((8, 0), {torch.float16, torch.bfloat16}),
        ((7, 5), {torch.float16}),
        ((6, 1), set()),
    ]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, capability=capability: capability)
        assert {
            dtype for dtype in (torch.float16, torch.bfloat16, torch.float32) if tensor_core_products(dtype, cuda)
        } == chosen
    # The premise: a product of two half-precision values is exact in float32.
    values = torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    for dtype in (torch.float16, torch.bfloat16):
        low = values.to(dtype)
        product = low.float() * low.flip(0).float()
        assert torch.equal(product.double(), low.double() * low.flip(0).double())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the selection is tested above")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tensor_core_sums_equal_float32_sums_of_the_same_values(dtype):
    from many_cli.stats import UpperTriangle, tensor_core_products

    cuda = torch.device("cuda")
    if not tensor_core_products(dtype, cuda):
        pytest.skip(f"this GPU has no tensor cores for {dtype}")
    x = torch.randn(4096, 1536, generator=torch.Generator().manual_seed(0)).to(dtype)
    ours = UpperTriangle(1536, cuda)
    ours.add(x.to(cuda))
    reference = x.double().T @ x.double()
    packed = ours.packed().double().cpu()
    expected = torch.cat([reference[row, row:] for row in range(1536)])
    float32 = torch.cat([(x.float().T @ x.float())[row, row:] for row in range(1536)]).double()
    assert (packed - expected).abs().max() <= 1e-6 * expected.abs().max() * 4
    assert (packed - float32).abs().max() <= 1e-6 * expected.abs().max() * 4


def test_modules_naming_only_adapted_layers_asks_for_nothing_more(task, tmp_path, capsys):
    """One --modules pattern for every task of a run: for an adapter that adapts every layer it
    names, the statistics are those without it; a pattern naming no layer at all is refused."""
    root, base, adapter = task
    data = root / "data" / "calib.jsonl"
    plain, covered = tmp_path / "plain.safetensors", tmp_path / "covered.safetensors"
    common = ["stats", "--model", base, "--adapter", adapter, "--data", data]
    assert run_cli(capsys, *common, "--out", plain)[0] == 0
    code, err = run_cli(capsys, *common, "--out", covered, "--modules", LM_TARGETS)
    assert code == 0, err
    without, with_pattern = read_stats(plain)[0], read_stats(covered)[0]
    assert without.keys() == with_pattern.keys()
    assert all(torch.equal(without[key], with_pattern[key]) for key in without)
    code, err = run_cli(capsys, *common, "--out", tmp_path / "none.safetensors", "--modules", r".*no_such_layer")
    assert code == 2 and "no linear layer's name matches" in err
