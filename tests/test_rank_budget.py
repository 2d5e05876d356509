"""The rank budget (`merge --rank`) against a dense weighted SVD, and merged adapters that PEFT
reloads whatever their ranks and module names."""

from __future__ import annotations

import json

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
