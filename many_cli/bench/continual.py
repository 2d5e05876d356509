"""`many bench continual`: a miniature continual instruction-tuning benchmark on the synthetic
world. For each seed and each kind of base (a generalist pretrained on the broad mixture, and a
blank one that knows nothing), it trains one adapter per task from the base, one adapter through
all tasks in sequence, gathers statistics with `many stats`, merges after every task with each
method through `many merge`, and scores every system on the held-out sets with `many infer`'s
greedy decoding and exact-match rule.
"""

from __future__ import annotations

import shutil
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from many_cli.bench.layerwise import layerwise_adapters
from many_cli.bench.training import TrainOptions, build_base, train_adapter, train_sequentially
from many_cli.bench.world import TASKS, write_split
from many_cli.data import Record
from many_cli.formats import read_records
from many_cli.infer import InferOptions, MergedModel, answer_all, load_merged, load_processor, load_task_projectors
from many_cli.merge import DEFAULT_ETA, DEFAULT_RIDGE, MergeOptions, merge
from many_cli.models import apply_adapters, load_adapted_model, load_base_model
from many_cli.options import Placement
from many_cli.report import Predictions, build_report, scores
from many_cli.state import BUNDLE_FILE, read_bundle_header
from many_cli.stats import StatsOptions, collect_stats

UPPER = "each adapter alone (upper bound)"
SEQUENTIAL = "sequential fine-tuning"
LPM = "LPM alone (last projector)"
CPM = "CPM alone (averaged LoRA)"
MANY = "MAny (LPM + CPM)"
EXPERTS = "MAny + routed experts"
# Routing: the defaults route each image to its nearest calibration image's task (issue 15);
# the paper routes softly by prototypes.
MANY_SOFT = "MAny, the paper's routing (soft, by prototypes)"
MANY_HARD = "MAny, hard routing by prototypes"
EXPERTS_SOFT = "MAny + routed experts, the paper's routing (soft, by prototypes)"
SOFT = InferOptions(device="cpu", routing="soft")
ETA = "eta (soft routing)"  # η only weighs soft routing
BASELINES = {
    "average": "average (last projector)",
    "task-arithmetic": "task arithmetic (last projector)",
    "ties": "TIES (last projector)",
}
REGMEAN = "RegMean as FusionBench runs it (last projector)"
REGMEAN_CPM = "RegMean as FusionBench runs it + CPM"
# FusionBench's RegMean: each task's mean covariance (--balance), off-diagonals × 0.6, no ridge.
REGMEAN_OPTIONS = MergeOptions(balance=True, alpha=0.6, ridge=0.0)
# Issue 15's leads: MAny with one change each, scored after every task as MAny is.
LEAD_ALPHA = "MAny, α = 0.6 (RegMean's off-diagonal reduction)"
LEAD_ANSWERS = "MAny, answer positions × 64"
LEAD_LAYERWISE = "MAny, layer by layer (RegMean++)"
LEAD_MODULEWISE = "MAny, module group by group (RegMean++)"
SYSTEMS = (
    UPPER,
    SEQUENTIAL,
    *BASELINES.values(),
    REGMEAN,
    LPM,
    CPM,
    REGMEAN_CPM,
    MANY_SOFT,
    MANY_HARD,
    MANY,
    LEAD_ALPHA,
    LEAD_ANSWERS,
    LEAD_LAYERWISE,
    LEAD_MODULEWISE,
    EXPERTS_SOFT,
    EXPERTS,
)
BASES = {"generalist": True, "blank": False}  # kind -> pretrained on the broad mixture


@dataclass(frozen=True)
class ContinualOptions:
    seeds: tuple[int, ...] = (0, 1, 2)
    bases: tuple[str, ...] = tuple(BASES)
    train: TrainOptions = TrainOptions()
    calibration: int = 32  # records per task for `many stats`
    evaluation: int = 48  # held-out records per task
    ridges: tuple[float, ...] = (0.0, 1e-6, 1e-4, 1e-2, 1.0)
    etas: tuple[float, ...] = (0.01, 0.05, 0.2, 1.0)
    calibration_sizes: tuple[int, ...] = (2, 8, 32)
    ranks: tuple[int, ...] = (8, 16, 32)  # merge --rank: the serving budget (Σ r_i = 32 here)
    alphas: tuple[float, ...] = (1.0, 0.6, 0.3, 0.1)  # merge --alpha: RegMean's off-diagonal reduction
    answer_weights: tuple[float, ...] = (1.0, 4.0, 16.0, 64.0)  # stats --answer-weight


