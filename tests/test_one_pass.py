"""`many merge --one-pass` (RegMean++ in one walk), checked against a float64 brute force that
merges the model stage by stage with its own hooks, against `many stats --under` refined until
it stops changing, and for what its state keeps under --resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from families import family_adapter, write_records
from helpers import invoke, load_base, make_adapter, run_cli, task_vector
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file
from test_families import encode_one
from transformers import AutoProcessor

from many_cli.bench.tiny import build_tiny_llava
from many_cli.families import projector_paths
from many_cli.merge import DEFAULT_RIDGE
from many_cli.state import STATS_FILE

LAYERS = 4


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """A tiny LLaVA of four layers, two task adapters on every projection of the language model
    (four stages a layer: sixteen), their calibration records and stats files."""
    root = tmp_path_factory.mktemp("one_pass")
    base = build_tiny_llava(root / "base", layers=LAYERS)
    adapters = [family_adapter(base, root / "adapters" / f"task{index}", seed=index) for index in range(2)]
    calibration = [write_records(root / "calibration", f"task{index}", 5, index, index, False) for index in range(2)]
    for adapter, records in zip(adapters, calibration, strict=True):
        assert invoke("stats", "--model", base, "--adapter", adapter, "--data", records, "--batch-size", "2") == 0
    return base, adapters, calibration


def one_pass(capsys, base, adapters, calibration, out: Path, *extra: str, said: str = "") -> Path:
    data = [argument for records in calibration for argument in ("--data", records)]
    code, err = run_cli(capsys, "merge", *adapters, "--out", out, "--one-pass", "--model", base, *data, *extra)
    assert code == 0 and said in err, err
    return out


def merged_updates(out: Path) -> dict[str, torch.Tensor]:
    """Each module's merged update B A (float64), as PEFT applies the output's LoRA."""
    config = json.loads((out / "adapter_config.json").read_text())
    factors = load_file(out / "adapter_model.safetensors")
    scale = config["lora_alpha"] / config["r"]
    return {
        key.removeprefix("base_model.model.").removesuffix(".lora_A.weight"): scale
        * factors[key.replace("lora_A", "lora_B")].double()
        @ factors[key].double()
        for key in factors
        if key.endswith("lora_A.weight")
    }


def brute_force_walk(
    base: Path, adapters: list[Path], calibration: list[Path], ridge: float
) -> dict[str, torch.Tensor]:
    """RegMean++ by brute force, float64: each task's model (its projector, its LoRA zeroed) runs
    every record whole (no batching, no padding) once per stage; the stage's modules are found by
    which ones read equal inputs, in the order the forward calls them; each stage is solved densely,
    τ* = (Σ τ_i C_i)(Σ C_i + ρ mean(diag) I)⁻¹, and folded into every task's weights before the next."""
    processor = AutoProcessor.from_pretrained(base)
    models, inputs = [], []
    for adapter, records in zip(adapters, calibration, strict=True):
        model = PeftModel.from_pretrained(load_base(base), adapter).double().eval()
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.zero_()
        models.append(model)
        lines = [json.loads(line) for line in open(records)]
        inputs.append([encode_one(processor, entry, records.parent, with_answer=True) for entry in lines])
    adapted = {
        name: module
        for name, module in models[0].get_base_model().named_modules()
        if hasattr(module, "lora_A") and "language_model" in name
    }
    stages = _stages(models[0], adapted, inputs[0][0])
    merged = {}
    for stage in stages:
        covariances = [_covariance(model, stage[0], records) for model, records in zip(models, inputs)]
        gram = sum(covariances)
        gram = gram + ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=torch.float64)
        for name in stage:
            vectors = [task_vector(adapter, name).double() for adapter in adapters]
            merged[name] = torch.linalg.solve(gram, sum(v @ c for v, c in zip(vectors, covariances)).T).T
            for model in models:
                with torch.no_grad():
                    model.get_base_model().get_submodule(name).base_layer.weight += merged[name]
    return merged


def _stages(model, adapted: dict, record) -> list[list[str]]:
    """The adapted modules grouped by equal inputs, in the order the forward first calls them."""
    seen: list[tuple[str, torch.Tensor]] = []
    hooks = [
        module.register_forward_pre_hook(lambda _m, args, name=name: seen.append((name, args[0].clone())))
        for name, module in adapted.items()
    ]
    with torch.no_grad():
        model(**record)
    for hook in hooks:
        hook.remove()
    stages: list[list[str]] = []
    for name, value in seen:
        same = next((stage for stage in stages if torch.equal(dict(seen)[stage[0]], value)), None)
        if same is None:
            stages.append([name])
        elif name not in same:
            same.append(name)
    return stages


