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
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from many_cli.bench.training import TrainOptions, build_base, train_adapter, train_jointly, train_sequentially
from many_cli.bench.world import TASKS, WorldTask, write_split
from many_cli.data import Record
from many_cli.families import module_at
from many_cli.formats import read_records
from many_cli.infer import InferOptions, MergedModel, answer_all, load_merged, load_processor, load_task_adapter
from many_cli.infer.load import bundled_modules, load_task_module
from many_cli.merge import DEFAULT_ETA, DEFAULT_RIDGE, MergeOptions, merge
from many_cli.models import apply_adapters, load_base_model
from many_cli.options import Placement
from many_cli.report import Predictions, build_report
from many_cli.rows import scores
from many_cli.state import BUNDLE_FILE, STATS_FILE, read_bundle_header
from many_cli.stats import StatsOptions, collect_stats
from many_cli.stats.walk import walker

UPPER = "each adapter alone (upper bound)"
JOINT = "joint multi-task fine-tuning (one LoRA of rank Σ r_i)"
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
# Issue 36's: the statistics taken again in the merged model (`many stats --under`), merged again,
# REFINEMENTS times; a module's inputs depend only on the stages below it, so the refinements
# reach RegMean++'s layer-by-layer merge, one stage of a layer's four (q/k/v, o, gate/up, down) each.
REFINEMENTS = 4
LEAD_UNDER_ONCE = "MAny, inputs of the merged model (1 refinement)"
LEAD_UNDER = f"MAny, inputs of the merged model ({REFINEMENTS} refinements, RegMean++)"
# Issue 44's: RegMean++ in one walk (`many merge --one-pass`), what the refinements tend to (it
# replaced "4 refinements + answer positions × 64", which scored as its one-pass row in every run).
ONE_PASS = "MAny, RegMean++ in one pass (merge --one-pass)"
ONE_PASS_ANSWERS = "MAny, RegMean++ in one pass + answer positions × 64"
SYSTEMS = (
    UPPER,
    JOINT,
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
    LEAD_UNDER_ONCE,
    LEAD_UNDER,
    ONE_PASS,
    ONE_PASS_ANSWERS,
    EXPERTS_SOFT,
    EXPERTS,
)
# The systems whose cost the benchmark measures: what one step of the CI job does for each.
COSTED = (MANY, LEAD_ANSWERS, LEAD_UNDER_ONCE, LEAD_UNDER, ONE_PASS, ONE_PASS_ANSWERS, EXPERTS)
ORDERS = {"forward": TASKS, "reverse": TASKS[::-1]}
BASES = {"generalist": True, "blank": False}  # kind -> pretrained on the broad mixture


@dataclass(frozen=True)
class ContinualOptions:
    seeds: tuple[int, ...] = (0, 1, 2)
    bases: tuple[str, ...] = tuple(BASES)
    orders: tuple[str, ...] = tuple(ORDERS)  # the task orders, each run on the same trained adapters
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
class Cost:
    """What a system's CI steps took: stats passes over one task's calibration data, seconds of
    `many stats` and `many merge`, and the bytes of its stats files and merge output (last step)."""

    passes: list[int] = field(default_factory=list)  # per step
    seconds: list[float] = field(default_factory=list)  # per step
    disk: int = 0


@dataclass
class WorldRun:
    """One seed on one base: per system, its prediction rows after each step, read as `many
    report` reads a user's run, so that the benchmark and the users' reports cannot disagree."""

    base: str
    seed: int
    order: str = "forward"
    steps: dict[str, list[Rows]] = field(default_factory=dict)
    costs: dict[str, Cost] = field(default_factory=dict)
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

    def worst_forgetting(self, system: str) -> float | None:
        lost = [value for value in self.report(system)["forgetting"].values() if value is not None]
        return max(lost) if lost else None

    def backward_transfer(self, system: str) -> float | None:
        return self.report(system)["backward_transfer"]

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
    adapters: dict[str, Path]  # task -> its adapter, trained from the base, with its stats file
    stats_seconds: dict[str, float]  # task -> its `many stats` run
    calibration: dict[str, Path]
    evaluation: dict[str, list[Record]]
    joint: Path  # one adapter trained on every task at once

    def seen(self, tasks: tuple[WorldTask, ...]) -> list[Record]:
        return [record for task in tasks for record in self.evaluation[task.name]]


