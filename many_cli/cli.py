"""The `many` command line: parse, call, report. No math lives here."""

from __future__ import annotations

import os
import sys
import warnings
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Iterator, Optional, TextIO

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from many_cli.data import DEFAULT_PROMPT
from many_cli.errors import InputError, OutputError, Terminated
from many_cli.export import ExportOptions, export
from many_cli.files import atomic_output_file, refuse_foreign_file, refuse_overlap
from many_cli.infer import InferOptions, average_accuracy
from many_cli.merge import MergeOptions, merge
from many_cli.options import with_options
from many_cli.stats import Progress as StatsProgress
from many_cli.stats import StatsOptions, collect_stats

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Merge the LoRA adapters and projectors of continual multimodal fine-tunes (MAny).")
stderr = Console(stderr=True, soft_wrap=True)


bench_app = typer.Typer(no_args_is_help=True, help="Measured ratios: ours against a baseline or a floor.")
app.add_typer(bench_app, name="bench")


@app.callback()
def _commands() -> None:
    """Merge the LoRA adapters and projectors of continual multimodal fine-tunes (MAny)."""
    # Libraries' own progress bars and deprecation notices would bury the one-line reports.
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as transformers_logging

    hub_logging.set_verbosity_error()  # its retry notices, one per attempt, would bury the one-line error
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


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
@with_options(MergeOptions)
def merge_command(
    adapters: Annotated[list[Path], typer.Argument(readable=False, help="Adapter directories in task order, or one folder holding them (name order).")],
    out: Annotated[Path, typer.Option("--out", readable=False, help="Output directory (must not exist unless --force).")],
    resume: Annotated[Optional[Path], typer.Option("--resume", readable=False, help="A previous merge directory to add these tasks to.")] = None,
    *,
    options: MergeOptions,
) -> None:
    """Merge LoRA adapters (with their many_stats.safetensors) into one PEFT adapter."""
    report = merge(adapters, out, options, resume=resume, track=_track)
    if report.rank != 0:
        return
    for line in report.warnings:
        stderr.print(f"[yellow]warning:[/] {line}", highlight=False)
    for line in report.notes:
        stderr.print(f"note: {line}", highlight=False)
    stderr.print(f"merged {len(report.tasks)} tasks ({', '.join(report.tasks)}) over "
                 f"{report.modules} modules into {report.out}", highlight=False)


@app.command("export")
@with_options(ExportOptions)
def export_command(
    model: Annotated[str, typer.Option("--model", help="Base model: a local transformers directory.")],
    merged: Annotated[Path, typer.Option("--merged", readable=False, help="A `many merge` output directory.")],
    out: Annotated[Path, typer.Option("--out", readable=False, help="The transformers model directory to write (must not exist unless --force).")],
    *,
    options: ExportOptions,
) -> None:
    """Write a standard transformers model: the merged LoRA folded into the base, one projector chosen."""
    report = export(model, merged, out, options, track=_track)
    stderr.print(f"folded {report.folded} merged LoRA modules into {report.tensors} tensors with the "
                 f"{report.projector} projector -> {report.out}", highlight=False)


class _RecordsBar(StatsProgress):
    """A rich progress bar over records, with records/s and tokens."""

    def __init__(self, total: int | None):
        super().__init__(total)
        self._progress = Progress(TextColumn("stats"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.fields[rate]} records/s, {task.fields[tokens]} tokens"),
                                  TimeElapsedColumn(), console=stderr, transient=True,
                                  disable=not stderr.is_terminal)
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
    data: Annotated[Path, typer.Option("--data", readable=False, help="Calibration data: a folder of images, a .jsonl or a LLaVA .json.")],
    out: Annotated[Optional[Path], typer.Option("--out", readable=False, help="Stats file (default: ADAPTER/many_stats.safetensors).")] = None,
    *,
    options: StatsOptions,
) -> None:
    """Accumulate one task's input covariances and visual prototype for `many merge`."""
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
    stderr.print(f"{report.records} records, {report.tokens} tokens, {report.images} images{skipped}: "
                 f"{report.inputs} distinct inputs of {report.modules} adapted layers -> {report.out}",
                 highlight=False)


