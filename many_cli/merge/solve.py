"""LPM, one input group at a time: gather the group's Gram matrix H and every task's factors,
keep them in the state, solve, and emit the merged factors. Under torchrun, group n is solved by rank n mod the
world size, and rank 0 alone writes, taking the other ranks' groups through `send_solved` and
`receive_solved`."""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

import torch

from many_cli import lpm
from many_cli.adapters import MergedAdapterWriter
from many_cli.distributed import World, receive_tensors, send_tensors
from many_cli.errors import InputError
from many_cli.merge.budget import Track, fit_rank, merged_modules
from many_cli.merge.inputs import Group, MergeInputs
from many_cli.merge.report import MergeReport
from many_cli.options import MergeOptions
from many_cli.state import STATE_FILE, StateGroup, StateTask, StateWriter, pack_symmetric, packed_blocks

_STATE_DTYPES = {"float64": torch.float64, "float32": torch.float32}

Emit = Callable[[str, torch.Tensor, torch.Tensor], None]  # (module, A, B) of the merged adapter
Taken = list[tuple[torch.Tensor, int]]  # --one-pass: per new task, a group's packed Σ x xᵀ and its rows


class TakenGroup(Protocol):
    group: Group
    taken: Taken


class Walk(Protocol):
    """--one-pass's statistics (`many_cli.stats.walk.StageWalk`, which the caller gives)."""

    spilled: int  # batches of hidden states the walk kept on disk

    def ordered(self, groups: list[Group]) -> list[Group]:
        """`groups` in the order the model's forward reaches them."""

    def stages(self, groups: list[Group], scratch: Path) -> Sequence[TakenGroup]:
        """Every group of `ordered`, with every new task's statistics of its input."""

    def install(self, merged: list[tuple[str, torch.Tensor, torch.Tensor]]) -> None:
        """A solved group's merged LoRA, switched on before the next group is taken."""


@dataclass(frozen=True)
class Contribution:
    """One task's share of one module in a group: w·A C and w·A diag(C) (rank, d_in) and s·B
    (d_out, rank)."""

    index: int
    module: str
    ac: torch.Tensor
    ad: torch.Tensor
    b: torch.Tensor

    def rhs(self, alpha: float) -> torch.Tensor:
        """w·A C_α, with C_α = α C + (1 − α) diag(C)."""
        return self.ac if alpha == 1 else alpha * self.ac + (1 - alpha) * self.ad


@dataclass
class SolvedGroup:
    """What one input group adds to the output: its tasks' shares (for the state), the merged
    (module, A, B), the energy a rank budget kept, and whether H needed the minimum-norm solve.
    `gram` (packed) only when the group was solved on another rank."""

    contributions: list[Contribution]
    merged: list[tuple[str, torch.Tensor, torch.Tensor]]
    energy: dict[str, tuple[float, float]]
    singular: bool
    gram: torch.Tensor | None = None


def merge_lpm(
    inputs: MergeInputs, staging: Path | None, report: MergeReport, track: Track, world: World, walk: Walk | None = None
) -> None:
    """The merged adapter (and the state) of `inputs` into `staging`; on ranks other than 0
    (`staging` None) only this rank's share of the groups, sent to rank 0. With `walk` (one
    process), the new tasks' covariances are taken by it, group after group."""
    rank, device, options, groups = world.rank, world.device, inputs.options, inputs.groups
    all_tasks = inputs.state_tasks()
    writer = adapter = None
    singular, underdetermined = [], []
    with ExitStack() as files:  # closed in order when the groups are done, removed if they fail
        if rank == 0:
            modules = merged_modules(inputs, [(m, g.dim) for g in groups for m in g.modules])
            adapter = files.enter_context(
                MergedAdapterWriter(staging, modules, inputs.base_model, inputs.adapter_names, inputs.fused_modules)
            )
            report.modules = len(modules)
            writer = files.enter_context(_state_writer(inputs, staging / STATE_FILE, all_tasks))
        stages = walk.stages(groups, staging) if walk else [_Given(group) for group in groups]
        for number, stage in enumerate(track(stages, "merging") if rank == 0 else stages):
            owner, group = number % world.size, stage.group
            if owner == rank:
                gram, contributions = gather_group(group, inputs, device, taken=stage.taken)
                if writer:  # the state in the order declared: each group's H, then its factors
                    _keep(writer, group, gram, contributions)
                solved = solve_group(group, gram, contributions, inputs, device, rank != 0, stage.taken)
                if walk:
                    walk.install(solved.merged)
                if rank:
                    send_solved(solved)
                    continue
            elif rank == 0:
                solved = receive_solved(owner, group, _contribution_keys(group, all_tasks), options.rank)
                _keep(writer, group, solved.gram, solved.contributions)
            else:
                continue
            for module, a, b in solved.merged:
                adapter.write(module, a, b)
            report.energy.update(solved.energy)
            if solved.singular:
                singular.append(group.key)
            if sum(task.tokens[group.key] for task in all_tasks) < group.dim:
                underdetermined.append(group.key)
    world.leave()
    report.note_conditioning(singular, underdetermined, len(groups), options.ridge)
    if walk and walk.spilled:
        report.notes.append(
            f"--one-pass kept {walk.spilled} batches of hidden states on disk beyond --walk-memory "
            f"{options.walk_memory:g} GiB (more memory is faster)"
        )


