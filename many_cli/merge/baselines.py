"""The merges LPM is compared with, module by module from the adapters alone (no statistics):
a method's rule (`many_cli/methods/`) applied to the tasks' factors (A_i, s_i·B_i), float64."""

from __future__ import annotations

from pathlib import Path

import torch

from many_cli.adapters import MergedAdapterWriter
from many_cli.merge.budget import Track, fit_rank, merged_modules
from many_cli.merge.inputs import MergeInputs
from many_cli.merge.report import MergeReport

Factors = list[torch.Tensor]


def merge_baseline(inputs: MergeInputs, staging: Path, report: MergeReport, track: Track, rule, dense: bool) -> None:
    """Every module merged by `rule` into `staging`'s adapter; `dense` rules return a
    factorization error too, reported as a note."""
    names = sorted({module for task in inputs.tasks for module in task.adapter.modules})
    modules = merged_modules(inputs, [(name, inputs.d_in(name)) for name in names], full_rank_cap=dense)
    worst = 0.0
    with MergedAdapterWriter(staging, modules, inputs.base_model, inputs.adapter_names, inputs.fused_modules) as writer:
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
