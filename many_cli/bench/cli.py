"""`many bench ...`: each command runs one measurement and prints its ratios (ours against a
baseline or a floor, measured in the same run) as a table. Each imports its own work."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from many_cli.errors import InputError
from many_cli.exits import importing
from many_cli.files import atomic_output_file
from many_cli.options import Device

# Where a benchmark writes its synthetic models, adapters and merges.
Workdir = Annotated[
    Optional[Path],
    typer.Option(
        "--workdir", readable=False, help="Keep the models, adapters and merges here (default: a temp folder, removed)."
    ),
]
# Where a benchmark creates its weights and runs.
Where = Annotated[Device, typer.Option("--device", help="auto, cpu or cuda: where the weights are made and it runs.")]
bench_app = typer.Typer(no_args_is_help=True, help="Measured ratios: ours against a baseline or a floor.")
stderr = Console(stderr=True, soft_wrap=True)


def _print_measures(title: str, rows: list[tuple[str, str]]) -> None:
    from rich.table import Table

    table = Table(title=title)
    table.add_column("measure")
    table.add_column("value", justify="right")
    for measure, value in rows:
        table.add_row(measure, value)
    Console().print(table)


@bench_app.command("startup")
def bench_startup_command(
    quick: Annotated[
        bool,
        typer.Option("--quick", help="Only `--help`, `merge --help`, one refused option and one missing path (CI)."),
    ] = False,
) -> None:
    """How fast `--help` and refusals answer, against `import torch`; exit 1 if one imports torch."""
    from many_cli.bench.startup import bench_startup

    result = bench_startup(quick)
    _print_measures(
        f"many bench startup: each command line as a fresh process, against "
        f'`python -c "import torch"` ({result.torch_seconds:.2f} s)',
        [
            (
                f"{case.name} (exit {case.exit_status}{', IMPORTS TORCH' if case.imports_torch else ''})",
                f"{case.seconds:.2f} s = {case.seconds / result.torch_seconds:.2f}x import torch",
            )
            for case in result.cases
        ],
    )
    slowest = max(result.cases, key=lambda case: case.seconds)
    Console().print(f"slowest: {slowest.name}, {slowest.seconds / result.torch_seconds:.2f}x import torch (goal ≤ 0.5)")
    importers = [case.name for case in result.cases if case.imports_torch]
    if importers:
        raise InputError(None, f"torch was imported by: {', '.join(importers)}")


@bench_app.command("stats")
def bench_stats_command(
    layers: Annotated[int, typer.Option("--layers", help="Language-model depth (cost is linear in it).")] = 1,
    hidden: Annotated[int, typer.Option("--hidden", help="Hidden size (LLaVA-1.5-7B: 4096).")] = 4096,
    intermediate: Annotated[int, typer.Option("--intermediate", help="MLP size (LLaVA-1.5-7B: 11008).")] = 11008,
    records: Annotated[int, typer.Option("--records", help="Records (each 576 image tokens plus text).")] = 4,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 2,
    device: Where = "auto",
) -> None:
    """`many stats` against a plain forward pass and against the FLOP floor, in one run."""
    with importing():  # transformers' bars and notices would bury the table
        from many_cli.bench.stats_bench import bench_stats

    result = bench_stats(
        layers=layers, hidden=hidden, intermediate=intermediate, records=records, batch_size=batch_size, device=device
    )
    _print_measures(
        f"many bench stats: {layers} layer(s) of {hidden}/{intermediate}, {result.tokens} tokens, {result.device}",
        [
            ("plain forward", f"{result.forward_seconds:.2f} s"),
            ("many stats (forward + statistics)", f"{result.stats_seconds:.2f} s"),
            ("stats / forward (goal ≤ 1.5)", f"{result.ratio_to_forward:.2f}"),
            ("FLOP floor (linear layers + covariance triangles at peak matmul speed)", f"{result.floor_seconds:.2f} s"),
            ("stats / floor", f"{result.ratio_to_floor:.2f}"),
            ("covariance FLOPs / forward FLOPs", f"{result.covariance_flops / result.forward_flops:.2f}"),
            ("peak matmul speed", f"{result.peak_flops / 1e9:.0f} GFLOP/s"),
        ],
    )


@bench_app.command("base-check")
def bench_base_check_command(
    layers: Annotated[int, typer.Option("--layers", help="Language-model depth (LLaVA-1.5-7B: 32).")] = 32,
    work: Annotated[
        Optional[Path], typer.Option("--work", help="Where the base is written (default: a temporary folder).")
    ] = None,
) -> None:
    """Checking a base by its weights against loading it: a 7B-shaped sharded LLaVA, bfloat16."""
    import tempfile

    with importing():  # transformers' bars and notices would bury the table
        from many_cli.bench.base_check import bench_base_check

    with tempfile.TemporaryDirectory(dir=work) as folder:
        result = bench_base_check(Path(folder), layers)
    _print_measures(
        f"many bench base-check: LLaVA-1.5-7B-shaped base, {layers} language layers, "
        f"{result.weight_bytes / 1e9:.1f} GB in {result.shards} shards, CPU",
        [
            ("base check (config + every tensor's byte windows)", f"{result.check_seconds * 1000:.1f} ms"),
            ("loading the base (bfloat16)", f"{result.load_seconds:.2f} s"),
            ("check / load (goal ≤ 0.05)", f"{result.ratio:.4f}"),
        ],
    )


@bench_app.command("infer")
def bench_infer_command(
    tasks: Annotated[int, typer.Option("--tasks", help="Merged tasks (routed projectors).")] = 4,
    hidden: Annotated[int, typer.Option("--hidden", help="Language-model width.")] = 1024,
    layers: Annotated[int, typer.Option("--layers", help="Language-model depth.")] = 4,
    images: Annotated[int, typer.Option("--images", help="Images answered per timing.")] = 4,
    new_tokens: Annotated[int, typer.Option("--new-tokens", help="Tokens generated per image.")] = 16,
    device: Where = "auto",
) -> None:
    """`many infer`'s per-image latency against the plain base model, and load times, in one run."""
    with importing():  # transformers' bars and notices would bury the table
        from many_cli.bench.infer_bench import bench_infer

    result = bench_infer(tasks=tasks, hidden=hidden, layers=layers, images=images, new_tokens=new_tokens, device=device)
    _print_measures(
        f"many bench infer: {tasks} tasks, {layers} layer(s) of width {hidden}, "
        f"{images} images x {new_tokens} new tokens, {result.device}",
        [
            ("plain base model, per image", f"{result.base_seconds_per_image:.3f} s"),
            ("many infer (folded LoRA + routed projectors), per image", f"{result.many_seconds_per_image:.3f} s"),
            ("latency ratio (goal ≤ 1.05)", f"{result.latency_ratio:.3f}"),
            ("load: plain base model", f"{result.base_load_seconds:.2f} s"),
            ("load: base + merged LoRA (folded) + bundle", f"{result.many_load_seconds:.2f} s"),
            (
                "--lm-routing experts (routing pre-pass + mixed-batch LoRA), per image",
                f"{result.experts_seconds_per_image:.3f} s",
            ),
            ("experts latency ratio", f"{result.experts_latency_ratio:.3f}"),
        ],
    )