Scores = dict[str, float]  # task -> accuracy
Rows = list[dict]  # `many infer`'s prediction rows of one step


@dataclass
class WorldRun:
    """One seed on one base: per system, its prediction rows after each step, read as `many
    report` reads a user's run, so that the benchmark and the users' reports cannot disagree."""

    base: str
    seed: int
    steps: dict[str, list[Rows]] = field(default_factory=dict)
    sweeps: dict[tuple[str, float], float] = field(default_factory=dict)  # (setting, value) -> MAny FAA

    def report(self, system: str) -> dict:
        return report_of(self.steps[system], system)

    def final(self, system: str) -> Scores:
        report = self.report(system)
        return dict(zip(report["tasks"], report["accuracy_matrix"][-1]))

    def faa(self, system: str) -> float:
        return self.report(system)["final_average_accuracy"]

    def forgetting(self, system: str) -> float | None:
        return self.report(system)["average_forgetting"]

    @property
    def routing(self) -> Scores:
        """Task -> share of its images MAny's last step routed to it (nearest calibration image)."""
        return self.report(MANY)["routing_accuracy"]

    @property
    def prototype_routing(self) -> Scores:
        """The same by the closest prototype (the paper's soft routing)."""
        return self.report(MANY_SOFT)["routing_accuracy"]


def report_of(steps: list[Rows], system: str) -> dict:
    """`many report`'s figures for one system's steps (each step named by the system)."""
    return build_report(
        [
            Predictions(Path(f"{system}, step {number}"), {"tasks": list(scores(rows)), "fingerprint": system}, rows)
            for number, rows in enumerate(steps, start=1)
        ]
    )


@dataclass(frozen=True)
class TrainedWorld:
    base: str
    adapters: list[Path]  # one per task, trained from the base, with its stats file
    sequential: list[Path]  # the sequential fine-tune after each task
    calibration: dict[str, Path]
    evaluation: dict[str, list[Record]]

    def seen(self, steps: int) -> list[Record]:
        return [record for task in TASKS[:steps] for record in self.evaluation[task.name]]


def run_world(
    root: Path, base_kind: str, seed: int, options: ContinualOptions, say: Callable[[str], None] = lambda message: None
) -> WorldRun:
    run = WorldRun(base_kind, seed)
    say(f"[{base_kind} seed {seed}] base, data, {len(TASKS)} adapters and the sequential fine-tune")
    world = _train_world(root, base_kind, seed, options)
    say(f"[{base_kind} seed {seed}] merging after every task and scoring")
    _score_steps(run, world, root)
    if options.ridges or options.etas or options.calibration_sizes:
        say(f"[{base_kind} seed {seed}] MAny against ridge, η and calibration size")
        _sweep(run, world, root, options)
    return run


def _train_world(root: Path, base_kind: str, seed: int, options: ContinualOptions) -> TrainedWorld:
    base = build_base(root / "base", BASES[base_kind], seed, options.train)
    calibration, evaluation = {}, {}
    for task in TASKS:
        folder = root / "data" / task.name
        calibration[task.name] = write_split(folder, task, "calibration", options.calibration, seed)
        evaluation[task.name] = list(read_records(write_split(folder, task, "evaluation", options.evaluation, seed)))
    adapters = [train_adapter(base, task, root / "adapters" / task.name, seed, options.train) for task in TASKS]
    for adapter, task in zip(adapters, TASKS):
        collect_stats(str(base), adapter, calibration[task.name], None, StatsOptions(device="cpu"))
    sequential = train_sequentially(base, TASKS, root / "sequential", seed, options.train)
    return TrainedWorld(str(base), adapters, sequential, calibration, evaluation)


