"""The `many` command line: parse, call, report. No math lives here.

Only the options, the errors and the file checks are imported up front: `--help` and every
refused option or missing path answer before torch loads; each command imports its own work."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
import typing
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Optional, TextIO

import typer
from rich.console import Console

from many_cli import __version__
from many_cli.bench.cli import bench_app
from many_cli.errors import InputError
from many_cli.exits import fail, importing, run
from many_cli.files import (
    atomic_output_file,
    refuse_foreign_file,
    refuse_overlap,
    refuse_special_file,
    require_inputs,
)
from many_cli.options import DEFAULT_PROMPT, ExportOptions, InferOptions, MergeOptions, ReportOptions, StatsOptions

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Merge the LoRA adapters and projectors of continual multimodal fine-tunes (MAny).",
)
app.add_typer(bench_app, name="bench")


def _print_version(asked: bool) -> None:
    if asked:
        print(f"many {__version__}")
        raise typer.Exit()


@app.callback()
def _top_level(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Merge the LoRA adapters and projectors of continual multimodal fine-tunes (MAny)."""


stderr = Console(stderr=True, soft_wrap=True)


def _help_of(settings: type, text: str) -> str:
    """An option's help as the command it is in says it (LoadsModel's name what runs beside the model)."""
    beside = getattr(settings, "BESIDE_THE_MODEL", None)
    return text if beside is None else text.format(beside_the_model=beside, dtype_note=settings.DTYPE_NOTE)


def with_options(settings: type) -> Callable[[Callable], Callable]:
    """Give a typer command, whose last parameter is `options: SETTINGS`, one option per field
    of SETTINGS declared with `options.option(...)`; the command receives them as one SETTINGS
    object, already checked."""
    hints = typing.get_type_hints(settings)
    fields = [field for field in dataclasses.fields(settings) if "flag" in field.metadata]

    def decorate(command: Callable) -> Callable:
        own = [
            parameter
            for parameter in inspect.signature(command, eval_str=True).parameters.values()
            if parameter.name != "options"
        ]
        declared = [
            inspect.Parameter(
                field.name,
                inspect.Parameter.KEYWORD_ONLY,
                default=field.default,
                annotation=Annotated[
                    hints[field.name],
                    typer.Option(field.metadata["flag"], help=_help_of(settings, field.metadata["help"])),
                ],
            )
            for field in fields
        ]

        @functools.wraps(command)
        def run(**arguments: Any) -> Any:
            values = {field.name: arguments.pop(field.name) for field in fields}
            return command(**arguments, options=settings(**values))

        del run.__wrapped__  # typer must see the signature below, not the command's own
        run.__signature__ = inspect.Signature([*own, *declared])
        run.__annotations__ = {
            parameter.name: parameter.annotation for parameter in run.__signature__.parameters.values()
        }
        return run

    return decorate


def _track(items, description):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[item]}"),
        TimeElapsedColumn(),
        console=stderr,
        transient=True,
        disable=not stderr.is_terminal,
    ) as progress:
        task = progress.add_task(description, total=len(items), item="")
        for item in items:
            progress.update(task, item=getattr(item, "key", item))
            yield item
            progress.advance(task)


