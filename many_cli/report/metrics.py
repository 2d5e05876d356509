"""`many report`'s figures: the prediction files read and checked as one continual run (step k:
a merge of the first tasks, scoring every task merged so far), the metrics as pure functions of
the rows, and the CI gate."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from many_cli.errors import InputError
from many_cli.files import check_readable
from many_cli.rows import MERGE, is_correct, is_scored_row, routed_tasks, scores


@dataclass(frozen=True)
class Predictions:
    """One `many infer --data` output: what answered ({"tasks": [...], "fingerprint": ...}) and its rows."""

    path: Path
    answered_by: dict
    rows: list[dict]


def read_predictions(path: Path, kind: str) -> Predictions:
    """The rows of a prediction file, each checked to carry what a report reads, all answered by
    one merge (`kind` MERGE) or by one task's own adapter (ADAPTER, from `infer --adapter`)."""
    if not path.is_file():
        raise InputError(path, "prediction file not found")
    check_readable(path)
    rows, answered_by = [], None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise InputError(path, "is not a `many infer` prediction file (not UTF-8 text)") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise InputError(path, f"line {number} is not JSON: not a `many infer` prediction file") from None
        if not is_scored_row(row, kind):
            made_by = "many infer --merged" if kind == MERGE else "many infer --adapter"
            raise InputError(
                path,
                f"line {number} is not a prediction row of `{made_by} --data` with its task, "
                f"whether it is correct and the {kind} that answered (a file of an older "
                f"many: score again)",
            )
        _check_correct(path, number, row)
        if answered_by is None:
            answered_by = row[kind]
        elif row[kind] != answered_by:
            raise InputError(
                path,
                f"line {number} was answered by another {kind} than line 1 "
                f"({row[kind]['fingerprint']} against {answered_by['fingerprint']}): one file per step",
            )
        rows.append(row)
    if not rows:
        raise InputError(path, "holds no prediction rows")
    return Predictions(path, answered_by, rows)


def _check_correct(path: Path, number: int, row: dict) -> None:
    """A row's `correct` is what its prediction and answer say (recomputed, never believed)."""
    answer = row.get("answer")
    if answer is not None and not isinstance(answer, str):
        raise InputError(path, f"line {number}: its answer {answer!r} is not a string")
    if row["correct"] != is_correct(row["prediction"], answer):
        raise InputError(
            path,
            f"line {number} says correct {json.dumps(row['correct'])}, but its prediction "
            f"{row['prediction']!r} and answer {answer!r} say {json.dumps(is_correct(row['prediction'], answer))} "
            f"(normalised exact match): the row was edited; score again with many infer",
        )


def forgetting(matrix: list[list[float | None]], first_steps: list[int]) -> list[float | None]:
    """Per task: its best accuracy after any step before the last, minus its final accuracy; None
    for a task first learned at the last step. matrix[k][j] is task j's accuracy after step k."""
    last = len(matrix) - 1
    return [
        None if first >= last else max(matrix[k][task] for k in range(first, last)) - matrix[last][task]
        for task, first in enumerate(first_steps)
    ]


def backward_transfer(matrix: list[list[float | None]], first_steps: list[int]) -> float | None:
    """Mean over the tasks learned before the last step of (final accuracy − accuracy right after
    the step that learned it); None with one step."""
    last = len(matrix) - 1
    changes = [matrix[last][task] - matrix[first][task] for task, first in enumerate(first_steps) if first < last]
    return statistics.fmean(changes) if changes else None


def step_costs(matrix: list[list[float | None]], routing: list[list[float | None]], tasks: list[str]) -> list[dict]:
    """Per step after the first, the earlier task whose accuracy fell most at that step (None when
    none fell), with how many of its images that step routed home: what the merge cost, and whether
    routing or the merged language model lost it."""
    costs = []
    for step in range(1, len(matrix)):
        drops = {
            index: matrix[step - 1][index] - matrix[step][index]
            for index in range(len(tasks))
            if matrix[step - 1][index] is not None
        }
        worst = max(drops, key=drops.get, default=None)
        costs.append(
            None
            if worst is None or drops[worst] <= 0
            else {
                "step": step + 1,
                "task": tasks[worst],
                "before": matrix[step - 1][worst],
                "after": matrix[step][worst],
                "routed_home": routing[step][worst],
            }
        )
    return costs


