"""`many merge` against independent dense computations on a tiny LLaVA."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import (
    RIDGE,
    dense_reference,
    input_key,
    load_base,
    lora_rank,
    merged_deltas,
    output_error,
    run_cli,
    task_vector,
)
from peft import PeftModel
from safetensors import safe_open

from many_cli.options import DEFAULT_ETA
from many_cli.state import STATS_FILE


def test_merged_adapter_equals_dense_least_squares(world, tmp_path, capsys):
    out = tmp_path / "merged"
    code, err = run_cli(capsys, "merge", *world.adapters, "--out", out, "--ridge", RIDGE)
    assert code == 0, err
    deltas = merged_deltas(world, out)
    assert len(deltas) == 2 * 7
    for module, delta in deltas.items():
        reference, gram = dense_reference(world, module, RIDGE)
        assert output_error(delta, reference, gram) <= 1e-4, module

    config = json.loads((out / "adapter_config.json").read_text())
    assert not config.get("modules_to_save")
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as handle:
        rank = handle.get_slice(
            "base_model.model.model.language_model.layers.1.self_attn.v_proj.lora_A.weight"
        ).get_shape()[0]
        assert rank == 2 + 2 + 3  # task1's v_proj has rank 2 through rank_pattern
        rank = handle.get_slice(
            "base_model.model.model.language_model.layers.0.self_attn.k_proj.lora_A.weight"
        ).get_shape()[0]
        assert rank == 2 + 4  # task2 does not adapt k_proj


def test_bundle_and_card_describe_the_inputs(world, tmp_path, capsys):
    out = tmp_path / "merged"
    assert run_cli(capsys, "merge", *world.adapters, "--out", out)[0] == 0
    with safe_open(str(out / "many_bundle.safetensors"), "pt") as bundle:
        metadata = bundle.metadata()
        assert json.loads(metadata["tasks"]) == ["task0", "task1", "task2"]
        assert float(metadata["eta"]) == DEFAULT_ETA  # the merge's own default, recorded for infer
        for index, adapter in enumerate(world.adapters):
            with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as source:
                weight = source.get_tensor("base_model.model.model.multi_modal_projector.linear_1.weight")
            assert torch.equal(bundle.get_tensor(f"projector/{index}/linear_1.weight"), weight)
            assert bundle.get_tensor(f"prototype/{index}").shape == (16,)
            with safe_open(str(adapter / STATS_FILE), "pt") as stats:
                assert torch.equal(bundle.get_tensor(f"exemplars/{index}"), stats.get_tensor("exemplars"))
    card = (out / "README.md").read_text()
    for adapter in world.adapters:
        weights = hashlib.sha256((adapter / "adapter_model.safetensors").read_bytes()).hexdigest()[:16]
        config = json.loads((adapter / "adapter_config.json").read_text())  # the fields that scale the weights
        scaling = json.dumps(
            {key: config.get(key) for key in ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern")},
            sort_keys=True,
        )
        digest = hashlib.sha256(f"{weights} {scaling}".encode()).hexdigest()[:16]
        assert adapter.name in card and digest in card
    assert "ridge" in card and "PeftModel.from_pretrained" in card


def test_resume_equals_batch_merge(world, tmp_path, capsys):
    first, resumed, batch = tmp_path / "m1", tmp_path / "m2", tmp_path / "m3"
    a, b, c = world.adapters
    assert run_cli(capsys, "merge", a, b, "--out", first)[0] == 0
    assert run_cli(capsys, "merge", c, "--resume", first, "--out", resumed)[0] == 0
    assert run_cli(capsys, "merge", a, b, c, "--out", batch)[0] == 0
    resumed_deltas, batch_deltas = merged_deltas(world, resumed), merged_deltas(world, batch)
    assert resumed_deltas.keys() == batch_deltas.keys()
    for module in batch_deltas:
        error = (resumed_deltas[module] - batch_deltas[module]).norm() / batch_deltas[module].norm()
        assert error <= 1e-5, module
    with safe_open(str(resumed / "many_state.safetensors"), "pt") as state:
        grams = [key for key in state.keys() if key.startswith("gram/")]
        assert len(grams) == 2 * 4  # one per distinct input: 4 per Llama layer, 2 layers
        assert json.loads(state.metadata()["tasks"])[2]["name"] == "task2"
    with safe_open(str(resumed / "many_bundle.safetensors"), "pt") as bundle:
        assert json.loads(bundle.metadata()["tasks"]) == ["task0", "task1", "task2"]
        assert "projector/2/linear_2.weight" in bundle.keys()
        for index, adapter in enumerate(world.adapters):  # carried from the first merge, and the new task's
            with safe_open(str(adapter / STATS_FILE), "pt") as stats:
                assert torch.equal(bundle.get_tensor(f"exemplars/{index}"), stats.get_tensor("exemplars"))
    assert sorted(p.name for p in (resumed / "experts").iterdir()) == ["task0", "task1", "task2"]
    expert = PeftModel.from_pretrained(load_base(world.base), resumed / "experts" / "task0")
    module = "model.language_model.layers.0.self_attn.q_proj"
    delta = expert.base_model.model.get_submodule(module).get_delta_weight("default").double()
    assert torch.allclose(delta, task_vector(world.adapters[0], module), atol=1e-6)


def test_a_float32_state_resumes_within_the_bound(world, tmp_path, capsys):
    first, resumed = tmp_path / "m1", tmp_path / "m2"
    a, b, c = world.adapters
    assert run_cli(capsys, "merge", a, b, "--out", first, "--state-precision", "float32")[0] == 0
    assert run_cli(capsys, "merge", c, "--resume", first, "--out", resumed, "--state-precision", "float32")[0] == 0
    with safe_open(str(first / "many_state.safetensors"), "pt") as state:
        assert {state.get_slice(key).get_dtype() for key in state.keys()} == {"F32"}
    for module, delta in merged_deltas(world, resumed).items():
        reference, gram = dense_reference(world, module, RIDGE)
        assert output_error(delta, reference, gram) <= 1e-4, module
    assert "state_precision: float32" in (resumed / "README.md").read_text()
    again = tmp_path / "m3"  # resumed without the flag: the state keeps its precision, and says so
    code, err = run_cli(capsys, "merge", c, "--resume", first, "--out", again)
    assert code == 0 and "stays float32, as the resumed one" in err, err
    with safe_open(str(again / "many_state.safetensors"), "pt") as state:
        assert {state.get_slice(key).get_dtype() for key in state.keys()} == {"F32"}


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--method", "average", "--ridge", "0.5"], "--ridge"),
        (["--method", "ties", "--balance"], "--balance"),
        (["--method", "task-arithmetic", "--state-precision", "float32"], "--state-precision"),
        (["--method", "average", "--alpha", "0.5"], "--alpha"),
        (["--method", "average", "--density", "0.5"], "--density"),
        (["--density", "0.5"], "--density"),
    ],
)
def test_an_option_the_method_ignores_is_refused(world, tmp_path, capsys, args, flag):
    code, err = run_cli(capsys, "merge", *world.adapters, "--out", tmp_path / "out", *args)
    assert code == 2 and f"{flag} does not apply to --method" in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_torchrun_ranks_share_the_groups_and_equal_a_single_process(world, tmp_path, capsys):
    single, split = tmp_path / "single", tmp_path / "split"
    settings = ["--rank", "3", "--ridge", "0.01"]  # a rank budget: the energy travels too
    assert run_cli(capsys, "merge", *world.adapters, "--out", single, *settings)[0] == 0
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29518",
            "-m",
            "many_cli",
            "merge",
            *map(str, world.adapters),
            "--out",
            str(split),
            *settings,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("merged 3 tasks") == 1  # one writer, one report
    for name in ("adapter_model.safetensors", "many_state.safetensors"):
        with safe_open(str(single / name), "pt") as one, safe_open(str(split / name), "pt") as two:
            assert list(one.keys()) == list(two.keys()) and one.metadata() == two.metadata()
            for key in one.keys():
                expected, got = one.get_tensor(key).double(), two.get_tensor(key).double()
                assert (got - expected).norm() <= 1e-9 * expected.norm() + 1e-12, key
    card = [line for line in (single / "README.md").read_text().splitlines() if "%" in line]
    assert card and card == [line for line in (split / "README.md").read_text().splitlines() if "%" in line]


def test_resume_refuses_other_settings_and_bases(world, tmp_path, capsys):
    import shutil

    from helpers import write_task_stats

    first = tmp_path / "m1"
    assert run_cli(capsys, "merge", world.adapters[0], "--out", first)[0] == 0
    code, err = run_cli(capsys, "merge", world.adapters[1], "--resume", first, "--balance", "--out", tmp_path / "m2")
    assert code == 2 and "many_state.safetensors" in err and "--balance" in err
    assert not (tmp_path / "m2").exists()

    other = tmp_path / "other_base" / "task1"
    shutil.copytree(world.adapters[1], other)
    covariances = {name: torch.eye(value.shape[0], dtype=torch.float64) for name, value in world.covariances[1].items()}
    write_task_stats(other, covariances, tokens=36, base_fingerprint="base-B")
    code, err = run_cli(capsys, "merge", other, "--resume", first, "--out", tmp_path / "m3")
    assert code == 2 and "another base model" in err and err.count("\n") == 1
    assert not (tmp_path / "m3").exists()


def test_folder_of_adapters_merges_in_name_order(world, tmp_path, capsys):
    out = tmp_path / "merged"
    assert run_cli(capsys, "merge", world.adapters[0].parent, "--out", out)[0] == 0
    with safe_open(str(out / "many_bundle.safetensors"), "pt") as bundle:
        assert json.loads(bundle.metadata()["tasks"]) == ["task0", "task1", "task2"]


def test_balance_weighs_tasks_by_mean_covariance(world, tmp_path, capsys):
    """Tasks with 12, 36 and 90 calibration tokens: --balance divides each covariance by its
    count, the default does not, and the two answers differ."""
    from helpers import write_task_stats

    counts = [12, 36, 90]
    copies = []
    for adapter, covariances, count in zip(world.adapters, world.covariances, counts):
        copies.append(shutil.copytree(adapter, tmp_path / "in" / adapter.name))
        write_task_stats(copies[-1], covariances, tokens=count)
    module = "model.language_model.layers.0.mlp.down_proj"
    weighted = [covariances[input_key(module)] / count for covariances, count in zip(world.covariances, counts)]
    gram = sum(weighted)
    numerator = sum(task_vector(adapter, module) @ covariance for adapter, covariance in zip(world.adapters, weighted))
    reference = torch.linalg.solve(gram, numerator.T).T
    errors = {}
    for flags in (["--balance"], []):
        out = tmp_path / f"merged{len(flags)}"
        assert run_cli(capsys, "merge", *copies, "--out", out, "--ridge", 0, *flags)[0] == 0
        errors[bool(flags)] = output_error(merged_deltas(world, out)[module], reference, gram)
    assert errors[True] <= 1e-4 and errors[False] >= 1e-3, errors


def regmean_reference(world, module: str, alpha: float, weights) -> tuple[torch.Tensor, torch.Tensor]:
    """FusionBench's RegMean on the task vectors, by a dense solve: each task's (weighted)
    covariance C_i,α = α C_i + (1 − α) diag(C_i), τ = (Σ τ_i C_i,α)(Σ C_i,α)⁻¹; and Σ C_i."""
    covariances = [weight * world.covariances[i][input_key(module)] for i, weight in enumerate(weights)]
    reduced = [alpha * c + (1 - alpha) * torch.diag(c.diagonal()) for c in covariances]
    numerator = sum(
        task_vector(adapter, module) @ c
        for adapter, c in zip(world.adapters, reduced)
        if task_vector(adapter, module) is not None
    )
    return torch.linalg.solve(sum(reduced), numerator.T).T, sum(covariances)


@pytest.mark.parametrize("alpha", [0.6, 0.1])
def test_alpha_reduces_the_off_diagonals_as_regmean_does_and_resumes_exactly(world, tmp_path, capsys, alpha):
    a, b, c = world.adapters
    batch, first, resumed = tmp_path / "batch", tmp_path / "first", tmp_path / "resumed"
    assert run_cli(capsys, "merge", a, b, c, "--out", batch, "--ridge", 0, "--balance", "--alpha", alpha)[0] == 0
    # The state keeps A diag(C) beside A C: a state merged at α = 1 resumes at any α.
    assert run_cli(capsys, "merge", a, b, "--out", first, "--ridge", 0, "--balance")[0] == 0
    assert (
        run_cli(capsys, "merge", c, "--resume", first, "--out", resumed, "--ridge", 0, "--balance", "--alpha", alpha)[0]
        == 0
    )
    tokens = 3 * 12  # every task's stats count 36 tokens (conftest.build_world)
    for out in (batch, resumed):
        deltas = merged_deltas(world, out)
        for module, delta in deltas.items():
            reference, gram = regmean_reference(world, module, alpha, [1 / tokens] * 3)
            assert output_error(delta, reference, gram) <= 1e-4, (out.name, module)
    exact, _ = dense_reference(world, "model.language_model.layers.0.mlp.down_proj", 0.0)
    module = "model.language_model.layers.0.mlp.down_proj"
    assert (
        output_error(merged_deltas(world, batch)[module], exact, regmean_reference(world, module, 1, [1] * 3)[1]) > 1e-3
    )


def test_one_task_at_ridge_zero_answers_like_the_adapter(world, tmp_path, capsys):
    """Few calibration tokens make H singular: the minimum-norm solution must still give
    the adapter's own outputs on its calibration data, with no NaN or Inf."""
    from helpers import brute_force_covariances, calibration_records, make_adapter, task_configs, write_task_stats

    adapter = make_adapter(world.base, tmp_path / "solo", task_configs()[0], seed=5)
    records = calibration_records(1, seed=6)  # 12 tokens, fewer than any layer's width
    write_task_stats(adapter, brute_force_covariances(world.base, adapter, records), tokens=12)
    out = tmp_path / "merged"
    code, err = run_cli(capsys, "merge", adapter, "--out", out, "--ridge", 0)
    assert code == 0, err
    assert "fewer calibration tokens than their width" in err

    reference = PeftModel.from_pretrained(load_base(world.base), adapter).eval()
    base = load_base(world.base)
    with safe_open(str(out / "many_bundle.safetensors"), "pt") as bundle:
        projector = {
            key.split("/", 2)[2]: bundle.get_tensor(key) for key in bundle.keys() if key.startswith("projector/0/")
        }
    base.model.multi_modal_projector.load_state_dict(projector)
    merged = PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        expected = reference(**records[0]).logits
        logits = merged(**records[0]).logits
    assert torch.isfinite(logits).all()
    assert (logits - expected).norm() / expected.norm() <= 1e-4


