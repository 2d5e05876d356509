"""`many merge`: read and check the inputs, merge with the chosen method, write the output
directory all or nothing.

The package, one job per module:
- `inputs`: the new tasks and the resumed merge, read and checked once (`MergeInputs`);
- `groups`: LPM's input groups, planned from the stats files and the resumed state;
- the methods themselves are `many_cli/methods/` (one module each, a registry);
- `solve`: LPM, one input group at a time, and how torchrun ranks share the groups;
- `baselines`: a method's rule over the tasks' factors, module by module (average, TIES ...);
- `budget`: the merged adapter's ranks and the `--rank` fit;
- `outputs`: the bundle, the experts and the model card (`card`);
- `report`: what the merge tells its user.

Memory stays flat in the depth of the model: for one group of modules that read the same
input, each task's covariance streams from its file a block of rows at a time into one Gram
matrix, which is factored in place; the state and the merged adapter stream to disk as each
group is solved.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Callable, Mapping

from many_cli.distributed import join_world
from many_cli.errors import InputError
from many_cli.files import atomic_output_dir
from many_cli.merge import outputs
from many_cli.merge.baselines import merge_baseline
from many_cli.merge.budget import Track
from many_cli.merge.groups import modules_pattern, plan_groups
from many_cli.merge.inputs import RESERVED_NAMES, read_inputs
from many_cli.merge.report import MergeReport
from many_cli.merge.solve import Walk, merge_lpm
from many_cli.methods import REGISTRY, MergeMethod
from many_cli.options import DEFAULT_ETA, DEFAULT_RIDGE, METHODS, MergeOptions
from many_cli.state import BUNDLE_FILE, EXPERTS_DIR, StatsHeader

__all__ = [
    "merge",
    "MergeOptions",
    "MergeReport",
    "METHODS",
    "DEFAULT_ETA",
    "DEFAULT_RIDGE",
    "RESERVED_NAMES",
    "modules_pattern",
]


def merge(
    adapter_paths: list[Path],
    out: Path,
    options: MergeOptions = MergeOptions(),
    resume: Path | None = None,
    track: Track = lambda items, _: items,
    task_names: Mapping[Path, str] | None = None,
    open_walk: Callable[[list[tuple[Path, StatsHeader]]], Walk] | None = None,
) -> MergeReport:
    """Merge the adapters (in task order) into `out`, after the merge at `resume` if given. A task
    is named after its adapter's folder, or as `task_names` names that folder. Under --one-pass,
    `open_walk` (`stats.walk.walker`'s, the base and data bound) takes the statistics."""
    options.check()
    method = REGISTRY[options.method]
    report = MergeReport(out, [], 0)
    with ExitStack() as converted:  # original-LLaVA-layout adapters are read through PEFT copies
        if resume is not None and not method.resumable:
            raise InputError(resume, "--resume works with --method many only (baselines keep no state)")
        inputs = read_inputs(
            adapter_paths, out, options, resume, method.needs_stats, report, converted, task_names or {}
        )
        if method.needs_stats:
            inputs.groups = plan_groups(inputs.tasks, inputs.previous)
        world = join_world(inputs.options.device)
        walk = _walk(inputs, resume, world, open_walk) if options.one_pass else None
        report.rank = world.rank
        if world.rank != 0:  # another torchrun rank: it does its share, rank 0 writes
            if method.distributed:
                _run(method, inputs, None, report, track, world, walk)
            return report
        with atomic_output_dir(out, inputs.options.force) as staging:
            _run(method, inputs, staging, report, track, world, walk)
            report.note_energy(inputs.options.rank)
            if inputs.options.experts:
                outputs.write_experts(inputs, staging / EXPERTS_DIR, report)
            outputs.write_bundle(inputs, staging / BUNDLE_FILE)  # after what it records
            outputs.write_card(inputs, method, staging / "README.md", report)
    return report


def _walk(inputs, resume: Path | None, world, open_walk) -> Walk:
    """--one-pass's walk, its groups put in the order the model's forward reaches them."""
    if resume is not None:
        raise InputError(
            resume, "--one-pass retakes every task's statistics: give every task's adapter (and --data), not --resume"
        )
    if world.size > 1:
        raise InputError(None, "--one-pass runs in one process: start it without torchrun")
    walk = open_walk([(task.adapter.path, task.stats) for task in inputs.tasks])
    inputs.groups = walk.ordered(inputs.groups)
    return walk


def _run(method: MergeMethod, inputs, staging: Path | None, report, track: Track, world, walk: Walk | None) -> None:
    """The merged adapter (and for LPM the state) into `staging`, by the method's runner."""
    if method.runner == "lpm":
        merge_lpm(inputs, staging, report, track, world, walk)
    else:
        merge_baseline(inputs, staging, report, track, method.rule, method.dense)
