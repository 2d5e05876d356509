"""`many report`'s words: report.md (tables short enough for a CI job summary), report.json's
text, and the trade-off line both the Markdown and the page open with."""

from __future__ import annotations

import json


def trade_off(report: dict) -> str | None:
    """The choice the report puts to its reader: what serving the merge with its experts keeps,
    or, when the merged model forgot and no experts file was given, how to forget nothing."""
    experts = report["experts"]
    if experts is not None:
        return (
            f"Served with `--lm-routing experts` (each image's task answering with its own LoRA beside "
            f"the merge), the same merge answers {_percent(experts['final_average_accuracy'])}% of these "
            f"records (merged: {_percent(report['final_average_accuracy'])}%), "
            f"{_percent(experts['answered_by_own_lora'])}% of them by their own task's LoRA."
        )
    if any(value is not None and value > 0 for value in report["forgetting"].values()):
        return (
            "To forget nothing, serve this merge with `many infer --lm-routing experts`: each image's "
            "task answers with its own LoRA from the merge's experts/ folder, every task's LoRA held "
            "beside the merged model. Score the same records that way and pass the file as "
            "`--experts` to see what it keeps here."
        )
    return None


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def markdown(report: dict) -> str:
    """The report as tables short enough for a CI job summary (accuracies in %)."""
    tasks = report["tasks"]
    lines = [
        "## Continual report",
        "",
        f"Final average accuracy **{_percent(report['final_average_accuracy'])}%** after "
        f"{len(report['steps'])} step(s); average forgetting {_percent(report['average_forgetting'])} points; "
        f"backward transfer {_percent(report['backward_transfer'])} points.",
        "",
        *([choice, ""] if (choice := trade_off(report)) else []),
        "| step | " + " | ".join(tasks) + " | average |",
        "|---" * (len(tasks) + 2) + "|",
    ]
    for number, (row, average) in enumerate(zip(report["accuracy_matrix"], report["average_accuracy"]), start=1):
        lines.append(f"| {number} | " + " | ".join(_percent(value) for value in row) + f" | {_percent(average)} |")
    experts = report["experts"]
    lines += [
        "",
        "| task | final | best before | forgetting | own adapter | final / own | routed home |"
        + (" with experts |" if experts else ""),
        "|---|---|---|---|---|---|---|" + ("---|" if experts else ""),
    ]
    last = len(report["accuracy_matrix"]) - 1
    for index, task in enumerate(tasks):
        history = [row[index] for row in report["accuracy_matrix"][:last] if row[index] is not None]
        ratio = report["ratio_to_upper"].get(task)
        lines.append(
            f"| {task} | {_percent(report['accuracy_matrix'][last][index])} | "
            f"{_percent(max(history)) if history else '—'} | {_percent(report['forgetting'][task])} | "
            f"{_percent(report['upper_accuracy'].get(task))} | {'—' if ratio is None else f'{ratio:.3f}'} | "
            f"{_percent(report['routing_accuracy'][task])} |"
            + (f" {_percent(experts['accuracy'][task])} |" if experts else "")
        )
    confusion = report["routing_confusion"]
    if any(map(any, confusion["counts"])):
        lines += [
            "",
            "Routing of the last step's images (rows: true task; columns: routed to):",
            "",
            "| | " + " | ".join(confusion["routed"]) + " |",
            "|---" * (len(confusion["routed"]) + 1) + "|",
        ]
        lines += [
            f"| {task} | " + " | ".join(map(str, counts)) + " |"
            for task, counts in zip(confusion["true"], confusion["counts"])
        ]
    lines += ["", f"{len(report['wrong_answers'])} wrong answers in the last step (index.html shows them)."]
    return "\n".join(lines) + "\n"


def as_json(report: dict) -> str:
    """report.json's text: the same bytes for the same rows."""
    return json.dumps(report, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
