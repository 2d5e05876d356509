"""The README.md model card of a merge output: what went in, with which settings, how to load it."""

from __future__ import annotations

import re
from pathlib import Path

from huggingface_hub import ModelCardData

from many_cli.merge.inputs import MergeInputs
from many_cli.merge.report import MergeReport
from many_cli.methods import MergeMethod
from many_cli.options import MergeOptions
from many_cli.prompting import described


def model_card(inputs: MergeInputs, method: MergeMethod, report: MergeReport) -> str:
    """The card of the merge of `inputs` by `method`, with what `report` noted."""
    tasks, previous = inputs.card_tasks()
    options, base_model, base_fingerprint = inputs.options, inputs.base_model, inputs.base_fingerprint
    rows = _task_rows(tasks, previous, inputs.resume, [described(record) for record in inputs.asked_as()])
    settings = _settings(options, method)
    notes = [f"- {line}" for line in report.warnings + report.notes]
    base = base_model or "BASE"
    # The card's whole text as one template, top to bottom, so it reads as the card itself does.
    return "\n".join(
        [
            "---",
            _front_matter(inputs, method, report).strip(),
            "---",
            "",
            "# Merged adapter made by `many merge`",
            "",
            f"{len(rows)} tasks merged into one LoRA adapter ({report.modules} modules) with "
            f"MAny's {method.title} merge.",
            f"Base model: `{base_model or 'unknown'}` (config fingerprint `{base_fingerprint or 'unknown'}`)"
            + (
                f", as its QLoRA adapters saw it (`--qlora {base_fingerprint.partition('+')[2]}`: give the same "
                f"to `many infer` and `many export`)."
                if "+" in (base_fingerprint or "")
                else "."
            ),
            "",
            "| order | task | adapter fingerprint | from | asked as (stats) |",
            "|---|---|---|---|---|",
            *rows,
            "",
            "## Settings",
            "",
            *settings,
            *(["", "## Notes", "", *notes] if notes else []),
            *_energy_table(report),
            "",
            "## Files",
            "",
            "- `adapter_config.json`, `adapter_model.safetensors`: the merged LoRA (scale 1, no modules_to_save).",
            "- `many_bundle.safetensors`: task names, per-task projectors, prototypes and calibration-image "
            "directions, default η.",
            *(
                ["- `many_state.safetensors`: sufficient statistics; `many merge NEW --resume THIS` adds tasks."]
                if method.resumable
                else []
            ),
            *(
                ["- `experts/TASK/`: each task's own LoRA, for `many infer --lm-routing experts`."]
                if options.experts
                else []
            ),
            "",
            "## Loading",
            "",
            "```python",
            "from peft import PeftModel",
            "from transformers import AutoModelForImageTextToText",
            "",
            f'base = AutoModelForImageTextToText.from_pretrained("{base}")',
            'model = PeftModel.from_pretrained(base, "THIS_DIRECTORY")',
            "```",
            "",
        ]
    ).replace("\n\n\n", "\n\n")


def _task_rows(
    tasks: list[tuple[str, str]], previous: list[tuple[str, str]], resume: Path | None, asked: list[str]
) -> list[str]:
    """One table row per task, in merge order: earlier tasks from the resumed state first."""
    sources = [(name, fingerprint, f"state of `{resume}`") for name, fingerprint in previous] + [
        (name, fingerprint, "adapter") for name, fingerprint in tasks
    ]
    return [
        f"| {number} | {name} | `{fingerprint}` | {source} | {asking} |"
        for number, ((name, fingerprint, source), asking) in enumerate(zip(sources, asked), start=1)
    ]


def _settings(options: MergeOptions, method: MergeMethod) -> list[str]:
    settings = [f"- method: `{options.method}`", f"- scale λ: {options.scale:g}"]
    settings += method.card_lines(options)
    settings.append(f"- default routing temperature η: {options.eta:g}")
    if options.rank is not None:
        settings.append(
            f"- rank budget: --rank {options.rank} (one uniform r; the best rank-{options.rank} fit "
            f"in {method.rank_fit})"
        )
    if options.checkpoint_names:
        settings.append(
            f"- module names: the base checkpoint's, for transformers {options.for_transformers} "
            f"(--for-transformers); experts/ keep those of transformers 4.52 and later"
        )
    return settings


def _front_matter(inputs: MergeInputs, method: MergeMethod, report: MergeReport) -> str:
    """The Hugging Face card metadata (YAML): the hub's own fields, and the merge under `many`.
    A local base path is not a hub id, so it is kept under `many` only."""
    tasks, previous = inputs.card_tasks()
    options, base_model = inputs.options, inputs.base_model
    is_hub_id = base_model is not None and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", base_model) is not None
    merge = {
        "method": options.method,
        "tasks": [name for name, _ in previous + tasks],
        "scale": options.scale,
        "eta": options.eta,
        "base_model": base_model,
        "base_fingerprint": inputs.base_fingerprint or None,
    }
    merge.update({field: getattr(options, field) for field in method.reads})
    if options.rank is not None:
        merge.update(rank=options.rank, energy_kept=round(report.energy_kept(), 6))
    return ModelCardData(
        library_name="peft",
        base_model=base_model if is_hub_id else None,
        tags=["lora", "many", "model-merging", "continual-learning"],
        many=merge,
    ).to_yaml()


def _energy_table(report: MergeReport) -> list[str]:
    """Under --rank: the fraction of each module's output energy kept."""
    if not report.energy:
        return []
    rows = [f"| {module} | {report.energy_kept(module):.4%} |" for module in report.energy]
    return [
        "",
        "## Rank budget",
        "",
        f"Output energy kept over all modules: {report.energy_kept():.4%}.",
        "",
        "<details><summary>per module</summary>",
        "",
        "| module | energy kept |",
        "|---|---|",
        *rows,
        "",
        "</details>",
    ]
