"""`many merge`: check the inputs, merge one input group at a time, write the output directory.

Memory stays flat in the depth of the model: for one group of modules that read the same
input, each task's covariance streams from its file a block of rows at a time into one Gram
matrix, which is factored in place; the state and the merged adapter stream to disk as each
group is solved.
"""

from __future__ import annotations

import re
import shutil
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import torch

from many_cli import lpm
from many_cli.adapters import (
    ADAPTER_CONFIG,
    Adapter,
    MergedAdapterWriter,
    MergedModule,
    check_supported_config,
    find_adapter_dirs,
    read_adapter,
)
from many_cli.card import model_card
from many_cli.distributed import init_distributed, rank_device, receive_tensors, send_tensors
from many_cli.errors import InputError
from many_cli.families import routable_modules
from many_cli.files import atomic_output_dir, refuse_overlap
from many_cli.llava_layout import peft_adapter_dir
from many_cli.options import DEFAULT_ETA, DEFAULT_RIDGE, METHODS, MergeOptions  # noqa: F401 - public names
from many_cli.state import (
    BUNDLE_FILE,
    EXPERTS_DIR,
    STATE_FILE,
    STATS_FILE,
    BundleHeader,
    BundleTask,
    StateGroup,
    StateHeader,
    StateTask,
    StateWriter,
    StatsHeader,
    check_one_merge,
    pack_symmetric,
    read_bundle_header,
    read_state_header,
    read_stats_header,
    write_bundle,
)

# Words `infer --lm-routing` and `export --projector` give their own meaning to, so no task may be named so.
RESERVED_NAMES = ("merged", "mean", "routed")
_STATE_DTYPES = {"float64": torch.float64, "float32": torch.float32}

T = TypeVar("T")
Track = Callable[[Sequence[T], str], Iterable[T]]
Emit = Callable[[str, torch.Tensor, torch.Tensor], None]  # (module, A, B) of the merged adapter


@dataclass(frozen=True)
class Task:
    adapter: Adapter
    stats: StatsHeader | None


@dataclass(frozen=True)
class Previous:
    """A merge output given to --resume."""

    state: StateHeader
    bundle: BundleHeader


@dataclass(frozen=True)
class Group:
    """Modules that read one input, so share one Gram matrix."""

    key: str
    dim: int
    modules: tuple[str, ...]
    inputs: tuple[str, ...]  # the input's key in each new task's stats file


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


def merge(
    adapter_paths: list[Path],
    out: Path,
    options: MergeOptions = MergeOptions(),
    resume: Path | None = None,
    track: Track = lambda items, _: items,
) -> MergeReport:
    _check_options(options, resume)
    paths = find_adapter_dirs(adapter_paths)
    refuse_overlap(out, [*adapter_paths, *paths, *([resume] if resume else [])])
    with ExitStack() as converted:  # original-LLaVA-layout adapters are read through PEFT copies
        tasks = [
            _load_task(
                converted.enter_context(peft_adapter_dir(path)), path / STATS_FILE, needs_stats=options.method == "many"
            )
            for path in paths
        ]
        return _merge_tasks(tasks, out, options, resume, track)


