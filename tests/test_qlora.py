"""`--qlora`: the base as a QLoRA adapter saw it, against transformers' own 4-bit load of the base
(bitsandbytes, on the CPU) taken back to full precision, and against the NF4 format worked out
by hand. The tiny model is 64 wide: bitsandbytes' CPU path for a loaded 4-bit model needs rows
of whole blocks."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import LM_TARGETS, console_script, make_adapter, run_cli, run_cli_output, task_vector
from peft import LoraConfig, PeftModel, get_peft_model
from PIL import Image
from safetensors.torch import load_file, save_file
from test_infer import write_task_data
from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig, LlavaForConditionalGeneration

import many_cli
from many_cli import qlora
from many_cli.bench.tiny import tiny_clip, tiny_llava_config, tiny_processor
from many_cli.errors import InputError
from many_cli.llava_layout import peft_adapter_dir
from many_cli.models import load_base_model
from many_cli.options import InferOptions, Placement
from many_cli.state import STATS_FILE, read_stats_header

pytest.importorskip("bitsandbytes")

SCHEMES = {"nf4-double": ("nf4", True), "nf4": ("nf4", False), "fp4-double": ("fp4", True), "fp4": ("fp4", False)}
# The 16 NF4 values (QLoRA, Dettmers et al. 2023, appendix E).
NF4 = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ]
)


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    """A 64-wide tiny LLaVA, one task's adapter (LoRA and its own projector) and its data."""
    root = tmp_path_factory.mktemp("qlora")
    torch.manual_seed(0)
    config = tiny_llava_config(64, intermediate=128, vision=tiny_clip(hidden=64))
    LlavaForConditionalGeneration(config).eval().save_pretrained(root / "base")
    tiny_processor().save_pretrained(root / "base")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=LM_TARGETS, modules_to_save=["multi_modal_projector"])
    adapter = make_adapter(root / "base", root / "red", config, seed=3)
    calibration = write_task_data(root / "calibration", "red", (220, 30, 30), 6, seed=0, varied=True)
    heldout = write_task_data(root / "heldout", "red", (220, 30, 30), 2, seed=1)
    return root / "base", adapter, calibration, heldout


def transformers_4bit_dequantised(base: Path, scheme: str):
    """The base as transformers loads it in 4 bits for training (its own choice of layers), taken
    back to float32 by transformers' own `dequantize` (before any forward pass: on the CPU, the
    first one repacks the weights)."""
    quant_type, double = SCHEMES[scheme]
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForImageTextToText.from_pretrained(
        base, quantization_config=config, dtype=torch.float32, device_map="cpu"
    )
    return model.dequantize(dtype=torch.float32).eval()


@pytest.mark.parametrize(
    "scheme", [pytest.param(s, marks=() if s == "nf4-double" else pytest.mark.slow) for s in SCHEMES]
)
def test_the_base_equals_transformers_own_4bit_load_taken_back(kit, scheme):
    base = kit[0]
    expected = transformers_4bit_dequantised(base, scheme).state_dict()
    ours = load_base_model(str(base), torch.device("cpu"), Placement(dtype="float32"), scheme).state_dict()
    full = load_base_model(str(base), torch.device("cpu"), Placement(dtype="float32")).state_dict()
    assert set(ours) == set(expected)
    for key in ours:
        assert torch.equal(ours[key], expected[key]), key
    changed = {key for key in ours if not torch.equal(ours[key], full[key])}
    # Every linear layer of the towers, the projector and the language model; not the output layer.
    assert len(changed) == 22 and "lm_head.weight" not in changed, sorted(changed)


@pytest.mark.parametrize("shape", [(32, 32), (3, 100), (64, 128)])
def test_nf4_takes_each_weight_to_the_nearest_code_times_its_blocks_largest(shape):
    """Blocks of 64 in storage order, whatever the shape (bitsandbytes' CPU path mis-reads a row
    shorter than a block when it keeps the shape)."""
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    flat = weight.flatten()
    expected = torch.empty_like(flat)
    for start in range(0, flat.numel(), 64):
        block = flat[start : start + 64]
        scale = block.abs().max()
        expected[start : start + 64] = NF4[(block / scale).unsqueeze(-1).sub(NF4).abs().argmin(-1)] * scale
    assert torch.allclose(qlora.requantised(weight, "nf4"), expected.reshape(shape), atol=1e-7, rtol=0)


