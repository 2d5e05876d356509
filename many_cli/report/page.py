"""`many report`'s index.html: one self-contained page (charts as inline SVG drawn by matplotlib,
thumbnails as data URLs, no script or style from elsewhere) that opens from a CI artifact: the
accuracy matrix as a heat map, each task's accuracy across steps, the routing confusion matrix,
and the wrong answers with their images, prompt, answer and routing."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from many_cli.report.markdown import markdown, trade_off

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { margin-bottom: 0.2em; } .summary td, .summary th { padding: 0.2em 1em 0.2em 0; text-align: left; }
figure { display: inline-block; margin: 0 1em 1em 0; vertical-align: top; } figcaption { font-size: 0.9em; color: #555; }
table.wrong { border-collapse: collapse; width: 100%; } table.wrong td, table.wrong th { border-top: 1px solid #ddd; padding: 0.4em; vertical-align: top; text-align: left; }
table.wrong img { max-width: 96px; max-height: 96px; image-rendering: pixelated; } .bad { color: #b00; } .missing { color: #b00; font-size: 0.8em; }
"""

# Shows the wrong answers of one task, or all: the page's only script, inline.
_SCRIPT = """
document.getElementById("task-filter").addEventListener("change", function (event) {
  for (const row of document.querySelectorAll("table.wrong tbody tr")) {
    row.hidden = event.target.value !== "" && row.dataset.task !== event.target.value;
  }
});
"""


def _svg(figure) -> str:
    import matplotlib.pyplot as plt

    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", metadata={"Date": None}, bbox_inches="tight")
    plt.close(figure)
    text = buffer.getvalue()
    return text[text.index("<svg") :]  # inline: no XML prologue or doctype


def _heat_map(values, rows: list[str], columns: list[str], title: str, percent: bool):
    import matplotlib.pyplot as plt
    import numpy as np

    data = np.array([[np.nan if value is None else value for value in row] for row in values], dtype=float)
    figure, axis = plt.subplots(figsize=(1.0 + 0.9 * len(columns), 0.9 + 0.55 * len(rows)))
    image = axis.imshow(
        data, cmap="viridis", vmin=0, vmax=1 if percent else max(1.0, float(np.nanmax(data))), aspect="auto"
    )
    for (row, column), value in np.ndenumerate(data):
        if not np.isnan(value):
            text = f"{100 * value:.0f}" if percent else f"{value:.0f}"
            axis.text(
                column,
                row,
                text,
                ha="center",
                va="center",
                fontsize=9,
                color="black" if value > 0.6 * image.norm.vmax else "white",
            )
    axis.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
    axis.set_yticks(range(len(rows)), rows)
    axis.set_title(title, fontsize=10)
    bar = figure.colorbar(image, ax=axis, fraction=0.05)
    if percent:
        bar.ax.yaxis.set_major_formatter(lambda value, _: f"{100 * value:.0f}")
    return figure


def _lines(report: dict):
    import matplotlib.pyplot as plt

    steps = list(range(1, len(report["accuracy_matrix"]) + 1))
    figure, axis = plt.subplots(figsize=(5.5, 3.4))
    for index, task in enumerate(report["tasks"]):
        points = [
            (step, 100 * row[index]) for step, row in zip(steps, report["accuracy_matrix"]) if row[index] is not None
        ]
        axis.plot(*zip(*points), marker="o", label=task)
    axis.plot(
        steps, [100 * value for value in report["average_accuracy"]], color="black", linestyle="--", label="average"
    )
    axis.set_xticks(steps)
    axis.set_xlabel("step (merge)")
    axis.set_ylabel("accuracy (%)")
    axis.set_ylim(-2, 102)
    axis.legend(fontsize=8, loc="lower left")
    axis.set_title("each task's accuracy across steps", fontsize=10)
    return figure