def _merge_tasks(tasks: list[Task], out: Path, options: MergeOptions, resume: Path | None, track: Track) -> MergeReport:
    previous = _read_previous(resume) if resume is not None else None
    base_fingerprint = _check_compatible(tasks, previous, options)
    base_model = previous.state.base_model if previous else tasks[0].adapter.base_model
    earlier = [task.name for task in previous.state.tasks] if previous else []
    report = MergeReport(out, earlier + [task.adapter.name for task in tasks], 0)
    options = _resolve_options(options, tasks, previous, report)
    _note_inputs(tasks, previous, report)
    report.rank, world = init_distributed(options.device)
    if report.rank != 0:  # another torchrun rank: it solves its share of the groups, rank 0 writes
        if options.method == "many":
            _merge_lpm(
                tasks,
                previous,
                _plan_groups(tasks, previous),
                options,
                base_fingerprint,
                base_model,
                None,
                report,
                track,
                emit=None,
                world=world,
            )
        return report
    with atomic_output_dir(out, options.force) as staging:
        if options.method == "many":
            groups = _plan_groups(tasks, previous)
            modules = _merged_modules(tasks, previous, [(m, g.dim) for g in groups for m in g.modules], options.rank)
            adapter = MergedAdapterWriter(staging, modules, base_model)
            _merge_lpm(
                tasks,
                previous,
                groups,
                options,
                base_fingerprint,
                base_model,
                staging / STATE_FILE,
                report,
                track,
                adapter.write,
                world=world,
            )
        else:
            names = sorted({module for task in tasks for module in task.adapter.modules})
            modules = _merged_modules(
                tasks, None, [(m, _d_in(tasks, m)) for m in names], options.rank, full_rank_cap=options.method == "ties"
            )
            adapter = MergedAdapterWriter(staging, modules, base_model)
            _merge_baseline(tasks, names, options, report, track, adapter.write)
        adapter.close()
        report.modules = len(modules)
        _report_energy(report, options.rank)
        _write_bundle(staging / BUNDLE_FILE, tasks, previous, options.eta)
        if options.experts:
            _write_experts(staging / EXPERTS_DIR, tasks, previous, base_model, report)
        (staging / "README.md").write_text(
            model_card(
                tasks=[(task.adapter.name, task.adapter.fingerprint) for task in tasks],
                previous=[(task.name, task.adapter_fingerprint) for task in previous.state.tasks] if previous else [],
                resume=resume,
                options=options,
                base_model=base_model,
                base_fingerprint=base_fingerprint,
                report=report,
            )
        )
    return report


def _resolve_options(
    options: MergeOptions, tasks: list[Task], previous: Previous | None, report: MergeReport
) -> MergeOptions:
    """The options as this merge applies them, each change said in a note: the state precision
    (the resumed state's unless given) and a rank budget above every module's full rank (capped)."""
    inherited = previous.state.precision if previous and options.state_precision is None else None
    options = replace(options, state_precision=options.state_precision or inherited or "float64")
    if inherited == "float32":
        report.notes.append(
            "the merge state stays float32, as the resumed one (--state-precision float64 "
            "to store it in float64 from now on)"
        )
    full_rank = _full_rank(tasks, previous)
    if options.rank is not None and options.rank > full_rank:
        report.notes.append(
            f"--rank {options.rank} exceeds the full rank of every merged module (at most "
            f"{full_rank}, min(d_in, d_out)): capped there"
        )
        options = replace(options, rank=full_rank)
    return options


def _note_inputs(tasks: list[Task], previous: Previous | None, report: MergeReport) -> None:
    """What the merge cannot check about its inputs, said: adapters naming different bases, and
    module names of layouts no stats file maps."""
    bases = sorted(
        {task.adapter.base_model for task in tasks if task.adapter.base_model}
        | ({previous.state.base_model} if previous and previous.state.base_model else set())
    )
    if len(bases) > 1:
        checked = (
            "their stats files agree on the base's configuration, which is what the merge checks"
            if all(task.stats for task in tasks)
            else "without stats files the merge cannot check the base"
        )
        report.notes.append(f"the adapters name different base models ({', '.join(bases)}); {checked}")
    unmapped = [task.adapter.path for task in tasks if task.stats is None]
    if unmapped and len({frozenset(task.adapter.modules) for task in tasks}) > 1:
        report.warnings.append(
            f"the adapters adapt different module names, and {', '.join(map(str, unmapped))} "
            f"{'has' if len(unmapped) == 1 else 'have'} no stats file to map the names onto the "
            f"base: adapters saved by different transformers versions merge as one only after "
            f"`many stats` on each"
        )


def _full_rank(tasks: list[Task], previous: Previous | None) -> int:
    """The largest rank any merged module has room for: min(d_in, d_out) of the widest."""
    shapes = [shape[1:] for shape in previous.state.factor_shapes().values()] if previous else []
    shapes += [(m.d_in, m.d_out) for task in tasks for m in task.adapter.modules.values()]
    return max(min(d_in, d_out) for d_in, d_out in shapes)


def _d_in(tasks: list[Task], module: str) -> int:
    return next(task.adapter.modules[module].d_in for task in tasks if module in task.adapter.modules)


