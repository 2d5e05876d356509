"""What the tests share, imported by name (`from helpers import ...`): tiny LLaVA models built from
configs, PEFT adapters on them, covariances gathered by brute force (forward hooks, float64, one
record at a time) to feed `many merge`, the dense least-squares reference of a merge, and the
command line run in-process or as an ordinary user."""

from __future__ import annotations

import hashlib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open

from many_cli import models
from many_cli.adapters import adapter_fingerprint
from many_cli.bench.tiny import IMAGE_SIZE, PATCH_SIZE, build_tiny_llava, tiny_tokenizer
from many_cli.state import STATS_FILE, pack_symmetric, unpack_symmetric, write_stats

transformers.utils.logging.disable_progress_bar()

IMAGE_TOKEN = tiny_tokenizer().convert_tokens_to_ids("<image>")  # the last special token: words follow it
VOCABULARY = len(tiny_tokenizer())
IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # the tokens an image becomes (the CLS feature dropped)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Which projections read the same input in a Llama block (the test knows; the merge is told
# through the stats file).
SHARED_INPUT = {
    "q_proj": "q_proj",
    "k_proj": "q_proj",
    "v_proj": "q_proj",
    "o_proj": "o_proj",
    "gate_proj": "gate_proj",
    "up_proj": "gate_proj",
    "down_proj": "down_proj",
}


def build_base(path: Path, hidden: int = 32, seed: int = 0) -> Path:
    """The tests' tiny LLaVA (the one the benchmarks and the sample use), fed token ids directly."""
    return build_tiny_llava(path, hidden=hidden, seed=seed)


def load_base(path: Path):
    """A saved tiny model in float32 on the CPU, loaded as `many` loads a base."""
    from many_cli.models import load_base_model
    from many_cli.options import Placement

    return load_base_model(str(path), torch.device("cpu"), Placement(dtype="float32"))


def make_adapter(base: Path, out: Path, config: LoraConfig, seed: int) -> Path:
    """A PEFT adapter with random (nonzero) LoRA factors and its own trained projector."""
    model = get_peft_model(load_base(base), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    model.save_pretrained(out)
    return out


def calibration_records(count: int, seed: int, length: int = 12) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    records = []
    for _ in range(count):
        text = torch.randint(IMAGE_TOKEN + 1, VOCABULARY, (length - IMAGE_TOKENS,), generator=generator)
        input_ids = torch.cat([text[:2], torch.full((IMAGE_TOKENS,), IMAGE_TOKEN), text[2:]])[None]
        records.append(
            {"input_ids": input_ids, "pixel_values": torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)}
        )
    return records


def brute_force_covariances(base: Path, adapter: Path, records) -> dict[str, torch.Tensor]:
    """Σ x xᵀ of every language-model projection's input, float64, one record at a time,
    in base + adapter (its LoRA and its projector)."""
    model = PeftModel.from_pretrained(load_base(base), adapter).eval()
    pattern = re.compile(r"language_model\.layers\.\d+\.\w+\.(%s)$" % "|".join(PROJECTIONS))
    return input_sums(model, lambda: [model(**record) for record in records], select=lambda name: pattern.search(name))


def input_sums(model, run, select=None, weight=None, rows=None) -> dict[str, torch.Tensor]:
    """The tests' one brute-force reference for `many stats`: Σ w x xᵀ, float64, of the input of
    each layer of `model` (a PeftModel) that `select(name)` picks (default: every layer PEFT
    adapted), over what `run()` feeds it through forward hooks. `weight(name)` gives the weight of
    each row of the layer's current input (None: 1); `rows`, if given, receives each layer's row count."""
    sums, hooks = {}, []
    for name, module in model.base_model.model.named_modules():
        if select(name) if select else hasattr(module, "lora_A"):

            def hook(_, args, name=name):
                x = args[0].reshape(-1, args[0].shape[-1]).to(torch.float64)
                weights = weight(name) if weight else None
                weighted = x if weights is None else x * weights.sqrt()[:, None]
                sums[name] = sums.get(name, 0) + weighted.T @ weighted
                if rows is not None:
                    rows[name] = rows.get(name, 0) + x.shape[0]

            hooks.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        run()
    for handle in hooks:
        handle.remove()
    return sums


