"""An adapter's config is read as PEFT reads it (its defaults, its types), checked against PEFT
itself; one that belongs to another base than the one given (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA
saved unconverted) is refused; a malformed one is one line naming its file."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import LM_TARGETS, load_base, make_adapter, run_cli
from peft import LoraConfig, PeftModel

from many_cli.adapters import read_adapter


def _rewrite_config(adapter, change) -> None:
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def test_a_config_without_lora_alpha_scales_as_peft_scales_it(world, tmp_path):
    adapter = make_adapter(world.base, tmp_path / "task", LoraConfig(r=16, lora_alpha=16, target_modules=LM_TARGETS), 1)
    _rewrite_config(adapter, lambda config: config.pop("lora_alpha"))
    peft_model = PeftModel.from_pretrained(load_base(world.base), adapter)
    scalings = {
        name.removeprefix("base_model.model."): module.scaling["default"]
        for name, module in peft_model.named_modules()
        if isinstance(getattr(module, "scaling", None), dict) and "default" in module.scaling
    }
    ours = {name: module.scale for name, module in read_adapter(adapter).modules.items()}
    assert scalings and set(ours) == set(scalings)
    assert all(ours[name] == pytest.approx(scalings[name]) for name in ours), (ours, scalings)
    assert set(ours.values()) == {0.5}  # PEFT's default lora_alpha 8 over r 16


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "corda", "loftq", "lora_ga"])
def test_an_adapter_for_a_changed_base_is_refused_saying_how_to_convert_it(world, tmp_path, capsys, init):
    adapter = make_adapter(world.base, tmp_path / "task", LoraConfig(r=2, lora_alpha=4, target_modules=LM_TARGETS), 1)
    _rewrite_config(adapter, lambda config: config.update(init_lora_weights=init))
    shutil.copy(world.adapters[0] / "many_stats.safetensors", adapter / "many_stats.safetensors")
    commands = [
        ["merge", adapter, "--out", tmp_path / "merged"],
        ["stats", "--model", world.base, "--adapter", adapter, "--data", tmp_path / "data.jsonl"],
        ["infer", "--model", world.base, "--adapter", adapter, "--prompt", "hi"],
    ]
    (tmp_path / "data.jsonl").write_text('{"prompt": "hi"}\n')
    for args in commands:
        code, err = run_cli(capsys, *args)
        assert code == 2 and err.count("\n") == 1, (args, err)
        assert f"{adapter / 'adapter_config.json'}: init_lora_weights {init!r}" in err, err
        assert "path_initial_model_for_weight_conversion" in err
    assert not (tmp_path / "merged").exists()


def test_pissa_saved_converted_is_a_plain_lora_of_the_original_base(world, tmp_path):
    """PEFT's own conversion, run here: its adapter on the original base is the trained model."""
    from peft import get_peft_model

    base = load_base(world.base)
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=2, target_modules=LM_TARGETS, init_lora_weights="pissa"))
    model.save_pretrained(tmp_path / "initial")  # the adapter before training
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.add_(0.05 * torch.randn_like(parameter))  # "training"
    model.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    ours = read_adapter(tmp_path / "converted")
    original = load_base(world.base).state_dict()
    trained = model.merge_and_unload().state_dict()
    module = sorted(ours.modules)[0]
    a, b = ours.lora_factors(module)
    weight = f"{module}.weight"
    delta = ours.modules[module].scale * b.double() @ a.double()
    assert torch.allclose(original[weight].double() + delta, trained[weight].double(), atol=1e-5)


@pytest.mark.parametrize(
    "change, fault",
    [
        (lambda c: c.update(lora_alpha="16"), "lora_alpha is '16': PEFT expects a number"),
        (lambda c: c.update(r="8"), "r is '8': PEFT expects a positive integer"),
        (lambda c: c.update(r=0), "r is 0: PEFT expects a positive integer"),
        (lambda c: c.update(use_rslora="yes"), "use_rslora is 'yes'"),
        (lambda c: c.update(rank_pattern={"[": 8}), "rank_pattern key '[' is not a regular expression"),
        (lambda c: c.update(alpha_pattern={"q_proj": None}), "alpha_pattern gives 'q_proj' None"),
        (lambda c: c.update(rank_pattern=[1]), "rank_pattern is [1]"),
    ],
)
def test_a_malformed_config_is_one_line_naming_it(world, tmp_path, capsys, change, fault):
    adapter = shutil.copytree(world.adapters[0], tmp_path / "task")
    _rewrite_config(adapter, change)
    code, err = run_cli(capsys, "merge", adapter, "--out", tmp_path / "merged")
    assert code == 2 and err == f"many: error: {adapter / 'adapter_config.json'}: {fault}" + err.split(fault, 1)[1]
    assert err.count("\n") == 1, err


def test_a_config_nested_too_deeply_is_one_line_naming_it(world, tmp_path, capsys):
    adapter = shutil.copytree(world.adapters[0], tmp_path / "task")
    (adapter / "adapter_config.json").write_text("[" * 200_000 + "]" * 200_000)
    code, err = run_cli(capsys, "merge", adapter, "--out", tmp_path / "merged")
    assert (
        code == 2
        and err == f"many: error: {adapter / 'adapter_config.json'}: not valid JSON for many (nested too deeply)\n"
    )


def test_an_adapter_saved_with_its_embedding_layers_is_refused_saying_why(world, tmp_path, capsys):
    from peft import get_peft_model

    model = get_peft_model(load_base(world.base), LoraConfig(r=2, lora_alpha=4, target_modules=LM_TARGETS))
    model.save_pretrained(tmp_path / "task", save_embedding_layers=True)  # PEFT's own writer, as after a resize
    shutil.copy(world.adapters[0] / "many_stats.safetensors", tmp_path / "task" / "many_stats.safetensors")
    code, err = run_cli(capsys, "merge", tmp_path / "task", "--out", tmp_path / "merged")
    assert code == 2 and err.count("\n") == 1
    assert "as PEFT's save_embedding_layers saves an input or output embedding after the vocabulary was resized" in err