def test_stats_merge_infer_and_export_run_on_the_base_as_the_adapter_saw_it(kit, tmp_path, capsys):
    base, adapter, calibration, heldout = kit
    stats = tmp_path / "red.stats.safetensors"
    qlora_stats = ["stats", "--model", base, "--adapter", adapter, "--data", calibration, "--qlora", "nf4-double"]
    assert run_cli(capsys, *qlora_stats, "--out", stats)[0] == 0
    assert read_stats_header(stats).base_fingerprint.endswith("+nf4-double")
    (tmp_path / "red").mkdir()
    for path in adapter.iterdir():
        (tmp_path / "red" / path.name).write_bytes(path.read_bytes())
    (tmp_path / "red" / STATS_FILE).write_bytes(stats.read_bytes())
    merged = tmp_path / "merged"
    assert run_cli(capsys, "merge", tmp_path / "red", "--out", merged, "--ridge", 0)[0] == 0
    assert "as its QLoRA adapters saw it (`--qlora nf4-double`" in (merged / "README.md").read_text()

    # The one-task merge answers as the adapter on transformers' 4-bit base taken back.
    out = tmp_path / "preds.jsonl"
    infer = ["infer", "--model", base, "--merged", merged, "--data", heldout, "--max-new-tokens", 5]
    code, err = run_cli(capsys, *infer, "--out", out)
    assert code == 2 and err.count("\n") == 1 and "give --qlora nf4-double" in err, err
    assert run_cli(capsys, *infer, "--out", out, "--qlora", "nf4-double")[0] == 0
    processor = AutoProcessor.from_pretrained(base)
    model = PeftModel.from_pretrained(transformers_4bit_dequantised(base, "nf4-double"), adapter).eval()
    for row, line in zip([json.loads(line) for line in open(out)], open(heldout)):
        record = json.loads(line)
        turns = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": record["prompt"]}]}]
        text = processor.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        image = Image.open(heldout.parent / record["image"]).convert("RGB")
        encoded = processor(text=[text], images=[image], return_tensors="pt")
        with torch.no_grad():
            tokens = model.generate(**encoded, max_new_tokens=5, do_sample=False)[0, encoded["input_ids"].shape[1] :]
        assert row["prediction"] == processor.decode(tokens, skip_special_tokens=True).strip()

    # The export holds the 4-bit base taken back, the merge folded in (by hand: W' + s B A).
    exported = tmp_path / "exported"
    code, err = run_cli(capsys, "export", "--model", base, "--merged", merged, "--out", exported)
    assert code == 2 and "give --qlora nf4-double" in err, err
    assert (
        run_cli(capsys, "export", "--model", base, "--merged", merged, "--out", exported, "--qlora", "nf4-double")[0]
        == 0
    )
    weights = LlavaForConditionalGeneration.from_pretrained(exported, dtype=torch.float32).state_dict()
    taken_back = transformers_4bit_dequantised(base, "nf4-double").state_dict()
    module = "model.language_model.layers.1.mlp.down_proj"
    folded = taken_back[f"{module}.weight"] + task_vector(merged, module).float()
    assert torch.allclose(weights[f"{module}.weight"], folded, atol=1e-6)
    vision = "model.vision_tower.encoder.layers.0.mlp.fc1.weight"
    assert torch.equal(weights[vision], taken_back[vision])
    assert torch.equal(weights["lm_head.weight"], taken_back["lm_head.weight"])
    assert "--qlora nf4-double" in (exported / "README.md").read_text()
    with pytest.raises(InputError, match="is an export, served as written"):
        many_cli.load_routed(exported, InferOptions(qlora="nf4-double"))


def test_a_quantised_base_or_no_bitsandbytes_is_one_line(kit, qlora_run, tmp_path, capsys):
    base, adapter, calibration, _ = kit
    quantised = tmp_path / "quantised"
    quantised.mkdir()
    for path in base.iterdir():
        (quantised / path.name).write_bytes(path.read_bytes())
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (quantised / "config.json").write_text(json.dumps(config))
    out = tmp_path / "s.safetensors"
    stats = ["stats", "--adapter", adapter, "--data", calibration, "--out", out, "--qlora", "nf4"]
    code, _, err = run_cli_output(capsys, *stats, "--model", quantised)
    assert code == 2 and err.count("\n") == 1, err
    assert f"{quantised}: is quantised already (bitsandbytes 4-bit nf4); --qlora takes the full-precision base" in err

    missing = tmp_path / "no_bitsandbytes" / "bitsandbytes"
    missing.mkdir(parents=True)
    (missing / "__init__.py").write_text("raise ImportError('bitsandbytes is not installed here')\n")
    without = {**os.environ, "PYTHONPATH": str(missing.parent)}
    ran = subprocess.run(
        [*console_script(), *map(str, stats), "--model", str(base)], capture_output=True, text=True, env=without
    )
    assert ran.returncode == 2 and ran.stderr.count("\n") == 1, ran.stderr
    assert "pip install bitsandbytes" in ran.stderr and not (tmp_path / "s.safetensors").exists()
    adapter = qlora_run[0]
    stats = ["stats", "--model", base, "--adapter", adapter, "--data", calibration, "--out", tmp_path / "s.safetensors"]
    ran = subprocess.run([*console_script(), *map(str, stats)], capture_output=True, text=True, env=without)
    assert ran.returncode == 2 and ran.stderr.count("\n") == 1, ran.stderr
    assert (
        f"{adapter}: saved a module in 4 bits (a QLoRA run's); reading it needs bitsandbytes: pip install" in ran.stderr
    )


