"""The merges LPM is compared with, module by module from the adapters alone (no statistics):
each rule a small function of the tasks' factors (A_i, s_i·B_i), float64."""

from __future__ import annotations

from pathlib import Path

import torch

from many_cli import lpm
from many_cli.adapters import MergedAdapterWriter
from many_cli.merge.budget import Track, fit_rank, merged_modules
from many_cli.merge.inputs import MergeInputs
from many_cli.merge.report import MergeReport
from many_cli.options import MergeOptions

Factors = list[torch.Tensor]


def average(
    a_blocks: Factors, b_blocks: Factors, options: MergeOptions, tasks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """λ/n Σ_i s_i B_i A_i (tasks that do not adapt the module count as zero), stacked exactly."""
    return lpm.stack_factors(a_blocks, b_blocks, [options.scale / tasks] * len(a_blocks))


def task_arithmetic(
    a_blocks: Factors, b_blocks: Factors, options: MergeOptions, tasks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """λ Σ_i s_i B_i A_i, stacked exactly."""
    return lpm.stack_factors(a_blocks, b_blocks, [options.scale] * len(a_blocks))


def ties(
    a_blocks: Factors, b_blocks: Factors, options: MergeOptions, tasks: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """TIES on the dense task vectors (tasks that do not adapt the module contribute zeros, which
    TIES ignores), factored back to rank Σ r_i by truncated SVD; also the relative error of that."""
    merged = options.scale * lpm.ties([b @ a for a, b in zip(a_blocks, b_blocks)], options.density)
    return lpm.low_rank_factors(merged, sum(block.shape[0] for block in a_blocks))


def merge_baseline(inputs: MergeInputs, staging: Path, report: MergeReport, track: Track, rule, dense: bool) -> None:
    """Every module merged by `rule` into `staging`'s adapter; `dense` rules return a
    factorization error too, reported as a note."""
    names = sorted({module for task in inputs.tasks for module in task.adapter.modules})
    modules = merged_modules(inputs, [(name, inputs.d_in(name)) for name in names], full_rank_cap=dense)
    worst = 0.0
    with MergedAdapterWriter(staging, modules, inputs.base_model, inputs.adapter_names) as writer:
        for module in track(names, "merging"):
            a_blocks, b_blocks = [], []
            for task in inputs.tasks:
                if module in task.adapter.modules:
                    a, b = task.adapter.lora_factors(module)
                    a_blocks.append(a.to(torch.float64))
                    b_blocks.append(b.to(torch.float64) * task.adapter.modules[module].scale)
            a, b, *error = rule(a_blocks, b_blocks, inputs.options, len(inputs.tasks))
            worst = max([worst, *error])
            if inputs.options.rank is not None:
                a, b = fit_rank(module, a, b, inputs.options.rank, report.energy)
            writer.write(module, a, b)
    report.modules = len(modules)
    if dense:
        report.notes.append(
            f"{inputs.options.method} is elementwise, so its dense result was factored by truncated SVD "
            f"to rank Σ r_i per module; largest relative Frobenius error {worst:.2e}"
        )