@dataclass(frozen=True)
class _Given:
    """A group whose covariances its tasks' stats files hold."""

    group: Group
    taken: None = None

    @property
    def key(self) -> str:
        return self.group.key


def _state_writer(inputs: MergeInputs, path: Path, all_tasks: list[StateTask]) -> StateWriter:
    ranks = inputs.ranks()
    layout = [
        StateGroup(
            group.key,
            group.dim,
            tuple((index, module, *ranks[index, module]) for index, module in _contribution_keys(group, all_tasks)),
        )
        for group in inputs.groups
    ]
    return StateWriter(
        path,
        layout,
        base_fingerprint=inputs.base_fingerprint,
        base_model=inputs.base_model,
        balance=inputs.options.balance,
        tasks=all_tasks,
        members={group.key: group.modules for group in inputs.groups},
        dtype=_STATE_DTYPES[inputs.options.state_precision],
    )


def _keep(writer: StateWriter, group: Group, gram: torch.Tensor, contributions: list[Contribution]) -> None:
    """A group in the state: its H (a matrix, or its packed triangle), then every task's factors."""
    writer.gram(group.key, gram)
    for part in contributions:
        writer.factors(part.index, part.module, part.ac, part.ad, part.b)


def _contribution_keys(group: Group, all_tasks: list[StateTask]) -> list[tuple[int, str]]:
    """(task index, module) of every task's share in `group`, in the order the state keeps them."""
    return [
        (index, module) for index, task in enumerate(all_tasks) for module in group.modules if module in task.modules
    ]


def solve_group(
    group: Group,
    gram: torch.Tensor,
    contributions: list[Contribution],
    inputs: MergeInputs,
    device: torch.device,
    pack: bool,
    taken: Taken | None = None,
) -> SolvedGroup:
    """Solve and factor one gathered group (its Gram matrix is factored in place); with `pack`,
    the result keeps H's upper triangle for rank 0 to write."""
    options = inputs.options
    packed = pack_symmetric(gram) if pack else None
    rhs = torch.cat([part.rhs(options.alpha) for part in contributions]).to(device)
    solution = lpm.cholesky_solve_right_(lpm.reduce_off_diagonal_(gram, options.alpha), rhs, options.ridge)
    singular = solution is None
    if singular:
        # The factorization overwrote the Gram matrix: gather it again, now checking every
        # value, so that NaN or Inf in a file is reported as such and not as a singular H.
        gram, _ = gather_group(group, inputs, device, factors=False, taken=taken)
        solution = lpm.min_norm_solve_right(lpm.reduce_off_diagonal_(gram, options.alpha), rhs, options.ridge)
    del gram
    merged, energy = [], {}
    _emit_group(group, contributions, solution, options, lambda *factors: merged.append(factors), energy)
    return SolvedGroup(contributions, merged, energy, singular, packed)


def send_solved(solved: SolvedGroup) -> None:
    """A solved group to rank 0, as `receive_solved` reads it: H's packed triangle, each task's
    (w·A C, w·A diag(C), s·B), each module's merged (A, B), the energy kept, the singular flag."""
    energy = torch.tensor(
        [solved.energy.get(module, (0.0, 0.0)) for module, _, _ in solved.merged], dtype=torch.float64
    )
    send_tensors(
        [
            solved.gram,
            *[tensor for part in solved.contributions for tensor in (part.ac, part.ad, part.b)],
            *[tensor for _, a, b in solved.merged for tensor in (a, b)],
            energy,
            torch.tensor([float(solved.singular)]),
        ],
        0,
    )


def receive_solved(owner: int, group: Group, keys: list[tuple[int, str]], rank_budget: int | None) -> SolvedGroup:
    """A group solved by rank `owner`, as `send_solved` sent it."""
    gram, *rest = receive_tensors(owner)
    shares = [
        Contribution(index, module, *rest[3 * number : 3 * number + 3]) for number, (index, module) in enumerate(keys)
    ]
    rest = rest[3 * len(keys) :]
    merged = [(module, rest[2 * number], rest[2 * number + 1]) for number, module in enumerate(group.modules)]
    energy_rows, flag = rest[2 * len(group.modules) :]
    energy = {module: tuple(row.tolist()) for module, row in zip(group.modules, energy_rows)} if rank_budget else {}
    return SolvedGroup(shares, merged, energy, bool(flag.item()), gram)


