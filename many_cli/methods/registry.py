"""The registry of merge methods. A method is one module in this package that registers one
`MergeMethod`: its name, which of MergeOptions' method settings it reads (every other method's
it refuses), its model-card lines, and its rule. No torch here: `--help` and every refused
option answer before torch loads; a rule imports its work when it runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

Lines = Callable[[Any], list[str]]  # the merge's MergeOptions -> the card's lines of its own settings


@dataclass(frozen=True)
class MergeMethod:
    """One merge method.

    `reads`: the MergeOptions fields of its own it applies (a field some method reads and this
    one does not is refused when set). `runner`: "lpm" (the least-squares solve over the
    statistics, `merge.solve`) or "factors" (`rule` applied module by module to the tasks'
    factors, `merge.baselines`). `rule(a_blocks, b_blocks, options, tasks)` returns the merged
    (A, B), and with `dense` also the relative error of factoring its dense result."""

    name: str
    title: str  # how the model card names the merge
    reads: tuple[str, ...]
    runner: str
    card_lines: Lines = lambda options: []
    rule: Callable | None = None
    dense: bool = False
    rank_fit: str = "the plain Frobenius norm"  # where a --rank budget's best approximation is taken

    @property
    def needs_stats(self) -> bool:
        """Reads each adapter's many_stats.safetensors."""
        return self.runner == "lpm"

    @property
    def resumable(self) -> bool:
        """Keeps a state that `--resume` extends."""
        return self.runner == "lpm"

    @property
    def distributed(self) -> bool:
        """torchrun ranks share the work (else rank 0 does it all)."""
        return self.runner == "lpm"


REGISTRY: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    REGISTRY[method.name] = method
    return method


def readers(field: str) -> list[str]:
    """The methods that read the setting `field`."""
    return [name for name, method in REGISTRY.items() if field in method.reads]


def ignored(name: str) -> list[str]:
    """The method settings `name` does not read: the fields other methods read."""
    own = set(REGISTRY[name].reads)
    return [
        field for field in dict.fromkeys(f for method in REGISTRY.values() for f in method.reads) if field not in own
    ]
