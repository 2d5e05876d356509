"""The base a QLoRA adapter was trained on: every weight that transformers' bitsandbytes 4-bit
loading quantises (`BitsAndBytesConfig(load_in_4bit=True, ...)`, as LLaMA-Factory's
`quantization_bit: 4` and PEFT's QLoRA scripts load a base) quantised as it was there (nf4 or
fp4 in blocks of 64, the block scales quantised again or not) and taken back to the weight's own
dtype. The adapter learnt its correction against these weights, not the full-precision ones."""

from __future__ import annotations

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


def _bitsandbytes():
    """bitsandbytes, or one line saying what to install."""
    try:
        import bitsandbytes
    except ImportError:
        raise InputError(
            None, "--qlora quantises the base as bitsandbytes did in training: pip install bitsandbytes"
        ) from None
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