def _merged_modules(
    tasks: list[Task],
    previous: Previous | None,
    order: list[tuple[str, int]],
    rank_budget: int | None,
    full_rank_cap: bool = False,
) -> list[MergedModule]:
    """The merged adapter's modules in the order they will be written: rank Σ r_i over the
    tasks that adapt each (capped at min(d_in, d_out) where a dense result is factored), or the
    rank budget."""
    ranks = _ranks(tasks, previous, len(previous.state.tasks) if previous else 0)
    modules = []
    for name, d_in in order:
        entries = [value for (_, module), value in ranks.items() if module == name]
        rank, d_out = sum(rank for rank, _ in entries), entries[0][1]
        if rank_budget is not None:
            rank = rank_budget
        elif full_rank_cap:
            rank = min(rank, d_in, d_out)
        modules.append(MergedModule(name, rank, d_in, d_out))
    return modules


def _check_options(options: MergeOptions, resume: Path | None) -> None:
    options.check()
    if resume is not None and options.method != "many":
        raise InputError(resume, "--resume works with --method many only (baselines keep no state)")


def _load_task(path: Path, stats_path: Path, needs_stats: bool) -> Task:
    """The adapter, named as its stats file found its modules on the base (an adapter saved under an
    older transformers layout is merged under today's names), and its statistics."""
    check_supported_config(path)  # IA3, DoRA ... are named before a missing stats file
    if not stats_path.exists():
        if needs_stats:
            raise InputError(stats_path, f"file not found; run `many stats --adapter {stats_path.parent} ...` first")
        return Task(read_adapter(path), None)
    stats = read_stats_header(stats_path)
    adapter = read_adapter(path, stats.module_names)
    if stats.adapter_fingerprint != adapter.fingerprint:
        raise InputError(
            stats_path,
            f"is stale: it was computed for adapter weights "
            f"{stats.adapter_fingerprint}, the adapter is now "
            f"{adapter.fingerprint}; re-run many stats",
        )
    return Task(adapter, stats)


def _read_previous(resume: Path) -> Previous:
    if not resume.is_dir():
        raise InputError(resume, "merge directory to resume from not found")
    previous = Previous(read_state_header(resume / STATE_FILE), read_bundle_header(resume / BUNDLE_FILE))
    check_one_merge(previous.state, previous.bundle)
    return previous


def _check_compatible(tasks: list[Task], previous: Previous | None, options: MergeOptions) -> str:
    """Refuse inputs that cannot be merged together; return the shared base fingerprint."""
    names = [task.name for task in previous.state.tasks] if previous else []
    for task in tasks:
        if task.adapter.name in names:
            raise InputError(
                task.adapter.path,
                f"task name {task.adapter.name!r} is already taken; "
                f"task names (adapter directory names) must be unique",
            )
        if task.adapter.name in RESERVED_NAMES or "." in task.adapter.name:
            raise InputError(
                task.adapter.path,
                f"task name {task.adapter.name!r} cannot be used: a task is named "
                f"after its adapter directory, and {', '.join(RESERVED_NAMES)} (infer "
                f"and export words) and names with a dot (PEFT adapter names) are "
                f"taken; rename the directory",
            )
        names.append(task.adapter.name)

    fingerprints = [(task.stats.path, task.stats.base_fingerprint) for task in tasks if task.stats]
    if previous:
        fingerprints.insert(0, (previous.state.path, previous.state.base_fingerprint))
        if previous.state.balance != options.balance:
            flag = "--balance" if previous.state.balance else "no --balance"
            raise InputError(
                previous.state.path,
                f"was built with {flag}; resume with the same weighting, or merge all adapters afresh",
            )
    for path, fingerprint in fingerprints[1:]:
        if fingerprint != fingerprints[0][1]:
            raise InputError(
                path,
                f"was computed on another base model (fingerprint {fingerprint}, "
                f"while {fingerprints[0][0]} has {fingerprints[0][1]})",
            )
    weighed = [task.stats for task in tasks if task.stats]
    for stats in weighed[1:]:
        if stats.answer_weight != weighed[0].answer_weight:
            raise InputError(
                stats.path,
                f"weighs answer positions {stats.answer_weight:g}, {weighed[0].path} "
                f"{weighed[0].answer_weight:g}: re-run many stats with one --answer-weight",
            )

    seen: dict[str, tuple[tuple[int, int], Path]] = {}
    if previous:
        for (_, module), (_, d_in, d_out) in previous.state.factor_shapes().items():
            seen[module] = ((d_in, d_out), previous.state.path)
    for task in tasks:
        for module in task.adapter.modules.values():
            shape = (module.d_in, module.d_out)
            first = seen.setdefault(module.name, (shape, task.adapter.weights))
            if first[0] != shape:
                raise InputError(
                    task.adapter.weights,
                    f"module {module.name} maps {shape[0]} to "
                    f"{shape[1]} features, but in {first[1]} "
                    f"{first[0][0]} to {first[0][1]}: adapters of "
                    f"different base models?",
                )
    _check_projectors(tasks, previous)
    return fingerprints[0][1] if fingerprints else ""