@bench_app.command("merge")
def bench_merge_command(
    layers: Annotated[
        int, typer.Option("--layers", help="Language-model layers (LLaVA-1.5-7B: 32); all figures scale linearly.")
    ] = 32,
    tasks: Annotated[int, typer.Option("--tasks", help="Tasks merged (a further one is added with --resume).")] = 6,
    dense_layers: Annotated[
        int, typer.Option("--dense-layers", help="Layers the (slow) dense reference is timed and checked on.")
    ] = 1,
    workdir: Workdir = None,
) -> None:
    """`many merge` on 7B-shaped adapters against dense RegMean and the Cholesky floor, in one run."""
    with importing():  # transformers' bars and notices would bury the table
        from many_cli.bench.merge_bench import bench_merge

    result = bench_merge(layers=layers, tasks=tasks, workdir=workdir, dense_layers=dense_layers)
    gigabyte = 1e9
    _print_measures(
        f"many bench merge: {tasks} tasks, {layers} layer(s) of LLaVA-1.5-7B shapes, rank 16",
        [
            ("merge time", f"{result.merge_seconds:.1f} s"),
            ("peak RSS (goal ≤ 2 GB)", f"{result.peak_rss / gigabyte:.2f} GB"),
            (
                "bytes read (stats + adapters) / written",
                f"{result.bytes_read / gigabyte:.2f} GB / {result.bytes_written / gigabyte:.2f} GB",
            ),
            (
                f"dense RegMean reference, per layer ({result.dense_layers} timed)",
                f"{result.dense_seconds_per_layer:.1f} s",
            ),
            ("speed-up over dense", f"{result.speedup_over_dense:.1f}x"),
            ("`many merge` as a process (start-up included)", f"{result.process_seconds:.1f} s"),
            (
                f"dense float32 RegMean reference, per layer ({result.dense_layers} timed)",
                f"{result.dense32_seconds_per_layer:.1f} s",
            ),
            ("process speed-up over dense float32 (goal ≥ 10)", f"{result.process_speedup_over_dense32:.1f}x"),
            ("process / (floor + start-up) (goal ≤ 1.3)", f"{result.process_ratio_to_floor:.2f}"),
            ("start-up: `import many_cli.merge`", f"{result.startup_seconds:.1f} s"),
            ("largest relative difference from dense (goal ≤ 1e-4)", f"{result.dense_error:.1e}"),
            ("floor: one Cholesky per distinct input", f"{result.floor_seconds:.1f} s"),
            ("merge / floor (goal ≤ 1.3)", f"{result.ratio_to_floor:.2f}"),
            ("merge with --state-precision float32 / floor", f"{result.float32_state_ratio_to_floor:.2f}"),
            (
                "merged adapter / dense merged delta (goal ≤ 5%)",
                f"{100 * result.adapter_bytes / result.dense_delta_bytes:.2f}%",
            ),
            ("--resume with one more task", f"{result.resume_seconds:.1f} s"),
            ("resume / (one-task merge + floor) (goal ≤ 1)", f"{result.resume_ratio:.2f}"),
            ("stats file per layer per task", f"{result.stats_bytes_per_layer / 1e6:.0f} MB"),
            ("merge state per layer", f"{result.state_bytes_per_layer / 1e6:.0f} MB"),
            (
                "merge state per layer, --state-precision float32",
                f"{result.float32_state_bytes_per_layer / 1e6:.0f} MB",
            ),
            (
                "float32 state: resumed merge against the float64 one, in output space (goal ≤ 1e-4)",
                f"{result.float32_state_error:.1e}",
            ),
        ],
    )