def stats_covariances(path: Path) -> dict[str, torch.Tensor]:
    """Each module's covariance as a `many_stats.safetensors` file stores it (shared inputs once)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        inputs = json.loads(handle.metadata()["inputs"])
        return {
            module: unpack_symmetric(handle.get_tensor(f"covariance/{key}"))
            for key, entry in inputs.items()
            for module in entry["modules"]
        }


def input_key(module: str) -> str:
    prefix, projection = module.rsplit(".", 1)
    return (
        f"{prefix.rsplit('.', 1)[0]}.{'self_attn' if projection in PROJECTIONS[:4] else 'mlp'}."
        f"{SHARED_INPUT[projection]}"
    )


def write_task_stats(
    adapter: Path,
    covariances: dict[str, torch.Tensor],
    tokens: int,
    base_fingerprint: str | None = None,
) -> None:
    """Write the stats file `many merge` reads, through the project's own writer, storing
    each shared input once (float32, as `many stats` accumulates); its base is the one the
    adapter's config names, unless `base_fingerprint` says otherwise."""
    if base_fingerprint is None:
        base_fingerprint = models.base_fingerprint(
            json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
        )
    by_input: dict[str, list[str]] = {}
    for module in covariances:
        by_input.setdefault(input_key(module), []).append(module)
    write_stats(
        adapter / STATS_FILE,
        covariances={key: pack_symmetric(covariances[key].to(torch.float32)) for key in by_input},
        tokens={key: tokens for key in by_input},
        modules=by_input,
        prototype=torch.randn(16),
        exemplars=torch.nn.functional.normalize(torch.randn(3, 16), dim=1),
        images=1,
        adapter_fingerprint=adapter_fingerprint(adapter),
        base_fingerprint=base_fingerprint,
        token_rule="test",
    )


@dataclass
class World:
    base: Path
    adapters: list[Path]
    covariances: list[dict[str, torch.Tensor]]  # float32-rounded, as stored, in float64


LM_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def task_configs() -> list[LoraConfig]:
    saved = ["multi_modal_projector"]
    return [
        LoraConfig(r=2, lora_alpha=4, target_modules=LM_TARGETS, modules_to_save=saved),
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=LM_TARGETS,
            modules_to_save=saved,
            use_rslora=True,
            rank_pattern={"v_proj": 2},
            alpha_pattern={"down_proj": 3},
        ),
        LoraConfig(
            r=3,
            lora_alpha=5,
            target_modules=["q_proj", "v_proj", "down_proj"],
            exclude_modules=r".*vision_tower.*",
            modules_to_save=saved,
        ),
    ]


def build_world(root: Path, records_per_task: int = 3, configs=None) -> World:
    base = build_base(root / "base")
    adapters, covariances = [], []
    for index, config in enumerate(configs or task_configs()):
        adapter = make_adapter(base, root / "adapters" / f"task{index}", config, seed=100 + index)
        records = calibration_records(records_per_task, seed=200 + index)
        sums = brute_force_covariances(base, adapter, records)
        write_task_stats(adapter, sums, tokens=records_per_task * 12)
        adapters.append(adapter)
        covariances.append({name: value.to(torch.float32).to(torch.float64) for name, value in sums.items()})
    return World(base, adapters, covariances)


def run_cli(capsys, *args: str) -> tuple[int, str]:
    """Run `many ARGS` in-process as the console script would; return (exit status, stderr)."""
    code, _, err = run_cli_output(capsys, *args)
    return code, err


