"""Adapters saved under the module names of older transformers versions (before 4.52 a LLaVA's
language model was `language_model.model`, its projector `multi_modal_projector`; a Qwen2-VL's
`model` and `visual`): the same weights under the old names give the same statistics and the same
merge as under today's names, and a tensor that loads nowhere is refused before any work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from families import build_llava, build_qwen2_vl, family_adapter, write_records
from helpers import run_cli, stats_covariances
from safetensors.torch import load_file, save_file

# Today's prefix -> the one transformers < 4.52 saved (as PEFT wrote it, after base_model.model.).
OLD_NAMES = {
    "llava": {
        "model.language_model.": "language_model.model.",
        "model.multi_modal_projector.": "multi_modal_projector.",
    },
    "qwen2_vl": {"model.language_model.": "model.", "model.visual.": "visual."},
}
BUILDERS = {"llava": build_llava, "qwen2_vl": build_qwen2_vl}
SAMPLE = Path(__file__).parent.parent / "sample_adapters"


def old_name(name: str, family: str) -> str:
    for new, old in OLD_NAMES[family].items():
        if name.startswith(new):
            return old + name[len(new) :]
    return name


def resave_in_old_layout(adapter: Path, out: Path, family: str, targets: str) -> Path:
    """The same tensors under the old names; `targets` says how the config names the modules:
    "full" (a list of full old names, as LLaMA-Factory writes), "short" (q_proj, ...) or "regex"."""
    out.mkdir()
    weights = load_file(adapter / "adapter_model.safetensors")
    prefix = "base_model.model."
    save_file(
        {prefix + old_name(key.removeprefix(prefix), family): value for key, value in weights.items()},
        out / "adapter_model.safetensors",
        metadata={"format": "pt"},
    )
    config = json.loads((adapter / "adapter_config.json").read_text())
    modules = sorted({key.removeprefix(prefix).split(".lora_")[0] for key in weights if ".lora_" in key})
    config["target_modules"] = {
        "full": [old_name(module, family) for module in modules],
        "short": sorted({module.rsplit(".", 1)[1] for module in modules}),
        "regex": r".*\.layers\.\d+\.(self_attn|mlp)\.\w+_proj",
    }[targets]
    config["modules_to_save"] = [old_name(module, family) for module in config["modules_to_save"]]
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module", params=["llava", "qwen2_vl"])
def family_world(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    base = BUILDERS[request.param](root / "base")
    adapters = [family_adapter(base, root / f"task{index}", seed=20 + index) for index in range(2)]
    data = [write_records(root / "data", f"task{index}", 6, seed=index, task=index, audio=False) for index in range(2)]
    return request.param, root, base, adapters, data


@pytest.mark.parametrize(
    "targets", ["regex", pytest.param("full", marks=pytest.mark.slow), pytest.param("short", marks=pytest.mark.slow)]
)
def test_old_layout_gives_the_same_statistics_and_merge(family_world, tmp_path, capsys, targets):
    family, root, base, adapters, data = family_world
    new = [tmp_path / "new0", tmp_path / "new1"]
    for adapter, copy in zip(adapters, new):
        shutil.copytree(adapter, copy)
    old = resave_in_old_layout(adapters[1], tmp_path / "old1", family, targets)
    for adapter, records in ((new[0], data[0]), (new[1], data[1]), (old, data[1])):
        code, err = run_cli(capsys, "stats", "--model", base, "--adapter", adapter, "--data", records)
        assert code == 0, err
    expected, got = (stats_covariances(path / "many_stats.safetensors") for path in (new[1], old))
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)

    for method in ("many", "average"):  # one merge of both layouts, every method
        same, mixed = tmp_path / f"{method}-same", tmp_path / f"{method}-mixed"
        for adapters_in, out in (([new[0], new[1]], same), ([new[0], old], mixed)):
            code, err = run_cli(capsys, "merge", *adapters_in, "--out", out, "--method", method, "--no-experts")
            assert code == 0, err
        expected, got = load_file(same / "adapter_model.safetensors"), load_file(mixed / "adapter_model.safetensors")
        assert expected.keys() == got.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-6)
        assert (
            json.loads((same / "adapter_config.json").read_text())["target_modules"]
            == json.loads((mixed / "adapter_config.json").read_text())["target_modules"]
        )
        bundles = [load_file(out / "many_bundle.safetensors") for out in (same, mixed)]
        assert bundles[0].keys() == bundles[1].keys()
        for key in bundles[0]:
            torch.testing.assert_close(bundles[1][key], bundles[0][key])


def test_a_tensor_that_loads_nowhere_is_refused_before_any_work(family_world, tmp_path, capsys):
    """PEFT only warns about such keys, and the statistics would be those of the base model."""
    family, root, base, adapters, data = family_world
    nowhere = tmp_path / "nowhere"
    shutil.copytree(adapters[0], nowhere)
    weights = load_file(nowhere / "adapter_model.safetensors")
    moved = {key.replace(".layers.", ".blocks."): value for key, value in weights.items()}
    save_file(moved, nowhere / "adapter_model.safetensors", metadata={"format": "pt"})
    config = json.loads((nowhere / "adapter_config.json").read_text())
    (nowhere / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["q_proj", "v_proj"]}))
    code, err = run_cli(capsys, "stats", "--model", base, "--adapter", nowhere, "--data", data[0])
    assert code == 2 and str(nowhere) in err and "loads nowhere" in err and ".blocks." in err, err
    assert err.count("\n") == 1 and not (nowhere / "many_stats.safetensors").exists()

    saved_elsewhere = tmp_path / "mlp1"  # an OpenGVLab-style projector that this model does not have
    shutil.copytree(adapters[0], saved_elsewhere)
    weights = load_file(saved_elsewhere / "adapter_model.safetensors")
    weights["base_model.model.mlp1.0.weight"] = torch.ones(4, 4)
    save_file(weights, saved_elsewhere / "adapter_model.safetensors", metadata={"format": "pt"})
    config = json.loads((saved_elsewhere / "adapter_config.json").read_text())
    (saved_elsewhere / "adapter_config.json").write_text(
        json.dumps({**config, "modules_to_save": [*config["modules_to_save"], "mlp1"]})
    )
    code, err = run_cli(capsys, "stats", "--model", base, "--adapter", saved_elsewhere, "--data", data[0])
    assert code == 2 and str(saved_elsewhere) in err and "mlp1" in err and err.count("\n") == 1, err


FIXTURES = Path(__file__).parent / "fixtures" / "old_layouts"  # written by transformers 4.51.3 + PEFT 0.15.2
# What transformers 4.52 renamed, as the test knows it: an old prefix -> today's.
TODAY = {
    "llava": {
        "language_model.model.": "model.language_model.",
        "language_model.lm_head.": "lm_head.",
        "vision_tower.vision_model.": "model.vision_tower.",
        "multi_modal_projector.": "model.multi_modal_projector.",
    },
    "qwen2_vl": {"model.": "model.language_model.", "visual.": "model.visual."},
}
TODAY["llava_next"] = TODAY["llava"]


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_adapters_written_by_the_old_stack_load_as_their_weights_renamed_by_hand(family, tmp_path):
    """Each fixture loaded by many equals the same tensors re-keyed to today's names by this
    test's own table and loaded by plain PEFT: every LoRA factor and saved projector."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForImageTextToText

    from many_cli.models import apply_adapters

    config = AutoConfig.from_pretrained(FIXTURES / family)
    torch.manual_seed(0)
    base = AutoModelForImageTextToText.from_config(config).eval()
    state = {key: value.clone() for key, value in base.state_dict().items()}

    def today(name: str) -> str:
        prefix = next(old for old in TODAY[family] if f"{name}.".startswith(old))
        return (TODAY[family][prefix] + f"{name}."[len(prefix) :]).removesuffix(".")

    renamed = tmp_path / "renamed"
    renamed.mkdir()
    weights = load_file(FIXTURES / family / "adapter" / "adapter_model.safetensors")
    peft = "base_model.model."
    save_file(
        {peft + today(key.removeprefix(peft)): value for key, value in weights.items()},
        renamed / "adapter_model.safetensors",
    )
    saved_config = json.loads((FIXTURES / family / "adapter" / "adapter_config.json").read_text())
    modules = sorted({today(key.removeprefix(peft).split(".lora_")[0]) for key in weights if ".lora_" in key})
    (renamed / "adapter_config.json").write_text(
        json.dumps(
            {
                **saved_config,
                "target_modules": modules,
                "modules_to_save": [today(m) for m in saved_config["modules_to_save"]],
            }
        )
    )

    ours = apply_adapters(base, family, [(FIXTURES / family / "adapter", "default")]).state_dict()
    fresh = AutoModelForImageTextToText.from_config(config)
    fresh.load_state_dict(state)
    by_hand = PeftModel.from_pretrained(fresh.eval(), renamed).state_dict()
    assert ours.keys() == by_hand.keys()
    adapted = [key for key in ours if "lora_" in key or "modules_to_save" in key]
    assert len(adapted) >= 2 * len(modules)
    for key in ours:
        assert torch.equal(ours[key], by_hand[key]), key
    loaded = {key for key in adapted if "lora_B" in key and bool(ours[key].abs().sum() > 0)}
    assert len(loaded) == len(modules)  # every module got its saved factors (PEFT's fresh B is zero)