def _check_projectors(tasks: list[Task], previous: Previous | None) -> None:
    reference: tuple[str | None, dict[str, tuple[int, ...]], Path] | None = None
    if previous:
        reference = (previous.bundle.projector_module, previous.bundle.projector_shapes(0), previous.bundle.path)
    for task in tasks:
        saved = list(task.adapter.saved_modules)
        if len(saved) > 1 and not routable_modules(saved):
            raise InputError(
                task.adapter.path / ADAPTER_CONFIG,
                f"saves {saved} whole (modules_to_save); many "
                f"routes one projector (with Qwen3-VL's DeepStack "
                f"mergers) and can merge nothing else saved whole",
            )
        mine = (task.adapter.projector_module, dict(task.adapter.projector_shapes), task.adapter.weights)
        if reference is None:
            reference = mine
        elif mine[:2] != reference[:2]:
            raise InputError(
                mine[2],
                f"its projector ({mine[0] or 'none'}: {mine[1]}) differs from "
                f"the one in {reference[2]} ({reference[0] or 'none'}: "
                f"{reference[1]}); every task must train the same projector",
            )


def _plan_groups(tasks: list[Task], previous: Previous | None) -> list[Group]:
    """Group the adapted modules by the input they read, as the stats files record it."""
    union = {module for task in tasks for module in task.adapter.modules}
    if previous:
        union.update(module for modules in previous.state.groups.values() for module in modules)
    signatures = {module: _input_signature(tasks, module, union) for module in sorted(union)}
    members = _resumed_members(tasks, previous, signatures) if previous else _fresh_members(signatures)
    return [
        Group(
            key,
            _group_width(tasks, previous, key, modules, signatures[modules[0]]),
            tuple(sorted(modules)),
            signatures[modules[0]],
        )
        for key, modules in sorted(members.items())
    ]


def _input_signature(tasks: list[Task], module: str, union: set[str]) -> tuple[str, ...]:
    """The key of the input `module` reads, in each new task's stats file."""
    keys = []
    for task in tasks:
        stats = task.stats.input_of(module)
        if stats is None:
            raise InputError(
                task.stats.path,
                f"holds no covariance for the input of {module}, which "
                f"{'its' if module in task.adapter.modules else 'another'} adapter "
                f"adapts; to cover every merged module, re-run: many stats --model BASE "
                f"--adapter {task.adapter.path} --data DATA --modules "
                f"'{modules_pattern(union)}'",
            )
        keys.append(stats.key)
    return tuple(keys)


def modules_pattern(modules: Iterable[str]) -> str:
    """A regular expression matching `modules` (and the same modules of every layer)."""
    shapes = sorted({re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(module)) for module in modules})
    return shapes[0] if len(shapes) == 1 else f"({'|'.join(shapes)})"


def _fresh_members(signatures: dict[str, tuple[str, ...]]) -> dict[str, list[str]]:
    """Modules reading one input in every task form a group, named after its first module."""
    by_signature: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for module, keys in signatures.items():
        by_signature[keys].append(module)
    return {modules[0]: modules for modules in by_signature.values()}


def _resumed_members(
    tasks: list[Task], previous: Previous, signatures: dict[str, tuple[str, ...]]
) -> dict[str, list[str]]:
    """The state's groups, joined by new modules that read one of their inputs."""
    members = {key: list(modules) for key, modules in previous.state.groups.items()}
    for modules in previous.state.groups.values():
        if len({signatures[module] for module in modules}) > 1:
            raise InputError(
                tasks[0].stats.path,
                f"the new stats files do not agree with the state on which modules read one input: {modules}",
            )
    by_signature = {signatures[modules[0]]: key for key, modules in previous.state.groups.items()}
    for module in sorted(set(signatures) - {m for modules in previous.state.groups.values() for m in modules}):
        key = by_signature.get(signatures[module])
        if key is None:
            raise InputError(
                previous.state.path,
                f"cannot add {module} on resume: the state holds "
                f"no statistics of its input for the earlier "
                f"tasks; merge all adapters afresh",
            )
        members[key].append(module)
    return members


