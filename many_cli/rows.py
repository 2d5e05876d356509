"""The prediction row: what `many infer --data` writes for each record and `many report` reads
back. Its fields, what names the model that answered, and the answer rule live here alone, so
that the writer and the reader cannot drift apart. No torch: the report imports it."""

from __future__ import annotations

import re
import string

MERGE, ADAPTER = "merge", "adapter"  # the field naming what answered: a merge, or one task's own adapter

ROW_FIELDS = {
    "prediction",
    "routing",
    "routed_task",
    "correct",
    "lm",
    "seconds",
    "prompt",
    "image",
    "images",
    "audio",
    "video",
    "task",
    "answer",
    MERGE,
    ADAPTER,
}


def is_prediction_row(row: object) -> bool:
    """Whether `row` has a prediction row's shape (its own fields only)."""
    return (
        isinstance(row, dict)
        and isinstance(row.get("prediction"), str)
        and isinstance(row.get("routing"), (dict, list))
        and set(row) <= ROW_FIELDS
    )


def normalise_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces: the usual VQA exact-match rule."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def is_correct(prediction: str, answer: str | None) -> bool | None:
    """Whether the prediction matches the answer (normalised exact match); None without an answer."""
    return None if answer is None else normalise_answer(prediction) == normalise_answer(answer)