def run_world(
    root: Path, base_kind: str, seed: int, options: ContinualOptions, say: Callable[[str], None] = lambda message: None
) -> list[WorldRun]:
    """One seed on one base: the base and the per-task adapters trained once, then each task
    order merged, fine-tuned sequentially and scored; the sweeps in the first order."""
    say(f"[{base_kind} seed {seed}] base, data and {len(TASKS)} adapters")
    world = _train_world(root, base_kind, seed, options)
    runs = []
    for order in options.orders:
        run = WorldRun(base_kind, seed, order)
        say(f"[{base_kind} seed {seed}, {order}] the sequential fine-tune, merging after every task and scoring")
        _score_steps(run, world, root / order, options.train)
        runs.append(run)
    if options.ridges or options.etas or options.calibration_sizes:
        say(f"[{base_kind} seed {seed}] MAny against ridge, η and calibration size")
        _sweep(runs[0], world, root / options.orders[0], ORDERS[options.orders[0]], options)
    return runs


def _train_world(root: Path, base_kind: str, seed: int, options: ContinualOptions) -> TrainedWorld:
    base = build_base(root / "base", BASES[base_kind], seed, options.train)
    calibration, evaluation, adapters, seconds = {}, {}, {}, {}
    for task in TASKS:
        folder = root / "data" / task.name
        calibration[task.name] = write_split(folder, task, "calibration", options.calibration, seed)
        evaluation[task.name] = list(read_records(write_split(folder, task, "evaluation", options.evaluation, seed)))
        adapters[task.name] = train_adapter(base, task, root / "adapters" / task.name, seed, options.train)
        start = time.perf_counter()
        collect_stats(str(base), adapters[task.name], calibration[task.name], None, StatsOptions(device="cpu"))
        seconds[task.name] = time.perf_counter() - start
    joint = train_jointly(base, TASKS, root / "joint", seed, options.train)
    return TrainedWorld(str(base), adapters, seconds, calibration, evaluation, joint)