@app.command("infer")
@with_options(InferOptions)
def infer_command(  # long only by the parameters typer declares: the body is six steps
    model: Annotated[str, typer.Option("--model", help="Base model: a local transformers directory (or a hub id).")],
    merged: Annotated[Path, typer.Option("--merged", readable=False, help="A `many merge` output directory.")],
    image: Annotated[Optional[Path], typer.Option("--image", readable=False, help="One image to answer about.")] = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", help=f"The question (also for a folder of images) [default: {DEFAULT_PROMPT}]; alone, a text prompt.")] = None,
    data: Annotated[Optional[list[Path]], typer.Option("--data", readable=False, help="A data set (folder, .jsonl or LLaVA .json); repeat for several tasks.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", readable=False, help="With --data: write JSON lines here (default: standard output).")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="With --image: print one JSON object.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an --out that is not an earlier `many infer` output.")] = False,
    *,
    options: InferOptions,
) -> None:
    """Answer one image, or score a data set, with the merged model and routed projectors."""
    import json

    from many_cli import infer
    from many_cli.data import Record
    from many_cli.formats import read_all_records

    single = image is not None or (prompt is not None and not data)
    _check_infer_mode(single, bool(data), out is not None or options.min_accuracy is not None, json_output)
    options = replace(options, prompt=DEFAULT_PROMPT if prompt is None else prompt)
    options.check()
    if image is not None and not image.is_file():
        raise InputError(image, "image not found")
    if out is not None:
        refuse_overlap(out, [merged, model, *(data or [])])
        refuse_foreign_file(out, force, infer.is_predictions_file, "many infer output (JSON lines)")
    loaded = infer.load_merged(model, merged, options)
    for note in loaded.notes:
        stderr.print(f"note: {note}", highlight=False)
    if single:
        [prediction] = infer.answer(loaded, [Record(str(image or "--prompt"), (image,) if image else (), options.prompt, None)],
                                    options.max_new_tokens)
        print(json.dumps(prediction.as_json()) if json_output else prediction.prediction)
        return

    predictions = []
    with _json_lines(out) as sink:
        for prediction in infer.answer_all(loaded, read_all_records(data, options.reading), options):
            sink.write(json.dumps(prediction.as_json()) + "\n")
            predictions.append(prediction)
    scores = infer.accuracy_by_task(predictions)
    if not scores:
        if options.min_accuracy is not None:  # a gate that scored nothing must not pass
            _fail(1, f"--min-accuracy {options.min_accuracy}: no record of {', '.join(map(str, data))} "
                     f"has an answer, so nothing was scored")
        return
    _print_accuracy(scores)
    average = average_accuracy(scores)
    if options.min_accuracy is not None and average < options.min_accuracy:
        _fail(1, f"average accuracy {average:.4f} is below --min-accuracy {options.min_accuracy}")


def _check_infer_mode(single: bool, data: bool, data_only_options: bool, json_output: bool) -> None:
    """One image or prompt, or a data set; refuse the options that would be ignored."""
    if single == data:
        raise InputError(None, "give --image IMG (and --prompt), --prompt TEXT alone, or --data DATA")
    unused = ["--out or --min-accuracy"] if single and data_only_options else []
    unused += ["--json"] if json_output and data else []
    if unused:
        raise InputError(None, f"{unused[0]} does not apply here: --out and --min-accuracy go with --data, "
                               f"--json with --image or --prompt alone")


@contextmanager
def _json_lines(path: Optional[Path]) -> Iterator[TextIO]:
    """Standard output, or a file that appears complete or not at all."""
    if path is None:
        yield sys.stdout
        return
    with atomic_output_file(path) as partial, open(partial, "w") as handle:
        yield handle


def _print_accuracy(scores: dict[str, tuple[int, int]]) -> None:
    from rich.table import Table

    table = Table(title="accuracy (normalised exact match)")
    table.add_column("task")
    table.add_column("correct", justify="right")
    table.add_column("records", justify="right")
    table.add_column("accuracy", justify="right")
    for task, (correct, total) in sorted(scores.items()):
        table.add_row(task, str(correct), str(total), f"{correct / total:.4f}")
    table.add_row("average", "", "", f"{average_accuracy(scores):.4f}", style="bold")
    stderr.print(table)


def _print_measures(title: str, rows: list[tuple[str, str]]) -> None:
    from rich.table import Table

    table = Table(title=title)
    table.add_column("measure")
    table.add_column("value", justify="right")
    for measure, value in rows:
        table.add_row(measure, value)
    Console().print(table)