@pytest.mark.parametrize("method", ["average", "task-arithmetic"])
def test_linear_baselines_are_exact(world, tmp_path, capsys, method):
    out = tmp_path / "merged"
    assert run_cli(capsys, "merge", *world.adapters, "--out", out, "--method", method, "--scale", 0.7)[0] == 0
    for module, delta in merged_deltas(world, out).items():
        vectors = [v for v in (task_vector(a, module) for a in world.adapters) if v is not None]
        expected = 0.7 * sum(vectors) / (len(world.adapters) if method == "average" else 1)
        assert torch.allclose(delta, expected, rtol=1e-5, atol=1e-6), module
    assert not (out / "many_state.safetensors").exists()


def test_ties_is_the_best_low_rank_fit_of_dense_ties(world, tmp_path, capsys):
    out = tmp_path / "merged"
    code, err = run_cli(capsys, "merge", *world.adapters, "--out", out, "--method", "ties", "--density", 0.3)
    assert code == 0, err
    assert "truncated SVD" in err
    for module, delta in merged_deltas(world, out).items():
        vectors = [v.numpy() for v in (task_vector(a, module) for a in world.adapters) if v is not None]
        trimmed = []
        for vector in vectors:
            threshold = np.sort(np.abs(vector).ravel())[::-1][round(0.3 * vector.size) - 1]
            trimmed.append(np.where(np.abs(vector) >= threshold, vector, 0.0))
        stacked = np.stack(trimmed)
        sign = np.sign(stacked.sum(axis=0))
        agree = (np.sign(stacked) == sign) & (stacked != 0)
        dense = (stacked * agree).sum(axis=0) / np.maximum(agree.sum(axis=0), 1)
        rank = sum(lora_rank(adapter, module) for adapter in world.adapters)
        u, s, vh = np.linalg.svd(dense)
        best = (u[:, :rank] * s[:rank]) @ vh[:rank]
        np.testing.assert_allclose(delta.numpy(), best, atol=1e-5, err_msg=module)


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