def _score_steps(run: WorldRun, world: TrainedWorld, root: Path) -> None:
    """Every system after every task, on the tasks seen so far; the routing of MAny's last step."""
    base, names = world.base, [task.name for task in TASKS]
    run.steps[UPPER] = [
        [
            row
            for name, adapter in zip(names, world.adapters)
            for row in _rows(_adapted(base, adapter), world.evaluation[name])
        ]
    ]
    for system in SYSTEMS[1:]:
        run.steps[system] = []
    answer_weighted = _restat(world, root / "leads" / "answers", StatsOptions(device="cpu", answer_weight=64.0))
    for step in range(1, len(TASKS) + 1):
        seen = world.seen(step)
        run.steps[SEQUENTIAL].append(_rows(_adapted(base, world.sequential[step - 1]), seen))
        merged = {
            method: _merge(world.adapters[:step], root / "merged" / f"{method}_{step}", MergeOptions(method=method))
            for method in ("many", *BASELINES)
        }
        merged["regmean"] = _merge(world.adapters[:step], root / "merged" / f"regmean_{step}", REGMEAN_OPTIONS)
        for method, system in BASELINES.items():
            run.steps[system].append(_rows(_fixed_projector(base, merged[method], step - 1), seen))
        run.steps[REGMEAN].append(_rows(_fixed_projector(base, merged["regmean"], step - 1), seen))
        run.steps[REGMEAN_CPM].append(_rows(load_merged(base, merged["regmean"], InferOptions(device="cpu")), seen))
        run.steps[LPM].append(_rows(_fixed_projector(base, merged["many"], step - 1), seen))
        run.steps[CPM].append(_rows(load_merged(base, merged["average"], InferOptions(device="cpu")), seen))
        run.steps[MANY].append(_rows(load_merged(base, merged["many"], InferOptions(device="cpu")), seen))
        run.steps[MANY_SOFT].append(_rows(load_merged(base, merged["many"], SOFT), seen))
        run.steps[MANY_HARD].append(_rows(load_merged(base, merged["many"], replace(SOFT, routing="hard")), seen))
        for system, options in ((EXPERTS, InferOptions(device="cpu")), (EXPERTS_SOFT, SOFT)):
            run.steps[system].append(
                _rows(load_merged(base, merged["many"], replace(options, lm_routing="experts")), seen)
            )
        calibration = [world.calibration[task.name] for task in TASKS[:step]]
        layerwise = layerwise_adapters(base, world.adapters[:step], calibration, root / "leads" / f"layerwise_{step}")
        modulewise = layerwise_adapters(
            base, world.adapters[:step], calibration, root / "leads" / f"modulewise_{step}", by_module=True
        )
        for system, name, adapters, options in (
            (LEAD_ALPHA, "alpha", world.adapters, MergeOptions(alpha=0.6)),
            (LEAD_ANSWERS, "answers", answer_weighted, MergeOptions()),
            (LEAD_LAYERWISE, "layerwise", layerwise, MergeOptions()),
            (LEAD_MODULEWISE, "modulewise", modulewise, MergeOptions()),
        ):
            out = _merge(adapters[:step], root / "leads" / f"{name}_merged_{step}", options)
            run.steps[system].append(_rows(load_merged(base, out, InferOptions(device="cpu")), seen))


def _sweep(run: WorldRun, world: TrainedWorld, root: Path, options: ContinualOptions) -> None:
    """MAny's FAA with one setting changed at a time: ridge, η, calibration records per task,
    the merged adapter's rank budget."""
    base, seen = world.base, world.seen(len(TASKS))
    for ridge in options.ridges:
        out = _merge(world.adapters, root / "sweep" / f"ridge_{ridge}", MergeOptions(ridge=ridge))
        run.sweeps[("ridge", ridge)] = _faa(_rows(load_merged(base, out, InferOptions(device="cpu")), seen))
    for rank in options.ranks:
        out = _merge(world.adapters, root / "sweep" / f"rank_{rank}", MergeOptions(rank=rank))
        run.sweeps[("rank", rank)] = _faa(_rows(load_merged(base, out, InferOptions(device="cpu")), seen))
    for alpha in options.alphas:
        out = _merge(world.adapters, root / "sweep" / f"alpha_{alpha}", MergeOptions(alpha=alpha))
        run.sweeps[("alpha", alpha)] = _faa(_rows(load_merged(base, out, InferOptions(device="cpu")), seen))
    for weight in options.answer_weights:
        copies = _restat(
            world, root / "sweep" / f"answer_weight_{weight}", StatsOptions(device="cpu", answer_weight=weight)
        )
        out = _merge(copies, root / "sweep" / f"answer_weight_{weight}_merged", MergeOptions())
        run.sweeps[("answer weight", weight)] = _faa(_rows(load_merged(base, out, InferOptions(device="cpu")), seen))
    final = root / "merged" / f"many_{len(TASKS)}"
    for eta in options.etas:
        run.sweeps[(ETA, eta)] = _faa(_rows(load_merged(base, final, replace(SOFT, eta=eta)), seen))
    for size in options.calibration_sizes:
        copies = _restat(world, root / "sweep" / f"calibration_{size}", StatsOptions(device="cpu", max_samples=size))
        out = _merge(copies, root / "sweep" / f"calibration_{size}_merged", MergeOptions())
        run.sweeps[("calibration", size)] = _faa(_rows(load_merged(base, out, InferOptions(device="cpu")), seen))


