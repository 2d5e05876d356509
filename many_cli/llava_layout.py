"""Adapters in the original LLaVA training layout (the LLaVA repository, MCITlib): a PEFT LoRA
saved against `LlavaLlamaForCausalLM` names (`model.layers.N...`), and `non_lora_trainables.bin`
holding the projector as `model.mm_projector.{0,2}.*`. They are read with
`torch.load(weights_only=True)` (tensors only, never arbitrary pickled objects) and mapped to
the transformers LLaVA names: `model.language_model.layers.N...` and
`model.multi_modal_projector.linear_{1,2}.*`.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from many_cli.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LORA_KEY,
    NON_LORA_TRAINABLES,
    PEFT_PREFIX,
    PICKLED_WEIGHTS,
    converted_copy,
)
from many_cli.errors import InputError
from many_cli.files import atomic_output_dir, read_json, refuse_overlap
from many_cli.tensorfiles import load_pickled_tensors, open_safetensors, save_tensors

# LLaVA-1.5's mlp2x_gelu projector: Sequential(Linear, GELU, Linear).
PROJECTOR_LAYERS = {"0": "linear_1", "2": "linear_2"}
_PROJECTOR_KEY = re.compile(r"(?:^|\.)mm_projector\.(?P<index>\d+)\.(?P<parameter>weight|bias)$")


def is_llava_layout(path: Path) -> bool:
    return (path / NON_LORA_TRAINABLES).is_file()


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        with open_safetensors(path) as handle:
            return {key: handle.get(key) for key in handle.keys()}
    loaded = load_pickled_tensors(path)
    for key, value in loaded.items():  # as safetensors reads are checked (tensorfiles.open_safetensors)
        if not value.is_floating_point():
            raise InputError(path, f"tensor {key!r} is {value.dtype}, not floating point; re-create the file")
        if not bool(torch.isfinite(value).all()):
            raise InputError(path, f"tensor {key!r} holds NaN or Inf; re-create the file")
    return loaded


def _language_model_name(key: str, source: Path) -> str:
    """`base_model.model.model.layers.0...` -> `model.language_model.layers.0...`."""
    name = key.removeprefix(PEFT_PREFIX)
    if name.startswith("model.language_model.") or name.startswith("lm_head."):
        return name
    if "vision_tower" in name or "mm_projector" in name:
        raise InputError(source, f"holds LoRA weights {key!r} outside the language model, which many does not map")
    if not name.startswith("model."):
        raise InputError(source, f"unexpected tensor {key!r} for the LLaVA layout")
    return "model.language_model." + name.removeprefix("model.")


def convert_tensors(source: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The PEFT adapter config and weights (transformers names) of an original-layout checkpoint."""
    config = read_json(source / ADAPTER_CONFIG)
    weights = source / ADAPTER_WEIGHTS
    lora = _load_tensors(weights if weights.is_file() else source / PICKLED_WEIGHTS)
    tensors, targets = {}, set()
    for key, value in lora.items():
        match = LORA_KEY.match(_language_model_name(key, source))
        if match is None:
            raise InputError(source, f"unexpected tensor {key!r}: not a LoRA factor")
        targets.add(match["module"])
        tensors[f"{PEFT_PREFIX}{match['module']}.lora_{match['part']}.weight"] = value.contiguous()
    extra = source / NON_LORA_TRAINABLES
    for key, value in _load_tensors(extra).items():
        match = _PROJECTOR_KEY.search(key)
        if match is None or match["index"] not in PROJECTOR_LAYERS:
            raise InputError(
                extra, f"holds {key!r}; many maps only the mlp2x_gelu projector (mm_projector.0 and mm_projector.2)"
            )
        layer = PROJECTOR_LAYERS[match["index"]]
        tensors[f"{PEFT_PREFIX}model.multi_modal_projector.{layer}.{match['parameter']}"] = value.contiguous()
    if not targets:
        raise InputError(source, "holds no LoRA weights")
    config = {
        **config,
        "target_modules": sorted(targets),
        "modules_to_save": ["multi_modal_projector"],
        "exclude_modules": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    return config, tensors


def write_peft_adapter(source: Path, out: Path) -> None:
    """Write `source` (original layout) as a standard PEFT adapter directory `out`."""
    config, tensors = convert_tensors(source)
    out.mkdir(parents=True, exist_ok=True)
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_tensors(out / ADAPTER_WEIGHTS, tensors, {"format": "pt"})


def convert(source: Path, out: Path, force: bool) -> Path:
    """`many convert`: an original-layout checkpoint to a PEFT adapter, all or nothing."""
    refuse_overlap(out, [source])
    if not is_llava_layout(source):
        raise InputError(source, f"is not an original LLaVA checkpoint (no {NON_LORA_TRAINABLES})")
    with atomic_output_dir(out, force) as staging:
        write_peft_adapter(source, staging)
    return out


@contextmanager
def peft_adapter_dir(path: Path, base: str | None = None) -> Iterator[Path]:
    """`path` itself for a PEFT adapter; for a checkpoint in its maker's own layout (the original
    LLaVA code's, InternVL's whole-model LoRA, checked against `base` when given), or a QLoRA
    adapter that saved a module in 4 bits, a temporary PEFT copy of the same name (the conversion
    is deterministic, so its fingerprint is too)."""
    from many_cli import internvl_layout, qlora

    if is_llava_layout(path):
        write = write_peft_adapter
    elif internvl_layout.is_whole_model_lora(path):
        write = internvl_layout.write_peft_adapter
        if base is not None:
            internvl_layout.check_against_base(path, base)
    elif qlora.saves_4bit_modules(path):
        write = qlora.write_dequantised_adapter
    else:
        yield path
        return
    with converted_copy(path, write) as converted:
        yield converted