def _emit_group(
    group: Group,
    contributions: list[Contribution],
    solution: lpm.Solution,
    options: MergeOptions,
    emit: Emit,
    energy: dict[str, tuple[float, float]],
) -> None:
    """Each module's merged factors: its tasks' solved rows of A* beside their s·B, scaled by λ;
    under a rank budget, the best rank-R approximation in the output space H weighs."""
    sizes = [part.ac.shape[0] for part in contributions]
    solved, weighted = solution.rows.split(sizes), solution.weighted.split(sizes)
    for module in group.modules:
        mine = [index for index, part in enumerate(contributions) if part.module == module]
        b = torch.cat([options.scale * contributions[index].b for index in mine], dim=1).to(solution.rows.device)
        a = torch.cat([solved[index] for index in mine])
        if options.rank is not None:
            a, b = fit_rank(
                module, a, b, options.rank, energy, torch.cat([weighted[index] for index in mine]), solution.unweigh
            )
        emit(module, a.cpu(), b.cpu())


def gather_group(
    group: Group, inputs: MergeInputs, device: torch.device, factors: bool = True, taken: Taken | None = None
):
    """The group's weighted Gram matrix H (float64, upper triangle filled) and, with `factors`,
    every task's (w·A C, w·A diag(C), s·B) for its modules: earlier tasks' from the state, new tasks' from
    their adapters and stats files (or, under --one-pass, the covariances the walk `taken`).
    Covariances stream from their files a block of rows at a time; H is the only d×d matrix in memory.

    The first gather (with factors) skips the NaN scan: NaN anywhere makes the factorization
    fail, and the second gather (without factors), which scans, then names the file."""
    gram = torch.zeros(group.dim, group.dim, dtype=torch.float64, device=device)
    for start, rows in inputs.earlier_gram_blocks(group, check_finite=not factors):
        gram[start : start + rows.shape[0], start:] += rows.to(device)
    contributions = (
        [Contribution(index, module, *shares) for index, module, shares in inputs.earlier_factors(group)]
        if factors
        else []
    )
    for index, (task, name) in enumerate(zip(inputs.tasks, group.inputs), start=inputs.offset):
        stats = task.stats.inputs[name]
        if stats.tokens <= 0:
            raise InputError(task.stats.path, f"input {name} saw no calibration tokens")
        if taken is not None:
            _check_walked(task, name, taken[index - inputs.offset][1])
        weight = 1.0 / stats.tokens if inputs.options.balance else 1.0
        adapted = [module for module in group.modules if module in task.adapter.modules] if factors else []
        pairs = [task.adapter.lora_factors(module) for module in adapted]
        stacked = torch.cat([a for a, _ in pairs]).to(device, torch.float64) if pairs else None
        product = torch.zeros(0 if stacked is None else stacked.shape[0], group.dim, dtype=torch.float64, device=device)
        diagonal = torch.zeros(group.dim, dtype=torch.float64, device=device)
        blocks = (
            task.stats.covariance_blocks(name, check_finite=not factors)
            if taken is None
            else packed_blocks(taken[index - inputs.offset][0])
        )
        for start, rows in blocks:
            rows = rows.to(device, torch.float64)
            gram[start : start + rows.shape[0], start:].add_(rows, alpha=weight)
            diagonal[start : start + rows.shape[0]] = rows.diagonal()
            if stacked is not None:
                lpm.add_symmetric_block_product_(product, stacked, start, rows)
        sizes = [a.shape[0] for a, _ in pairs]
        products = (weight * product).split(sizes)
        diagonal_products = (weight * stacked * diagonal).split(sizes) if stacked is not None else []
        for module, (_, b), ac, ad in zip(adapted, pairs, products, diagonal_products):
            scaled_b = b.to(torch.float64) * task.adapter.modules[module].scale
            contributions.append(Contribution(index, module, ac.cpu().contiguous(), ad.cpu().contiguous(), scaled_b))
    contributions.sort(key=lambda part: (part.index, group.modules.index(part.module)))
    return gram, contributions


def _check_walked(task, name: str, rows: int) -> None:
    """The walk counted the positions the task's stats file counted: the same records, asked alike."""
    counted = task.stats.inputs[name].tokens
    if rows != counted:
        raise InputError(
            task.stats.path,
            f"--one-pass counted {rows} calibration positions at input {name} where this stats file counted "
            f"{counted}: give --data the calibration data its stats were taken on",
        )
