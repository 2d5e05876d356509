"""`many export`: a merge output folded into a standard transformers model directory that any
loader of the family reads: the merged LoRA added into the base weights (W + s·B A) and one
projector chosen. The base checkpoint streams tensor by tensor into shards of the same names
and keys (its own layout, whatever transformers version wrote it), so memory holds one tensor.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Sequence, TypeVar

import torch
from torch import nn

from many_cli import internlm2, qlora
from many_cli.adapters import Adapter, read_adapter
from many_cli.errors import InputError
from many_cli.families import module_name, projector_paths
from many_cli.files import atomic_output_dir, read_json, refuse_overlap
from many_cli.layouts import checkpoint_names, converted_names
from many_cli.models import (
    base_fingerprint,
    load_processor,
    maker_layout,
    maker_names,
    meta_model,
    quantisation,
    refuse_other_base,
)
from many_cli.options import MEAN, ROUTED, ExportOptions
from many_cli.state import BUNDLE_FILE, BundleHeader, read_merge_output, recorded_base
from many_cli.tensorfiles import (
    DTYPES,
    PICKLED_WEIGHTS_INDEX,
    WEIGHTS_INDEX,
    StreamingSafetensorsWriter,
    load_pickled_tensors,
    model_weight_files,
    open_safetensors,
    safetensors_name,
)

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
_REWRITTEN = {"README.md", WEIGHTS_INDEX, PICKLED_WEIGHTS_INDEX}  # written by the export itself

T = TypeVar("T")
Track = Callable[[Sequence[T], str], Iterable[T]]


@dataclass
class ExportReport:
    out: Path
    folded: int  # merged LoRA modules added into the base weights
    projector: str
    tensors: int


def export(
    base: str, merged: Path, out: Path, options: ExportOptions = ExportOptions(), track: Track = lambda items, _: items
) -> ExportReport:
    """Write the base model with `merged` folded in to `out` (see the module's docstring)."""
    base_dir = Path(base).expanduser()
    if not (base_dir / "config.json").is_file():
        raise InputError(
            base,
            "export reads the base model's own files: give a local model directory (for a hub id, its snapshot folder)",
        )
    quantised = quantisation(read_json(base_dir / "config.json"))
    if quantised is not None:
        raise InputError(
            base,
            f"is quantised ({quantised}): export folds the merge into full-precision weights; export "
            f"onto the full-precision base it was quantised from",
        )
    fingerprint = base_fingerprint(
        str(base_dir), options.qlora
    )  # a remote-code or broken config is refused in one line
    load_processor(str(base_dir))  # the export must load as the base does, processor included
    bundle = read_merge_output(merged)
    built_on = recorded_base(merged)
    if built_on:
        refuse_other_base(*built_on, base, fingerprint)
    adapter = read_adapter(merged)
    refuse_overlap(out, [base_dir, merged])
    shards = _shards(base_dir)
    model = meta_model(base_dir)
    keys = [key for shard_keys in shards.values() for key in shard_keys]
    with maker_names():  # a maker's checkpoint keeps its own names (OpenGVLab's, LLaVA's code's)
        raw_names = checkpoint_names(model, keys)
        fused = internlm2.fused_rows(model, converted_names(model, keys))
    folds = _folds(adapter, raw_names, set(keys), fused, merged)
    if options.qlora != qlora.NONE:
        folds = _requantised_first(folds, model, raw_names, options.qlora)
    changes = {**folds, **_projector(model, bundle, options.projector, raw_names)}
    with atomic_output_dir(out, options.force) as staging:
        for shard in track(list(shards), "export"):
            (staging / shard).parent.mkdir(parents=True, exist_ok=True)
            _stream_shard(base_dir / shard, staging / safetensors_name(shard), changes)
        for path in base_dir.iterdir():
            if path.is_file() and not path.name.endswith(_WEIGHT_SUFFIXES) and path.name not in _REWRITTEN:
                shutil.copy2(path, staging / path.name)
        _write_index(base_dir, staging)
        maker = maker_layout(str(base_dir))
        config = maker[0].exported_config(str(base_dir), maker[1]) if maker is not None else None
        if config is not None:
            (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if options.projector == ROUTED:
            shutil.copy2(bundle.path, staging / BUNDLE_FILE)
        (staging / "README.md").write_text(
            _card(base, merged, adapter, options.projector, maker is not None, options.qlora)
        )
    return ExportReport(out, len(adapter.modules), options.projector, sum(len(keys) for keys in shards.values()))


def _shards(base_dir: Path) -> dict[str, list[str]]:
    """The base checkpoint's weight files and the keys of each."""
    shards = {}
    for name in model_weight_files(base_dir):
        if name.endswith(".safetensors"):
            with open_safetensors(base_dir / name) as handle:
                shards[name] = handle.keys()
        else:
            shards[name] = list(load_pickled_tensors(base_dir / name))
    return shards


def _write_index(base_dir: Path, staging: Path) -> None:
    """The base's shard index, naming the shards as the export writes them (safetensors)."""
    for name in (WEIGHTS_INDEX, PICKLED_WEIGHTS_INDEX):
        if (base_dir / name).is_file():
            index = read_json(base_dir / name)
            index["weight_map"] = {key: safetensors_name(shard) for key, shard in index["weight_map"].items()}
            (staging / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            return


Change = Callable[[torch.Tensor], torch.Tensor]


def _folds(
    adapter: Adapter,
    raw_names: dict[str, str],
    checkpoint_keys: set[str],
    fused: dict[str, tuple[str, torch.Tensor]],
    merged: Path,
) -> dict[str, Change]:
    """Checkpoint key -> W ↦ W + s·B A for every merged module (computed in float32, stored in
    W's dtype). A module named by the checkpoint's own key (a merge written --for-transformers
    < 4.52, or one of adapters merged in their saved names) folds there; a module the checkpoint
    holds inside a fused tensor (`fused`: its key and rows there, InternLM2's wqkv) adds into its
    rows."""
    changes: dict[str, Change] = {}
    for module in adapter.modules.values():
        weight_name = f"{module.name}.weight"
        key = raw_names.get(weight_name) or (weight_name if weight_name in checkpoint_keys else None)
        if key is None and weight_name in fused:
            key, rows = fused[weight_name]
            changes[key] = partial(_fold_rows, changes.get(key), adapter, module, rows, merged)
            continue
        if key is None:
            raise InputError(
                merged,
                f"module {module.name} has no weight in the base checkpoint that can be "
                f"rewritten: merged for another model?",
            )

        def fold(weight: torch.Tensor, module=module) -> torch.Tensor:
            a, b = adapter.lora_factors(module.name)
            if weight.shape != (b.shape[0], a.shape[1]):
                raise InputError(
                    merged,
                    f"module {module.name} is {b.shape[0]}×{a.shape[1]}, the base weight "
                    f"{tuple(weight.shape)}: merged for another model?",
                )
            return torch.addmm(weight.float(), b.float(), a.float(), alpha=module.scale).to(weight.dtype)

        changes[key] = fold
    return changes


def _fold_rows(
    previous: Change | None, adapter: Adapter, module, rows: torch.Tensor, merged: Path, weight: torch.Tensor
) -> torch.Tensor:
    """W with s·B A added into its `rows` (after what `previous` folds into its other rows)."""
    weight = previous(weight) if previous else weight
    a, b = adapter.lora_factors(module.name)
    if weight.shape[1:] != (a.shape[1],) or rows.shape[0] != b.shape[0] or weight.shape[0] <= int(rows.max()):
        raise InputError(
            merged,
            f"module {module.name} is {b.shape[0]}×{a.shape[1]}, the base's fused weight "
            f"{tuple(weight.shape)}: merged for another model?",
        )
    return weight.float().index_add(0, rows, b.float() @ a.float(), alpha=module.scale).to(weight.dtype)


def _projector(model: nn.Module, bundle: BundleHeader, choice: str, raw_names: dict[str, str]) -> dict[str, Change]:
    """Checkpoint key -> the chosen projector's tensor (one task's, or the tasks' mean), for
    the projector and every companion the bundle holds."""
    if not bundle.projector_module:
        if choice not in (MEAN, ROUTED):
            raise InputError(bundle.path, "holds no projectors, so --projector can only be mean or routed")
        return {}
    indices = _chosen_tasks(bundle, choice)
    changes = {}
    for path in projector_paths(model):
        states = [bundle.module_state(index, path) for index in indices]
        for parameter in states[0]:
            key = raw_names.get(f"{module_name(model, path)}.{parameter}")
            if key is None:
                raise InputError(
                    bundle.path,
                    f"the projector parameter {path}.{parameter} has no tensor in the "
                    f"base checkpoint that can be rewritten",
                )
            value = torch.stack([state[parameter].float() for state in states]).mean(dim=0)
            changes[key] = lambda weight, value=value, key=key: _replace(weight, value, bundle.path, key)
    return changes


def _chosen_tasks(bundle: BundleHeader, choice: str) -> list[int]:
    if choice in (MEAN, ROUTED):
        return list(range(len(bundle.tasks)))
    if choice not in bundle.tasks:
        raise InputError(
            bundle.path,
            f"has no task {choice!r} (its tasks: {', '.join(bundle.tasks)}); --projector takes a task, mean or routed",
        )
    return [bundle.tasks.index(choice)]


def _replace(weight: torch.Tensor, value: torch.Tensor, bundle: Path, key: str) -> torch.Tensor:
    if weight.shape != value.shape:
        raise InputError(
            bundle,
            f"its projector tensor for {key} is {tuple(value.shape)}, the base's "
            f"{tuple(weight.shape)}: merged for another model?",
        )
    return value.to(weight.dtype)


def _requantised_first(
    folds: dict[str, Change], model: nn.Module, raw_names: dict[str, str], scheme: str
) -> dict[str, Change]:
    """`folds`, with each weight a 4-bit load quantises (`qlora.quantised_modules` of the meta
    model, by its checkpoint key) first taken to the weights the QLoRA adapters trained on."""
    changes = dict(folds)
    for module in qlora.quantised_modules(model):
        key = raw_names.get(f"{module}.weight", f"{module}.weight")
        changes[key] = partial(_after_requantising, folds.get(key), scheme)
    return changes


def _after_requantising(change: Change | None, scheme: str, weight: torch.Tensor) -> torch.Tensor:
    requantised = qlora.requantised(weight, scheme)
    return change(requantised) if change is not None else requantised


def _stream_shard(source: Path, target: Path, changes: dict[str, Change]) -> None:
    """`source` written to `target` as safetensors, tensor by tensor, each changed as `changes`
    says (a pickled shard is memory-mapped, so it too is read one tensor at a time)."""
    if source.suffix != ".safetensors":
        tensors = load_pickled_tensors(source)
        layout = [(key, tensor.dtype, tuple(tensor.shape)) for key, tensor in tensors.items()]
        with StreamingSafetensorsWriter(target, layout, {"format": "pt"}) as writer:
            for key, tensor in tensors.items():
                writer.write(key, changes[key](tensor) if key in changes else tensor)
        return
    with open_safetensors(source) as handle:
        keys = handle.keys()
        layout = [(key, DTYPES[handle.dtype(key)], handle.shape(key)) for key in keys]
        with StreamingSafetensorsWriter(target, layout, handle.metadata() or {"format": "pt"}) as writer:
            for key in keys:
                tensor = handle.raw(key)
                writer.write(key, changes[key](tensor) if key in changes else tensor)


def _card(base: str, merged: Path, adapter: Adapter, projector: str, maker: bool, scheme: str) -> str:
    routed = projector == ROUTED
    chosen = {
        MEAN: "the tasks' projectors averaged",
        ROUTED: "the tasks' projectors averaged (routed through many, below)",
    }.get(projector, f"task {projector}'s projector")
    return "\n".join(
        [
            "---",
            "library_name: transformers",
            "tags: [many, model-merging, continual-learning]",
            "---",
            "",
            "# Model exported by `many export`",
            "",
            f"The base model `{base}` with the merged LoRA of `{merged}` folded into its weights "
            f"({len(adapter.modules)} modules) and, in the projector's place, {chosen}. "
            + (
                f"The base's weights are those its QLoRA adapters trained on (`--qlora {scheme}`: "
                f"quantised to 4 bits and back), stored at full precision. "
                if scheme != qlora.NONE
                else ""
            )
            + "It loads as the base does:",
            "",
            *(
                [
                    "in its maker's own layout, with the code that reads the base (OpenGVLab's, LLaVA's "
                    "`load_pretrained_model`), and with `many` (`many infer --model THIS_DIRECTORY`)."
                ]
                if maker
                else [
                    "```python",
                    "from transformers import AutoModelForImageTextToText, AutoProcessor",
                    "",
                    'model = AutoModelForImageTextToText.from_pretrained("THIS_DIRECTORY")',
                    'processor = AutoProcessor.from_pretrained("THIS_DIRECTORY")',
                    "```",
                ]
            ),
            *(
                [
                    "",
                    "With `many` installed, the task projectors are routed per image again (CPM), from "
                    f"`{BUNDLE_FILE}` beside the weights:",
                    "",
                    "```python",
                    "import many_cli",
                    "",
                    'routed = many_cli.load_routed("THIS_DIRECTORY")  # .model (ready to generate), .processor',
                    "```",
                ]
                if routed
                else []
            ),
            "",
        ]
    )