@bench_app.command("stats")
def bench_stats_command(
    layers: Annotated[int, typer.Option("--layers", help="Language-model depth (cost is linear in it).")] = 1,
    hidden: Annotated[int, typer.Option("--hidden", help="Hidden size (LLaVA-1.5-7B: 4096).")] = 4096,
    intermediate: Annotated[int, typer.Option("--intermediate", help="MLP size (LLaVA-1.5-7B: 11008).")] = 11008,
    records: Annotated[int, typer.Option("--records", help="Records (each 576 image tokens plus text).")] = 4,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 2,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
) -> None:
    """`many stats` against a plain forward pass and against the FLOP floor, in one run."""
    from many_cli.bench.stats_bench import bench_stats

    result = bench_stats(layers=layers, hidden=hidden, intermediate=intermediate, records=records,
                         batch_size=batch_size, device=device)
    _print_measures(f"many bench stats: {layers} layer(s) of {hidden}/{intermediate}, {result.tokens} tokens, "
                    f"{result.device}", [
        ("plain forward", f"{result.forward_seconds:.2f} s"),
        ("many stats (forward + statistics)", f"{result.stats_seconds:.2f} s"),
        ("stats / forward (goal ≤ 1.5)", f"{result.ratio_to_forward:.2f}"),
        ("FLOP floor (linear layers + covariance triangles at peak matmul speed)", f"{result.floor_seconds:.2f} s"),
        ("stats / floor", f"{result.ratio_to_floor:.2f}"),
        ("covariance FLOPs / forward FLOPs", f"{result.covariance_flops / result.forward_flops:.2f}"),
        ("peak matmul speed", f"{result.peak_flops / 1e9:.0f} GFLOP/s"),
    ])


@bench_app.command("infer")
def bench_infer_command(
    tasks: Annotated[int, typer.Option("--tasks", help="Merged tasks (routed projectors).")] = 4,
    hidden: Annotated[int, typer.Option("--hidden", help="Language-model width.")] = 1024,
    layers: Annotated[int, typer.Option("--layers", help="Language-model depth.")] = 4,
    images: Annotated[int, typer.Option("--images", help="Images answered per timing.")] = 4,
    new_tokens: Annotated[int, typer.Option("--new-tokens", help="Tokens generated per image.")] = 16,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
) -> None:
    """`many infer`'s per-image latency against the plain base model, and load times, in one run."""
    from many_cli.bench.infer_bench import bench_infer

    result = bench_infer(tasks=tasks, hidden=hidden, layers=layers, images=images, new_tokens=new_tokens,
                         device=device)
    _print_measures(f"many bench infer: {tasks} tasks, {layers} layer(s) of width {hidden}, "
                    f"{images} images x {new_tokens} new tokens, {result.device}", [
        ("plain base model, per image", f"{result.base_seconds_per_image:.3f} s"),
        ("many infer (folded LoRA + routed projectors), per image", f"{result.many_seconds_per_image:.3f} s"),
        ("latency ratio (goal ≤ 1.05)", f"{result.latency_ratio:.3f}"),
        ("load: plain base model", f"{result.base_load_seconds:.2f} s"),
        ("load: base + merged LoRA (folded) + bundle", f"{result.many_load_seconds:.2f} s"),
        ("--lm-routing experts (routing pre-pass + mixed-batch LoRA), per image",
         f"{result.experts_seconds_per_image:.3f} s"),
        ("experts latency ratio", f"{result.experts_latency_ratio:.3f}"),
    ])