def _score_steps(run: WorldRun, world: TrainedWorld, root: Path, train: TrainOptions) -> None:
    """Every system after every task of the run's order, on the tasks seen so far; each costed
    system's passes, seconds and disk."""
    base, tasks = world.base, ORDERS[run.order]
    adapters = [world.adapters[task.name] for task in tasks]
    sequential = train_sequentially(Path(base), tasks, root / "sequential", run.seed, train)
    run.steps[UPPER] = [
        [row for task in tasks for row in _rows(_adapted(base, world.adapters[task.name]), world.evaluation[task.name])]
    ]
    run.steps[JOINT] = [_rows(_adapted(base, world.joint), world.seen(tasks))]
    for system in SYSTEMS[2:]:
        run.steps[system] = []
    run.costs = {system: Cost() for system in COSTED}
    answers_seconds: dict[str, float] = {}
    answer_weighted = _restat(
        world, tasks, root / "leads" / "answers", StatsOptions(device="cpu", answer_weight=64.0), answers_seconds
    )
    for step in range(1, len(tasks) + 1):
        seen, new = world.seen(tasks[:step]), tasks[step - 1].name
        run.steps[SEQUENTIAL].append(_rows(_adapted(base, sequential[step - 1]), seen))
        merged, seconds = {}, {}
        for method in ("many", *BASELINES):
            merged[method], seconds[method] = _timed_merge(
                adapters[:step], root / "merged" / f"{method}_{step}", MergeOptions(method=method)
            )
        merged["regmean"] = _merge(adapters[:step], root / "merged" / f"regmean_{step}", REGMEAN_OPTIONS)
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
        today = world.stats_seconds[new] + seconds["many"]
        for system in (MANY, EXPERTS):
            _charge(run.costs[system], 1, today, adapters[:step], merged["many"])
        alpha, _ = _timed_merge(adapters[:step], root / "leads" / f"alpha_merged_{step}", MergeOptions(alpha=0.6))
        run.steps[LEAD_ALPHA].append(_rows(load_merged(base, alpha, InferOptions(device="cpu")), seen))
        answers, merging = _timed_merge(
            answer_weighted[:step], root / "leads" / f"answers_merged_{step}", MergeOptions()
        )
        run.steps[LEAD_ANSWERS].append(_rows(load_merged(base, answers, InferOptions(device="cpu")), seen))
        weighted = answers_seconds[new] + merging
        _charge(run.costs[LEAD_ANSWERS], 1, weighted, answer_weighted[:step], answers)
        copies = [
            shutil.copytree(adapter, root / "leads" / f"under_{step}" / adapter.name) for adapter in adapters[:step]
        ]
        under, spent = merged["many"], today
        for refinement in range(1, REFINEMENTS + 1):
            clock = time.perf_counter()
            for copy, task in zip(copies, tasks):
                collect_stats(
                    base, copy, world.calibration[task.name], None, StatsOptions(device="cpu", under=under, force=True)
                )
            under = _merge(copies, root / "leads" / f"under_{step}_merged_{refinement}", MergeOptions())
            spent += time.perf_counter() - clock
            for system, after in ((LEAD_UNDER_ONCE, 1), (LEAD_UNDER, REFINEMENTS)):
                if refinement == after:
                    run.steps[system].append(_rows(load_merged(base, under, InferOptions(device="cpu")), seen))
                    _charge(run.costs[system], 1 + refinement * step, spent, copies, under)
        calibration = [world.calibration[task.name] for task in tasks[:step]]
        for system, stated, weight, spent in (
            (ONE_PASS, adapters, 1.0, world.stats_seconds[new]),
            (ONE_PASS_ANSWERS, answer_weighted, 64.0, answers_seconds[new]),
        ):
            clock, out = time.perf_counter(), root / "leads" / f"one_pass_{weight:g}_{step}"
            walked = MergeOptions(one_pass=True, model=Path(base), force=True)
            merge(stated[:step], out, walked, open_walk=walker(walked, calibration))
            run.steps[system].append(_rows(load_merged(base, out, InferOptions(device="cpu")), seen))
            # the new task's `many stats`, then the walk: every seen task's data through the model once
            _charge(run.costs[system], 1 + step, spent + time.perf_counter() - clock, stated[:step], out)


def _timed_merge(adapters: list[Path], out: Path, options: MergeOptions) -> tuple[Path, float]:
    start = time.perf_counter()
    _merge(adapters, out, options)
    return out, time.perf_counter() - start


def _charge(cost: Cost, passes: int, seconds: float, adapters: list[Path], merged: Path) -> None:
    """One step's cost; the disk is the step's stats files and merge output (the last step's stays)."""
    cost.passes.append(passes)
    cost.seconds.append(seconds)
    files = [adapter / STATS_FILE for adapter in adapters] + [path for path in merged.rglob("*") if path.is_file()]
    cost.disk = sum(path.stat().st_size for path in files)


