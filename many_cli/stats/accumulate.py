"""`many stats`' accumulation: forward pre-hooks on the adapted layers summing Σ x xᵀ (float32,
upper triangle) per distinct input over the unmasked positions, the exemplars of the images the
projector sees, and the forward pass that drives them."""

from __future__ import annotations

from functools import partial
from typing import Callable, Iterable

import torch
from torch import nn

from many_cli.cpm import pooled_direction
from many_cli.models import (
    computes_own_positions,
)
from many_cli.state import BLOCK


def tensor_core_products(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether Σ x xᵀ can multiply x in its own half precision with float32 accumulation (the
    tensor cores, an order of magnitude above the float32 units) and give what float32 gives:
    the product of two bfloat16 or two float16 values is exact in float32, so only the order of
    the float32 sums differs. Needs CUDA with tensor cores for the dtype (float16 from compute
    capability 7.0, bfloat16 from 8.0) and torch's matrix product with a float32 `out_dtype`."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16) or not hasattr(torch.ops.aten.mm, "dtype"):
        return False
    return torch.cuda.get_device_capability(device) >= ((8, 0) if dtype == torch.bfloat16 else (7, 0))


class UpperTriangle:
    """Σ x xᵀ kept as its upper triangle, in row blocks: half the memory and about half the
    multiply-adds of a full d×d accumulation, and already in the stats file's packed order.
    Sums are float32; x is multiplied in its own dtype where `tensor_core_products` allows."""

    def __init__(self, dim: int, device: torch.device):
        self.dim = dim
        self.device = device
        self.rows_added = 0  # the tokens counted
        self.rows = [
            torch.zeros(min(BLOCK, dim - start), dim - start, dtype=torch.float32, device=device)
            for start in range(0, dim, BLOCK)
        ]

    def add(self, x: torch.Tensor) -> None:
        """Add xᵀ x for x of shape (tokens, dim)."""
        self.rows_added += x.shape[0]
        half = tensor_core_products(x.dtype, self.device)
        x = x if half else x.float()
        for index, rows in enumerate(self.rows):
            start = index * BLOCK
            if half:
                rows.add_(torch.mm(x[:, start : start + rows.shape[0]].T, x[:, start:], out_dtype=torch.float32))
            else:
                rows.addmm_(x[:, start : start + rows.shape[0]].T, x[:, start:])

    def packed(self) -> torch.Tensor:
        """The upper triangle row by row, as `state.pack_symmetric` lays it out."""
        return torch.cat([rows[row, row:] for rows in self.rows for row in range(rows.shape[0])])


class InputCovariances:
    """Forward pre-hooks on the adapted layers. During the first batch, layers whose input has
    the fingerprint of an earlier layer's (q/k/v, gate/up, whatever their names) join its
    group and lose their hook; afterwards one float32 Σ x xᵀ per distinct input accumulates
    on the compute device: over the positions whose attention mask is 1 for `text_layers`
    (which read the token sequence), over every row for the others (a vision tower's layers
    read image patches: every one counts)."""

    def __init__(self, layers: dict[str, nn.Module], device: torch.device, text_layers: set[str]):
        self._device = device
        self._text_layers = text_layers
        self._mask: torch.Tensor | None = None
        self._scale: torch.Tensor | None = None  # √weight of each unmasked position
        self._discovering = True
        self._seen: dict[tuple, str] = {}
        self.sums: dict[str, UpperTriangle] = {}
        self.members: dict[str, list[str]] = {}
        self._hooks = {
            name: layer.register_forward_pre_hook(partial(self._hook, name)) for name, layer in layers.items()
        }

    def begin_batch(self, mask: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        self._mask = mask.reshape(-1)
        self._scale = None if weights is None else weights.reshape(-1)[self._mask].sqrt()[:, None]

    def end_batch(self) -> None:
        if self._discovering:
            self._discovering = False
            self._seen.clear()
            for name in list(self._hooks):
                if name not in self.members:
                    self._hooks.pop(name).remove()

    def _hook(self, name: str, _module: nn.Module, args: tuple) -> None:
        x = args[0]
        flat = x.reshape(-1, x.shape[-1]).to(self._device)  # under a device map, layers sit on other devices
        if name in self._text_layers:
            flat = flat[self._mask]
            if self._scale is not None:  # Σ w x xᵀ = Σ (√w x)(√w x)ᵀ
                flat = flat * self._scale.to(flat.dtype)
        if self._discovering and name not in self.sums:  # a layer called again keeps all its inputs
            fingerprint = _fingerprint(flat)
            if fingerprint in self._seen:
                self.members[self._seen[fingerprint]].append(name)
                return
            self._seen[fingerprint] = name
            self.members[name] = [name]
            self.sums[name] = UpperTriangle(flat.shape[1], self._device)
        self.sums[name].add(flat)

    def remove_hooks(self) -> None:
        for hook in self._hooks.values():
            hook.remove()
        self._hooks.clear()


def _fingerprint(flat: torch.Tensor) -> tuple:
    """Three moments of an activation: equal for modules that read the same tensor, and for
    distinct real activations never all equal."""
    values = flat.double()
    weights = torch.arange(1, values.shape[0] + 1, dtype=torch.float64, device=values.device)
    return (
        tuple(flat.shape),
        float(values.sum()),
        float(values.square().sum()),
        float((values.sum(dim=1) * weights).sum()),
    )


class Exemplars:
    """Keeps the L2-normalised, mean-pooled projector input of every image, in order: the exemplars
    that `infer --routing nearest` routes by, whose mean is the CPM prototype."""

    def __init__(self, projector: nn.Module | None):
        self.directions: list[torch.Tensor] = []
        self.batches: list[int] = []
        self.image_shares: list[int] | None = None  # set before each forward (families.ImageTracker)
        self._hook = projector.register_forward_pre_hook(self._add) if projector is not None else None

    def _add(self, _module: nn.Module, args: tuple) -> None:
        self.directions.append(pooled_direction(args[0], self.image_shares).float().cpu())
        self.batches.append(self.directions[-1].shape[0])

    def result(self) -> torch.Tensor | None:
        return torch.cat(self.directions) if self.directions else None

    def remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()


def accumulate(
    model: nn.Module,
    batches: Iterable[tuple[dict, torch.Tensor | None]],
    covariances: "InputCovariances",
    device: torch.device,
    done: Callable[[int, int], None] = lambda records, tokens: None,
) -> None:
    """The statistics pass: one forward per encoded batch, its attention mask (and the weight of
    each position, if any) given to the hooks first; `done(records, tokens)` after each batch."""
    for encoded, weights in batches:
        mask = encoded["attention_mask"].bool()
        covariances.begin_batch(mask.to(device), None if weights is None else weights.to(device))
        forward(model, encoded, device)
        covariances.end_batch()
        done(mask.shape[0], int(mask.sum()))


def forward(model: nn.Module, encoded, device: torch.device) -> None:
    """One forward pass for statistics: positions follow the attention mask, so left and right
    padding see the same activations, and only the last position's logits are computed, unless
    the output layer is adapted (its input covariance then needs every position)."""
    from peft.tuners.lora import LoraLayer

    mask = encoded["attention_mask"]
    keep = 0 if isinstance(model.get_output_embeddings(), LoraLayer) else 1  # 0: every position
    with torch.inference_mode():
        # Positions follow the mask, unless the model derives its own from it (Qwen-VL's 3-D rope).
        positions = (
            {}
            if computes_own_positions(model)
            else {"position_ids": (mask.long().cumsum(-1) - 1).clamp(min=0).to(device)}
        )
        model(**encoded.to(device), **positions, use_cache=False, logits_to_keep=keep)
