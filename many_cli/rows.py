"""The prediction row: what `many infer --data` writes for each record and `many report` reads
back. Its fields, how it is built and checked, the answer rule, the routed task and the scores
live here alone, so that the writer and the reader cannot drift apart. No torch: the report
imports it."""

from __future__ import annotations

import re
import string

MERGE, ADAPTER = "merge", "adapter"  # the field naming what answered: a merge, or one task's own adapter
MERGED = "merged"  # the `lm` of a row the merged LoRA answered (a task's name: that task's own LoRA)
MEDIA = ("image", "audio", "video")  # a record's one media file, by kind; several images are "images"

ROW_FIELDS = {
    "prediction",
    "routing",
    "routed_task",
    "correct",
    "lm",
    "seconds",
    "prompt",
    "images",
    *MEDIA,
    "task",
    "answer",
    MERGE,
    ADAPTER,
}

Routing = dict[str, float] | list[dict[str, float]]  # the weights of a record's image, or of each of several


def build_row(
    prediction: str,
    routing: Routing,
    lm: str,
    seconds: float,
    prompt: str | None,
    answered_by: tuple[str, dict] | None,
    media: dict[str, str],
    images: list[str],
    task: str | None,
    answer: str | None,
) -> dict:
    """One record's row: its prediction, routing and routed task, whether it is correct, the
    language-model adapter that answered (`lm`), what answered (`answered_by`: MERGE or ADAPTER
    and its {"tasks", "fingerprint"}), and the record's prompt, media (one file by kind, or
    several images), task and answer."""
    row = {
        "prediction": prediction,
        "routing": routing,
        "routed_task": routed_task(routing),
        "correct": is_correct(prediction, answer),
        "lm": lm,
        "seconds": round(seconds, 4),
        "prompt": prompt,
    }
    if answered_by is not None:
        row[answered_by[0]] = answered_by[1]
    if len(images) > 1:
        row["images"] = images
    else:
        row.update(media)
    if task:
        row["task"] = task
    if answer is not None:
        row["answer"] = answer
    return row


def is_prediction_row(row: object) -> bool:
    """Whether `row` has a prediction row's shape (its own fields only)."""
    return (
        isinstance(row, dict)
        and isinstance(row.get("prediction"), str)
        and isinstance(row.get("routing"), (dict, list))
        and set(row) <= ROW_FIELDS
    )


def is_scored_row(row: object, kind: str) -> bool:
    """Whether `row` carries what a report reads: its prediction, task, whether it is correct,
    and the `kind` (MERGE or ADAPTER) that answered."""
    source = row.get(kind) if isinstance(row, dict) else None
    return (
        isinstance(row, dict)
        and isinstance(row.get("prediction"), str)
        and isinstance(row.get("task"), str)
        and "correct" in row
        and row["correct"] in (True, False, None)
        and isinstance(source, dict)
        and isinstance(source.get("tasks"), list)
        and isinstance(source.get("fingerprint"), str)
    )


def normalise_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces: the usual VQA exact-match rule."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def is_correct(prediction: str, answer: str | None) -> bool | None:
    """Whether the prediction matches the answer (normalised exact match); None without an answer."""
    return None if answer is None else normalise_answer(prediction) == normalise_answer(answer)


def routed_task(routing: Routing) -> str | list[str | None] | None:
    """The task of the largest routing weight (per image for several); None where nothing was routed."""

    def top(weights: dict[str, float]) -> str | None:
        return max(weights, key=weights.get) if weights else None

    return [top(weights) for weights in routing] if isinstance(routing, list) else top(routing)


def routed_tasks(row: dict) -> list[str]:
    """The task each image (audio, video) of a row was routed to; none without routing."""
    routed = row.get("routed_task")
    return [task for task in (routed if isinstance(routed, list) else [routed]) if isinstance(task, str)]


def scores(rows: list[dict]) -> dict[str | None, tuple[int, int]]:
    """task -> (correct, scored) over the rows that carry an answer, tasks in order of first row
    (None: rows without a task)."""
    found: dict[str | None, list[int]] = {}
    for row in rows:
        score = found.setdefault(row.get("task"), [0, 0])
        if row["correct"] is not None:
            score[0] += row["correct"]
            score[1] += 1
    return {task: (correct, scored) for task, (correct, scored) in found.items()}


def average_accuracy(scores: dict[str | None, tuple[int, int]]) -> float:
    """The mean over tasks of each task's accuracy (every task weighs the same)."""
    return sum(correct / total for correct, total in scores.values()) / len(scores)


def scored_tasks(rows: list[dict]) -> dict[str | None, tuple[int, int]]:
    """The scores of the tasks with at least one answer among `rows`."""
    return {task: score for task, score in scores(rows).items() if score[1]}


def accuracy_gate(scored: dict[str | None, tuple[int, int]], min_accuracy: float | None, data: str) -> str | None:
    """`--min-accuracy`'s one line when the scores of `data` fail it: a gate that scored
    nothing fails too."""
    if min_accuracy is None:
        return None
    if not scored:
        return f"--min-accuracy {min_accuracy}: no record of {data} has an answer, so nothing was scored"
    average = average_accuracy(scored)
    if average < min_accuracy:
        return f"average accuracy {average:.4f} is below --min-accuracy {min_accuracy}"
    return None