def _group_width(
    tasks: list[Task], previous: Previous | None, key: str, modules: list[str], inputs: tuple[str, ...]
) -> int:
    """The input's width, which every stats file, the state and every adapter must agree on."""
    dims = {task.stats.inputs[name].dim for task, name in zip(tasks, inputs)}
    if previous and key in previous.state.groups:
        dims.add(previous.state.gram_dim(key))
    dims.update(
        task.adapter.modules[module].d_in for task in tasks for module in modules if module in task.adapter.modules
    )
    if len(dims) != 1:
        raise InputError(
            tasks[0].stats.path,
            f"the input of {key} has differing widths {sorted(dims)} across stats files and adapters",
        )
    return dims.pop()


def _merge_lpm(
    tasks: list[Task],
    previous: Previous | None,
    groups: list[Group],
    options: MergeOptions,
    base_fingerprint: str,
    base_model: str | None,
    state_path: Path | None,
    report: MergeReport,
    track: Track,
    emit: Emit | None,
    world: int,
) -> None:
    """Per input group: gather H and every task's factors, keep them in the state, solve, emit.
    Under torchrun, group n is solved by rank n mod world size, and rank 0 alone writes (its
    `state_path` and `emit`; the other ranks pass None), taking the other ranks' groups in order."""
    rank = report.rank
    offset = len(previous.state.tasks) if previous else 0
    all_tasks = list(previous.state.tasks if previous else []) + [
        _state_task(task, index, groups) for index, task in enumerate(tasks)
    ]
    ranks = _ranks(tasks, previous, offset)
    writer = (
        None
        if rank
        else StateWriter(
            state_path,
            [
                StateGroup(
                    group.key,
                    group.dim,
                    tuple(
                        (index, module, *ranks[index, module]) for index, module in _contribution_keys(group, all_tasks)
                    ),
                )
                for group in groups
            ],
            base_fingerprint=base_fingerprint,
            base_model=base_model,
            balance=options.balance,
            tasks=all_tasks,
            members={group.key: group.modules for group in groups},
            dtype=_STATE_DTYPES[options.state_precision],
        )
    )
    device = rank_device(options.device, world)
    singular, underdetermined = [], []
    background_writes = writer is not None and world == 1

    def prepare(group: Group) -> Gathered:
        gram, contributions = _gather_group(group, tasks, previous, offset, options.balance, device)
        if background_writes:  # the state in the order declared: each group's H, then its factors
            writer.gram(group.key, gram)
            for part in contributions:
                writer.factors(part.index, part.module, part.ac, part.ad, part.b)
        return Gathered(gram, contributions, kept=background_writes)

    mine = _one_ahead([group for number, group in enumerate(groups) if number % world == rank], prepare)
    for number, group in enumerate(track(groups, "merging") if rank == 0 else groups):
        owner = number % world
        if owner == rank:
            gathered = next(mine)
            if writer and not gathered.kept:
                writer.gram(group.key, gathered.gram)
            solved = _solve_group(group, gathered, tasks, previous, offset, options, device, pack=rank != 0)
            if rank:
                _send_group(solved)
                continue
        elif rank == 0:
            gathered = None
            solved = _receive_group(owner, group, _contribution_keys(group, all_tasks), options.rank)
            writer.gram(group.key, solved.gram)
        else:
            continue
        if not (gathered and gathered.kept):
            for part in solved.contributions:
                writer.factors(part.index, part.module, part.ac, part.ad, part.b)
        for module, a, b in solved.merged:
            emit(module, a, b)
        report.energy.update(solved.energy)
        if solved.singular:
            singular.append(group.key)
        if sum(task.tokens[group.key] for task in all_tasks) < group.dim:
            underdetermined.append(group.key)
    if writer:
        writer.close()
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    _report_conditioning(report, singular, underdetermined, len(groups), options.ridge)


def _contribution_keys(group: Group, all_tasks: list[StateTask]) -> list[tuple[int, str]]:
    """(task index, module) of every task's share in `group`, in the order the state keeps them."""
    return [
        (index, module) for index, task in enumerate(all_tasks) for module in group.modules if module in task.modules
    ]


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