def build_report(steps: list[Predictions], upper: list[Predictions] = (), experts: Predictions | None = None) -> dict:
    """The report as report.json holds it (see the module's docstring); bad steps are InputErrors
    naming the file. `experts`: the last step's merge scored with `--lm-routing experts`."""
    tasks: list[str] = []
    first_steps: list[int] = []
    per_step: list[dict[str, tuple[int, int]]] = []
    for number, step in enumerate(steps):
        found = scores(step.rows)
        _check_merge(step, found, steps[number - 1] if number else None)
        if per_step:
            _check_growth(step, steps[number - 1], found, per_step[-1])
        order = {task: index for index, task in enumerate(step.answered_by["tasks"])}
        new = sorted((task for task in found if task not in tasks), key=lambda task: order.get(task, len(order)))
        tasks += new
        first_steps += [number] * len(new)
        for task, (_, scored) in found.items():
            if scored == 0:
                raise InputError(step.path, f"no record of task {task!r} has an answer, so it cannot be scored")
        per_step.append(found)
    matrix = [[found[task][0] / found[task][1] if task in found else None for task in tasks] for found in per_step]
    averages = [statistics.fmean(value for value in row if value is not None) for row in matrix]
    lost = forgetting(matrix, first_steps)
    final = matrix[-1]
    upper_accuracy = _upper_accuracy(upper, tasks)
    confusion, routing = _routing(steps[-1].rows, tasks)
    routing_matrix = [
        [_routing(step.rows, tasks)[1][task] if task in found else None for task in tasks]
        for step, found in zip(steps, per_step)
    ]
    return {
        "steps": [
            {
                "file": str(step.path),
                "merge": step.answered_by,
                "records": {task: found[task][1] for task in tasks if task in found},
            }
            for step, found in zip(steps, per_step)
        ],
        "tasks": tasks,
        "learned_at_step": first_steps,
        "accuracy_matrix": matrix,
        "average_accuracy": averages,
        "final_average_accuracy": averages[-1],
        "forgetting": dict(zip(tasks, lost)),
        "average_forgetting": statistics.fmean(value for value in lost if value is not None)
        if any(value is not None for value in lost)
        else None,
        "backward_transfer": backward_transfer(matrix, first_steps),
        "upper_accuracy": upper_accuracy,
        "ratio_to_upper": {
            task: final[index] / upper_accuracy[task] if upper_accuracy.get(task) else None
            for index, task in enumerate(tasks)
            if task in upper_accuracy
        },
        "routing_accuracy": routing,
        "routing_accuracy_matrix": routing_matrix,
        "step_costs": step_costs(matrix, routing_matrix, tasks),
        "routing_confusion": confusion,
        "wrong_answers": [_wrong(row) for row in steps[-1].rows if row["correct"] is False],
        "experts": None if experts is None else _experts(experts, steps[-1], per_step[-1]),
    }


def _experts(experts: Predictions, last: Predictions, found: dict[str, tuple[int, int]]) -> dict:
    """What `--lm-routing experts` keeps of the last step: its accuracy per task on the same
    records, its average, and the share of rows a task's own LoRA answered."""
    if experts.answered_by != last.answered_by:
        raise InputError(
            experts.path,
            f"was answered by merge {experts.answered_by['fingerprint']}, not by the last step's "
            f"({last.answered_by['fingerprint']}, {last.path}): score the last step's merge with --lm-routing experts",
        )
    scored = scores(experts.rows)
    if {task: count for task, (_, count) in scored.items()} != {task: count for task, (_, count) in found.items()}:
        raise InputError(
            experts.path,
            f"scores other records than {last.path}: give `many infer --lm-routing experts` the same --data",
        )
    own = sum(row.get("lm") == row["task"] for row in experts.rows)
    if not any(row.get("lm") in found for row in experts.rows):
        raise InputError(
            experts.path, "no row was answered by a task's own LoRA: not a `many infer --lm-routing experts` output"
        )
    accuracy = {task: correct / count for task, (correct, count) in scored.items()}
    return {
        "file": str(experts.path),
        "accuracy": accuracy,
        "final_average_accuracy": statistics.fmean(accuracy.values()),
        "answered_by_own_lora": own / len(experts.rows),
    }


def _check_merge(step: Predictions, found: dict[str, tuple[int, int]], previous: Predictions | None) -> None:
    """A step scores exactly the tasks its merge holds, routes only to them, and its merge holds
    the previous step's tasks first, in their order: one run of continual merges."""
    merged = step.answered_by["tasks"]
    for task in found:
        if task not in merged:
            raise InputError(
                step.path,
                f"scores task {task!r}, which the merge that answered it does not hold (it holds "
                f"{', '.join(merged)}); a record's task (its task field, else its file's name) must be "
                f"the name of the adapter that learned it: name it with `many infer --data TASK=DATA`",
            )
    unscored = [task for task in merged if task not in found]
    if unscored:
        raise InputError(
            step.path,
            f"scores no record of task {', '.join(map(repr, unscored))}, which its merge holds: each step "
            f"scores every task merged so far",
        )
    for number, row in enumerate(step.rows, start=1):
        stray = [task for task in routed_tasks(row) if task not in merged]
        if stray:
            raise InputError(step.path, f"row {number} is routed to {stray[0]!r}, a task its merge does not hold")
    if previous is not None and merged[: len(previous.answered_by["tasks"])] != previous.answered_by["tasks"]:
        raise InputError(
            step.path,
            f"was answered by a merge of {', '.join(merged)}, which does not extend the merge of "
            f"{previous.path} ({', '.join(previous.answered_by['tasks'])}): give one file per "
            f"merge of one continual run, in merge order",
        )


