"""What a merge tells its user: the tasks it merged, the modules it wrote, and its warnings and
notes (conditioning, the energy a rank budget kept)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class MergeReport:
    out: Path
    tasks: list[str]
    modules: int
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    energy: dict[str, tuple[float, float]] = field(default_factory=dict)  # --rank: module -> (kept, whole)
    rank: int = 0  # under torchrun, the process's rank: only rank 0 writes and reports

    def energy_kept(self, module: str | None = None) -> float:
        """The fraction of the merged update's output energy the rank budget kept, in `module`
        or over all modules."""
        parts = self.energy.values() if module is None else [self.energy[module]]
        whole = sum(total for _, total in parts)
        return sum(kept for kept, _ in parts) / whole if whole > 0 else 1.0

    def note_energy(self, rank: int | None) -> None:
        if rank is None or not self.energy:
            return
        lowest = min(self.energy, key=self.energy_kept)
        self.notes.append(
            f"--rank {rank}: {self.energy_kept():.2%} of the merged update's output energy kept "
            f"over all modules (lowest: {self.energy_kept(lowest):.2%}, {lowest})"
        )

    def note_conditioning(self, singular: list[str], underdetermined: list[str], groups: int, ridge: float) -> None:
        if singular:
            self.warnings.append(
                f"the Gram matrix of {len(singular)} of {groups} inputs (first: {singular[0]}) is "
                f"singular or indefinite at --ridge {ridge:g}: took the minimum-norm "
                f"least-squares solution, which leaves directions no calibration input reached unchanged"
            )
        if underdetermined:
            self.notes.append(
                f"{len(underdetermined)} of {groups} inputs saw fewer calibration tokens than their width, "
                f"so their Gram matrix is rank-deficient"
                + (f"; --ridge {ridge:g} keeps it solvable" if ridge > 0 else "")
            )
