"""The merge methods, one entry each: what a method reads, whether `--resume` can extend it, how
it runs, and how the model card names it and its own settings. Adding a method is one entry here
(and its name in `options.Method`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from many_cli.merge import baselines
from many_cli.merge.solve import merge_lpm
from many_cli.options import METHODS, MergeOptions


@dataclass(frozen=True)
class Method:
    title: str  # how the model card names the merge
    needs_stats: bool  # reads each adapter's many_stats.safetensors
    resumable: bool  # keeps a state that `--resume` extends
    distributed: bool  # torchrun ranks share the work (else rank 0 does it all)
    run: Callable  # (inputs, staging, report, track, World) -> None: the merged adapter into staging
    settings: Callable[[MergeOptions], dict]  # its own settings, as the card's metadata lists them
    rank_fit: str  # where a --rank budget's best approximation is taken


def _lpm_settings(options: MergeOptions) -> dict:
    return {
        "ridge": options.ridge,
        "balance": options.balance,
        "alpha": options.alpha,
        "state_precision": options.state_precision,
    }


def _baseline(rule, dense: bool = False) -> Callable:
    return lambda inputs, staging, report, track, world: baselines.merge_baseline(
        inputs, staging, report, track, rule, dense
    )


_PLAIN = "the plain Frobenius norm"
METHOD_TABLE: dict[str, Method] = {
    "many": Method("least-squares (LPM)", True, True, True, merge_lpm, _lpm_settings, "each layer's output space"),
    "average": Method("average", False, False, False, _baseline(baselines.average), lambda options: {}, _PLAIN),
    "task-arithmetic": Method(
        "task arithmetic", False, False, False, _baseline(baselines.task_arithmetic), lambda options: {}, _PLAIN
    ),
    "ties": Method(
        "TIES",
        False,
        False,
        False,
        _baseline(baselines.ties, dense=True),
        lambda options: {"density": options.density},
        _PLAIN,
    ),
}
assert tuple(METHOD_TABLE) == METHODS, "every method the options offer has one entry"