@bench_app.command("continual")
def bench_continual_command(
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            readable=False,
            help="Folder for continual.md, continual.png and MAny's `many report` of each run (reports/).",
        ),
    ] = Path("continual"),
    seeds: Annotated[int, typer.Option("--seeds", help="Seeds per base (mean ± std over them).")] = 3,
    bases: Annotated[str, typer.Option("--bases", help="Comma-separated: generalist, blank.")] = "generalist,blank",
    orders: Annotated[
        str, typer.Option("--orders", help="Comma-separated task orders: forward, reverse.")
    ] = "forward,reverse",
    task_steps: Annotated[
        Optional[int], typer.Option("--task-steps", help="Training steps per task [default: 400].")
    ] = None,
    pretrain_steps: Annotated[
        Optional[int], typer.Option("--pretrain-steps", help="Generalist pretraining steps [default: 600].")
    ] = None,
    layers: Annotated[int, typer.Option("--layers", help="The world's language-model layers (a deeper world: 8).")] = 2,
    sweeps: Annotated[
        bool,
        typer.Option(
            "--sweeps/--no-sweeps", help="MAny against ridge, η, calibration size, rank budget, α and answer weight."
        ),
    ] = True,
    workdir: Workdir = None,
) -> None:
    """A miniature continual benchmark: every merge method and MAny against the per-task upper
    bound and sequential fine-tuning, trained and scored on the synthetic world."""
    import tempfile

    with importing():  # transformers' bars and notices would bury the table
        from many_cli.bench.continual import BASES, MANY, ORDERS, ContinualOptions, markdown, plot, run_benchmark
        from many_cli.bench.training import TrainOptions
        from many_cli.report import write_report

    if seeds < 1:
        raise InputError(None, f"--seeds is how many seeds to run per base (at least 1), got {seeds}")
    kinds = tuple(kind.strip() for kind in bases.split(","))
    if not kinds or any(kind not in BASES for kind in kinds):
        raise InputError(None, f"--bases takes a comma-separated list of {', '.join(BASES)}, got {bases!r}")
    sequences = tuple(order.strip() for order in orders.split(","))
    if not sequences or any(order not in ORDERS for order in sequences):
        raise InputError(None, f"--orders takes a comma-separated list of {', '.join(ORDERS)}, got {orders!r}")
    if layers < 1:
        raise InputError(None, f"--layers must be ≥ 1, got {layers}")
    steps = {"task_steps": task_steps, "pretrain_steps": pretrain_steps, "layers": layers}
    options = ContinualOptions(
        seeds=tuple(range(seeds)),
        bases=kinds,
        orders=sequences,
        train=TrainOptions(**{key: value for key, value in steps.items() if value is not None}),
    )
    if not sweeps:
        options = replace(options, ridges=(), etas=(), calibration_sizes=(), ranks=(), alphas=(), answer_weights=())
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="many-continual-") as scratch:
        runs = run_benchmark(workdir or Path(scratch), options, say=lambda message: stderr.print(message, markup=False))
        for run in runs:  # MAny's own `many report`, written while its images are still there
            write_report(run.report(MANY), out / "reports" / f"{run.base}_seed{run.seed}_{run.order}", force=True)
    table = markdown(runs, options)
    with atomic_output_file(out / "continual.md") as partial:
        partial.write_text(table + "\n")
    with atomic_output_file(out / "continual.png") as partial:
        plot(runs, partial)
    Console().print(table)
    stderr.print(f"wrote {out / 'continual.md'} and {out / 'continual.png'}")