def _check_growth(
    step: Predictions, previous: Predictions, found: dict[str, tuple[int, int]], before: dict[str, tuple[int, int]]
) -> None:
    """A step scores every task the step before it scored, each as wholly, and at least one more."""
    for task, (_, scored) in before.items():
        if task not in found:
            raise InputError(
                step.path,
                f"scores no record of task {task!r}, which {previous.path} scored: each "
                f"step scores every task merged so far (give the files in merge order)",
            )
        if found[task][1] != scored:
            raise InputError(
                step.path,
                f"scores {found[task][1]} records of task {task!r} where {previous.path} "
                f"scored {scored}: each step scores the same whole evaluation set",
            )
    if set(found) == set(before):
        raise InputError(
            step.path,
            f"scores the same tasks as {previous.path}: each step adds the tasks of a "
            f"fine-tune (give one file per merge, in merge order)",
        )


def _upper_accuracy(upper: list[Predictions], tasks: list[str]) -> dict[str, float]:
    """Each task's accuracy with its own adapter alone, from `infer --adapter` files."""
    accuracy: dict[str, float] = {}
    for predictions in upper:
        own = predictions.answered_by["tasks"]
        for task, (correct, scored) in scores(predictions.rows).items():
            if [task] != own:
                raise InputError(
                    predictions.path, f"scores task {task!r} with the adapter of {', '.join(own)}: not that task's own"
                )
            if task in accuracy:
                raise InputError(predictions.path, f"scores task {task!r} again: give one --upper file per task")
            if task not in tasks:
                raise InputError(predictions.path, f"scores task {task!r}, which no step scores")
            if scored == 0:
                raise InputError(predictions.path, f"no record of task {task!r} has an answer, so it cannot be scored")
            accuracy[task] = correct / scored
    return {task: accuracy[task] for task in tasks if task in accuracy}


def _routing(rows: list[dict], tasks: list[str]) -> tuple[dict, dict[str, float | None]]:
    """The final step's routing: counts[true task][routed task] over images, the routed tasks
    being the merge's (then any other seen), and per task the share of its images routed home."""
    routed_to = list(
        dict.fromkeys(
            [*rows[0].get(MERGE, {}).get("tasks", []), *tasks, *(task for row in rows for task in routed_tasks(row))]
        )
    )
    counts = [[0] * len(routed_to) for _ in tasks]
    for row in rows:
        for task in routed_tasks(row):
            counts[tasks.index(row["task"])][routed_to.index(task)] += 1
    accuracy = {
        task: counts[index][routed_to.index(task)] / sum(counts[index]) if sum(counts[index]) else None
        for index, task in enumerate(tasks)
    }
    return {"true": tasks, "routed": routed_to, "counts": counts}, accuracy


def _wrong(row: dict) -> dict:
    media = row.get("images") or [row[kind] for kind in ("image", "video", "audio") if row.get(kind)]
    return {
        "task": row["task"],
        "media": media,
        "prompt": row.get("prompt"),
        "answer": row.get("answer"),
        "prediction": row["prediction"],
        "routed_task": row.get("routed_task"),
        "routing": row.get("routing"),
    }


def gate(report: dict, min_final_accuracy: float | None, max_forgetting: float | None) -> str | None:
    """The CI gate's one line when the report fails it, naming the worst task and its figure."""
    tasks, final = report["tasks"], report["accuracy_matrix"][-1]
    if min_final_accuracy is not None and report["final_average_accuracy"] < min_final_accuracy:
        worst = min(range(len(tasks)), key=lambda index: final[index])
        return (
            f"final average accuracy {report['final_average_accuracy']:.4f} is below --min-final-accuracy "
            f"{min_final_accuracy} (worst task: {tasks[worst]}, {final[worst]:.4f})"
        )
    lost = {task: value for task, value in report["forgetting"].items() if value is not None}
    if max_forgetting is not None and lost and max(lost.values()) > max_forgetting:
        worst = max(lost, key=lost.get)
        return f"task {worst} forgot {lost[worst]:.4f} (best earlier accuracy minus final), above --max-forgetting {max_forgetting}"
    return None