def test_a_remote_code_base_is_refused_in_one_line_without_asking(tmp_path, capsys):
    """A model that runs its own code from the checkpoint (MiniCPM-V's); transformers would ask first.
    (OpenGVLab's InternVL-Chat is translated instead: tests/test_opengvlab_internvl.py.)"""
    base = tmp_path / "MiniCPM-V-2_6"
    base.mkdir()
    (base / "config.json").write_text(
        json.dumps(
            {
                "model_type": "minicpmv",
                "auto_map": {
                    "AutoConfig": "configuration_minicpm.MiniCPMVConfig",
                    "AutoModel": "modeling_minicpmv.MiniCPMV",
                },
            }
        )
    )
    adapter, data = FIXTURES / "llava" / "adapter", tmp_path / "data.jsonl"
    data.write_text('{"prompt": "hi"}\n')
    code, err = run_cli(capsys, "stats", "--model", base, "--adapter", adapter, "--data", data, "--out", tmp_path / "s")
    assert code == 2 and "remote-code model" in err and "'minicpmv'" in err and err.count("\n") == 1, err


def test_a_baseline_merge_refuses_adapters_of_a_remote_code_base(tmp_path, capsys):
    """`merge --method average` reads no base, yet adapters whose config names a remote-code base
    here (MiniCPM-V's) are refused in one line, as every command that reads the base refuses it;
    the same adapters naming a base many runs merge."""
    base = tmp_path / "MiniCPM-V-2_6"
    base.mkdir()
    (base / "config.json").write_text(
        json.dumps({"model_type": "minicpmv", "auto_map": {"AutoModel": "modeling_minicpmv.MiniCPMV"}})
    )
    adapters = []
    for task in ("1_colour", "2_count"):
        adapter = shutil.copytree(SAMPLE / "adapters" / task, tmp_path / task)
        config = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(base)}))
        adapters.append(adapter)
    code, err = run_cli(capsys, "merge", *adapters, "--method", "average", "--out", tmp_path / "merged")
    assert code == 2 and err.count("\n") == 1, err
    assert f"{adapters[0] / 'adapter_config.json'}: names its base {base}: is a remote-code model" in err, err
    assert not (tmp_path / "merged").exists()
    code, err = run_cli(
        capsys,
        "merge",
        *(SAMPLE / "adapters" / t for t in ("1_colour", "2_count")),
        "--method",
        "average",
        "--out",
        tmp_path / "ok",
    )
    assert code == 0, err
    # a maker's layout many translates is not checked further: nothing of it is read here (a
    # LLaVA-code base whose tower folder is not on this machine, as on a training machine's paths)
    llava_code = shutil.copytree(Path(__file__).parent / "fixtures" / "llava_code" / "base", tmp_path / "llava-base")
    for adapter in adapters:
        config = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(llava_code)}))
    code, err = run_cli(capsys, "merge", *adapters, "--method", "average", "--out", tmp_path / "merged")
    assert code == 0, err