def _thumbnail(path: str) -> str:
    """An <img> of the file as a data URL (96 px), or a line saying why there is none."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((96, 96))
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
    except (OSError, UnidentifiedImageError, ValueError) as error:
        reason = "not found" if isinstance(error, FileNotFoundError) else "not an image"
        return f'<div class="missing">{html.escape(path)}: {reason}</div>'
    data = base64.b64encode(buffer.getvalue()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(path)}" title="{html.escape(path)}">'


def _metric(name: str, value: float | None, points: bool = False) -> str:
    shown = "—" if value is None else f"{100 * value:.1f}{' points' if points else '%'}"
    number = "" if value is None else f' data-value="{value!r}"'
    return f'<td data-metric="{name}"{number}>{shown}</td>'


def _routing_text(routing) -> str:
    weights = routing if isinstance(routing, list) else [routing or {}]
    return (
        "; ".join(
            ", ".join(f"{task} {weight:.2f}" for task, weight in sorted(each.items(), key=lambda item: -item[1])[:3])
            for each in weights
        )
        or "—"
    )


def _costs(costs: list[dict | None]) -> str:
    """What each merge cost, in words: the task that fell most, and whether routing explains it."""
    items = []
    for number, cost in enumerate(costs, start=2):
        if cost is None:
            items.append(f"<li>Step {number} cost no earlier task.</li>")
            continue
        home = cost["routed_home"]
        why = (
            "its images were not routed (no routing in these rows)"
            if home is None
            else f"{100 * home:.0f}% of its images were still routed home, so the merged language model lost it"
            if home >= 0.95
            else f"only {100 * home:.0f}% of its images were routed home: routing sent the "
            f"rest to other tasks' projectors"
        )
        items.append(
            f'<li class="cost">Step {number} cost <b>{html.escape(cost["task"])}</b> most: '
            f"{100 * cost['before']:.1f}% &rarr; {100 * cost['after']:.1f}%; {why}.</li>"
        )
    return f"<h2>What each merge cost</h2><ul>{''.join(items)}</ul>" if items else ""


def write_page(report: dict, path: Path) -> None:
    """index.html for `report` (as `report.build_report` returns it)."""
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["svg.hashsalt"] = "many-report"  # the same page for the same report
    steps = [f"step {number}" for number in range(1, len(report["accuracy_matrix"]) + 1)]
    heat = _heat_map(report["accuracy_matrix"], steps, report["tasks"], "accuracy (%) after each step", True)
    confusion = report["routing_confusion"]
    totals = [sum(row) or 1 for row in confusion["counts"]]
    shares = [[count / total for count in row] for row, total in zip(confusion["counts"], totals)]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>many report</title>',
        f"<style>{_STYLE}</style></head><body>",
        "<h1>Continual report</h1>",
        f"<p>{len(steps)} step(s), tasks in the order learned: {html.escape(', '.join(report['tasks']))}. "
        f"Last merge: <code>{html.escape(report['steps'][-1]['merge']['fingerprint'])}</code>.</p>",
        '<table class="summary"><tr><th>final average accuracy</th>'
        + _metric("final_average_accuracy", report["final_average_accuracy"])
        + "</tr>",
        "<tr><th>average forgetting</th>" + _metric("average_forgetting", report["average_forgetting"], True) + "</tr>",
        "<tr><th>backward transfer</th>" + _metric("backward_transfer", report["backward_transfer"], True) + "</tr>",
        "</table>",
        *([f'<p id="trade-off">{html.escape(choice)}</p>'] if (choice := trade_off(report)) else []),
        _costs(report["step_costs"]),
        f'<figure id="accuracy-heatmap">{_svg(heat)}<figcaption>Rows: steps; columns: tasks. A cell that darkens '
        f"down its column is a task a later merge cost.</figcaption></figure>",
        f'<figure id="accuracy-lines">{_svg(_lines(report))}</figure>',
        f'<figure id="routing-confusion">{_svg(_heat_map(shares, confusion["true"], confusion["routed"], "last step: share of each task images routed to each task (%)", True))}'
        f"<figcaption>Rows: true task; columns: the task its images were routed to.</figcaption></figure>",
        "<h2>Per task, after the last step</h2>",
        '<table class="summary"><tr><th>task</th><th>final</th>'
        "<th>forgetting</th><th>own adapter</th><th>final / own</th><th>routed home</th>"
        + ("<th>with experts</th>" if report["experts"] else "")
        + "</tr>",
    ]
    final = report["accuracy_matrix"][-1]
    for index, task in enumerate(report["tasks"]):
        ratio = report["ratio_to_upper"].get(task)
        parts.append(
            f"<tr><th>{html.escape(task)}</th>"
            + _metric(f"final:{task}", final[index])
            + _metric(f"forgetting:{task}", report["forgetting"][task], True)
            + _metric(f"upper:{task}", report["upper_accuracy"].get(task))
            + f'<td data-metric="ratio:{html.escape(task)}">{"—" if ratio is None else f"{ratio:.3f}"}</td>'
            + _metric(f"routing:{task}", report["routing_accuracy"][task])
            + (_metric(f"experts:{task}", report["experts"]["accuracy"][task]) if report["experts"] else "")
            + "</tr>"
        )
    parts.append("</table>")
    wrong = report["wrong_answers"]
    options = "".join(f'<option value="{html.escape(task)}">{html.escape(task)}</option>' for task in report["tasks"])
    parts += [
        f"<h2>Wrong answers in the last step ({len(wrong)})</h2>",
        f'<label>task <select id="task-filter"><option value="">all</option>{options}</select></label>',
        '<table class="wrong"><thead><tr><th>image</th><th>task</th><th>prompt</th><th>answer</th>'
        "<th>prediction</th><th>routed to</th></tr></thead><tbody>",
    ]
    for row in wrong:
        routed = row["routed_task"] if isinstance(row["routed_task"], list) else [row["routed_task"]]
        routed_text = ", ".join(task or "—" for task in routed)
        away = any(task not in (None, row["task"]) for task in routed)
        parts.append(
            f'<tr data-task="{html.escape(row["task"])}"><td>{"".join(map(_thumbnail, row["media"]))}</td>'
            f"<td>{html.escape(row['task'])}</td><td>{html.escape(str(row['prompt']))}</td>"
            f'<td>{html.escape(str(row["answer"]))}</td><td class="bad">{html.escape(row["prediction"])}</td>'
            f"<td{' class=bad' if away else ''}>{html.escape(routed_text)}"
            f"<br><small>{html.escape(_routing_text(row['routing']))}</small></td></tr>"
        )
    parts += [
        "</tbody></table>",
        f"<details><summary>The same as Markdown</summary><pre>{html.escape(markdown(report))}</pre></details>",
        f"<script>{_SCRIPT}</script>",
        "</body></html>",
    ]
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")