@bench_app.command("e2e")
def bench_e2e_command(
    family: Annotated[
        str, typer.Option("--family", help="llava-1.5-7b or qwen2.5-vl-7b (their real configurations), or tiny.")
    ] = "llava-1.5-7b",
    layers: Annotated[
        Optional[int],
        typer.Option("--layers", help="Language-model layers [default: the family's]; figures scale linearly."),
    ] = None,
    vision_layers: Annotated[
        Optional[int], typer.Option("--vision-layers", help="Vision-tower layers [default: the family's].")
    ] = None,
    tasks: Annotated[int, typer.Option("--tasks", help="Task adapters written, gathered and merged.")] = 6,
    records: Annotated[int, typer.Option("--records", help="Calibration records per task.")] = 4,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Records per stats forward.")] = 2,
    new_tokens: Annotated[int, typer.Option("--new-tokens", help="Tokens generated per image by infer.")] = 8,
    device: Where = "auto",
    workdir: Workdir = None,
) -> None:
    """stats, merge and infer at a real model's size (random bf16 weights), each timed in one run."""
    with importing():  # transformers' bars and notices would bury the table
        from many_cli.bench.e2e import FAMILIES, bench_e2e

    if family not in FAMILIES:
        raise InputError(None, f"--family takes one of {', '.join(FAMILIES)}, got {family!r}")
    result = bench_e2e(family, layers, vision_layers, tasks, records, batch_size, new_tokens, device, workdir)
    gigabyte = 1e9
    _print_measures(
        f"many bench e2e: {family} ({result.layers} language / {result.vision_layers} vision layers), "
        f"{tasks} tasks, {records} records each, on {result.device}",
        [
            ("stats: tokens per task", f"{result.stats_tokens}"),
            ("stats: statistics pass, tokens/s", f"{result.tokens_per_second:.0f}"),
            ("stats: pass / plain forward (same batches)", f"{result.stats_ratio:.2f}"),
            ("stats: command per task (load and write included)", f"{result.stats_seconds:.1f} s"),
            (
                "stats: peak host / device memory",
                f"{result.stats_peak_host / gigabyte:.2f} / {result.stats_peak_device / gigabyte:.2f} GB",
            ),
            (f"merge: {tasks} tasks, all layers", f"{result.merge_seconds:.1f} s"),
            ("merge: peak host memory", f"{result.merge_peak_host / gigabyte:.2f} GB"),
            ("infer: base model, per image", f"{result.infer_base_seconds:.2f} s"),
            ("infer: merged model, routed projector, per image", f"{result.infer_many_seconds:.2f} s"),
            ("infer: latency ratio to the base model", f"{result.latency_ratio:.2f}"),
            (
                "infer: peak host / device memory (base and merged loaded)",
                f"{result.infer_peak_host / gigabyte:.2f} / {result.infer_peak_device / gigabyte:.2f} GB",
            ),
            (
                "disk per task: adapter + stats file",
                f"{result.adapter_bytes_per_task / gigabyte:.3f} + {result.stats_bytes_per_task / gigabyte:.2f} GB",
            ),
            ("disk: merge output (state, adapter, bundle, experts)", f"{result.merged_bytes / gigabyte:.2f} GB"),
        ],
    )


