"""Checkpoints in the original LLaVA training layout, written by hand from a PEFT adapter of
the shipped sample, against that same PEFT adapter."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import invoke, run_cli
from safetensors.torch import load_file

SAMPLE = Path(__file__).resolve().parent.parent / "sample_adapters"
TASK = "2_count"
SHORT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_llava_layout(peft_dir: Path, out: Path) -> None:
    """What the LLaVA repository's train.py saves: LoRA keys under LlavaLlamaForCausalLM names
    in adapter_model.bin, the projector as mm_projector.{0,2} in non_lora_trainables.bin, and a
    config whose target_modules are short names (find_all_linear_names)."""
    out.mkdir(parents=True)
    lora, projector = {}, {}
    for key, value in load_file(peft_dir / "adapter_model.safetensors").items():
        if ".multi_modal_projector." in key:
            layer, parameter = key.split(".multi_modal_projector.")[1].split(".")
            projector[f"base_model.model.model.mm_projector.{ {'linear_1': 0, 'linear_2': 2}[layer] }.{parameter}"] = (
                value
            )
        else:
            lora[key.replace(".model.language_model.", ".model.")] = value
    torch.save(lora, out / "adapter_model.bin")
    torch.save(projector, out / "non_lora_trainables.bin")
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    config.update(
        target_modules=SHORT_TARGETS,
        modules_to_save=None,
        exclude_modules=None,
        base_model_name_or_path="lmsys/vicuna-7b-v1.5",
    )
    (out / "adapter_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava_layout")
    peft_dir = shutil.copytree(SAMPLE / "adapters" / TASK, root / "peft" / TASK)
    llava_dir = root / "llava" / TASK
    write_llava_layout(peft_dir, llava_dir)
    return root, peft_dir, llava_dir


def test_convert_maps_every_key_to_the_peft_name(checkpoints, capsys):
    root, peft_dir, llava_dir = checkpoints
    code, err = run_cli(capsys, "convert", llava_dir, "--out", root / "converted")
    assert code == 0, err
    converted = load_file(root / "converted" / "adapter_model.safetensors")
    original = load_file(peft_dir / "adapter_model.safetensors")
    assert converted.keys() == original.keys()
    for key, value in original.items():
        assert torch.equal(converted[key], value), key


def test_converted_adapter_loads_into_the_same_model(checkpoints, capsys):
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    root, peft_dir, llava_dir = checkpoints
    assert invoke("convert", llava_dir, "--out", root / "converted_for_load", "--force") == 0

    def adapted(directory: Path):
        model = LlavaForConditionalGeneration.from_pretrained(SAMPLE / "base")
        return PeftModel.from_pretrained(model, str(directory)).eval()

    expected, actual = adapted(peft_dir), adapted(root / "converted_for_load")
    # Short target names would also have matched the vision tower's q/k/v: the conversion must not.
    names = {name for name, _ in actual.named_modules() if name.endswith(".lora_A")}
    assert names == {name for name, _ in expected.named_modules() if name.endswith(".lora_A")}
    assert not any("vision_tower" in name for name in names)
    torch.manual_seed(0)
    inputs = {"input_ids": torch.tensor([[1] + [4] * 16 + [20, 30, 40]]), "pixel_values": torch.rand(1, 3, 32, 32)}
    with torch.no_grad():
        assert torch.allclose(actual(**inputs).logits, expected(**inputs).logits, atol=0, rtol=0)


def test_stats_and_merge_take_the_original_layout_directly(checkpoints, tmp_path, capsys):
    root, peft_dir, llava_dir = checkpoints
    data = SAMPLE / "data" / TASK / "calibration.jsonl"
    for adapter in (peft_dir, llava_dir):
        code, err = run_cli(
            capsys, "stats", "--model", SAMPLE / "base", "--adapter", adapter, "--data", data, "--max-samples", "8"
        )
        assert code == 0, err
    for adapter, out in ((peft_dir, tmp_path / "from_peft"), (llava_dir, tmp_path / "from_llava")):
        code, err = run_cli(capsys, "merge", adapter, "--out", out)
        assert code == 0, err
    expected = load_file(tmp_path / "from_peft" / "adapter_model.safetensors")
    actual = load_file(tmp_path / "from_llava" / "adapter_model.safetensors")
    assert actual.keys() == expected.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


def test_a_pickle_that_is_not_tensors_is_refused(checkpoints, tmp_path, capsys):
    _, _, llava_dir = checkpoints
    bad = shutil.copytree(llava_dir, tmp_path / "bad")
    torch.save({"projector": torch.zeros(2), "note": Path("x")}, bad / "non_lora_trainables.bin")
    code, err = run_cli(capsys, "convert", bad, "--out", tmp_path / "out")
    assert code == 2
    assert "non_lora_trainables.bin" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fault, message", [(float("nan"), "holds NaN or Inf"), (None, "not floating point")])
def test_nan_or_integer_lora_weights_are_refused_naming_the_checkpoint(checkpoints, tmp_path, capsys, fault, message):
    _, _, llava_dir = checkpoints
    bad = shutil.copytree(llava_dir, tmp_path / "bad")
    lora = torch.load(bad / "adapter_model.bin", weights_only=True)
    key = next(iter(lora))
    lora[key] = lora[key].clone().fill_(fault) if fault is not None else lora[key].to(torch.int32)
    torch.save(lora, bad / "adapter_model.bin")
    code, err = run_cli(capsys, "convert", bad, "--out", tmp_path / "out")
    assert code == 2 and message in err and str(bad / "adapter_model.bin") in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_stats_on_the_original_layout_names_the_checkpoint_not_a_temporary_copy(checkpoints, world, tmp_path, capsys):
    _, _, llava_dir = checkpoints
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "hi"}\n')
    code, err = run_cli(
        capsys,
        "stats",
        "--model",
        world.base,
        "--adapter",
        llava_dir,
        "--data",
        data,
        "--out",
        tmp_path / "stats.safetensors",
        "--text-only",
    )  # a base of other widths
    assert code == 2 and f"{llava_dir}: does not fit the base model" in err and "many-llava-" not in err, err