def test_for_an_older_transformers_modules_are_named_as_the_base_checkpoint(world, tmp_path, capsys):
    """Before transformers 4.52 a LLaVA's language model was `language_model.model`: the merged
    adapter for such a stack names each module by its weight's key in the base checkpoint, with
    the same tensors and ranks (rank_pattern keys that PEFT 0.13 and today's PEFT both match to
    their own module alone), and it answers as today's adapter once mapped back onto the model."""
    from helpers import calibration_records

    from many_cli.models import apply_adapters

    current, older = tmp_path / "current", tmp_path / "older"
    assert run_cli(capsys, "merge", *world.adapters, "--out", current)[0] == 0
    older_stack = ["--for-transformers", "4.46.3", "--model", world.base]
    code, err = run_cli(capsys, "merge", *world.adapters, "--out", older, *older_stack)
    assert code == 0, err
    with safe_open(str(world.base / "model.safetensors"), "pt") as base:
        checkpoint = set(base.keys())
    weights = "adapter_model.safetensors"
    with safe_open(str(current / weights), "pt") as now, safe_open(str(older / weights), "pt") as then:
        renamed = {
            key.replace("base_model.model.model.language_model.", "base_model.model.language_model.model."): key
            for key in now.keys()
        }
        assert set(then.keys()) == set(renamed)
        ranks = {}
        for old_key, key in renamed.items():
            assert torch.equal(then.get_tensor(old_key), now.get_tensor(key))
            module = old_key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
            assert f"{module}.weight" in checkpoint
            if old_key.endswith("lora_A.weight"):
                ranks[module] = then.get_slice(old_key).get_shape()[0]
    config = json.loads((older / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == set(ranks)
    assert config["rank_pattern"]
    for module in ranks:
        older_peft = [key for key in config["rank_pattern"] if re.match(rf".*\.{key}$", module)]
        today_peft = [key for key in config["rank_pattern"] if re.match(rf"(.*\.)?({key})$", module)]
        assert older_peft == today_peft and len(older_peft) <= 1
        assert (config["rank_pattern"][older_peft[0]] if older_peft else config["r"]) == ranks[module]
    expert = "experts/task0/adapter_model.safetensors"
    assert (older / expert).read_bytes() == (current / expert).read_bytes()  # many infer's, today's names

    record = calibration_records(1, seed=7)[0]
    with torch.no_grad():
        expected = PeftModel.from_pretrained(load_base(world.base), current).eval()(**record).logits
        mapped = apply_adapters(load_base(world.base), str(world.base), [(older, "merged")]).eval()
        assert torch.allclose(mapped(**record).logits, expected, atol=1e-6)

    same = tmp_path / "same"
    assert run_cli(capsys, "merge", *world.adapters, "--out", same, "--for-transformers", "4.52")[0] == 0
    assert (same / weights).read_bytes() == (current / weights).read_bytes()
    code, err = run_cli(capsys, "merge", *world.adapters, "--out", tmp_path / "bad", "--for-transformers", "4.46.x")
    assert code == 2 and "--for-transformers takes a version such as 4.46.3" in err


def test_for_an_older_transformers_the_base_is_named_and_checked(world, tmp_path, capsys, monkeypatch):
    """The checkpoint's names come from the base given with --model, checked against the base the
    stats files record; never from the adapter's base_model_name_or_path resolved from the current
    folder (a hub id for LLaMA-Factory and ms-swift, another model from elsewhere)."""
    other = tmp_path / "other"
    shutil.copytree(world.base, other)
    config = json.loads((other / "config.json").read_text())
    config["text_config"]["rms_norm_eps"] = 1e-3
    (other / "config.json").write_text(json.dumps(config))
    merge = ["merge", *world.adapters, "--out", tmp_path / "older", "--for-transformers", "4.46.3"]
    code, err = run_cli(capsys, *merge)
    assert code == 2 and "give that base with --model BASE" in err and err.count("\n") == 1, err
    code, err = run_cli(capsys, *merge, "--model", other)
    assert code == 2 and f"was built on another base model than {other}" in err and err.count("\n") == 1, err
    code, err = run_cli(capsys, "merge", *world.adapters, "--out", tmp_path / "older", "--model", world.base)
    assert (
        code == 2 and "--model applies to --one-pass, --checkpoint-names and --for-transformers below 4.52 only" in err
    ), err
    monkeypatch.chdir(tmp_path)  # the adapters' relative base path leads nowhere from here
    assert run_cli(capsys, *merge, "--model", world.base)[0] == 0
    # export takes that merge as it takes today's, to the same weights
    current = tmp_path / "current"
    assert run_cli(capsys, "merge", *world.adapters, "--out", current)[0] == 0
    for merged in (current, tmp_path / "older"):
        code, err = run_cli(
            capsys, "export", "--model", world.base, "--merged", merged, "--out", merged.with_suffix(".x")
        )
        assert code == 0, err
    exported = "model.safetensors"
    assert (tmp_path / "older.x" / exported).read_bytes() == (tmp_path / "current.x" / exported).read_bytes()
    assert not (other / "adapter_config.json").exists() and not (tmp_path / "bad").exists()


PLUGIN = """
import sys

from many_cli.methods import MergeMethod, register


def first(a_blocks, b_blocks, options, tasks):
    from many_cli import lpm

    # the first adapting task's update as it is (the others' factors kept at weight 0: rank Σ r_i)
    return lpm.stack_factors(a_blocks, b_blocks, [options.scale] + [0.0] * (len(a_blocks) - 1))


register(
    MergeMethod(
        name="first-task",
        title="the first task alone",
        reads=(),
        runner="factors",
        card_lines=lambda options: ["- the first adapting task's update, unchanged"],
        rule=first,
    )
)
from many_cli.cli import main

for line in sys.stdin:  # one command line a line, each run as `many` runs it; its status after it
    sys.argv = ["many", *line.rstrip("\\n").split("\\t")]
    try:
        main()
        code = 0
    except SystemExit as done:
        code = done.code or 0
    print(f"exit {code}", flush=True)
    print(f"exit {code}", file=sys.stderr, flush=True)
"""


def test_a_method_registered_in_its_own_module_is_offered_refused_and_carded(world, tmp_path):
    """A throwaway method, registered by one module as a plugin would be, is in `--help`'s
    choices, refuses another method's option in one line, and merges with its card line."""
    out = tmp_path / "merged"
    commands = [
        ["merge", "--help"],
        ["merge", *world.adapters, "--out", tmp_path / "no", "--method", "first-task", "--ridge", "1"],
        ["merge", *world.adapters, "--out", out, "--method", "first-task"],
    ]
    done = subprocess.run(
        [sys.executable, "-c", PLUGIN],
        input="".join("\t".join(map(str, command)) + "\n" for command in commands),
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    outs, errs = done.stdout.split("exit "), done.stderr.split("exit ")
    assert [part.split("\n", 1)[0] for part in outs[1:]] == ["0", "2", "0"], done.stderr
    assert "first-task" in outs[0]
    assert (
        errs[1]
        .split("\n", 1)[1]
        .strip()
        .endswith("--ridge does not apply to --method first-task (it applies to --method many); leave it out")
    ), done.stderr
    assert not (tmp_path / "no").exists()
    for module, delta in merged_deltas(world, out).items():
        expected = next(v for v in (task_vector(a, module) for a in world.adapters) if v is not None)
        assert torch.allclose(delta, expected, rtol=1e-5, atol=1e-6), module
    card = (out / "README.md").read_text()
    assert "method: `first-task`" in card and "- the first adapting task's update, unchanged" in card