@bench_app.command("merge")
def bench_merge_command(
    layers: Annotated[int, typer.Option("--layers", help="Language-model layers (LLaVA-1.5-7B: 32); all figures scale linearly.")] = 32,
    tasks: Annotated[int, typer.Option("--tasks", help="Tasks merged (a further one is added with --resume).")] = 6,
    dense_layers: Annotated[int, typer.Option("--dense-layers", help="Layers the (slow) dense reference is timed and checked on.")] = 1,
    workdir: Annotated[Optional[Path], typer.Option("--workdir", readable=False, help="Where to write the synthetic adapters (default: the temp folder).")] = None,
) -> None:
    """`many merge` on 7B-shaped adapters against dense RegMean and the Cholesky floor, in one run."""
    from many_cli.bench.merge_bench import bench_merge

    result = bench_merge(layers=layers, tasks=tasks, workdir=workdir, dense_layers=dense_layers)
    gigabyte = 1e9
    _print_measures(f"many bench merge: {tasks} tasks, {layers} layer(s) of LLaVA-1.5-7B shapes, rank 16", [
        ("merge time", f"{result.merge_seconds:.1f} s"),
        ("peak RSS (goal ≤ 2 GB)", f"{result.peak_rss / gigabyte:.2f} GB"),
        ("bytes read (stats + adapters) / written",
         f"{result.bytes_read / gigabyte:.2f} GB / {result.bytes_written / gigabyte:.2f} GB"),
        (f"dense RegMean reference, per layer ({result.dense_layers} timed)", f"{result.dense_seconds_per_layer:.1f} s"),
        ("speed-up over dense (goal ≥ 10)", f"{result.speedup_over_dense:.1f}x"),
        ("largest relative difference from dense (goal ≤ 1e-4)", f"{result.dense_error:.1e}"),
        ("floor: one Cholesky per distinct input", f"{result.floor_seconds:.1f} s"),
        ("merge / floor (goal ≤ 1.3)", f"{result.ratio_to_floor:.2f}"),
        ("merge with --state-precision float32 / floor", f"{result.float32_state_ratio_to_floor:.2f}"),
        ("merged adapter / dense merged delta (goal ≤ 5%)",
         f"{100 * result.adapter_bytes / result.dense_delta_bytes:.2f}%"),
        ("--resume with one more task", f"{result.resume_seconds:.1f} s"),
        ("resume / (one-task merge + floor) (goal ≤ 1)", f"{result.resume_ratio:.2f}"),
        ("stats file per layer per task", f"{result.stats_bytes_per_layer / 1e6:.0f} MB"),
        ("merge state per layer", f"{result.state_bytes_per_layer / 1e6:.0f} MB"),
        ("merge state per layer, --state-precision float32", f"{result.float32_state_bytes_per_layer / 1e6:.0f} MB"),
        ("float32 state: resumed merge against the float64 one, in output space (goal ≤ 1e-4)",
         f"{result.float32_state_error:.1e}"),
    ])


@bench_app.command("continual")
def bench_continual_command(
    out: Annotated[Path, typer.Option("--out", readable=False, help="Folder for continual.md and continual.png.")] = Path("continual"),
    seeds: Annotated[int, typer.Option("--seeds", help="Seeds per base (mean ± std over them).")] = 3,
    bases: Annotated[str, typer.Option("--bases", help="Comma-separated: generalist, blank.")] = "generalist,blank",
    task_steps: Annotated[Optional[int], typer.Option("--task-steps", help="Training steps per task [default: 400].")] = None,
    pretrain_steps: Annotated[Optional[int], typer.Option("--pretrain-steps", help="Generalist pretraining steps [default: 600].")] = None,
    sweeps: Annotated[bool, typer.Option("--sweeps/--no-sweeps", help="MAny against ridge, η, calibration size, rank budget, α and answer weight.")] = True,
    workdir: Annotated[Optional[Path], typer.Option("--workdir", readable=False, help="Keep the models, adapters and merges here (default: a temp folder, removed).")] = None,
) -> None:
    """A miniature continual benchmark: every merge method and MAny against the per-task upper
    bound and sequential fine-tuning, trained and scored on the synthetic world."""
    import importlib.util
    import tempfile

    if importlib.util.find_spec("matplotlib") is None:  # checked before the long run, not after
        raise InputError(None, "many bench continual draws its plot with matplotlib: pip install 'many-cli[bench]'")
    from many_cli.bench.continual import BASES, ContinualOptions, markdown, plot, run_benchmark
    from many_cli.bench.training import TrainOptions

    if seeds < 1:
        raise InputError(None, f"--seeds is how many seeds to run per base (at least 1), got {seeds}")
    kinds = tuple(kind.strip() for kind in bases.split(","))
    if not kinds or any(kind not in BASES for kind in kinds):
        raise InputError(None, f"--bases takes a comma-separated list of {', '.join(BASES)}, got {bases!r}")
    steps = {"task_steps": task_steps, "pretrain_steps": pretrain_steps}
    options = ContinualOptions(seeds=tuple(range(seeds)), bases=kinds,
                               train=TrainOptions(**{key: value for key, value in steps.items() if value is not None}))
    if not sweeps:
        options = replace(options, ridges=(), etas=(), calibration_sizes=(), ranks=(), alphas=(), answer_weights=())
    with tempfile.TemporaryDirectory(prefix="many-continual-") as scratch:
        runs = run_benchmark(workdir or Path(scratch), options, say=lambda message: stderr.print(message, markup=False))
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(runs, options)
    with atomic_output_file(out / "continual.md") as partial:
        partial.write_text(table + "\n")
    with atomic_output_file(out / "continual.png") as partial:
        plot(runs, partial)
    Console().print(table)
    stderr.print(f"wrote {out / 'continual.md'} and {out / 'continual.png'}")


