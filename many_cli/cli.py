"""The `many` command line: parse, call, report. No math lives here."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from many_cli.errors import InputError
from many_cli.merge import DEFAULT_DENSITY, DEFAULT_ETA, DEFAULT_RIDGE, METHODS, MergeOptions, merge

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Merge the LoRA adapters and projectors of continual multimodal fine-tunes (MAny).")
stderr = Console(stderr=True)


@app.callback()
def _commands() -> None:
    """Merge the LoRA adapters and projectors of continual multimodal fine-tunes (MAny)."""


def _track(items, description):
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[item]}"), TimeElapsedColumn(),
                  console=stderr, transient=True, disable=not stderr.is_terminal) as progress:
        task = progress.add_task(description, total=len(items), item="")
        for item in items:
            progress.update(task, item=getattr(item, "key", item))
            yield item
            progress.advance(task)


@app.command("merge")
def merge_command(
    adapters: Annotated[list[Path], typer.Argument(help="Adapter directories in task order, or one folder holding them (name order).")],
    out: Annotated[Path, typer.Option("--out", help="Output directory (must not exist unless --force).")],
    scale: Annotated[float, typer.Option("--scale", help="λ: the merged task vector is applied as W + λ τ*.")] = 1.0,
    ridge: Annotated[float, typer.Option("--ridge", help="ρ: H + ρ·mean(diag H)·I; 0 is pure least squares.")] = DEFAULT_RIDGE,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="A previous merge directory to add these tasks to.")] = None,
    method: Annotated[str, typer.Option("--method", help=f"One of: {', '.join(METHODS)}.")] = "many",
    balance: Annotated[bool, typer.Option("--balance", help="Weigh tasks equally, not by calibration tokens.")] = False,
    density: Annotated[float, typer.Option("--density", help="TIES: fraction of each task vector kept.")] = DEFAULT_DENSITY,
    eta: Annotated[float, typer.Option("--eta", help="Default routing temperature η stored in the bundle.")] = DEFAULT_ETA,
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it exists.")] = False,
) -> None:
    """Merge LoRA adapters (with their many_stats.safetensors) into one PEFT adapter."""
    options = MergeOptions(method=method, scale=scale, ridge=ridge, balance=balance,
                           density=density, eta=eta, force=force)
    report = merge(adapters, out, options, resume=resume, track=_track)
    for line in report.warnings:
        stderr.print(f"[yellow]warning:[/] {line}", highlight=False)
    for line in report.notes:
        stderr.print(f"note: {line}", highlight=False)
    stderr.print(f"merged {len(report.tasks)} tasks ({', '.join(report.tasks)}) over "
                 f"{report.modules} modules into {report.out}", highlight=False)


def main() -> None:
    """Entry point: usage errors exit 2 (typer's message); bad input exits 2 with one line;
    any other failure exits 1 with one line (set MANY_DEBUG=1 for the traceback)."""
    try:
        app()
    except InputError as error:
        _fail(2, str(error))
    except Exception as error:  # noqa: BLE001 - the last line of defence, reported in one line
        if os.environ.get("MANY_DEBUG"):
            raise
        _fail(1, f"{type(error).__name__}: {error}")


def _fail(code: int, message: str) -> None:
    print(f"many: error: {message}", file=sys.stderr)
    sys.exit(code)