@app.command("merge")
@with_options(MergeOptions)
def merge_command(
    adapters: Annotated[
        list[Path],
        typer.Argument(
            readable=False,
            metavar="[TASK=]ADAPTER",
            help="Adapter directories in task order, or one folder holding them (name order). A task is "
            "named after its folder; TASK=ADAPTER names it (a tool's checkpoint-N folders).",
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", readable=False, help="Output directory (must not exist unless --force).")
    ],
    resume: Annotated[
        Optional[Path],
        typer.Option("--resume", readable=False, help="A previous merge directory to add these tasks to."),
    ] = None,
    data: Annotated[
        Optional[list[Path]],
        typer.Option(
            "--data",
            readable=False,
            help="--one-pass: each task's calibration data (its stats were taken on), once per adapter in task order.",
        ),
    ] = None,
    *,
    options: MergeOptions,
) -> None:
    """Merge LoRA adapters (with their many_stats.safetensors) into one PEFT adapter."""
    options.check()
    if data and not options.one_pass:
        raise InputError(None, "--data applies to --one-pass only; leave it out")
    named = [task_and_path(adapter) for adapter in adapters]
    adapters = [path for _, path in named]
    require_inputs(
        {
            **{adapter: "adapter directory not found" for adapter in adapters},
            **({resume: "merge directory to resume from not found"} if resume else {}),
            **{source: "data not found" for source in data or []},
        }
    )
    with importing(transformers=options.one_pass):
        from many_cli.merge import merge

        if options.one_pass:
            from many_cli.stats.walk import walker
    task_names = {path: name for name, path in named if name is not None}
    open_walk = walker(options, data or []) if options.one_pass else None
    report = merge(adapters, out, options, resume=resume, track=_track, task_names=task_names, open_walk=open_walk)
    if report.rank != 0:
        return
    for line in report.warnings:
        stderr.print(f"[yellow]warning:[/] {line}", highlight=False)
    for line in report.notes:
        stderr.print(f"note: {line}", highlight=False)
    stderr.print(
        f"merged {len(report.tasks)} tasks ({', '.join(report.tasks)}) over {report.modules} modules into {report.out}",
        highlight=False,
    )


@app.command("export")
@with_options(ExportOptions)
def export_command(
    model: Annotated[str, typer.Option("--model", help="Base model: a local transformers directory.")],
    merged: Annotated[Path, typer.Option("--merged", readable=False, help="A `many merge` output directory.")],
    out: Annotated[
        Path,
        typer.Option(
            "--out", readable=False, help="The transformers model directory to write (must not exist unless --force)."
        ),
    ],
    *,
    options: ExportOptions,
) -> None:
    """Write a standard transformers model: the merged LoRA folded into the base, one projector chosen."""
    options.check()
    require_inputs(
        {
            merged: "merge directory not found",
            Path(model).expanduser(): "not found: export reads the base model's own files: give a local model "
            "directory (for a hub id, its snapshot folder)",
        }
    )
    with importing():
        from many_cli.export import export

    report = export(model, merged, out, options, track=_track)
    stderr.print(
        f"folded {report.folded} merged LoRA modules into {report.tensors} tensors with the "
        f"{report.projector} projector -> {report.out}",
        highlight=False,
    )


class _RecordsBar:
    """A rich progress bar over records, with records/s and tokens (what stats.Progress is told)."""

    def __init__(self, total: int | None):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("stats"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} records/s, {task.fields[tokens]} tokens"),
            TimeElapsedColumn(),
            console=stderr,
            transient=True,
            disable=not stderr.is_terminal,
        )
        self._task = self._progress.add_task("stats", total=total, rate="-", tokens=0)
        self._tokens = 0
        self._progress.start()

    def advance(self, records: int, tokens: int) -> None:
        self._tokens += tokens
        self._progress.advance(self._task, records)
        speed = self._progress.tasks[0].speed
        self._progress.update(self._task, tokens=self._tokens, rate=f"{speed:.1f}" if speed else "-")

    def close(self) -> None:
        self._progress.stop()


@app.command("stats")
@with_options(StatsOptions)
def stats_command(
    model: Annotated[str, typer.Option("--model", help="Base model: a local transformers directory (or a hub id).")],
    adapter: Annotated[Path, typer.Option("--adapter", readable=False, help="The task's PEFT adapter directory.")],
    data: Annotated[
        Path,
        typer.Option("--data", readable=False, help="Calibration data: a folder of images, a .jsonl or a LLaVA .json."),
    ],
    out: Annotated[
        Optional[Path],
        typer.Option("--out", readable=False, help="Stats file (default: ADAPTER/many_stats.safetensors)."),
    ] = None,
    *,
    options: StatsOptions,
) -> None:
    """Accumulate one task's input covariances and visual prototype for `many merge`."""
    options.check()
    require_inputs({adapter: "adapter directory not found", data: "data not found"})
    with importing():
        from many_cli.stats import collect_stats

    bars: list[_RecordsBar] = []

    def progress(total):
        bars.append(_RecordsBar(total))
        return bars[-1]

    try:
        report = collect_stats(model, adapter, data, out, options, progress=progress)
    finally:
        for bar in bars:
            bar.close()
    if report.rank != 0:
        return
    for line in report.notes:
        stderr.print(f"note: {line}", highlight=False)
    skipped = f", skipped {report.skipped} bad records" if report.skipped else ""
    stderr.print(
        f"{report.records} records, {report.tokens} tokens, {report.images} images{skipped}: "
        f"{report.inputs} distinct inputs of {report.modules} adapted layers -> {report.out}",
        highlight=False,
    )