def _restat(world: TrainedWorld, folder: Path, options: StatsOptions) -> list[Path]:
    """Copies of the task adapters with their stats taken again under `options`."""
    copies = []
    for adapter, task in zip(world.adapters, TASKS):
        copy = shutil.copytree(adapter, folder / task.name, dirs_exist_ok=True)
        collect_stats(world.base, copy, world.calibration[task.name], None, replace(options, force=True))
        copies.append(copy)
    return copies


def _merge(adapters: list[Path], out: Path, options: MergeOptions) -> Path:
    merge(adapters, out, replace(options, force=True))
    return out


def _adapted(base: str, adapter: Path) -> MergedModel:
    """base + one adapter (its LoRA and its projector), as PEFT loads it."""
    model = load_adapted_model(base, adapter, torch.device("cpu"), Placement(dtype="float32"))
    return MergedModel(model, load_processor(base), None, torch.device("cpu"))


def _fixed_projector(base: str, merged: Path, index: int) -> MergedModel:
    """The merged LoRA with one task's projector (a merge without CPM)."""
    model = apply_adapters(
        load_base_model(base, torch.device("cpu"), Placement(dtype="float32")), base, [(merged, "default")]
    ).merge_and_unload()
    bundle = read_bundle_header(merged / BUNDLE_FILE)
    load_task_projectors(model, bundle, index)
    return MergedModel(model.eval(), load_processor(base), None, torch.device("cpu"))


def _rows(model: MergedModel, records: list[Record]) -> Rows:
    """The rows `many infer --data` would write for these records."""
    return [
        prediction.as_json() for prediction in answer_all(model, records, InferOptions(max_new_tokens=3, batch_size=64))
    ]


def _faa(rows: Rows) -> float:
    return report_of([rows], "sweep")["final_average_accuracy"]


def run_benchmark(
    root: Path, options: ContinualOptions, say: Callable[[str], None] = lambda message: None
) -> list[WorldRun]:
    return [
        run_world(root / f"{base}_{seed}", base, seed, options, say) for base in options.bases for seed in options.seeds
    ]


def _mean_spread(values: list[float], percent: bool = True) -> str:
    scale = 100 if percent else 1
    mean = statistics.fmean(values) * scale
    if len(values) < 2:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {statistics.stdev(values) * scale:.1f}"


