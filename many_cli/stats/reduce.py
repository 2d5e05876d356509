"""`many stats`' reduction: what a run summed, gathered from its hooks and, under torchrun,
summed over every rank as one process would have it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from many_cli.distributed import World, all_gather_json, all_gather_rows
from many_cli.stats.accumulate import Exemplars, InputCovariances


class Counts(Protocol):
    """The run's counts (a StatsReport's), summed over the ranks with the statistics."""

    records: int
    skipped: int
    tokens: int


@dataclass
class Totals:
    """What a stats run sums (over every rank under torchrun)."""

    sums: dict[str, torch.Tensor]  # input -> packed Σ x xᵀ
    rows: dict[str, int]  # input -> rows counted
    members: dict[str, list[str]]  # input -> the modules that read it, in the order the forward met them
    exemplars: torch.Tensor | None  # (images, width): each image's pooled direction, in record order
    batches: list[int]  # how many of the exemplars each forward met, in order

    @property
    def images(self) -> int:
        return 0 if self.exemplars is None else self.exemplars.shape[0]

    def prototype(self) -> torch.Tensor | None:
        """The mean exemplar, summed a forward at a time: the order of a float32 sum decides its
        last bit, and so the file's bytes, which must not depend on how the ranks split the work."""
        if not self.images:
            return None
        sums = [batch.sum(dim=0) for batch in self.exemplars.split(self.batches)]
        return sum(sums[1:], sums[0]) / self.images


def gather_totals(covariances: InputCovariances, exemplars: Exemplars, world: World, report: Counts) -> Totals:
    """The hooks' sums and exemplars; under torchrun, every rank's (and `report`'s counts) summed."""
    totals = Totals(
        {key: triangle.packed() for key, triangle in covariances.sums.items()},
        {key: triangle.rows_added for key, triangle in covariances.sums.items()},
        covariances.members,
        exemplars.result(),
        exemplars.batches,
    )
    return _all_reduce(totals, report, world.device) if world.size > 1 else totals


def _all_reduce(totals: Totals, report: Counts, device: torch.device) -> Totals:
    """Every rank's statistics summed, as one process would have them: inputs in the order the
    first rank's forward met them, exemplars in record order (the ranks hold consecutive shards).
    Ranks agree on the grouping of layers by input (it is structural); a rank whose shard was
    empty adopts it from the others. Ranks exchange tensors only (their layout as JSON bytes)."""
    lengths = {key: packed.numel() for key, packed in totals.sums.items()}
    width = None if totals.exemplars is None else totals.exemplars.shape[1]
    layouts = all_gather_json(
        {"members": totals.members, "lengths": lengths, "width": width, "batches": totals.batches}
        if totals.members
        else None
    )
    known = [layout for layout in layouts if layout is not None]
    if not known:
        return totals
    members, lengths = known[0]["members"], known[0]["lengths"]
    if any(layout["members"] != members for layout in known):
        raise RuntimeError("ranks disagree on which layers share an input")
    sums, rows = {}, {}
    for key in members:
        packed = totals.sums.get(key)
        if packed is None:
            packed = torch.zeros(lengths[key], dtype=torch.float32, device=device)
        torch.distributed.all_reduce(packed)
        sums[key] = packed
        count = torch.tensor([totals.rows.get(key, 0)], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(count)
        rows[key] = int(count.item())
    counts = torch.tensor([report.records, report.skipped, report.tokens], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(counts)
    report.records, report.skipped, report.tokens = (int(value) for value in counts.tolist())
    width = next((layout["width"] for layout in known if layout["width"] is not None), None)
    exemplars = None
    if width is not None:
        mine = totals.exemplars if totals.exemplars is not None else torch.zeros(0, width)
        exemplars = all_gather_rows(mine)
    return Totals(sums, rows, members, exemplars, [batch for layout in known for batch in layout["batches"]])