@app.command("infer")
@with_options(InferOptions)
def infer_command(  # long only by the parameters typer declares: the body is six steps
    model: Annotated[str, typer.Option("--model", help="Base model: a local transformers directory (or a hub id).")],
    merged: Annotated[
        Optional[Path], typer.Option("--merged", readable=False, help="A `many merge` output directory.")
    ] = None,
    adapter: Annotated[
        Optional[Path],
        typer.Option(
            "--adapter",
            readable=False,
            help="Instead of --merged: one task's own adapter (LoRA and projector), no merge: that task's upper bound.",
        ),
    ] = None,
    image: Annotated[Optional[Path], typer.Option("--image", readable=False, help="One image to answer about.")] = None,
    prompt: Annotated[
        Optional[str],
        typer.Option(
            "--prompt",
            help=f"The question (also for a folder of images) [default: {DEFAULT_PROMPT}]; alone, a text prompt.",
        ),
    ] = None,
    data: Annotated[
        Optional[list[Path]],
        typer.Option(
            "--data",
            readable=False,
            help="A data set (folder, .jsonl, LLaVA .json, DIR/dataset_info.json:NAME); repeat for several "
            "tasks. A record's task is its task field, else its file's or entry's name; TASK=DATA names it.",
        ),
    ] = None,
    out: Annotated[
        Optional[Path],
        typer.Option("--out", readable=False, help="With --data: write JSON lines here (default: standard output)."),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="With --image: print one JSON object.")] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an --out that is not an earlier `many infer` output.")
    ] = False,
    *,
    options: InferOptions,
) -> None:
    """Answer one image, or score a data set, with the merged model and routed projectors."""
    import json

    if (merged is None) == (adapter is None):
        raise InputError(
            None,
            "give --merged MERGE (a `many merge` output) or --adapter ADAPTER (one task's own adapter), one of them",
        )
    answering = merged or adapter
    sources = [task_and_path(source) for source in data or []]
    data = [path for _, path in sources]

    single = image is not None or (prompt is not None and not data)
    _check_infer_mode(single, bool(data), out is not None or options.min_accuracy is not None, json_output)
    options = replace(options, prompt=DEFAULT_PROMPT if prompt is None else prompt)
    options.check()
    if image is not None:
        refuse_special_file(image)
        if not image.is_file():
            raise InputError(image, "image not found")
    require_inputs(
        {
            answering: "merge directory not found" if merged else "adapter directory not found",
            **{source: "data not found" for source in data or []},
        }
    )
    with importing():
        from many_cli import infer
        from many_cli.data import Record
        from many_cli.formats import read_all_records, refuse_output_over_data
        from many_cli.rows import accuracy_gate, average_accuracy, scored_tasks

    if out is not None:
        refuse_overlap(out, [answering, model])
        refuse_output_over_data(out, data, options.reading, infer.is_predictions_file)
        refuse_foreign_file(out, force, infer.is_predictions_file, "many infer output (JSON lines)")
    loaded = infer.load_merged(model, merged, options) if merged else infer.load_task_adapter(model, adapter, options)
    for note in loaded.notes:
        stderr.print(f"note: {note}", highlight=False)
    if single:
        [prediction] = infer.answer(
            loaded,
            [Record(str(image or "--prompt"), (image,) if image else (), options.prompt, None)],
            options.max_new_tokens,
        )
        print(json.dumps(prediction.as_json()) if json_output else prediction.prediction)
        return

    rows = []
    with _json_lines(out) as sink:
        for prediction in infer.answer_all(loaded, read_all_records(sources, options.reading), options):
            rows.append(prediction.as_json())
            sink.write(json.dumps(rows[-1]) + "\n")
    scored = scored_tasks(rows)
    if scored:
        _print_accuracy(scored, average_accuracy(scored))
    failed = accuracy_gate(scored, options.min_accuracy, ", ".join(map(str, data)))
    if failed:
        fail(1, failed)


def task_and_path(value: Path) -> tuple[str | None, Path]:
    """`TASK=PATH` names a task (unless a file of that whole name exists); else (None, PATH)."""
    task, equals, path = str(value).partition("=")
    if equals and task and path and "/" not in task and not value.exists():
        return task, Path(path)
    return None, value


def _check_infer_mode(single: bool, data: bool, data_only_options: bool, json_output: bool) -> None:
    """One image or prompt, or a data set; refuse the options that would be ignored."""
    if single == data:
        raise InputError(None, "give --image IMG (and --prompt), --prompt TEXT alone, or --data DATA")
    unused = ["--out or --min-accuracy"] if single and data_only_options else []
    unused += ["--json"] if json_output and data else []
    if unused:
        raise InputError(
            None,
            f"{unused[0]} does not apply here: --out and --min-accuracy go with --data, "
            f"--json with --image or --prompt alone",
        )


@contextmanager
def _json_lines(path: Optional[Path]) -> Iterator[TextIO]:
    """Standard output, or a file that appears complete or not at all."""
    if path is None:
        yield sys.stdout
        return
    with atomic_output_file(path) as partial, open(partial, "w") as handle:
        yield handle