def markdown(runs: list[WorldRun], options: ContinualOptions) -> str:
    """Per base: per-task accuracy, FAA and forgetting of every system (mean ± standard deviation
    over seeds, in %), routing accuracy, and MAny's FAA against ridge, η and calibration size."""
    names = [task.name for task in TASKS]
    lines = []
    for base in dict.fromkeys(run.base for run in runs):
        group = [run for run in runs if run.base == base]
        lines += [
            f"### {base} base ({len(group)} seed{'s' * (len(group) > 1)}; accuracy in %, mean ± std)",
            "",
            "| system | " + " | ".join(names) + " | FAA | forgetting |",
            "|---" * (len(names) + 3) + "|",
        ]
        upper = statistics.fmean(run.faa(UPPER) for run in group)
        for system in SYSTEMS:
            cells = [_mean_spread([run.final(system)[name] for run in group]) for name in names]
            forgetting = [run.forgetting(system) for run in group]
            faa = _mean_spread([run.faa(system) for run in group])
            bold = "**" if system in (MANY, EXPERTS) else ""
            lines.append(
                f"| {bold}{system}{bold} | "
                + " | ".join(cells)
                + f" | {bold}{faa}{bold} | "
                + ("—" if forgetting[0] is None else _mean_spread(forgetting))
                + " |"
            )
        for label, found in (
            ("nearest calibration image", lambda run: run.routing),
            ("prototype arg-max", lambda run: run.prototype_routing),
        ):
            routing = [_mean_spread([found(run)[name] for run in group]) for name in names]
            lines.append(
                f"| routing accuracy ({label} = true task) | "
                + " | ".join(routing)
                + " | "
                + _mean_spread([statistics.fmean(found(run).values()) for run in group])
                + " | |"
            )
        lines.append("")
        if upper > 0:  # adapters trained too briefly may know nothing
            ratios = [
                f"{system}: {statistics.fmean(run.faa(system) for run in group) / upper:.3f}"
                for system in (MANY_SOFT, MANY, LEAD_MODULEWISE, EXPERTS_SOFT, EXPERTS)
            ]
            lines += ["FAA / upper bound: " + "; ".join(ratios) + ".", ""]
        routed = [(run, name) for run in group for name in names if run.routing[name] >= 0.98]
        if routed:
            ratio = statistics.fmean(run.final(EXPERTS)[name] for run, name in routed) / statistics.fmean(
                run.final(UPPER)[name] for run, name in routed
            )
            lines += [
                f"Where routing reached 98% ({len(routed)} of {len(group) * len(names)} task runs), "
                f"routed experts / upper bound: {ratio:.3f}.",
                "",
            ]
        sweeps = sorted({key for run in group for key in run.sweeps}, key=lambda key: (key[0], key[1]))
        if sweeps:
            lines += [
                f"MAny's FAA (%) on the {base} base against one setting (others at their defaults: "
                f"nearest-image routing (η {DEFAULT_ETA:g} under soft routing), ridge {DEFAULT_RIDGE:g}, "
                f"calibration {options.calibration}, rank Σ r_i "
                f"= {len(TASKS) * options.train.rank}, α 1, answer weight 1):",
                "",
                "| setting | value | FAA |",
                "|---|---|---|",
            ]
            for setting, value in sweeps:
                lines.append(
                    f"| {setting} | {value:g} | {_mean_spread([run.sweeps[(setting, value)] for run in group])} |"
                )
            lines.append("")
    return "\n".join(lines)


def plot(runs: list[WorldRun], path: Path) -> None:
    """FAA of every system per base (bars, spread as error bars), and MAny's FAA against the
    ridge, η and the calibration size (one line per base)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bases = list(dict.fromkeys(run.base for run in runs))
    figure, axes = plt.subplots(1, 4, figsize=(20, 4.8), gridspec_kw={"width_ratios": [2.4, 1, 1, 1]})
    width = 0.8 / len(bases)
    for offset, base in enumerate(bases):
        group = [run for run in runs if run.base == base]
        values = [[100 * run.faa(system) for run in group] for system in SYSTEMS]
        axes[0].bar(
            [index + offset * width for index in range(len(SYSTEMS))],
            [statistics.fmean(v) for v in values],
            width,
            yerr=[statistics.stdev(v) if len(v) > 1 else 0 for v in values],
            label=f"{base} base",
            capsize=2,
        )
        for axis, setting, label in zip(
            axes[1:],
            ("ridge", ETA, "calibration"),
            ("ridge ρ", "η (CPM temperature, soft routing)", "calibration records per task"),
        ):
            keys = sorted(key for key in group[0].sweeps if key[0] == setting)
            xs = [value for _, value in keys]
            if setting == "ridge":  # a log axis cannot show 0: put it one decade below the smallest
                positive = [x for x in xs if x > 0]
                xs = [x if x > 0 else min(positive) / 10 for x in xs]
            axis.plot(
                xs,
                [100 * statistics.fmean(run.sweeps[key] for run in group) for key in keys],
                marker="o",
                label=f"{base} base",
            )
            axis.set_xscale("log")
            axis.set_xticks(xs, ["0" if value == 0 else f"{value:g}" for _, value in keys])
            axis.minorticks_off()
            axis.set_xlabel(label)
            axis.set_ylabel("MAny FAA (%)")
            axis.set_ylim(0, 102)
            axis.legend(fontsize=8)
    axes[0].set_xticks(
        [index + width * (len(bases) - 1) / 2 for index in range(len(SYSTEMS))],
        [system.replace(" (", "\n(") for system in SYSTEMS],
        rotation=30,
        ha="right",
        fontsize=8,
    )
    axes[0].set_ylabel("final average accuracy (%)")
    axes[0].set_ylim(0, 102)
    axes[0].legend(fontsize=8)
    axes[0].set_title("held-out accuracy after the last task")
    figure.tight_layout()
    figure.savefig(path, dpi=90, format="png")
    plt.close(figure)
