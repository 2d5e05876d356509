"""What a merge writes beside the merged adapter: the bundle (every task's projector, prototype
and calibration-image directions), each task's own LoRA under experts/, and the model card."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from many_cli.adapters import MergedAdapterWriter, MergedModule, read_adapter
from many_cli.errors import InputError
from many_cli.merge.card import model_card
from many_cli.merge.inputs import MergeInputs
from many_cli.merge.report import MergeReport
from many_cli.methods import MergeMethod
from many_cli.state import EXPERTS_DIR, StateHeader
from many_cli.state import write_bundle as write_bundle_file


def write_bundle(inputs: MergeInputs, path: Path) -> None:
    """Task names, per-task projectors, prototypes and exemplars, the default η, the base, and the
    fingerprints of the merged LoRA and experts already written beside it."""
    tasks, projector_module = inputs.bundle_tasks()
    write_bundle_file(path, tasks, projector_module, inputs.options.eta, inputs.base_fingerprint)


def write_experts(inputs: MergeInputs, folder: Path, report: MergeReport) -> None:
    """Each task's own LoRA as a PEFT adapter of scale 1 (B scaled by s_i), so that inference can
    route the language model too; earlier tasks' are carried over from the resumed output."""
    missing = _copy_earlier_experts(inputs, folder)
    if missing:
        report.notes.append(
            f"the resumed merge kept no experts for {', '.join(missing)} "
            f"(made with --no-experts); --lm-routing experts will not offer them"
        )
    for task in inputs.tasks:
        modules = [MergedModule(m.name, m.rank, m.d_in, m.d_out) for m in task.adapter.modules.values()]
        with MergedAdapterWriter(folder / task.adapter.name, modules, inputs.base_model) as writer:
            for module in task.adapter.modules.values():
                a, b = task.adapter.lora_factors(module.name)
                writer.write(module.name, a, b.to(torch.float64) * module.scale)


def _copy_earlier_experts(inputs: MergeInputs, folder: Path) -> list[str]:
    """Copy the resumed merge's experts into `folder`, each checked first; return the earlier
    tasks that kept none."""
    if not inputs.previous:
        return []
    state = inputs.previous.state
    earlier = state.path.parent / EXPERTS_DIR
    missing = []
    for index, task in enumerate(state.tasks):
        if (earlier / task.name).is_dir():
            check_expert(earlier / task.name, state, index)
            shutil.copytree(earlier / task.name, folder / task.name)
        else:
            missing.append(task.name)
    return missing


def write_card(inputs: MergeInputs, method: MergeMethod, path: Path, report: MergeReport) -> None:
    path.write_text(model_card(inputs, method, report))


def check_expert(expert: Path, state: StateHeader, index: int) -> None:
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