def _print_accuracy(scores: dict[str, tuple[int, int]], average: float) -> None:
    from rich.table import Table

    table = Table(title="accuracy (normalised exact match)")
    table.add_column("task")
    table.add_column("correct", justify="right")
    table.add_column("records", justify="right")
    table.add_column("accuracy", justify="right")
    for task, (correct, total) in sorted(scores.items()):
        table.add_row(task, str(correct), str(total), f"{correct / total:.4f}")
    table.add_row("average", "", "", f"{average:.4f}", style="bold")
    stderr.print(table)


@app.command("report")
@with_options(ReportOptions)
def report_command(
    predictions: Annotated[
        list[Path],
        typer.Argument(
            readable=False,
            help="`many infer --merged ... --data` outputs in merge order: one per step, each scoring every task merged so far.",
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            readable=False,
            help="The folder for report.json, report.md and index.html (replaced when it holds an earlier report).",
        ),
    ],
    upper: Annotated[
        Optional[list[Path]],
        typer.Option(
            "--upper",
            readable=False,
            help="`many infer --adapter ... --data` outputs: each task's own adapter, its upper bound; repeat per task.",
        ),
    ] = None,
    experts: Annotated[
        Optional[Path],
        typer.Option(
            "--experts",
            readable=False,
            help="The last step's merge scored on the same records with `many infer --lm-routing experts`: "
            "what serving it so keeps, beside the merged model's forgetting.",
        ),
    ] = None,
    *,
    options: ReportOptions,
) -> None:
    """The continual run after each step: accuracy matrix, forgetting, backward transfer, routing, wrong answers."""
    options.check()
    inputs = [*predictions, *(upper or []), *([experts] if experts else [])]
    require_inputs({path: "prediction file not found" for path in inputs})
    from many_cli.report import build_report, gate, read_predictions, write_report
    from many_cli.rows import ADAPTER, MERGE

    report = build_report(
        [read_predictions(path, MERGE) for path in predictions],
        [read_predictions(path, ADAPTER) for path in upper or []],
        read_predictions(experts, MERGE) if experts else None,
    )
    refuse_overlap(out, inputs)
    write_report(report, out, options.force)
    print(
        f"final average accuracy {100 * report['final_average_accuracy']:.1f}% after {len(predictions)} step(s) "
        f"-> {out / 'index.html'}"
    )
    failed = gate(report, options.min_final_accuracy, options.max_forgetting)
    if failed:
        fail(1, failed)


@app.command("convert")
def convert_command(
    source: Annotated[
        Path,
        typer.Argument(
            readable=False, help="A checkpoint in the original LLaVA training layout (LoRA + non_lora_trainables.bin)."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", readable=False, help="The PEFT adapter directory to write.")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out.")] = False,
) -> None:
    """Write an original-LLaVA-layout checkpoint as a standard PEFT adapter (transformers names)."""
    require_inputs({source: "checkpoint not found"})
    with importing(transformers=False):
        from many_cli.llava_layout import convert

    convert(source, out, force)
    stderr.print(
        f"wrote {out}: PeftModel.from_pretrained(LlavaForConditionalGeneration..., {str(out)!r})", markup=False
    )


def _shipped_sample() -> Path:
    """The sample that comes with many: inside the installed package (a wheel), or at the top of
    the source tree (a checkout, an editable install)."""
    package = Path(__file__).resolve().parent
    installed = package / "sample_adapters"
    return installed if installed.is_dir() else package.parent / "sample_adapters"


@app.command("demo")
def demo_command(
    sample: Annotated[
        Optional[Path],
        typer.Option(
            "--sample", readable=False, help="The sample folder (base/, adapters/, data/). Default: the one many ships."
        ),
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", readable=False, help="Where the adapters' copies, their stats and the merge go.")
    ] = Path("many-demo"),
    force: Annotated[
        bool, typer.Option("--force", help="Replace an --out that is not an earlier demo's untouched output.")
    ] = False,
) -> None:
    """The whole job on the shipped sample: stats for each adapter, merge, one answer per task."""
    sample = _shipped_sample() if sample is None else sample
    require_inputs({sample: "sample folder not found"})
    with importing():
        from many_cli.demo import run_demo

    report = run_demo(sample, out, force, say=lambda command: stderr.print(f"[dim]$ {command}[/dim]"))
    print(f"many infer with {report.merged} (MAny: merged LoRA + routed projectors):")
    for prediction in report.predictions:
        task, weight = max(prediction.routing.items(), key=lambda item: item[1])
        print(
            f"  {prediction.record.image.relative_to(sample)}  {prediction.record.prompt!r} -> "
            f"{prediction.prediction!r} (expected {prediction.record.answer!r}; routed to {task}, "
            f"weight {weight:.2f})"
        )


def main() -> None:
    """Run the command line (see `exits.run` for how it ends)."""
    run(app)
