"""The merged adapter's ranks: Σ r_i per module by default, or one uniform rank under `--rank`,
fitted as the best approximation of the update in the space that weighs it."""

from __future__ import annotations

from typing import Callable, Iterable, Sequence, TypeVar

import torch

from many_cli import lpm
from many_cli.adapters import MergedModule
from many_cli.merge.inputs import MergeInputs

T = TypeVar("T")
Track = Callable[[Sequence[T], str], Iterable[T]]  # a progress display over items: (items, what) -> items


def merged_modules(
    inputs: MergeInputs, order: list[tuple[str, int]], full_rank_cap: bool = False
) -> list[MergedModule]:
    """The merged adapter's modules in the order they will be written ((name, d_in) in `order`):
    rank Σ r_i over the tasks that adapt each (capped at min(d_in, d_out) where a dense result is
    factored), or the rank budget."""
    ranks = inputs.ranks()
    modules = []
    for name, d_in in order:
        entries = [value for (_, module), value in ranks.items() if module == name]
        rank, d_out = sum(rank for rank, _ in entries), entries[0][1]
        if inputs.options.rank is not None:
            rank = inputs.options.rank
        elif full_rank_cap:
            rank = min(rank, d_in, d_out)
        modules.append(MergedModule(name, rank, d_in, d_out))
    return modules


def fit_rank(
    module: str,
    a: torch.Tensor,
    b: torch.Tensor,
    rank: int,
    energy: dict[str, tuple[float, float]],
    weighted: torch.Tensor | None = None,
    unweigh: Callable[[torch.Tensor], torch.Tensor] = lambda rows: rows,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of rank exactly `rank` for the update B A: exact and zero-padded when it fits,
    else the best approximation of B A W (`weighted` = A W; plain Frobenius without W), mapped
    back by `unweigh`. Records the energy kept and the whole (in the weighted space)."""
    weighted = a if weighted is None else weighted
    whole = lpm.squared_norm(weighted, b)
    if b.shape[1] <= rank:
        energy[module] = (whole, whole)
        return lpm.pad_rank(a, b, rank)
    kept_rows, b, kept = lpm.truncate(weighted, b, rank)
    energy[module] = (kept, whole)
    return lpm.pad_rank(unweigh(kept_rows), b, rank)  # a layer narrower than `rank` has fewer directions