@pytest.fixture(scope="module")
def qlora_run(kit, tmp_path_factory):
    """A QLoRA adapter as PEFT saves it from a 4-bit model (LLaMA-Factory's quantization_bit: 4
    loading), its projector kept whole (`modules_to_save`, LLaMA-Factory's `additional_target`):
    packed as bitsandbytes packed it, the quant state beside it. Also what training changed."""
    quant_type, double = SCHEMES["nf4-double"]
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double,
        bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_quant_storage=torch.float32,  # LLaMA-Factory's: its compute dtype
    )
    model = AutoModelForImageTextToText.from_pretrained(
        kit[0], quantization_config=config, dtype=torch.float32, device_map="cpu"
    )
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=LM_TARGETS, modules_to_save=["multi_modal_projector"])
    peft = get_peft_model(model, lora)
    generator = torch.Generator().manual_seed(5)
    trained = {}
    with torch.no_grad():
        for name, parameter in peft.named_parameters():
            # What training changes: the LoRA factors and the projector's biases (its packed weight
            # takes no gradient through the dequantisation, though PEFT marks it trainable).
            if "lora_" in name or (parameter.requires_grad and name.endswith(".bias")):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
                trained[name.replace(".default", "").replace("modules_to_save.", "")] = parameter.detach().clone()
    adapter = tmp_path_factory.mktemp("qlora_run") / "qlora_run"
    peft.save_pretrained(adapter)
    return adapter, trained


def test_a_qlora_runs_projector_saved_in_4_bits_is_read_at_full_precision(kit, qlora_run, capsys):
    """Read as the weights the layer computed with (the 4-bit base's, frozen in training) and the
    bias it trained."""
    base, _, calibration, _ = kit
    adapter, trained = qlora_run
    saved = load_file(adapter / "adapter_model.safetensors")
    projector = "base_model.model.model.multi_modal_projector"
    assert f"{projector}.linear_1.weight.absmax" in saved  # the layout under test: packed, quant state beside
    stats = ["stats", "--model", base, "--adapter", adapter, "--data", calibration, "--force"]
    code, err = run_cli(capsys, *stats)  # its quant state says which base it trained on: a note says so
    assert code == 0 and f"{adapter}: trained on a 4-bit base (nf4-double, its saved modules' quant" in err, err
    code, err = run_cli(capsys, *stats, "--qlora", "nf4-double")
    assert code == 0 and "trained on a 4-bit base" not in err, err
    taken_back = transformers_4bit_dequantised(base, "nf4-double").state_dict()
    with peft_adapter_dir(adapter) as converted:
        read = load_file(converted / "adapter_model.safetensors")
    for layer in ("linear_1", "linear_2"):
        assert torch.equal(
            read[f"{projector}.{layer}.weight"], taken_back[f"model.multi_modal_projector.{layer}.weight"]
        )
        assert torch.equal(read[f"{projector}.{layer}.bias"], trained[f"{projector}.{layer}.bias"])
    assert not [key for key in read if qlora.QUANT_STATE_KEY.match(key)]
    assert {key for key in read if "lora_" in key} == {key for key in saved if "lora_" in key}
    assert all(torch.equal(read[key], saved[key]) for key in read if "lora_" in key)


@pytest.mark.parametrize("fault", ["description", "scales"])
def test_a_broken_4bit_saved_module_is_one_line(kit, qlora_run, tmp_path, capsys, fault):
    base, _, calibration, _ = kit
    adapter = tmp_path / "broken"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_bytes((qlora_run[0] / "adapter_config.json").read_bytes())
    tensors = load_file(qlora_run[0] / "adapter_model.safetensors")
    layer = "base_model.model.model.multi_modal_projector.linear_1.weight"
    if fault == "description":
        tensors[f"{layer}.quant_state.bitsandbytes__nf4"] = torch.tensor(list(b"{not json"), dtype=torch.uint8)
    else:
        tensors[f"{layer}.absmax"] = tensors[f"{layer}.absmax"][:3]
    save_file(tensors, adapter / "adapter_model.safetensors")
    out = tmp_path / "s.safetensors"
    code, _, err = run_cli_output(
        capsys, "stats", "--model", base, "--adapter", adapter, "--data", calibration, "--out", out
    )
    assert code == 2 and err.count("\n") == 1 and str(adapter / "adapter_model.safetensors") in err, err
    assert not out.exists()