@bench_app.command("e2e")
def bench_e2e_command(
    family: Annotated[str, typer.Option("--family", help="llava-1.5-7b or qwen2.5-vl-7b (their real configurations), or tiny.")] = "llava-1.5-7b",
    layers: Annotated[Optional[int], typer.Option("--layers", help="Language-model layers [default: the family's]; figures scale linearly.")] = None,
    vision_layers: Annotated[Optional[int], typer.Option("--vision-layers", help="Vision-tower layers [default: the family's].")] = None,
    tasks: Annotated[int, typer.Option("--tasks", help="Task adapters written, gathered and merged.")] = 6,
    records: Annotated[int, typer.Option("--records", help="Calibration records per task.")] = 4,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Records per stats forward.")] = 2,
    new_tokens: Annotated[int, typer.Option("--new-tokens", help="Tokens generated per image by infer.")] = 8,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda: where the weights are created and every phase runs.")] = "auto",
    workdir: Annotated[Optional[Path], typer.Option("--workdir", readable=False, help="Where to write the model and adapters (default: the temp folder).")] = None,
) -> None:
    """stats, merge and infer at a real model's size (random bf16 weights), each timed in one run."""
    from many_cli.bench.e2e import FAMILIES, bench_e2e

    if family not in FAMILIES:
        raise InputError(None, f"--family takes one of {', '.join(FAMILIES)}, got {family!r}")
    result = bench_e2e(family, layers, vision_layers, tasks, records, batch_size, new_tokens, device, workdir)
    gigabyte = 1e9
    _print_measures(f"many bench e2e: {family} ({result.layers} language / {result.vision_layers} vision layers), "
                    f"{tasks} tasks, {records} records each, on {result.device}", [
        ("stats: tokens per task", f"{result.stats_tokens}"),
        ("stats: statistics pass, tokens/s", f"{result.tokens_per_second:.0f}"),
        ("stats: pass / plain forward (same batches)", f"{result.stats_ratio:.2f}"),
        ("stats: command per task (load and write included)", f"{result.stats_seconds:.1f} s"),
        ("stats: peak host / device memory", f"{result.stats_peak_host / gigabyte:.2f} / "
                                              f"{result.stats_peak_device / gigabyte:.2f} GB"),
        (f"merge: {tasks} tasks, all layers", f"{result.merge_seconds:.1f} s"),
        ("merge: peak host memory", f"{result.merge_peak_host / gigabyte:.2f} GB"),
        ("infer: base model, per image", f"{result.infer_base_seconds:.2f} s"),
        ("infer: merged model, routed projector, per image", f"{result.infer_many_seconds:.2f} s"),
        ("infer: latency ratio to the base model", f"{result.latency_ratio:.2f}"),
        ("infer: peak host / device memory (base and merged loaded)",
         f"{result.infer_peak_host / gigabyte:.2f} / {result.infer_peak_device / gigabyte:.2f} GB"),
        ("disk per task: adapter + stats file", f"{result.adapter_bytes_per_task / gigabyte:.3f} + "
                                                f"{result.stats_bytes_per_task / gigabyte:.2f} GB"),
        ("disk: merge output (state, adapter, bundle, experts)", f"{result.merged_bytes / gigabyte:.2f} GB"),
    ])


@bench_app.command("sample")
def bench_sample_command(
    out: Annotated[Path, typer.Option("--out", readable=False, help="Where to write the sample.")] = Path("sample_adapters"),
    force: Annotated[bool, typer.Option("--force", help="Replace an existing sample.")] = False,
) -> None:
    """Regenerate the shipped sample (tiny LLaVA, four trained task adapters, their data)."""
    from many_cli.bench.sample import write_sample

    write_sample(out, force)
    stderr.print(f"wrote {out}")