def _covariance(model, name: str, records) -> torch.Tensor:
    total = 0
    module = model.get_base_model().get_submodule(name)

    def hook(_module, args):
        nonlocal total
        x = args[0].reshape(-1, args[0].shape[-1]).double()
        total = total + x.T @ x

    handle = module.register_forward_pre_hook(hook)
    with torch.no_grad():
        for record in records:
            model(**record)
    handle.remove()
    return total


def test_every_merged_module_equals_a_float64_brute_force_stage_by_stage(deep, tmp_path, capsys):
    base, adapters, calibration = deep
    out = one_pass(capsys, base, adapters, calibration, tmp_path / "one_pass")
    expected = brute_force_walk(base, adapters, calibration, DEFAULT_RIDGE)
    measured = merged_updates(out)
    assert len(expected) == 7 * LAYERS and measured.keys() == expected.keys()
    errors = {
        name: torch.linalg.norm(measured[name] - update) / torch.linalg.norm(update)
        for name, update in expected.items()
    }
    first = [name for name in expected if ".layers.0.self_attn." in name and not name.endswith("o_proj")]
    # The first stage reads the stats' own inputs: float32 sums, float64 solve. Each later stage
    # reads inputs the merged stages below give, so that rounding grows with depth (this tiny model
    # with large random LoRA amplifies it; rounding the brute force's own updates to float32
    # moves its last stage by 7e-6).
    assert all(errors[name] <= 1e-5 for name in first), errors
    assert all(error <= 2e-3 for error in errors.values()), errors
    plain = tmp_path / "plain"
    assert run_cli(capsys, "merge", *adapters, "--out", plain)[0] == 0
    changed = merged_updates(plain)  # the stats files' own inputs give another merge above the first stage
    assert (
        sum(
            torch.linalg.norm(changed[name] - update) > 1e-2 * torch.linalg.norm(update)
            for name, update in expected.items()
        )
        > len(expected) // 2
    )


@pytest.fixture(scope="module")
def shallow_targets(deep, tmp_path_factory):
    """The same base and data, adapters on q and v only (one stage a layer: four in all)."""
    base, _, calibration = deep
    root = tmp_path_factory.mktemp("one_pass_qv")
    config = dict(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)")
    adapters = [
        make_adapter(
            base,
            root / f"task{index}",
            LoraConfig(**config, modules_to_save=projector_paths(load_base(base))),
            seed=index,
        )
        for index in range(3)
    ]
    third = write_records(root / "calibration", "task2", 4, 7, 0, False)
    for adapter, records in zip(adapters, [*calibration, third], strict=True):
        assert invoke("stats", "--model", base, "--adapter", adapter, "--data", records, "--batch-size", "2") == 0
    return base, adapters, [*calibration, third]


def test_one_pass_equals_stats_under_refined_until_it_stops_changing_and_resumes_as_a_batch(
    shallow_targets, tmp_path, capsys
):
    base, adapters, calibration = shallow_targets
    out = one_pass(capsys, base, adapters[:2], calibration[:2], tmp_path / "one_pass")
    copies = [shutil.copytree(adapter, tmp_path / "refined" / adapter.name) for adapter in adapters[:2]]
    merged = tmp_path / "refined" / "merge"
    assert run_cli(capsys, "merge", *copies, "--out", merged)[0] == 0
    rounds, previous = 0, merged_updates(merged)
    while True:  # four stages: a round fixes one more, the next shows nothing changes
        rounds += 1
        for copy, records in zip(copies, calibration):
            assert invoke("stats", "--model", base, "--adapter", copy, "--data", records, "--under", merged) == 0
        assert run_cli(capsys, "merge", *copies, "--out", merged, "--force")[0] == 0
        updates = merged_updates(merged)
        if all(torch.equal(updates[name], previous[name]) for name in updates) or rounds == 8:
            break
        previous = updates
    assert 2 <= rounds <= LAYERS + 1
    walked = merged_updates(out)
    assert updates.keys() == walked.keys()
    for name, update in updates.items():
        assert torch.linalg.norm(walked[name] - update) <= 1e-6 * torch.linalg.norm(update), name
    # --resume keeps the walk's statistics: adding a task equals a batch merge over the refined stats
    resumed, batch = tmp_path / "resumed", tmp_path / "batch"
    assert run_cli(capsys, "merge", adapters[2], "--out", resumed, "--resume", out)[0] == 0
    assert run_cli(capsys, "merge", *copies, adapters[2], "--out", batch)[0] == 0
    expected, measured = merged_updates(batch), merged_updates(resumed)
    for name, update in expected.items():
        assert torch.linalg.norm(measured[name] - update) <= 1e-6 * torch.linalg.norm(update), name


