"""The README.md model card of a merge output: what went in, with which settings, how to load it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from many_cli.merge import MergeOptions, MergeReport


def model_card(*, tasks: list[tuple[str, str]], previous: list[tuple[str, str]], resume: Path | None,
               options: "MergeOptions", base_model: str | None, base_fingerprint: str,
               report: "MergeReport") -> str:
    rows = _task_rows(tasks, previous, resume)
    settings = _settings(options)
    notes = [f"- {line}" for line in report.warnings + report.notes]
    base = base_model or "BASE"
    # The card's whole text as one template, top to bottom, so it reads as the card itself does.
    return "\n".join([
        "---",
        "library_name: peft",
        f"base_model: {base_model}" if base_model else "",
        "tags: [lora, many, model-merging, continual-learning]",
        "---",
        "",
        "# Merged adapter made by `many merge`",
        "",
        f"{len(rows)} tasks merged into one LoRA adapter ({report.modules} modules) with "
        f"MAny's {'least-squares (LPM)' if options.method == 'many' else options.method} merge.",
        f"Base model: `{base_model or 'unknown'}` (config fingerprint `{base_fingerprint or 'unknown'}`).",
        "",
        "| order | task | adapter fingerprint | from |",
        "|---|---|---|---|",
        *rows,
        "",
        "## Settings",
        "",
        *settings,
        *(["", "## Notes", "", *notes] if notes else []),
        "",
        "## Files",
        "",
        "- `adapter_config.json`, `adapter_model.safetensors`: the merged LoRA (scale 1, no modules_to_save).",
        "- `many_bundle.safetensors`: task names, per-task projectors and prototypes, default η.",
        *(["- `many_state.safetensors`: sufficient statistics; `many merge NEW --resume THIS` adds tasks."]
          if options.method == "many" else []),
        *(["- `experts/TASK/`: each task's own LoRA, for `many infer --lm-routing experts`."]
          if options.experts else []),
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
    ]).replace("\n\n\n", "\n\n")


def _task_rows(tasks: list[tuple[str, str]], previous: list[tuple[str, str]], resume: Path | None) -> list[str]:
    """One table row per task, in merge order: earlier tasks from the resumed state first."""
    sources = [(name, fingerprint, f"state of `{resume}`") for name, fingerprint in previous] + \
              [(name, fingerprint, "adapter") for name, fingerprint in tasks]
    return [f"| {number} | {name} | `{fingerprint}` | {source} |"
            for number, (name, fingerprint, source) in enumerate(sources, start=1)]


def _settings(options: "MergeOptions") -> list[str]:
    settings = [f"- method: `{options.method}`", f"- scale λ: {options.scale:g}"]
    if options.method == "many":
        weighting = ("balanced (each task divided by its token count)" if options.balance
                     else "by calibration tokens (plain least squares)")
        settings += [f"- ridge ρ: {options.ridge:g} (relative to the mean diagonal of each Gram matrix)",
                     f"- weighting: {weighting}"]
    if options.method == "ties":
        settings.append(f"- TIES density: {options.density:g}")
    settings.append(f"- default routing temperature η: {options.eta:g}")
    return settings
