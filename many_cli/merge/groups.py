"""LPM's input groups: the adapted modules of every task grouped by the input they read (as
the stats files record it, and as the resumed state grouped them), each group's width checked
across stats files, the state and the adapters; one Gram matrix per group."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Iterable

from many_cli.errors import InputError
from many_cli.merge.inputs import Group, Previous, Task


def plan_groups(tasks: list[Task], previous: Previous | None) -> list[Group]:
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