def test_hidden_states_spilled_to_disk_give_the_same_merge_and_leave_nothing(shallow_targets, tmp_path, capsys):
    base, adapters, calibration = shallow_targets
    held = merged_updates(one_pass(capsys, base, adapters[:2], calibration[:2], tmp_path / "held"))
    spilled = one_pass(
        capsys,
        base,
        adapters[:2],
        calibration[:2],
        tmp_path / "spilled",
        "--walk-memory",
        "0",
        said="kept 2 batches of hidden states on disk",
    )
    assert all(torch.equal(update, held[name]) for name, update in merged_updates(spilled).items())
    assert sorted(path.name for path in tmp_path.iterdir()) == ["held", "spilled"]
    assert not list(spilled.rglob("*hidden*"))
    card = (spilled / "README.md").read_text()
    assert "one pass through the merged model" in card


def test_what_one_pass_cannot_walk_is_refused_in_one_line(shallow_targets, tmp_path, capsys):
    base, adapters, calibration = shallow_targets
    out = tmp_path / "out"
    data = ["--data", calibration[0], "--data", calibration[1]]
    other = write_records(tmp_path / "other", "task0", 3, 11, 0, False)
    vision = make_adapter(
        base,
        tmp_path / "vision",
        LoraConfig(
            r=2,
            lora_alpha=4,
            target_modules=r".*(vision_tower|language_model).*\.q_proj",
            modules_to_save=projector_paths(load_base(base)),
        ),
        seed=5,
    )
    assert invoke("stats", "--model", base, "--adapter", vision, "--data", calibration[0]) == 0
    prior = tmp_path / "prior" / "merge"
    assert invoke("merge", adapters[2], "--out", prior) == 0
    cases = [
        (["--one-pass", *data], "--one-pass runs the base model: give it with --model BASE"),
        (["--one-pass", "--model", base, "--data", calibration[0]], "--one-pass takes one --data per adapter"),
        (data, "--data applies to --one-pass only"),
        (["--walk-memory", "1"], "--walk-memory applies to --one-pass only"),
        (
            ["--one-pass", "--model", base, "--data", other, "--data", calibration[1]],
            f"{adapters[0] / STATS_FILE}: --one-pass counted",
        ),
        (["--one-pass", "--model", base, *data, "--resume", prior], "--one-pass retakes every task's statistics"),
    ]
    for extra, fault in cases:
        code, err = run_cli(capsys, "merge", *adapters[:2], "--out", out, *extra)
        assert code == 2 and fault in err and len(err.strip().splitlines()) == 1, (extra, err)
        assert not out.exists()
    code, err = run_cli(capsys, "merge", vision, "--out", out, "--one-pass", "--model", base, *data[:2])
    assert code == 2 and "lies outside them" in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_qwen2_vl_walk_replays_its_3d_rotary_positions(tmp_path, capsys):
    """Qwen2-VL's layers read M-RoPE positions the model derives from the images: the walk
    replays each layer with the arguments the model gave it, and equals the brute force."""
    from families import FAMILIES

    base = FAMILIES["qwen2_vl"](tmp_path / "base")
    adapters = [family_adapter(base, tmp_path / "adapters" / f"task{index}", seed=index) for index in range(2)]
    calibration = [write_records(tmp_path / "calibration", f"task{i}", 4, i, i, False) for i in range(2)]
    for adapter, records in zip(adapters, calibration, strict=True):
        assert invoke("stats", "--model", base, "--adapter", adapter, "--data", records, "--batch-size", "3") == 0
    measured = merged_updates(one_pass(capsys, base, adapters, calibration, tmp_path / "one_pass"))
    expected = brute_force_walk(base, adapters, calibration, DEFAULT_RIDGE)
    assert measured.keys() == expected.keys() and len(expected) >= 14
    for name, update in expected.items():
        assert torch.linalg.norm(measured[name] - update) <= 2e-3 * torch.linalg.norm(update), name