def test_a_baseline_merge_of_layouts_it_cannot_map_warns(tmp_path, capsys):
    """Without stats files nothing maps an old layout's names: the merge says so."""
    lora_only = []
    for task in ("1_colour", "2_count"):  # LoRA alone (a projector under two names is refused already)
        adapter = shutil.copytree(SAMPLE / "adapters" / task, tmp_path / f"lora_{task}")
        weights = load_file(adapter / "adapter_model.safetensors")
        save_file({k: v for k, v in weights.items() if "projector" not in k}, adapter / "adapter_model.safetensors")
        config = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": []}))
        lora_only.append(adapter)
    new = lora_only[0]
    old = resave_in_old_layout(lora_only[1], tmp_path / "old", "llava", "full")
    code, err = run_cli(capsys, "merge", new, old, "--method", "average", "--out", tmp_path / "merged")
    assert code == 0 and "warning:" in err and "adapt different module names" in err and str(old) in err, err


def test_an_adapter_naming_another_base_gets_a_note(tmp_path, capsys):
    """A note, not a refusal: the same model sits at other paths on other machines; the stats
    file's base fingerprint is what merges check."""
    adapters = [shutil.copytree(SAMPLE / "adapters" / task, tmp_path / task) for task in ("1_colour", "2_count")]
    config = json.loads((adapters[1] / "adapter_config.json").read_text())
    (adapters[1] / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "org/other-vlm"}))
    for adapter in adapters:
        code, err = run_cli(
            capsys,
            "stats",
            "--model",
            SAMPLE / "base",
            "--adapter",
            adapter,
            "--data",
            SAMPLE / "data" / adapter.name / "calibration.jsonl",
        )
        assert code == 0, err
        assert ("names the base model 'org/other-vlm'" in err) == (adapter.name == "2_count"), err
    code, err = run_cli(capsys, "merge", *adapters, "--out", tmp_path / "merged")
    assert code == 0 and "name different base models (org/other-vlm, sample_adapters/base)" in err, err
