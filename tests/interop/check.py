"""The interop suite's comparisons and its table, in `many`'s environment.

python check.py same LABEL A B     A, B: answers (answer.py, tool_answer.py, serve.py, `swift infer`) or `many infer` rows
python check.py ids LABEL A B      A, B: token ids per record (many_ids.py, tool_ids.py)
python check.py table WORK         per-task accuracy of each tool's adapters and merges
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(path: Path) -> list[dict]:
    """A JSON list or JSON lines."""
    text = path.read_text()
    return json.loads(text) if text.lstrip().startswith("[") else [json.loads(line) for line in text.splitlines()]


def answers(path: Path, tokens: bool) -> list[tuple[str, object]]:
    """(image, answer) in order: the generated token ids where both sides have them (engines
    detokenize an unfinished character differently), else the answer's text (`swift infer`'s
    result rows: its response, the record's image)."""
    return [
        (row["image"], row["tokens"] if tokens else row["prediction"])
        if "image" in row
        else (_path(row["images"][0]), row["response"].strip())
        for row in rows(path)
    ]


def _path(image: object) -> str:
    return image["path"] if isinstance(image, dict) else image


def ids(label: str, first: Path, second: Path) -> None:
    a, b = json.loads(first.read_text()), json.loads(second.read_text())
    differ = [index for index, (x, y) in enumerate(zip(a, b)) if x != y]
    if len(a) != len(b) or differ or not a:
        first_difference = differ[:1] and [(a[differ[0]], b[differ[0]])]
        sys.exit(f"{label}: {len(a)} and {len(b)} records, {len(differ)} differ, first {first_difference}")
    print(f"{label}: {len(a)} of {len(a)} records' ids equal ({sum(map(len, a))} tokens)")


def same(label: str, first: Path, second: Path) -> None:
    tokens = all("tokens" in row for path in (first, second) for row in rows(path))
    a, b = answers(first, tokens), answers(second, tokens)
    if [image for image, _ in a] != [image for image, _ in b]:
        sys.exit(f"{label}: {first} and {second} answer other images")
    differ = [(image, x, y) for (image, x), (_, y) in zip(a, b) if x != y]
    if differ or not a:
        sys.exit(f"{label}: {len(differ)} of {len(a)} answers differ, first {differ[:1]}")
    print(f"{label}: {len(a)} of {len(a)} greedy answers equal{' (token for token)' if tokens else ''}")


def accuracy(path: Path) -> dict[str, tuple[int, int]]:
    """Per task: (correct, records) of a `many infer` predictions file."""
    counts: dict[str, list[int]] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        tally = counts.setdefault(row["task"], [0, 0])
        tally[0] += bool(row["correct"])
        tally[1] += 1
    return {task: (correct, total) for task, (correct, total) in counts.items()}


def tool_accuracy(tool_answers: Path, own: Path) -> tuple[int, int]:
    """(correct, records) of the tool's own answers, scored by many's answer rule against the
    expected answers that many's rows of the same images carry."""
    from many_cli.rows import is_correct

    expected = {row["image"]: row["answer"] for row in rows(own)}
    scored = [is_correct(answer, expected[image]) for image, answer in answers(tool_answers, tokens=False)]
    return sum(scored), len(scored)


def table(work: Path) -> None:
    lines = [
        "| family | tool | task | under the tool | its own adapter | merged (LPM + CPM) | merged, `--lm-routing experts` |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in sorted(path for path in work.glob("*/*") if (path / "final.jsonl").is_file()):
        merged, experts = accuracy(run / "final.jsonl"), accuracy(run / "experts.jsonl")
        for task in sorted(merged):
            own_rows = run / "upper" / f"{task}.jsonl"
            counts = (tool_accuracy(run / "tool" / f"{task}.json", own_rows), accuracy(own_rows)[task])
            cells = [f"{c}/{t} ({c / t:.0%})" for c, t in (*counts, merged[task], experts[task])]
            lines.append(f"| {run.parent.name} | {run.name} | {task} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    (work / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    command, *arguments = sys.argv[1:]
    if command == "table":
        table(Path(arguments[0]))
    else:
        {"same": same, "ids": ids}[command](arguments[0], Path(arguments[1]), Path(arguments[2]))
