"""`many stats`: stream calibration records through base + adapter and accumulate, for every
distinct input of the adapted layers, Σ x xᵀ over the unmasked positions, and the visual
prototype of the task. Under torchrun each rank takes a disjoint shard and the sums are
all-reduced before rank 0 writes the file.

The package, one job per module:
- `collect`: the run (records, model, shard, checks, the stats file);
- `accumulate`: the hooks, the float32 sums and the exemplars, and the forward that drives them;
- `reduce`: what a run summed, over every torchrun rank.
"""

from many_cli.options import StatsOptions
from many_cli.stats.accumulate import (
    Exemplars,
    InputCovariances,
    UpperTriangle,
    accumulate,
    forward,
    tensor_core_products,
)
from many_cli.stats.collect import TOKEN_RULE, Progress, StatsReport, collect_stats, encoded_batches

__all__ = [
    "TOKEN_RULE",
    "Exemplars",
    "InputCovariances",
    "Progress",
    "StatsOptions",
    "StatsReport",
    "UpperTriangle",
    "accumulate",
    "collect_stats",
    "encoded_batches",
    "forward",
    "tensor_core_products",
]
