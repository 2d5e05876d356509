"""A merge, a stats file and an `infer --adapter` run know their base by its config and its
weights: another base is refused in one line naming the file that records it; the same weights
sharded otherwise are the same base."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import build_base, invoke, run_cli, write_task_stats
from safetensors.torch import load_file, save_file

from many_cli.models import base_fingerprint

SAMPLE = Path(__file__).parent.parent / "sample_adapters"


@pytest.fixture(scope="module")
def bases(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    other_config = shutil.copytree(world.base, root / "other_config")
    config = json.loads((other_config / "config.json").read_text())
    config["text_config"]["rms_norm_eps"] = 1e-5 if config["text_config"].get("rms_norm_eps") != 1e-5 else 1e-6
    (other_config / "config.json").write_text(json.dumps(config))
    other_weights = build_base(root / "other_weights", seed=1)
    nudged = shutil.copytree(world.base, root / "nudged")  # one tensor of the language model changed
    weights = load_file(nudged / "model.safetensors")
    name = next(key for key in sorted(weights) if "layers.0.self_attn.q_proj" in key)
    weights[name] = weights[name] + 1e-3
    save_file(weights, nudged / "model.safetensors", metadata={"format": "pt"})
    return {"other config": other_config, "other weights": other_weights, "nudged": nudged}


@pytest.fixture(scope="module")
def merged(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("merge") / "merged"
    assert invoke("merge", *world.adapters[:2], "--out", out) == 0
    return out


def test_another_base_is_refused_naming_the_file_that_records_the_base(world, bases, merged, tmp_path, capsys):
    """The bundle records the base, so a merge without its state (the largest file, which only
    --resume needs) still refuses another base."""
    bundle, stats = merged / "many_bundle.safetensors", world.adapters[0] / "many_stats.safetensors"
    stateless = shutil.copytree(merged, tmp_path / "stateless")
    (stateless / "many_state.safetensors").unlink()
    for kind, base in bases.items():
        how = "another config" if kind == "other config" else "the same config but other weights"
        cases = [
            (["infer", "--model", base, "--merged", merged, "--prompt", "hi"], bundle),
            (["infer", "--model", base, "--merged", stateless, "--prompt", "hi"], stateless / bundle.name),
            (["infer", "--model", base, "--adapter", world.adapters[0], "--prompt", "hi"], stats),
            (["export", "--model", base, "--merged", merged, "--out", tmp_path / "exported"], bundle),
            (
                ["export", "--model", base, "--merged", stateless, "--out", tmp_path / "exported"],
                stateless / bundle.name,
            ),
        ]
        for args, named in cases:
            code, err = run_cli(capsys, *args)
            assert code == 2 and err.count("\n") == 1, (args, err)
            assert f"{named}: was built on another base model than {base} ({how})" in err, (args, err)
    assert not (tmp_path / "exported").exists()


def test_resuming_with_stats_taken_on_another_base_is_refused(world, bases, merged, tmp_path, capsys):
    adapter = shutil.copytree(world.adapters[2], tmp_path / world.adapters[2].name)
    write_task_stats(adapter, world.covariances[2], 36, base_fingerprint=base_fingerprint(str(bases["nudged"])))
    code, err = run_cli(capsys, "merge", adapter, "--resume", merged, "--out", tmp_path / "next")
    assert code == 2 and "was computed on another base model" in err and str(adapter) in err, err


def test_the_same_weights_sharded_otherwise_are_the_same_base(world, merged, tmp_path, capsys):
    sharded = shutil.copytree(world.base, tmp_path / "sharded", ignore=shutil.ignore_patterns("model.safetensors"))
    weights = load_file(world.base / "model.safetensors")
    names = sorted(weights)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in halves.items():
        save_file({key: weights[key] for key in keys}, sharded / shard, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {key: shard for shard, keys in halves.items() for key in keys}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    assert base_fingerprint(str(sharded)) == base_fingerprint(str(world.base))
    code, err = run_cli(capsys, "infer", "--model", sharded, "--merged", merged, "--prompt", "hi")
    assert code == 0, err


def test_every_tensor_counts_and_a_copy_is_the_same_base(world, bases, tmp_path):
    copy = shutil.copytree(world.base, tmp_path / "copy")
    fingerprints = {base_fingerprint(str(path)) for path in [world.base, copy]}
    assert len(fingerprints) == 1
    assert base_fingerprint(str(bases["nudged"])) not in fingerprints
    weights = load_file(world.base / "model.safetensors")
    generator = torch.Generator().manual_seed(0)
    for name in sorted(weights)[:: max(1, len(weights) // 6)]:  # a fine-tune's change to any one tensor shows
        update = 1e-4 * torch.randn(weights[name].shape, generator=generator)
        save_file({**weights, name: weights[name] + update}, copy / "model.safetensors", metadata={"format": "pt"})
        assert base_fingerprint(str(copy)) not in fingerprints, name


def test_a_quantised_base_is_refused_in_one_line_where_it_cannot_be_run(tmp_path, capsys):
    """A base saved quantised (bitsandbytes 4-bit, as LLaMA-Factory's `quantization_bit: 4` export
    or a hub -bnb-4bit checkpoint): without bitsandbytes, one line saying what to install; `export`
    refuses it before reading anything, since it folds into full-precision weights."""
    import importlib.util

    base = shutil.copytree(SAMPLE / "base", tmp_path / "base-bnb-4bit")
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
    }
    (base / "config.json").write_text(json.dumps(config))
    adapter = SAMPLE / "adapters" / "1_colour"
    if importlib.util.find_spec("bitsandbytes") is None:
        code, err = run_cli(capsys, "infer", "--model", base, "--adapter", adapter, "--prompt", "hi", "--device", "cpu")
        assert code == 2 and err.count("\n") == 1, err
        assert f"{base}: is quantised (bitsandbytes 4-bit nf4); loading it needs bitsandbytes (pip install" in err, err
    out = tmp_path / "exported"
    code, err = run_cli(capsys, "export", "--model", base, "--merged", adapter, "--out", out)
    assert code == 2 and err.count("\n") == 1, err
    assert "is quantised (bitsandbytes 4-bit nf4): export folds the merge into full-precision weights" in err, err
    assert not out.exists()