@dataclass
class Gathered:
    """One group's weighted Gram matrix H (float64, upper triangle filled) and every task's share;
    `kept` once both are in the merge state."""

    gram: torch.Tensor
    contributions: list[Contribution]
    kept: bool


def _one_ahead(groups: list[Group], prepare: Callable[[Group], Gathered]) -> Iterator[Gathered]:
    """prepare(group) for each group in order, the next one prepared in a background thread while
    the caller solves this one: reading, summing and writing run beside the factorization."""
    if not groups:
        return
    with ThreadPoolExecutor(1, thread_name_prefix="many-gather") as pool:
        pending = pool.submit(prepare, groups[0])
        for following in [*groups[1:], None]:
            ready = pending.result()
            if following is not None:
                pending = pool.submit(prepare, following)
            yield ready


def _solve_group(
    group: Group,
    gathered: Gathered,
    tasks: list[Task],
    previous: Previous | None,
    offset: int,
    options: MergeOptions,
    device: torch.device,
    pack: bool,
) -> SolvedGroup:
    """Solve and factor one gathered group (its Gram matrix is factored in place); with `pack`,
    the result keeps H's upper triangle for rank 0 to write."""
    gram, contributions = gathered.gram, gathered.contributions
    packed = pack_symmetric(gram) if pack else None
    rhs = torch.cat([part.rhs(options.alpha) for part in contributions]).to(device)
    solution = lpm.cholesky_solve_right_(lpm.reduce_off_diagonal_(gram, options.alpha), rhs, options.ridge)
    singular = solution is None
    if singular:
        # The factorization overwrote the Gram matrix: gather it again, now checking every
        # value, so that NaN or Inf in a file is reported as such and not as a singular H.
        gram, _ = _gather_group(group, tasks, previous, offset, options.balance, device, factors=False)
        solution = lpm.min_norm_solve_right(lpm.reduce_off_diagonal_(gram, options.alpha), rhs, options.ridge)
    del gram, gathered.gram
    merged, energy = [], {}
    _emit_group(group, contributions, solution, options, lambda *factors: merged.append(factors), energy)
    return SolvedGroup(contributions, merged, energy, singular, packed)


def _send_group(solved: SolvedGroup) -> None:
    """A solved group to rank 0, as `_receive_group` reads it."""
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


def _receive_group(owner: int, group: Group, keys: list[tuple[int, str]], rank_budget: int | None) -> SolvedGroup:
    """A group solved by rank `owner`, as `_send_group` sent it."""
    gram, *rest = receive_tensors(owner)
    shares = [
        Contribution(index, module, *rest[3 * number : 3 * number + 3]) for number, (index, module) in enumerate(keys)
    ]
    rest = rest[3 * len(keys) :]
    merged = [(module, rest[2 * number], rest[2 * number + 1]) for number, module in enumerate(group.modules)]
    energy_rows, flag = rest[2 * len(group.modules) :]
    energy = {module: tuple(row.tolist()) for module, row in zip(group.modules, energy_rows)} if rank_budget else {}
    return SolvedGroup(shares, merged, energy, bool(flag.item()), gram)


def _state_task(task: Task, index: int, groups: list[Group]) -> StateTask:
    """A new task as the state records it: its calibration tokens per input group."""
    return StateTask(
        task.adapter.name,
        task.adapter.fingerprint,
        tuple(task.adapter.modules),
        {group.key: task.stats.inputs[group.inputs[index]].tokens for group in groups},
    )


