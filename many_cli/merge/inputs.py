"""What a merge starts from, read and checked once: the new tasks (adapters and their stats
files) and, with `--resume`, the earlier merge's state and bundle, as one `MergeInputs` whose
methods give every task in order — earlier tasks first — so that nothing downstream asks
whether this is a resume."""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Mapping

import torch

from many_cli.adapters import ADAPTER_CONFIG, Adapter, check_supported_config, find_adapter_dirs, read_adapter
from many_cli.errors import InputError
from many_cli.families import routable_modules
from many_cli.files import read_json, refuse_overlap
from many_cli.llava_layout import peft_adapter_dir
from many_cli.merge.report import MergeReport
from many_cli.models import base_fingerprint, checkpoint_module_names, refuse_other_base, refuse_remote_code
from many_cli.options import MergeOptions
from many_cli.state import (
    BUNDLE_FILE,
    STATE_FILE,
    STATS_FILE,
    BundleHeader,
    BundleTask,
    StateHeader,
    StateTask,
    StatsHeader,
    check_one_merge,
    read_bundle_header,
    read_state_header,
    read_stats_header,
)

# Words `infer --lm-routing` and `export --projector` give their own meaning to, so no task may be named so.
RESERVED_NAMES = ("merged", "mean", "routed")


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


@dataclass
class MergeInputs:
    """Everything a merge reads, checked together: the new tasks, the resumed merge (if any), the
    options as this merge applies them, and what follows from them (base, groups, ranks)."""

    tasks: list[Task]
    previous: Previous | None
    options: MergeOptions
    resume: Path | None
    base_fingerprint: str
    groups: list[Group] = field(default_factory=list)  # LPM's input groups (empty for a baseline)
    # --for-transformers below 4.52: each module's name in the model -> its name in the base checkpoint
    adapter_names: dict[str, str] | None = None
    fused_modules: dict[str, tuple[str, torch.Tensor]] | None = None  # module -> (checkpoint's fused module, rows)

    @property
    def offset(self) -> int:
        """The number of earlier tasks: the index of the first new one."""
        return len(self.previous.state.tasks) if self.previous else 0

    @property
    def names(self) -> list[str]:
        """Every task's name, in merge order."""
        return [task.name for task in self.earlier_state_tasks] + [task.adapter.name for task in self.tasks]

    @property
    def base_model(self) -> str | None:
        return self.previous.state.base_model if self.previous else self.tasks[0].adapter.base_model

    @property
    def earlier_state_tasks(self) -> list[StateTask]:
        return list(self.previous.state.tasks) if self.previous else []

    def state_tasks(self) -> list[StateTask]:
        """Every task as the state records it: its calibration tokens per input group."""
        return self.earlier_state_tasks + [
            StateTask(
                task.adapter.name,
                task.adapter.fingerprint,
                tuple(task.adapter.modules),
                {group.key: task.stats.inputs[group.inputs[index]].tokens for group in self.groups},
            )
            for index, task in enumerate(self.tasks)
        ]

    def ranks(self) -> dict[tuple[int, str], tuple[int, int]]:
        """(task index, module) -> (rank, d_out) over every task."""
        ranks = {}
        if self.previous:
            for key, (rank, _, d_out) in self.previous.state.factor_shapes().items():
                ranks[key] = (rank, d_out)
        for index, task in enumerate(self.tasks, start=self.offset):
            for module in task.adapter.modules.values():
                ranks[index, module.name] = (module.rank, module.d_out)
        return ranks

    def earlier_gram_blocks(self, group: Group, check_finite: bool) -> Iterator[tuple[int, torch.Tensor]]:
        """The earlier tasks' H of `group` (already weighted), a block of rows at a time."""
        if self.previous:
            yield from self.previous.state.gram_blocks(group.key, check_finite=check_finite)

    def earlier_factors(self, group: Group) -> Iterator[tuple[int, str, tuple[torch.Tensor, ...]]]:
        """(task index, module, (w·A C, w·A diag(C), s·B)) of the earlier tasks in `group`."""
        for index, task in enumerate(self.earlier_state_tasks):
            for module in group.modules:
                if module in task.modules:
                    yield index, module, self.previous.state.factors(index, module)

    def bundle_tasks(self) -> tuple[list[BundleTask], str | None]:
        """Every task's projector, prototype and exemplars, and the projector's module name."""
        bundled, projector_module = [], None
        if self.previous:
            projector_module = self.previous.bundle.projector_module
            bundle = self.previous.bundle
            bundled = [
                BundleTask(name, bundle.projector(index), bundle.prototype(index), bundle.exemplars(index))
                for index, name in enumerate(bundle.tasks)
            ]
        for task in self.tasks:
            projector_module = projector_module or task.adapter.projector_module
            bundled.append(
                BundleTask(
                    task.adapter.name,
                    {name: task.adapter.projector_tensor(name) for name in task.adapter.projector_shapes},
                    task.stats.prototype() if task.stats else None,
                    task.stats.exemplars() if task.stats else None,
                )
            )
        asked = self.asked_as()
        return [replace(task, asked_as=asked[index]) for index, task in enumerate(bundled)], projector_module

    def card_tasks(self) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """(name, adapter fingerprint) of the new tasks and of the earlier ones."""
        return (
            [(task.adapter.name, task.adapter.fingerprint) for task in self.tasks],
            [(task.name, task.adapter_fingerprint) for task in self.earlier_state_tasks],
        )

    def asked_as(self) -> list[Mapping[str, object]]:
        """How each task's records were asked (its prompting's record; {}: unknown), in merge order."""
        earlier = list(self.previous.bundle.asked_as) if self.previous else []
        return earlier + [task.stats.asked_as if task.stats else {} for task in self.tasks]

    def d_in(self, module: str) -> int:
        return next(task.adapter.modules[module].d_in for task in self.tasks if module in task.adapter.modules)

    def full_rank(self) -> int:
        """The largest rank any merged module has room for: min(d_in, d_out) of the widest."""
        shapes = [shape[1:] for shape in self.previous.state.factor_shapes().values()] if self.previous else []
        shapes += [(m.d_in, m.d_out) for task in self.tasks for m in task.adapter.modules.values()]
        return max(min(d_in, d_out) for d_in, d_out in shapes)


