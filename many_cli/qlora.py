"""The base a QLoRA adapter was trained on: every weight that transformers' bitsandbytes 4-bit
loading quantises (`BitsAndBytesConfig(load_in_4bit=True, ...)`, as LLaMA-Factory's
`quantization_bit: 4` and PEFT's QLoRA scripts load a base) quantised as it was there (nf4 or
fp4 in blocks of 64, the block scales quantised again or not) and taken back to the weight's own
dtype. The adapter learnt its correction against these weights, not the full-precision ones."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from many_cli.errors import InputError

if TYPE_CHECKING:  # torch loads where a model does; `many_cli.options` reads SCHEMES without it
    import torch
    from torch import nn

NONE = "none"
# --qlora's values: (bitsandbytes' quant_type, bnb_4bit_use_double_quant).
SCHEMES: dict[str, tuple[str, bool]] = {
    "nf4-double": ("nf4", True),  # LLaMA-Factory's quantization_bit: 4 default, the QLoRA paper's
    "nf4": ("nf4", False),
    "fp4-double": ("fp4", True),
    "fp4": ("fp4", False),
}
BLOCKSIZE = 64  # what transformers' Linear4bit quantises with (bitsandbytes' default; not configurable there)


def quiet() -> None:
    """bitsandbytes says on import (by PEFT too, wherever it is installed), on a CPU with bf16,
    that it could not fetch an optional kernel from the Hub (and `kernels`, offline, that it did
    not check its publisher), and its quantisation compiles with torch, which says it found no
    CUDA: none of it changes a result, and it would bury many's lines."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    logging.getLogger("kernels").setLevel(logging.ERROR)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def _bitsandbytes(path: Path | None = None, need: str = "--qlora quantises the base as bitsandbytes did in training"):
    """bitsandbytes, or one line saying what needs it and what to install."""
    quiet()
    try:
        import bitsandbytes
    except ImportError:
        raise InputError(path, f"{need}: pip install bitsandbytes") from None
    return bitsandbytes


def quantised_modules(model: nn.Module) -> Iterator[str]:
    """The names of the linear layers transformers replaces by bitsandbytes' Linear4bit when it
    loads `model` in 4 bits (its own rule: every `nn.Linear` but the output layer, tied weights and
    the model's float32 modules)."""
    from torch import nn
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    skipped = HfQuantizer.get_modules_to_not_convert(model, None, getattr(model, "_keep_in_fp32_modules", None))
    for name, module in model.named_modules():
        if type(module) is nn.Linear and should_convert_module(name, skipped):
            yield name


def requantised(weight: torch.Tensor, scheme: str) -> torch.Tensor:
    """`weight` quantised to 4 bits by `scheme` (a key of SCHEMES) and back, in its own dtype and
    on its own device: the weight a QLoRA forward pass computes with."""
    functional = _bitsandbytes().functional
    quant_type, double = SCHEMES[scheme]
    # Blocks run over the weight's elements in storage order, whatever its shape; as one column,
    # bitsandbytes 0.50's CPU dequantisation also reads them back right (given a row shorter
    # than a block, it takes the wrong block's scale).
    packed, state = functional.quantize_4bit(
        weight.reshape(-1, 1), blocksize=BLOCKSIZE, compress_statistics=double, quant_type=quant_type
    )
    return functional.dequantize_4bit(packed, state).to(weight.dtype).reshape(weight.shape)


def requantise(model: nn.Module, scheme: str) -> None:
    """Each weight of `model` that a 4-bit load quantises replaced, in place, by `requantised`."""
    import torch

    with torch.no_grad():
        for name in list(quantised_modules(model)):
            weight = model.get_submodule(name).weight
            weight.copy_(requantised(weight, scheme))


# What PEFT saves of a module kept whole (`modules_to_save`, LLaMA-Factory's `additional_target`)
# that was a 4-bit layer in training: its packed weight and, beside it, bitsandbytes' quant state.
QUANT_STATE_KEY = re.compile(
    r"^(?P<weight>.+\.weight)\.(absmax|quant_map|nested_absmax|nested_quant_map|quant_state\.bitsandbytes__(nf4|fp4))$"
)


def saves_4bit_modules(adapter: Path) -> bool:
    """Whether the PEFT adapter folder `adapter` saved a module in 4 bits (a QLoRA run's projector)."""
    from many_cli.adapters import ADAPTER_WEIGHTS
    from many_cli.tensorfiles import open_safetensors

    weights = adapter / ADAPTER_WEIGHTS
    if not weights.is_file():
        return False
    with open_safetensors(weights) as handle:
        return any(QUANT_STATE_KEY.match(key) for key in handle.keys())