@app.command("convert")
def convert_command(
    source: Annotated[Path, typer.Argument(readable=False, help="A checkpoint in the original LLaVA training layout (LoRA + non_lora_trainables.bin).")],
    out: Annotated[Path, typer.Option("--out", readable=False, help="The PEFT adapter directory to write.")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out.")] = False,
) -> None:
    """Write an original-LLaVA-layout checkpoint as a standard PEFT adapter (transformers names)."""
    from many_cli.llava_layout import convert

    convert(source, out, force)
    stderr.print(f"wrote {out}: PeftModel.from_pretrained(LlavaForConditionalGeneration..., {str(out)!r})",
                 markup=False)


@app.command("demo")
def demo_command(
    sample: Annotated[Path, typer.Option("--sample", readable=False, help="The sample folder (base/, adapters/, data/).")] = Path("sample_adapters"),
    out: Annotated[Path, typer.Option("--out", readable=False, help="Where the adapters' copies, their stats and the merge go.")] = Path("many-demo"),
    force: Annotated[bool, typer.Option("--force", help="Replace an --out that is not an earlier demo's untouched output.")] = False,
) -> None:
    """The whole job on the shipped sample: stats for each adapter, merge, one answer per task."""
    from many_cli.demo import run_demo

    report = run_demo(sample, out, force, say=lambda command: stderr.print(f"[dim]$ {command}[/dim]"))
    print(f"many infer with {report.merged} (MAny: merged LoRA + routed projectors):")
    for prediction in report.predictions:
        task, weight = max(prediction.routing.items(), key=lambda item: item[1])
        print(f"  {prediction.record.image.relative_to(sample)}  {prediction.record.prompt!r} -> "
              f"{prediction.prediction!r} (expected {prediction.record.answer!r}; routed to {task}, "
              f"weight {weight:.2f})")


def main() -> None:
    """Run the command line: usage errors exit 2 (typer's message); bad input exits 2 with one
    line; Ctrl-C exits 130 and SIGTERM 143, each with one line, after the outputs in progress
    are cleaned up; any other failure exits 1 with one line (MANY_DEBUG=1 shows the traceback)."""
    warnings.showwarning = _warn_in_one_line
    sys.stdout = _StandardOutput(sys.stdout)
    try:
        try:
            app()
        finally:
            sys.stdout.flush()  # a full disk shows here, while it can still be reported
    except _ReaderGone:  # the reader went away (`many … | head`): stop quietly, as other tools do
        sys.stdout = open(os.devnull, "w")  # nothing left to flush at exit
        sys.exit(0)
    except OutputError as error:
        sys.stdout = open(os.devnull, "w")
        _fail(1, str(error))
    except SystemExit as done:
        if done.code == 130:  # typer's silent exit on Ctrl-C inside a command
            _fail(130, "interrupted")
        raise
    except KeyboardInterrupt:
        _fail(130, "interrupted")
    except Terminated:
        _fail(143, "terminated")
    except InputError as error:
        _fail(2, str(error))
    except Exception as error:  # noqa: BLE001 - the last line of defence, reported in one line
        if os.environ.get("MANY_DEBUG"):
            raise
        _fail(1, f"{type(error).__name__}: {error}")


class _ReaderGone(Exception):
    """The reader of standard output closed it."""


class _StandardOutput:
    """sys.stdout whose failures (closed, a full disk) are an OutputError naming it, and a reader
    that went away is _ReaderGone."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        return self._guarded(lambda: self._stream.write(text))

    def flush(self) -> None:
        self._guarded(lambda: self._stream.flush())

    def __getattr__(self, name: str):
        return getattr(self._stream, name)

    def _guarded(self, call):
        if self._stream is None:
            raise OutputError("standard output: cannot write (it is closed)")
        try:
            return call()
        except BrokenPipeError:
            raise _ReaderGone() from None  # not an OSError: click would turn that into exit 1
        except OSError as error:
            raise OutputError(f"standard output: cannot write ({error.strerror or error})") from None


def _warn_in_one_line(message, category, filename, lineno, file=None, line=None) -> None:
    """Library warnings (PEFT, Pillow) as one line each, not a source excerpt."""
    text = " ".join(str(message).split())
    print(f"many: warning: {text[:300]}", file=sys.stderr)


def _fail(code: int, message: str) -> None:
    print(f"many: error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(code)
