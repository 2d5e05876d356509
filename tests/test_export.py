"""`many export`: a sharded base streamed into the same shards with the merge folded in, every
shard kept inside --out, and what it refuses."""

from __future__ import annotations

import json
import shutil

import torch
from helpers import run_cli, run_cli_output


def test_export_streams_a_sharded_checkpoint_into_the_same_shards(world, tmp_path, capsys):
    """A base saved in several shards: the export keeps its files, keys and dtypes; each merged
    module's weight is W + B A (the merged adapter's factors, read here), the projector the
    mean of the task projectors (read from the adapters), every other tensor unchanged."""
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    sharded = tmp_path / "base"
    model = AutoModelForImageTextToText.from_pretrained(world.base)
    model.save_pretrained(sharded, max_shard_size="40KB")
    for path in world.base.iterdir():
        if not path.name.startswith("model") and not (sharded / path.name).exists():
            shutil.copy2(path, sharded / path.name)
    shards = sorted(path.name for path in sharded.glob("*.safetensors"))
    assert len(shards) > 2
    merged, out = tmp_path / "merged", tmp_path / "exported"
    assert run_cli(capsys, "merge", *world.adapters, "--out", merged)[0] == 0
    code, err = run_cli(capsys, "export", "--model", sharded, "--merged", merged, "--projector", "mean", "--out", out)
    assert code == 0, err
    assert sorted(path.name for path in out.glob("*.safetensors")) == shards
    assert (out / "model.safetensors.index.json").read_text() == (sharded / "model.safetensors.index.json").read_text()
    before, after = {}, {}
    for shard in shards:
        before.update(load_file(sharded / shard))
        after.update(load_file(out / shard))
    assert before.keys() == after.keys()
    factors = load_file(merged / "adapter_model.safetensors")
    projectors = [load_file(adapter / "adapter_model.safetensors") for adapter in world.adapters]
    changed = 0
    for key, tensor in before.items():
        assert after[key].dtype == tensor.dtype
        # The checkpoint's own (older) layout: language_model.model.X is the model's model.language_model.X.
        lora = f"base_model.model.model.language_model.{key.removeprefix('language_model.model.')}"[: -len("weight")]
        if key.startswith("language_model.model.") and f"{lora}lora_A.weight" in factors:
            a, b = factors[f"{lora}lora_A.weight"], factors[f"{lora}lora_B.weight"]
            assert torch.allclose(after[key], tensor + b @ a, atol=1e-6), key
            changed += 1
        elif key.startswith("multi_modal_projector."):
            saved = f"base_model.model.model.{key}"
            mean = sum(weights[saved] for weights in projectors) / len(projectors)
            assert torch.allclose(after[key], mean, atol=1e-6), key
            changed += 1
        else:
            assert torch.equal(after[key], tensor), key
    assert changed == 2 * 7 + 4  # every merged module, and the projector's two layers


def test_export_keeps_every_shard_inside_out_whatever_the_index_names(world, tmp_path, capsys):
    """An index naming a shard by an absolute path or through `..` is refused before anything is
    written (the shard, or a file beside --out, would be overwritten); a shard in a sub-folder
    is exported to the same sub-folder."""
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    sharded = tmp_path / "base"
    AutoModelForImageTextToText.from_pretrained(world.base).save_pretrained(sharded, max_shard_size="40KB")
    for path in world.base.iterdir():
        if not path.name.startswith("model") and not (sharded / path.name).exists():
            shutil.copy2(path, sharded / path.name)
    merged = tmp_path / "merged"
    assert run_cli(capsys, "merge", *world.adapters, "--out", merged)[0] == 0
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    moved = sorted(set(index["weight_map"].values()))[-1]
    outside = tmp_path / "outside.safetensors"
    shutil.move(sharded / moved, outside)
    before = outside.read_bytes()
    bystander = tmp_path / "bystander.safetensors"
    bystander.write_bytes(b"the user's")
    for name in (str(outside), "../outside.safetensors", "../bystander.safetensors"):
        renamed = {key: name if shard == moved else shard for key, shard in index["weight_map"].items()}
        index_path.write_text(json.dumps({**index, "weight_map": renamed}))
        code, _, err = run_cli_output(
            capsys, "export", "--model", sharded, "--merged", merged, "--out", tmp_path / "exported"
        )
        assert code == 2 and "is not a path inside the model's folder" in err and err.count("\n") == 1, err
        assert outside.read_bytes() == before and bystander.read_bytes() == b"the user's"
        assert not (tmp_path / "exported").exists()

    (sharded / "shards").mkdir()
    shutil.move(outside, sharded / "shards" / moved)
    renamed = {key: f"shards/{moved}" if shard == moved else shard for key, shard in index["weight_map"].items()}
    index_path.write_text(json.dumps({**index, "weight_map": renamed}))
    code, err = run_cli(capsys, "export", "--model", sharded, "--merged", merged, "--out", tmp_path / "exported")
    assert code == 0, err
    assert load_file(tmp_path / "exported" / "shards" / moved).keys() == load_file(sharded / "shards" / moved).keys()
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "exported")
    assert set(reloaded.state_dict()) == set(AutoModelForImageTextToText.from_pretrained(sharded).state_dict())


def test_export_refuses_a_base_that_is_not_a_local_model_and_an_unknown_task(world, tmp_path, capsys):
    merged = tmp_path / "merged"
    assert run_cli(capsys, "merge", *world.adapters, "--out", merged)[0] == 0
    code, _, err = run_cli_output(
        capsys, "export", "--model", "llava-hf/llava-1.5-7b-hf", "--merged", merged, "--out", tmp_path / "out"
    )
    assert code == 2 and "give a local model directory" in err and err.count("\n") == 1
    code, _, err = run_cli_output(
        capsys,
        "export",
        "--model",
        world.base,
        "--merged",
        merged,
        "--projector",
        "nosuchtask",
        "--out",
        tmp_path / "out",
    )
    assert code == 2 and "has no task 'nosuchtask'" in err and not (tmp_path / "out").exists()
    code, _, err = run_cli_output(
        capsys, "export", "--model", world.base, "--merged", merged, "--out", merged / "inside"
    )
    assert code == 2 and not (merged / "inside").exists()
