"""Serving-ready output: the rank budget (`merge --rank`) against a dense weighted SVD, and merged
adapters that PEFT reloads whatever the module names."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import RIDGE, dense_reference, merged_deltas, output_error, run_cli, run_cli_output
from peft import PeftModel
from torch import nn

from many_cli.adapters import MergedAdapterWriter, MergedModule


def best_rank_in_output_space(reference: torch.Tensor, gram: torch.Tensor, rank: int) -> tuple[torch.Tensor, float]:
    """argmin over rank-`rank` τ of ‖(τ − τ_ref) L‖, H + ridge = L Lᵀ, by a dense SVD of τ_ref L;
    and the fraction of ‖τ_ref L‖² it keeps."""
    loaded = gram + RIDGE * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=torch.float64)
    lower = torch.linalg.cholesky(loaded)
    u, s, vh = torch.linalg.svd(reference @ lower)
    best = (u[:, :rank] * s[:rank]) @ vh[:rank] @ torch.linalg.inv(lower)
    return best, float(s[:rank].square().sum() / s.square().sum())


def test_rank_budget_is_the_best_fit_in_each_layers_output_space(world, tmp_path, capsys):
    out = tmp_path / "merged"
    code, err = run_cli(capsys, "merge", *world.adapters, "--out", out, "--ridge", RIDGE, "--rank", "4")
    assert code == 0, err
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 4
    assert "rank_pattern" not in config and "alpha_pattern" not in config
    deltas = merged_deltas(world, out)  # PEFT reloads it
    assert len(deltas) == 2 * 7
    kept, whole = 0.0, 0.0
    for module, delta in deltas.items():
        assert torch.linalg.matrix_rank(delta, rtol=1e-5) <= 4  # PEFT multiplies in float32
        reference, gram = dense_reference(world, module, RIDGE)
        best, fraction = best_rank_in_output_space(reference, gram, 4)
        assert output_error(delta, best, gram) <= 1e-4, module
        # The plain Frobenius SVD is a worse fit where it counts (the layer's outputs).
        u, s, vh = torch.linalg.svd(reference)
        frobenius = (u[:, :4] * s[:4]) @ vh[:4]
        assert output_error(frobenius, reference, gram) > output_error(delta, reference, gram)
        weighted = (
            (
                reference
                @ torch.linalg.cholesky(
                    gram + RIDGE * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=torch.float64)
                )
            )
            .square()
            .sum()
        )
        kept, whole = kept + fraction * weighted, whole + weighted
    assert f"{float(kept / whole):.2%} of the merged update's output energy kept" in err
    assert "--rank 4" in (out / "README.md").read_text()


def test_a_rank_budget_above_the_sum_of_ranks_is_exact(world, tmp_path, capsys):
    out = tmp_path / "merged"
    code, err = run_cli(capsys, "merge", *world.adapters, "--out", out, "--ridge", RIDGE, "--rank", "16")
    assert code == 0, err
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 16
    for module, delta in merged_deltas(world, out).items():
        reference, gram = dense_reference(world, module, RIDGE)
        assert output_error(delta, reference, gram) <= 1e-5, module
    assert "100.00% of the merged update's output energy kept" in err

    huge = tmp_path / "huge"  # beyond every layer's full rank (32 and 48 wide): capped there, and said
    code, err = run_cli(capsys, "merge", *world.adapters, "--out", huge, "--ridge", RIDGE, "--rank", "100000")
    assert code == 0 and "--rank 100000 exceeds the full rank of every merged module (at most 32" in err, err
    assert json.loads((huge / "adapter_config.json").read_text())["r"] == 32
    assert (huge / "adapter_model.safetensors").stat().st_size < 4 * (out / "adapter_model.safetensors").stat().st_size
    for module, delta in merged_deltas(world, huge).items():
        reference, gram = dense_reference(world, module, RIDGE)
        assert output_error(delta, reference, gram) <= 1e-5, module


def test_baselines_take_the_plain_frobenius_fit(world, tmp_path, capsys):
    full, budget = tmp_path / "full", tmp_path / "budget"
    assert run_cli(capsys, "merge", *world.adapters, "--out", full, "--method", "average")[0] == 0
    assert run_cli(capsys, "merge", *world.adapters, "--out", budget, "--method", "average", "--rank", "3")[0] == 0
    exact, reduced = merged_deltas(world, full), merged_deltas(world, budget)
    for module, delta in exact.items():
        u, s, vh = torch.linalg.svd(delta)
        best = (u[:, :3] * s[:3]) @ vh[:3]
        assert torch.linalg.norm(reduced[module] - best) <= 1e-5 * torch.linalg.norm(best), module


def test_resume_under_a_rank_budget_equals_the_batch_merge(world, tmp_path, capsys):
    a, b, c = world.adapters
    assert run_cli(capsys, "merge", a, b, "--out", tmp_path / "first")[0] == 0
    assert (
        run_cli(capsys, "merge", c, "--resume", tmp_path / "first", "--out", tmp_path / "resumed", "--rank", "4")[0]
        == 0
    )
    assert run_cli(capsys, "merge", a, b, c, "--out", tmp_path / "batch", "--rank", "4")[0] == 0
    resumed, batch = merged_deltas(world, tmp_path / "resumed"), merged_deltas(world, tmp_path / "batch")
    for module, delta in batch.items():
        assert torch.linalg.norm(resumed[module] - delta) <= 1e-5 * torch.linalg.norm(delta), module


def test_a_rank_below_one_is_refused(world, tmp_path, capsys):
    code, _, err = run_cli_output(capsys, "merge", *world.adapters, "--out", tmp_path / "m", "--rank", "0")
    assert code == 2 and "--rank must be ≥ 1" in err and not (tmp_path / "m").exists()


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 5)


class Confusable(nn.Module):
    """Module names one of which ends like another: `inner.proj` and `outer.inner.proj`."""

    def __init__(self):
        super().__init__()
        self.inner = Block()
        self.outer = nn.Module()
        self.outer.inner = Block()
        self.other = Block()


@pytest.mark.parametrize(
    "ranks",
    [
        {"inner.proj": 2, "outer.inner.proj": 5, "other.proj": 2},
        {"outer.inner.proj": 2, "inner.proj": 5, "other.proj": 2},
    ],
)
def test_per_module_ranks_reload_in_peft_whatever_the_names(tmp_path, ranks):
    torch.manual_seed(0)
    factors = {name: (torch.randn(rank, 6), torch.randn(5, rank)) for name, rank in ranks.items()}
    writer = MergedAdapterWriter(tmp_path, [MergedModule(name, rank, 6, 5) for name, rank in ranks.items()], None)
    for name, (a, b) in factors.items():
        writer.write(name, a, b)
    writer.close()
    model = PeftModel.from_pretrained(Confusable(), tmp_path)
    for name, (a, b) in factors.items():
        layer = model.base_model.model.get_submodule(name)
        assert layer.r["default"] == ranks[name]
        assert torch.allclose(layer.get_delta_weight("default"), b @ a, atol=1e-5), name


def test_the_card_is_a_hugging_face_card_with_the_merge_in_its_metadata(world, tmp_path, capsys):
    from huggingface_hub import ModelCard

    copies = []
    for adapter in world.adapters:  # as trained from a hub model
        copies.append(tmp_path / "in" / adapter.name)
        shutil.copytree(adapter, copies[-1])
        config = json.loads((copies[-1] / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = "llava-hf/llava-1.5-7b-hf"
        (copies[-1] / "adapter_config.json").write_text(json.dumps(config))
    out = tmp_path / "merged"
    assert run_cli(capsys, "merge", *copies, "--out", out, "--rank", "4", "--ridge", "0.01")[0] == 0
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "peft" and card.data.base_model == "llava-hf/llava-1.5-7b-hf"
    assert {"lora", "model-merging"} <= set(card.data.tags)
    many = card.data.to_dict()["many"]
    assert many["method"] == "many" and many["rank"] == 4 and many["ridge"] == 0.01
    assert many["tasks"] == ["task0", "task1", "task2"] and 0 < many["energy_kept"] <= 1
    assert "PeftModel.from_pretrained" in card.text

    local = tmp_path / "local"  # a local base path is no hub id: kept under `many` only
    assert run_cli(capsys, "merge", *world.adapters, "--out", local)[0] == 0
    data = ModelCard.load(local / "README.md").data.to_dict()
    assert "base_model" not in data and data["many"]["base_model"] == str(world.base)


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


def test_the_readmes_python_api_example_runs_and_its_two_paths_agree(monkeypatch, capsys):
    """The README's Python API block, executed as written from the repository root: the merge
    keeps some energy at rank 8, and `many_cli.answer` and transformers' own `generate` on the
    loaded model give the same words."""
    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    section = readme[readme.index("## Python API") :]
    block = section[section.index("```python\n") + len("```python\n") : section.index("\n```\n")]
    monkeypatch.chdir(root)
    capsys.readouterr()
    exec(compile(block, "README.md", "exec"), {"__name__": "readme_example"})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("merged ['1_colour', '2_count'], ") and "% of the output energy kept" in lines[0]
    answer, generated = lines[1].split(" {")[0].removeprefix("many_cli.answer: "), lines[2].removeprefix("generate: ")
    assert answer and answer == generated.strip()
    assert "'2_count': " in lines[1]
    assert not list((root / "sample_adapters" / "adapters").glob("*/many_stats.safetensors"))


def test_a_base_without_a_processor_is_refused_by_every_command(world, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(world.base / name, bare / name)
    merged = tmp_path / "merged"
    assert run_cli(capsys, "merge", *world.adapters, "--out", merged)[0] == 0
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "hi"}\n')
    for args in (
        ["stats", "--model", bare, "--adapter", world.adapters[0], "--data", data, "--out", tmp_path / "s"],
        ["infer", "--model", bare, "--merged", merged, "--prompt", "hi"],
        ["export", "--model", bare, "--merged", merged, "--out", tmp_path / "exported"],
    ):
        code, err = run_cli(capsys, *args)
        assert code == 2 and f"{bare}: has no processor or tokenizer" in err and err.count("\n") == 1, (args, err)
    assert not (tmp_path / "exported").exists() and not (tmp_path / "s").exists()