@bench_app.command("one-pass")
def bench_one_pass_command(
    family: Annotated[
        str, typer.Option("--family", help="llava-1.5-7b or qwen2.5-vl-7b (their real configurations), or tiny.")
    ] = "llava-1.5-7b",
    layers: Annotated[int, typer.Option("--layers", help="Language-model layers; figures scale linearly.")] = 1,
    vision_layers: Annotated[int, typer.Option("--vision-layers", help="Vision-tower layers.")] = 1,
    tasks: Annotated[int, typer.Option("--tasks", help="Task adapters merged.")] = 2,
    records: Annotated[int, typer.Option("--records", help="Calibration records per task.")] = 4,
    device: Where = "auto",
    workdir: Workdir = None,
) -> None:
    """`many merge --one-pass` against today's job (a stats pass per task and a plain merge), at a
    real model's widths, each phase timed in a process of its own."""
    with importing():
        from many_cli.bench.e2e import FAMILIES
        from many_cli.bench.one_pass_bench import bench_one_pass

    if family not in FAMILIES:
        raise InputError(None, f"--family takes one of {', '.join(FAMILIES)}, got {family!r}")
    result = bench_one_pass(family, layers, vision_layers, tasks, records, device, workdir)
    gigabyte = 1e9
    _print_measures(
        f"many bench one-pass: {family} ({result.layers} language layer{'s' * (result.layers > 1)}), "
        f"{tasks} tasks, {records} records each, on {result.device}",
        [
            ("many stats, one task (load and write included)", f"{result.stats_seconds:.1f} s"),
            ("many merge (plain)", f"{result.merge_seconds:.1f} s"),
            ("many merge --one-pass, every task", f"{result.one_pass_seconds:.1f} s"),
            ("  the same, every hidden state spilled to disk", f"{result.spilled_seconds:.1f} s"),
            ("one pass / (stats per task + plain merge)", f"{result.seconds_ratio:.2f}"),
            (
                "peak memory: stats / merge / one pass",
                " / ".join(
                    f"{peak / gigabyte:.2f}" for peak in (result.stats_peak, result.merge_peak, result.one_pass_peak)
                )
                + " GB",
            ),
            ("peak memory: one pass / one stats run", f"{result.peak_ratio:.2f}"),
            ("peak memory: one pass spilled", f"{result.spilled_peak / gigabyte:.2f} GB"),
        ],
    )


@bench_app.command("sample")
def bench_sample_command(
    out: Annotated[Path, typer.Option("--out", readable=False, help="Where to write the sample.")] = Path(
        "sample_adapters"
    ),
    force: Annotated[bool, typer.Option("--force", help="Replace an existing sample.")] = False,
) -> None:
    """Regenerate the shipped sample (tiny LLaVA, four trained task adapters, their data)."""
    with importing():  # transformers' bars and notices would bury the one line it ends on
        from many_cli.bench.sample import write_sample

    write_sample(out, force)
    stderr.print(f"wrote {out}")
