"""`many demo`: the whole job on the shipped sample, in one process: statistics for each task's
adapter, the merge, and an answer for one held-out image of each task."""

from __future__ import annotations

import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from many_cli.data import BadRecord, Record
from many_cli.errors import InputError
from many_cli.files import atomic_output_dir, refuse_overlap, written_by_many
from many_cli.formats import read_records
from many_cli.infer import InferOptions, Prediction, answer, load_merged
from many_cli.merge import MergeOptions, merge
from many_cli.state import STATS_FILE
from many_cli.stats import StatsOptions, collect_stats

ANSWER_TOKENS = 4  # the sample's answers are one word


@dataclass
class DemoReport:
    merged: Path
    predictions: list[Prediction]


def run_demo(sample: Path, out: Path, force: bool, say: Callable[[str], None]) -> DemoReport:
    """Copy the sample's adapters to `out/adapters` (the sample stays as shipped), run
    `many stats` on each with its calibration set, `many merge` them to `out/merged`, and
    `many infer` the first evaluation image of every task. `out` appears only when all of it worked.
    An existing `out` is replaced when it is an earlier demo's untouched output, or with `force`."""
    base, adapters = sample / "base", sample / "adapters"
    if not adapters.is_dir() or not base.is_dir():
        raise InputError(
            sample, "is not a sample folder (it needs base/ and adapters/; regenerate it with `many bench sample`)"
        )
    tasks = sorted(path.name for path in adapters.iterdir() if path.is_dir())
    records = [_first_record(sample / "data" / task / "evaluation.jsonl") for task in tasks]
    refuse_overlap(out, [sample])
    with atomic_output_dir(out, force, is_demo_output) as staging:
        copies = []
        for task in tasks:
            copy = shutil.copytree(adapters / task, staging / "adapters" / task)
            calibration = sample / "data" / task / "calibration.jsonl"
            say(
                _command(
                    "stats",
                    "--model",
                    base,
                    "--adapter",
                    out / "adapters" / task,
                    "--data",
                    calibration,
                    "--template",
                    "base",
                )
            )
            # Run on the sample's own adapter, so that errors name it; the stats go beside the copy.
            collect_stats(
                str(base), adapters / task, calibration, copy / STATS_FILE, StatsOptions(device="cpu", template="base")
            )
            copies.append(copy)
        say(_command("merge", out / "adapters", "--out", out / "merged", "--force"))
        merge(copies, staging / "merged", MergeOptions())
    for record in records:
        infer = ("infer", "--model", base, "--merged", out / "merged", "--image", record.image)
        say(_command(*infer, "--prompt", record.prompt, "--max-new-tokens", ANSWER_TOKENS))
    model = load_merged(str(base), out / "merged", InferOptions(device="cpu"))
    return DemoReport(out / "merged", answer(model, records, max_new_tokens=ANSWER_TOKENS))


def _command(*words: object) -> str:
    """`many WORDS`, quoted so that it can be copied and run as it is."""
    return shlex.join(["many", *map(str, words)])


def is_demo_output(path: Path) -> bool:
    """Whether `path` is an earlier `many demo`'s output, holding just what the demo wrote."""
    return (path / "adapters").is_dir() and (path / "merged").is_dir() and written_by_many(path)


def _first_record(path: Path) -> Record:
    record = next(iter(read_records(path)), None)
    if record is None:
        raise InputError(path, "holds no record")
    if isinstance(record, BadRecord):
        raise InputError(record.source, record.fault)
    return record