def read_inputs(
    adapter_paths: list[Path],
    out: Path,
    options: MergeOptions,
    resume: Path | None,
    needs_stats: bool,
    report: MergeReport,
    converted: ExitStack,
    task_names: Mapping[Path, str],
) -> MergeInputs:
    """Read and check everything the merge starts from; notes and resolved options go to `report`.
    `needs_stats`: whether the method reads stats files. Original-LLaVA-layout adapters are
    read through PEFT copies that live as long as `converted`."""
    paths = find_adapter_dirs(adapter_paths)
    refuse_overlap(out, [*adapter_paths, *paths, *([resume] if resume else [])])
    tasks = [
        _load_task(converted.enter_context(peft_adapter_dir(path)), path / STATS_FILE, needs_stats, converted)
        for path in paths
    ]
    tasks = [  # a task named on the command line (NAME=ADAPTER) rather than by its folder
        Task(replace(task.adapter, name=task_names[path]), task.stats) if path in task_names else task
        for path, task in zip(paths, tasks)
    ]
    if not needs_stats:  # no stats file vouches for the base: check the one each adapter names
        for path, task in zip(paths, tasks):
            _refuse_untranslated_base(path, task.adapter.base_model)
    previous = _read_previous(resume) if resume is not None else None
    inputs = MergeInputs(tasks, previous, options, resume, _check_compatible(tasks, previous, options))
    report.tasks = inputs.names
    inputs.options = _resolve_options(inputs, report)
    _note_inputs(inputs, report)
    if options.model is not None:
        base = str(options.model)
        fingerprint = base_fingerprint(base, options.qlora)  # a missing, broken or remote-code base is refused here
        recorded_by = previous.state.path if previous else next((t.stats.path for t in tasks if t.stats), None)
        if recorded_by and inputs.base_fingerprint:
            refuse_other_base(recorded_by, inputs.base_fingerprint, base, fingerprint)
    if options.checkpoint_names:
        inputs.adapter_names, inputs.fused_modules = checkpoint_module_names(str(options.model))
    return inputs


def _refuse_untranslated_base(adapter: Path, base: str | None) -> None:
    """A merge that reads no base still refuses adapters of a base many does not run (a remote-code
    model), as every command that reads one does, when that base is a folder here; a maker's
    layout many translates is not checked further, since nothing of it is read."""
    config_path = Path(base).expanduser() / "config.json" if base else None
    if config_path is None or not config_path.is_file():
        return
    try:
        refuse_remote_code(base, read_json(config_path))
    except InputError as error:
        raise InputError(adapter / ADAPTER_CONFIG, f"names its base {error}") from None


def _resolve_options(inputs: MergeInputs, report: MergeReport) -> MergeOptions:
    """The options as this merge applies them, each change said in a note: the state precision
    (the resumed state's unless given) and a rank budget above every module's full rank (capped)."""
    options, previous = inputs.options, inputs.previous
    inherited = previous.state.precision if previous and options.state_precision is None else None
    options = replace(options, state_precision=options.state_precision or inherited or "float64")
    if inherited == "float32":
        report.notes.append(
            "the merge state stays float32, as the resumed one (--state-precision float64 "
            "to store it in float64 from now on)"
        )
    full_rank = inputs.full_rank()
    if options.rank is not None and options.rank > full_rank:
        report.notes.append(
            f"--rank {options.rank} exceeds the full rank of every merged module (at most "
            f"{full_rank}, min(d_in, d_out)): capped there"
        )
        options = replace(options, rank=full_rank)
    return options


def _note_inputs(inputs: MergeInputs, report: MergeReport) -> None:
    """What the merge cannot check about its inputs, said: adapters naming different bases, and
    module names of layouts no stats file maps."""
    tasks, previous = inputs.tasks, inputs.previous
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


def _load_task(path: Path, stats_path: Path, needs_stats: bool, converted: ExitStack) -> Task:
    """The adapter, named as its stats file found its modules on the base (an adapter saved under an
    older transformers layout is merged under today's names; InternLM2's wqkv LoRA split as there),
    and its statistics."""
    check_supported_config(path)  # IA3, DoRA ... are named before a missing stats file
    if not stats_path.exists():
        if needs_stats:
            raise InputError(stats_path, f"file not found; run `many stats --adapter {stats_path.parent} ...` first")
        return Task(read_adapter(path), None)
    stats = read_stats_header(stats_path)
    if stats.split_qkv:
        from many_cli.internlm2 import split_adapter

        path = converted.enter_context(split_adapter(path, stats.split_qkv))
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
                f"task name {task.adapter.name!r} is already taken; task names (adapter directory "
                f"names) must be unique: name it on the command line, TASK={task.adapter.path}",
            )
        if task.adapter.name in RESERVED_NAMES or "." in task.adapter.name:
            raise InputError(
                task.adapter.path,
                f"task name {task.adapter.name!r} cannot be used: a task is named "
                f"after its adapter directory, and {', '.join(RESERVED_NAMES)} (infer "
                f"and export words) and names with a dot (PEFT adapter names) are "
                f"taken; rename the directory, or name the task on the command line: TASK=ADAPTER",
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