def run_cli_output(capsys, *args: str) -> tuple[int, str, str]:
    """Run `many ARGS` in-process; return (exit status, stdout, stderr)."""
    capsys.readouterr()  # drop what the test's own setup printed
    code = invoke(*args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def invoke(*args) -> int:
    """Run `many ARGS` in-process as the console script would; return its exit status."""
    from many_cli.cli import main

    argv = sys.argv
    sys.argv = ["many", *map(str, args)]
    try:
        main()
        return 0
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else 0
    finally:
        sys.argv = argv


def digest(path: Path) -> dict[str, str]:
    """sha256 of every file under `path` (or of the file itself), by path relative to it."""
    paths = [path] if path.is_file() else sorted(item for item in path.rglob("*") if item.is_file())
    return {
        str(item.relative_to(path) if path.is_dir() else item.name): hashlib.sha256(item.read_bytes()).hexdigest()
        for item in paths
    }


def hidden(folder: Path) -> list[str]:
    return sorted(item.name for item in folder.iterdir() if item.name.startswith("."))


def console_script() -> list[str]:
    """The installed `many` command (or `python -m many_cli` where there is none)."""
    script = Path(sys.executable).with_name("many")
    return [str(script)] if script.exists() else [sys.executable, "-m", "many_cli"]


def many_as_ordinary_user() -> list[str]:
    """The console script, run (when the tests run as root) without the powers that ignore
    file permissions, so that permission bugs fail here as they would for any user."""
    import os

    many = console_script()
    if os.geteuid() == 0:
        many = [
            "setpriv",
            "--bounding-set=-dac_override,-dac_read_search",
            "--inh-caps=-dac_override,-dac_read_search",
            *many,
        ]
    return many


RIDGE = 1e-4


def task_vector(adapter, module: str) -> torch.Tensor:
    """s·B A in float64, with s worked out here from the config, as PEFT documents it."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as handle:
        prefix = f"base_model.model.{module}"
        if f"{prefix}.lora_A.weight" not in handle.keys():
            return None
        a = handle.get_tensor(f"{prefix}.lora_A.weight").double()
        b = handle.get_tensor(f"{prefix}.lora_B.weight").double()
    rank = a.shape[0]
    projection = module.rsplit(".", 1)[1]
    alpha = (config.get("alpha_pattern") or {}).get(projection, config["lora_alpha"])  # a merge writes none
    scale = alpha / rank**0.5 if config.get("use_rslora") else alpha / rank
    return scale * b @ a


def lora_rank(adapter, module: str) -> int:
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as handle:
        key = f"base_model.model.{module}.lora_A.weight"
        return handle.get_slice(key).get_shape()[0] if key in handle.keys() else 0


def dense_reference(world, module: str, ridge: float, tasks=None) -> tuple[torch.Tensor, torch.Tensor]:
    """τ_ref = (Σ τ_i C_i)(H + ρ·mean(diag H)·I)⁻¹ with an explicit dense solve; and H."""
    tasks = range(len(world.adapters)) if tasks is None else tasks
    covariances = [world.covariances[i][input_key(module)] for i in tasks]
    gram = sum(covariances)
    numerator = 0
    for i, covariance in zip(tasks, covariances):
        tau = task_vector(world.adapters[i], module)
        if tau is not None:
            numerator = numerator + tau @ covariance
    loaded = gram + ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=torch.float64)
    return torch.linalg.solve(loaded, numerator.T).T, gram


def merged_deltas(world, out) -> dict[str, torch.Tensor]:
    """Each module's delta as PEFT applies it after PeftModel.from_pretrained."""
    model = PeftModel.from_pretrained(load_base(world.base), out)
    deltas = {}
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
            deltas[name] = module.get_delta_weight("default").double()
    return deltas


def output_error(delta: torch.Tensor, reference: torch.Tensor, gram: torch.Tensor) -> float:
    """‖(τ* − τ_ref) H½‖ / ‖τ_ref H½‖, i.e. the error in the layer's outputs over the
    calibration inputs."""

    def norm(matrix):
        return torch.sqrt(torch.trace(matrix @ gram @ matrix.T).clamp(min=0))

    return float(norm(delta - reference) / norm(reference))


def merge_recorded_tasks(capsys, base: Path, folder: Path, cases: list[dict], out: Path) -> tuple[list[Path], Path]:
    """A maker's fixture's two tasks (its `adapter_task_a`, `adapter_task_b`, copied under `out`),
    each with statistics on its own recorded image and question, merged: (the adapters, the merge)."""
    import shutil

    adapters = []
    for task, case in zip(("task_a", "task_b"), cases):
        adapter = shutil.copytree(folder / f"adapter_{task}", out / task)
        data = out / f"{task}.jsonl"
        record = {"image": str(folder / case["image"]), "prompt": case["question"], "answer": "red"}
        data.write_text(json.dumps(record) + "\n")
        code, err = run_cli(capsys, "stats", "--model", base, "--adapter", adapter, "--data", data, "--device", "cpu")
        assert code == 0, err
        adapters.append(adapter)
    merged = out / "merged"
    code, err = run_cli(capsys, "merge", *adapters, "--out", merged)
    assert code == 0, err
    return adapters, merged
