"""Module names across transformers versions: an adapter or checkpoint saved under an older
layout of a family (before transformers 4.52 a LLaVA's language model was `language_model.model`,
a Qwen2-VL's `model`) is mapped onto the base model as transformers builds it now, through
transformers' own record of its renamings (its checkpoint conversion mapping, with the makers'
own layouts registered there while the callers in `models` ask: `internvl_layout`)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

from torch import nn

Rename = Callable[[str], "str | None"]


def renamer(model: nn.Module, converted: bool = False) -> Rename:
    """A parameter key as some transformers version saved it -> its key in `model`, or None
    where transformers converts the tensor (fuses or splits it) instead of renaming it; with
    `converted`, only those keys are named (after the first tensor they become), others None."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [item for item in transforms if not isinstance(item, WeightConverter)]
    converters = [item for item in transforms if isinstance(item, WeightConverter)]
    state = dict.fromkeys(model.state_dict())
    prefix = model.base_model_prefix

    def rename(key: str) -> str | None:
        name, conversion = rename_source_key(key, renamings, converters, prefix, state)
        return name if (conversion is not None) == converted else None

    return rename


def module_renames(rename: Rename, lora_modules: Iterable[str], saved: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Each adapted module's saved name -> its name in the model, for the LoRA modules (named
    through their `.weight`) and the modules saved whole (`saved`: (module, parameter) pairs).
    Where a saved module's inner names change too (OpenGVLab's `mlp1.1` is the projector's
    `linear_1`), each inner module gets its own entry and the saved module maps to the model's
    module that holds them all."""
    names = {}
    for module in lora_modules:
        names[module] = _module_of(rename(f"{module}.weight"), "weight") or module
    inner: dict[str, list[str]] = {}
    for module, parameter in saved:
        key = rename(f"{module}.{parameter}")
        names[module] = _module_of(key, parameter) or names.get(module, module)
        if key is not None and _module_of(key, parameter) is None and "." in parameter:
            owner, leaf = parameter.rsplit(".", 1)
            renamed_owner = _module_of(key, leaf)
            if renamed_owner is not None:
                names[f"{module}.{owner}"] = renamed_owner
                inner.setdefault(module, []).append(renamed_owner)
    for module, owners in inner.items():
        names[module] = _common_prefix(owners)
    return names


def _common_prefix(modules: list[str]) -> str:
    """The deepest module that holds every one of `modules` (dotted names)."""
    parts = [module.split(".") for module in modules]
    common = []
    for pieces in zip(*parts):
        if len(set(pieces)) != 1:
            break
        common.append(pieces[0])
    return ".".join(common)


def _module_of(key: str | None, parameter: str) -> str | None:
    suffix = f".{parameter}"
    return key[: -len(suffix)] if key is not None and key.endswith(suffix) else None


def rename_key(key: str, renames: dict[str, str]) -> str:
    """A key under a saved module name (`module.rest`), put under the module's name in the model."""
    for module in sorted(renames, key=len, reverse=True):  # the longest module that holds the key
        if key == module or key.startswith(f"{module}."):
            return renames[module] + key[len(module) :]
    return key


def checkpoint_names(model: nn.Module, keys: Iterable[str]) -> dict[str, str]:
    """Each parameter's name in `model` -> its key among a checkpoint's `keys`, through the
    renamings transformers applies when it loads (checkpoints keep older layouts); keys that
    transformers converts (fuses, splits) are left out: they cannot be rewritten one at a time."""
    rename = renamer(model)
    return {name: key for key in keys if (name := rename(key)) is not None}


def converted_names(model: nn.Module, keys: Iterable[str]) -> dict[str, str]:
    """The first parameter each converted key among `keys` becomes in `model` -> that key."""
    rename = renamer(model, converted=True)
    return {name: key for key in keys if (name := rename(key)) is not None}


@contextmanager
def registered_names(model_type: str, transforms: list) -> Iterator[None]:
    """transformers' loader of `model_type` reads a maker's own names through `transforms` (its
    weight renamings and converters) while this lasts, and only then: the same mapping, reversed,
    would rename what transformers saves."""
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )

    previous = get_checkpoint_conversion_mapping(model_type) or []
    register_checkpoint_conversion_mapping(model_type, [*transforms, *previous], overwrite=True)
    try:
        yield
    finally:
        register_checkpoint_conversion_mapping(model_type, previous, overwrite=True)