def write_dequantised_adapter(source: Path, out: Path) -> None:
    """`source` as a PEFT adapter folder `out` whose 4-bit saved modules hold their weights at
    full precision (what the layer computed with in training), their quant state dropped."""
    import torch

    from many_cli.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS
    from many_cli.tensorfiles import open_safetensors, save_tensors

    functional = _bitsandbytes(
        source, "saved a module in 4 bits (a QLoRA run's); reading it needs bitsandbytes"
    ).functional
    with open_safetensors(source / ADAPTER_WEIGHTS) as handle:
        tensors = {key: handle.raw(key) for key in handle.keys()}  # packed 4-bit data: checked once unpacked
        metadata = handle.metadata() or {"format": "pt"}
    states: dict[str, dict[str, torch.Tensor]] = {}
    for key in list(tensors):
        found = QUANT_STATE_KEY.match(key)
        if found:
            states.setdefault(found["weight"], {})[key[len(found["weight"]) + 1 :]] = tensors.pop(key)
    for weight, state in states.items():
        if weight not in tensors:
            raise InputError(source / ADAPTER_WEIGHTS, f"holds the 4-bit quant state of {weight} but not the weight")
        try:
            quant_state = functional.QuantState.from_dict(state, device=torch.device("cpu"))
            _check_packing(tensors[weight], quant_state)
            shape, quant_state.shape = quant_state.shape, torch.Size((quant_state.shape.numel(), 1))  # see requantised
            tensors[weight] = functional.dequantize_4bit(tensors[weight], quant_state).reshape(shape)
        except (TypeError, ValueError, KeyError, RuntimeError) as error:
            raise InputError(
                source / ADAPTER_WEIGHTS, f"its 4-bit {weight} cannot be unpacked with its quant state ({error})"
            ) from None
    out.mkdir(parents=True, exist_ok=True)
    (out / ADAPTER_CONFIG).write_bytes((source / ADAPTER_CONFIG).read_bytes())
    save_tensors(out / ADAPTER_WEIGHTS, tensors, metadata)


def _check_packing(packed: torch.Tensor, state) -> None:
    """Two weights to a byte and one scale a block, as the quant state's shape and blocksize say
    (checked here: bitsandbytes' own kernels fail on a mismatch with pages of trace)."""
    count = state.shape.numel()
    if packed.numel() * packed.element_size() != -(-count // 2):
        raise ValueError(f"{packed.numel() * packed.element_size()} bytes packed for {count} weights")
    if state.absmax.numel() != -(-count // state.blocksize):
        raise ValueError(f"{state.absmax.numel()} block scales for {count} weights in blocks of {state.blocksize}")


def saved_scheme(adapter: Path) -> str | None:
    """The scheme (a key of SCHEMES) bitsandbytes packed the adapter's 4-bit saved modules by, as
    their quant state says (its quant type; nested: the scales quantised too), or None."""
    import json

    from many_cli.adapters import ADAPTER_WEIGHTS
    from many_cli.tensorfiles import open_safetensors

    if not saves_4bit_modules(adapter):
        return None
    weights = adapter / ADAPTER_WEIGHTS
    with open_safetensors(weights) as handle:
        key = next((key for key in handle.keys() if ".quant_state.bitsandbytes__" in key), None)
        if key is None:
            raise InputError(weights, "holds 4-bit quant state without its description (quant_state.bitsandbytes__*)")
        try:
            state = json.loads(bytes(handle.raw(key).tolist()).decode())
            return f"{state['quant_type']}{'-double' if 'nested_blocksize' in state else ''}"
        except (TypeError, ValueError, KeyError) as error:  # not the JSON bytes bitsandbytes writes
            raise InputError(weights, f"its {key} is not a readable bitsandbytes quant state ({error})") from None


def base_note(adapter: Path, given: str) -> str | None:
    """A line for an adapter whose saved modules show it trained on a 4-bit base other than the
    base --qlora gives (None when they agree, or when nothing shows it)."""
    scheme = saved_scheme(adapter)
    if scheme is None or scheme == given:
        return None
    asked = "the full-precision base" if given == NONE else f"--qlora {given}"
    return (
        f"{adapter}: trained on a 4-bit base ({scheme}, its saved modules' quant state says), run here on "
        f"{asked}; --qlora {scheme} runs the base as it saw it"
    )