def _sweep(
    run: WorldRun, world: TrainedWorld, root: Path, tasks: tuple[WorldTask, ...], options: ContinualOptions
) -> None:
    """MAny's FAA with one setting changed at a time: ridge, η, calibration records per task,
    the merged adapter's rank budget."""
    base, seen = world.base, world.seen(tasks)
    adapters = [world.adapters[task.name] for task in tasks]
    for ridge in options.ridges:
        out = _merge(adapters, root / "sweep" / f"ridge_{ridge}", MergeOptions(ridge=ridge))
        run.sweeps[("ridge", ridge)] = _faa(_rows(load_merged(base, out, InferOptions(device="cpu")), seen))
    for rank in options.ranks:
        out = _merge(adapters, root / "sweep" / f"rank_{rank}", MergeOptions(rank=rank))
        run.sweeps[("rank", rank)] = _faa(_rows(load_merged(base, out, InferOptions(device="cpu")), seen))
    for alpha in options.alphas:
        out = _merge(adapters, root / "sweep" / f"alpha_{alpha}", MergeOptions(alpha=alpha))
        run.sweeps[("alpha", alpha)] = _faa(_rows(load_merged(base, out, InferOptions(device="cpu")), seen))
    for weight in options.answer_weights:
        copies = _restat(
            world, tasks, root / "sweep" / f"answer_weight_{weight}", StatsOptions(device="cpu", answer_weight=weight)
        )
        out = _merge(copies, root / "sweep" / f"answer_weight_{weight}_merged", MergeOptions())
        run.sweeps[("answer weight", weight)] = _faa(_rows(load_merged(base, out, InferOptions(device="cpu")), seen))
    final = root / "merged" / f"many_{len(TASKS)}"
    for eta in options.etas:
        run.sweeps[(ETA, eta)] = _faa(_rows(load_merged(base, final, replace(SOFT, eta=eta)), seen))
    for size in options.calibration_sizes:
        stats = StatsOptions(device="cpu", max_samples=size)
        copies = _restat(world, tasks, root / "sweep" / f"calibration_{size}", stats)
        out = _merge(copies, root / "sweep" / f"calibration_{size}_merged", MergeOptions())
        run.sweeps[("calibration", size)] = _faa(_rows(load_merged(base, out, InferOptions(device="cpu")), seen))


def _restat(
    world: TrainedWorld,
    tasks: tuple[WorldTask, ...],
    folder: Path,
    options: StatsOptions,
    seconds: dict[str, float] | None = None,
) -> list[Path]:
    """Copies of the tasks' adapters, in order, with their stats taken again under `options`
    (each run's seconds into `seconds`)."""
    copies = []
    for task in tasks:
        copy = shutil.copytree(world.adapters[task.name], folder / task.name, dirs_exist_ok=True)
        start = time.perf_counter()
        collect_stats(world.base, copy, world.calibration[task.name], None, replace(options, force=True))
        if seconds is not None:
            seconds[task.name] = time.perf_counter() - start
        copies.append(copy)
    return copies


def _merge(adapters: list[Path], out: Path, options: MergeOptions) -> Path:
    merge(adapters, out, replace(options, force=True))
    return out


def _adapted(base: str, adapter: Path) -> MergedModel:
    """base + one adapter (its LoRA and its projector), as PEFT loads it."""
    model = load_task_adapter(base, adapter, InferOptions(device="cpu", dtype="float32", fold=False)).model
    return MergedModel(model, load_processor(base), None, torch.device("cpu"))


def _fixed_projector(base: str, merged: Path, index: int) -> MergedModel:
    """The merged LoRA with one task's projector (a merge without CPM)."""
    model = apply_adapters(
        load_base_model(base, torch.device("cpu"), Placement(dtype="float32")), base, [(merged, "default")]
    ).merge_and_unload()
    bundle = read_bundle_header(merged / BUNDLE_FILE)
    for path in bundled_modules(model, bundle):
        load_task_module(module_at(model, path), bundle, index, path)
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
        run
        for base in options.bases
        for seed in options.seeds
        for run in run_world(root / f"{base}_{seed}", base, seed, options, say)
    ]


def _mean_spread(values: list[float], percent: bool = True) -> str:
    scale = 100 if percent else 1
    mean = statistics.fmean(values) * scale
    if len(values) < 2:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {statistics.stdev(values) * scale:.1f}"


def _spread_or_dash(values: list[float | None]) -> str:
    return "—" if any(value is None for value in values) else _mean_spread(values)


