"""Answering for `many infer`: batched greedy answers of a loaded model, each record routed,
in experts mode each record's language-model adapter chosen by its image; the rows they make."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

from many_cli.data import Record, encode_loaded, load_inputs
from many_cli.errors import InputError
from many_cli.infer.load import Answerer, MergedModel
from many_cli.options import InferOptions
from many_cli.rows import ADAPTER, MEDIA, MERGED, build_row, is_prediction_row


@dataclass
class Prediction:
    record: Record
    prediction: str
    routing: dict[str, float] | list[dict[str, float]]  # the weights of its image (audio, video); a list for several
    seconds: float
    lm: str = MERGED  # which language-model adapter answered: "merged" or a task's name
    answered_by: Answerer | None = None

    def as_json(self) -> dict:
        record = self.record
        return build_row(
            self.prediction,
            self.routing,
            self.lm,
            self.seconds,
            record.prompt,
            None if self.answered_by is None else (self.answered_by.kind, self.answered_by.as_json()),
            {kind: str(getattr(record, kind)) for kind in MEDIA if getattr(record, kind) is not None},
            [str(path) for path in record.images],
            record.task,
            record.answer,
        )


def answer(merged: MergedModel, records: list[Record], max_new_tokens: int) -> list[Prediction]:
    """Greedy answers for one batch of records (their answers, if any, are not shown to the
    model). Records with and without an image may mix: each gets its own routing, in order."""
    media = [load_inputs(merged.processor, record) for record in records]
    encoded = encode_loaded(merged.processor, records, media, with_answers=False).to(merged.device)
    start = time.perf_counter()
    extra = {}
    with torch.inference_mode():
        if merged.experts:
            extra["adapter_names"] = choose_adapters(merged, encoded, records)
        if merged.router is not None:
            merged.router.last_weights = None  # never report an earlier batch's routing
        generated = merged.model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False, **extra)
    seconds = (time.perf_counter() - start) / len(records)
    texts = merged.processor.batch_decode(generated[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
    routing = _routing_per_record(merged, records)
    own = merged.answered_by.tasks[0] if merged.answered_by and merged.answered_by.kind == ADAPTER else MERGED
    names = extra.get("adapter_names", [own] * len(records))
    return [
        Prediction(record, text.strip(), weights, seconds, name, merged.answered_by)
        for record, text, weights, name in zip(records, texts, routing, names, strict=True)
    ]


def _routing_per_record(merged: MergedModel, records: list[Record]) -> list[dict[str, float] | list[dict[str, float]]]:
    """The router's weights of the last forward for each record: one image's (audio's, video's)
    weights, a list of them for a record of several images, {} for a record without media."""
    # The model encodes a batch's images (or audio) first, record by record, then its videos.
    rows_of = [len(record.images) + (record.audio is not None) if record.video is None else 0 for record in records]
    video_rows = [1 if record.video is not None else 0 for record in records]
    if merged.router is None or not any(rows_of) and not any(video_rows):
        return [{} for _ in records]
    rows = merged.router.last_weights
    expected = sum(rows_of) + sum(video_rows)
    if rows is None or rows.shape[0] != expected:
        raise RuntimeError(f"the router saw {0 if rows is None else rows.shape[0]} images for {expected} in the batch")
    weights = [dict(zip(merged.router.tasks, row)) for row in rows.tolist()]
    starts = [sum(rows_of[:index]) for index in range(len(records))]
    video_starts = [sum(rows_of) + sum(video_rows[:index]) for index in range(len(records))]
    routing = []
    for index, record in enumerate(records):
        mine = (
            weights[video_starts[index] : video_starts[index] + 1]
            if record.video is not None
            else weights[starts[index] : starts[index] + rows_of[index]]
        )
        routing.append(mine if len(mine) > 1 else (mine[0] if mine else {}))
    return routing


def choose_adapters(merged: MergedModel, encoded, records: list[Record]) -> list[str]:
    """Experts mode: route each image first (the vision tower and projectors run once more),
    then answer with its task's own LoRA when the routing weight reaches the confidence, else
    (and for records without an image) with the merged one."""
    video = next((record for record in records if record.video is not None), None)
    if video is not None:
        raise InputError(video.source, "has a video: --lm-routing experts routes images only (use merged)")
    several = next((record for record in records if len(record.images) > 1), None)
    if several is not None:
        raise InputError(
            several.source,
            "has several images: --lm-routing experts answers a record with one "
            "task's adapter, chosen by one image (use merged)",
        )
    if "pixel_values" not in encoded:
        return [MERGED] * len(records)
    merged.router.last_weights = None
    merged.tracker.encode_images(encoded)
    names = []
    for weights in _routing_per_record(merged, records):
        task, weight = max(weights.items(), key=lambda item: item[1]) if weights else (MERGED, 1.0)
        names.append(task if weight >= merged.router.confidence else MERGED)
    return names


def answer_all(merged: MergedModel, records: Iterable[Record], options: InferOptions) -> Iterator[Prediction]:
    batch: list[Record] = []
    for record in records:
        batch.append(record)
        if len(batch) == options.batch_size:
            yield from answer(merged, batch, options.max_new_tokens)
            batch = []
    if batch:
        yield from answer(merged, batch, options.max_new_tokens)


def is_predictions_file(path: Path) -> bool:
    """Whether `path` is empty or a complete `many infer` output (which `--out` may replace):
    every line, the last one ended, a JSON object with a prediction and its routing, and nothing
    else but the fields `many infer` writes. Anything else may be the user's own file."""
    try:
        text = path.read_bytes().decode("utf-8")
        if not text:
            return True
        if not text.endswith("\n"):
            return False
        return all(is_prediction_row(json.loads(line)) for line in text[:-1].split("\n"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