def _emit_group(
    group: Group,
    contributions: list["Contribution"],
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
            a, b = _fit_rank(
                module, a, b, options.rank, energy, torch.cat([weighted[index] for index in mine]), solution.unweigh
            )
        emit(module, a.cpu(), b.cpu())


def _fit_rank(
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


def _report_energy(report: MergeReport, rank: int | None) -> None:
    if rank is None or not report.energy:
        return
    lowest = min(report.energy, key=report.energy_kept)
    report.notes.append(
        f"--rank {rank}: {report.energy_kept():.2%} of the merged update's output energy kept "
        f"over all modules (lowest: {report.energy_kept(lowest):.2%}, {lowest})"
    )


def _report_conditioning(
    report: MergeReport, singular: list[str], underdetermined: list[str], groups: int, ridge: float
) -> None:
    if singular:
        report.warnings.append(
            f"the Gram matrix of {len(singular)} of {groups} inputs (first: {singular[0]}) is "
            f"singular or indefinite at --ridge {ridge:g}: took the minimum-norm "
            f"least-squares solution, which leaves directions no calibration input reached unchanged"
        )
    if underdetermined:
        report.notes.append(
            f"{len(underdetermined)} of {groups} inputs saw fewer calibration tokens than their width, "
            f"so their Gram matrix is rank-deficient" + (f"; --ridge {ridge:g} keeps it solvable" if ridge > 0 else "")
        )


def _ranks(tasks: list[Task], previous: Previous | None, offset: int) -> dict[tuple[int, str], tuple[int, int]]:
    """(task index, module) -> (rank, d_out), for earlier tasks from the state's shapes."""
    ranks = {}
    if previous:
        for key, (rank, _, d_out) in previous.state.factor_shapes().items():
            ranks[key] = (rank, d_out)
    for index, task in enumerate(tasks, start=offset):
        for module in task.adapter.modules.values():
            ranks[index, module.name] = (module.rank, module.d_out)
    return ranks


def _gather_group(
    group: Group,
    tasks: list[Task],
    previous: Previous | None,
    offset: int,
    balance: bool,
    device: torch.device,
    factors: bool = True,
):
    """The group's weighted Gram matrix H (float64, upper triangle filled) and, with `factors`,
    every task's (w·A C, w·A diag(C), s·B) for its modules: earlier tasks' from the state, new tasks' from
    their adapters and stats files. Covariances stream from their files a block of rows at a
    time; H is the only d×d matrix in memory.

    The first gather (with factors) skips the NaN scan: NaN anywhere makes the factorization
    fail, and the second gather (without factors), which scans, then names the file."""
    gram = torch.zeros(group.dim, group.dim, dtype=torch.float64, device=device)
    contributions = []
    if previous:
        for start, rows in previous.state.gram_blocks(group.key, check_finite=not factors):
            gram[start : start + rows.shape[0], start:] += rows.to(device)
        if factors:
            for index in range(offset):
                for module in group.modules:
                    if module in previous.state.tasks[index].modules:
                        contributions.append(Contribution(index, module, *previous.state.factors(index, module)))
    for index, (task, name) in enumerate(zip(tasks, group.inputs), start=offset):
        stats = task.stats.inputs[name]
        if stats.tokens <= 0:
            raise InputError(task.stats.path, f"input {name} saw no calibration tokens")
        weight = 1.0 / stats.tokens if balance else 1.0
        adapted = [module for module in group.modules if module in task.adapter.modules] if factors else []
        pairs = [task.adapter.lora_factors(module) for module in adapted]
        stacked = torch.cat([a for a, _ in pairs]).to(device, torch.float64) if pairs else None
        product = torch.zeros(0 if stacked is None else stacked.shape[0], group.dim, dtype=torch.float64, device=device)
        diagonal = torch.zeros(group.dim, dtype=torch.float64, device=device)
        for start, rows in task.stats.covariance_blocks(name, check_finite=not factors):
            rows = rows.to(device, torch.float64)
            gram[start : start + rows.shape[0], start:].add_(rows, alpha=weight)
            diagonal[start : start + rows.shape[0]] = rows.diagonal()
            if stacked is not None:
                lpm.add_symmetric_block_product_(product, stacked, start, rows)
        sizes = [a.shape[0] for a, _ in pairs]
        products = (weight * product).split(sizes)
        diagonal_products = (weight * stacked * diagonal).split(sizes) if stacked is not None else []
        for module, (_, b), ac, ad in zip(adapted, pairs, products, diagonal_products):
            contributions.append(
                Contribution(
                    index,
                    module,
                    ac.cpu().contiguous(),
                    ad.cpu().contiguous(),
                    b.to(torch.float64) * task.adapter.modules[module].scale,
                )
            )
    contributions.sort(key=lambda part: (part.index, group.modules.index(part.module)))
    return gram, contributions


def _merge_baseline(
    tasks: list[Task], modules: list[str], options: MergeOptions, report: MergeReport, track: Track, emit: Emit
) -> None:
    worst = 0.0
    for module in track(modules, "merging"):
        a_blocks, b_blocks = [], []
        for task in tasks:
            if module in task.adapter.modules:
                a, b = task.adapter.lora_factors(module)
                a_blocks.append(a.to(torch.float64))
                b_blocks.append(b.to(torch.float64) * task.adapter.modules[module].scale)
        if options.method == "ties":
            # Tasks that do not adapt the module contribute zeros, which TIES ignores.
            merged = options.scale * lpm.ties([b @ a for a, b in zip(a_blocks, b_blocks)], options.density)
            a, b, error = lpm.low_rank_factors(merged, sum(block.shape[0] for block in a_blocks))
            worst = max(worst, error)
        else:
            weight = options.scale / len(tasks) if options.method == "average" else options.scale
            a, b = lpm.stack_factors(a_blocks, b_blocks, [weight] * len(a_blocks))
        if options.rank is not None:
            a, b = _fit_rank(module, a, b, options.rank, report.energy)
        emit(module, a, b)
    if options.method == "ties":
        report.notes.append(
            f"TIES is elementwise, so its dense result was factored by truncated SVD "
            f"to rank Σ r_i per module; largest relative Frobenius error {worst:.2e}"
        )


def _write_experts(
    folder: Path, tasks: list[Task], previous: Previous | None, base_model: str | None, report: MergeReport
) -> None:
    """Each task's own LoRA as a PEFT adapter of scale 1 (B scaled by s_i), so that inference can
    route the language model too; earlier tasks' are carried over from the resumed output."""
    if previous:
        earlier = previous.state.path.parent / EXPERTS_DIR
        missing = [task.name for task in previous.state.tasks if not (earlier / task.name).is_dir()]
        if missing:
            report.notes.append(
                f"the resumed merge kept no experts for {', '.join(missing)} "
                f"(made with --no-experts); --lm-routing experts will not offer them"
            )
        for index, task in enumerate(previous.state.tasks):
            if (earlier / task.name).is_dir():
                _check_expert(earlier / task.name, previous.state, index)
                shutil.copytree(earlier / task.name, folder / task.name)
    for task in tasks:
        modules = [MergedModule(m.name, m.rank, m.d_in, m.d_out) for m in task.adapter.modules.values()]
        writer = MergedAdapterWriter(folder / task.adapter.name, modules, base_model)
        for module in task.adapter.modules.values():
            a, b = task.adapter.lora_factors(module.name)
            writer.write(module.name, a, b.to(torch.float64) * module.scale)
        writer.close()


def _check_expert(expert: Path, state: StateHeader, index: int) -> None:
    """A resumed expert is copied only once it is that task's LoRA in the state: the same modules,
    each with the state's scaled B."""
    adapter = read_adapter(expert)
    if set(adapter.modules) != set(state.tasks[index].modules):
        raise InputError(
            expert,
            f"adapts other modules than task {state.tasks[index].name!r} in the merge state "
            f"{state.path}: not this merge's expert; re-create the merge",
        )
    for module in adapter.modules:
        _, b = adapter.lora_factors(module)
        expected = state.factors(index, module)[2]
        if b.shape != expected.shape or not torch.allclose(b.double(), expected, rtol=1e-5, atol=1e-7):
            raise InputError(
                expert,
                f"its {module} differs from task {state.tasks[index].name!r} in the merge state "
                f"{state.path}: not this merge's expert; re-create the merge",
            )


def _write_bundle(path: Path, tasks: list[Task], previous: Previous | None, eta: float) -> None:
    """Task names, per-task projectors, prototypes and exemplars, and the default η."""
    bundled, projector_module = [], None
    if previous:
        projector_module = previous.bundle.projector_module
        bundled = [
            BundleTask(
                name,
                previous.bundle.projector(index),
                previous.bundle.prototype(index),
                previous.bundle.exemplars(index),
            )
            for index, name in enumerate(previous.bundle.tasks)
        ]
    for task in tasks:
        projector_module = projector_module or task.adapter.projector_module
        bundled.append(
            BundleTask(
                task.adapter.name,
                {name: task.adapter.projector_tensor(name) for name in task.adapter.projector_shapes},
                task.stats.prototype() if task.stats else None,
                task.stats.exemplars() if task.stats else None,
            )
        )
    write_bundle(path, bundled, projector_module, eta)