def markdown(runs: list[WorldRun], options: ContinualOptions) -> str:
    """Per base: per-task accuracy, FAA, average and worst forgetting and backward transfer of
    every system (mean ± standard deviation over seeds and task orders, in %), routing accuracy,
    what a CI step of each costed system costs, and MAny's FAA against each swept setting."""
    names = [task.name for task in TASKS]
    lines = []
    for base in dict.fromkeys(run.base for run in runs):
        group = [run for run in runs if run.base == base]
        seeds, orders = len({run.seed for run in group}), list(dict.fromkeys(run.order for run in group))
        lines += [
            f"### {base} base, {options.train.layers} layers ({seeds} seed{'s' * (seeds > 1)} × {len(orders)} "
            f"task order{'s' * (len(orders) > 1)} "
            f"({', '.join(orders)}); accuracy in %, mean ± std over the {len(group)} runs)",
            "",
            "| system | " + " | ".join(names) + " | FAA | forgetting | worst forgetting | backward transfer |",
            "|---" * (len(names) + 5) + "|",
        ]
        upper = statistics.fmean(run.faa(UPPER) for run in group)
        for system in SYSTEMS:
            cells = [_mean_spread([run.final(system)[name] for run in group]) for name in names]
            faa = _mean_spread([run.faa(system) for run in group])
            bold = "**" if system in (MANY, EXPERTS) else ""
            lines.append(
                f"| {bold}{system}{bold} | "
                + " | ".join(cells)
                + f" | {bold}{faa}{bold} | "
                + " | ".join(
                    _spread_or_dash([measure(run, system) for run in group])
                    for measure in (WorldRun.forgetting, WorldRun.worst_forgetting, WorldRun.backward_transfer)
                )
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
                + " | | | |"
            )
        lines.append("")
        if upper > 0:  # adapters trained too briefly may know nothing
            ratios = [
                f"{system}: {statistics.fmean(run.faa(system) for run in group) / upper:.3f}"
                for system in (MANY_SOFT, *COSTED[:-1], EXPERTS_SOFT, EXPERTS)
            ]
            lines += ["FAA / upper bound: " + "; ".join(ratios) + ".", ""]
        joint = statistics.fmean(run.faa(JOINT) for run in group)
        if joint > 0:  # the other ceiling: one model of the merged rank trained on every task at once
            ratios = [
                f"{system}: {statistics.fmean(run.faa(system) for run in group) / joint:.3f}"
                for system in (MANY, LEAD_UNDER, ONE_PASS, ONE_PASS_ANSWERS, EXPERTS)
            ]
            lines += ["FAA / joint multi-task fine-tuning: " + "; ".join(ratios) + ".", ""]
        lines += _cost_table(group)
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


def _cost_table(group: list[WorldRun]) -> list[str]:
    """What one CI step of each costed system takes, over the group's runs."""
    steps = len(TASKS)
    lines = [
        "What a CI step costs (mean over the steps and runs; the stats passes are over one task's "
        "calibration data; seconds of `many stats` and `many merge`, not of scoring):",
        "",
        f"| system | stats passes a step (at step {steps}) | seconds a step (at step {steps}) | "
        f"disk at step {steps}: stats files + merge output (MB) |",
        "|---|---|---|---|",
    ]
    for system in COSTED:
        costs = [run.costs[system] for run in group]
        passes = statistics.fmean(value for cost in costs for value in cost.passes)
        last = statistics.fmean(cost.passes[-1] for cost in costs)
        seconds = statistics.fmean(value for cost in costs for value in cost.seconds)
        final = statistics.fmean(cost.seconds[-1] for cost in costs)
        disk = statistics.fmean(cost.disk for cost in costs) / 1e6
        lines.append(f"| {system} | {passes:g} ({last:g}) | {seconds:.1f} ({final:.1f}) | {disk:.1f} |")
    return lines + [
        "",
        f"{EXPERTS} is the merge of {MANY}, served with every task's own LoRA beside it "
        "(`many infer --lm-routing experts`).",
        "",
    ]


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
