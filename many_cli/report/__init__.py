"""`many report`: what a team asks after each fine-tune of a continual run, from `many infer`'s
prediction rows alone (`rows` owns them): the accuracy matrix (step × task), average accuracy per
step, final average accuracy, forgetting, backward transfer, each task's ratio to its own adapter
(the upper bound), routing accuracy and the routing confusion matrix, the wrong answers, and the
trade-off: what the last merge keeps served with `--lm-routing experts`, or how to see it.

The package, one job per module:
- `metrics`: the prediction files read and checked, the figures as pure functions of the rows,
  the CI gate;
- `markdown`: report.md, report.json's text and the trade-off line;
- `page`: index.html.
"""

from __future__ import annotations

import json
from pathlib import Path

from many_cli.files import OUTPUT_MANIFEST, atomic_output_dir
from many_cli.report.markdown import as_json, markdown
from many_cli.report.metrics import Predictions, build_report, gate, read_predictions
from many_cli.report.page import write_page

__all__ = ["Predictions", "build_report", "gate", "read_predictions", "write_report", "is_report_dir"]

REPORT_FILES = ("report.json", "report.md", "index.html")


def is_report_dir(path: Path) -> bool:
    """Whether `path` is an earlier report (which `--out` may replace): exactly the report's files."""
    try:
        return (
            sorted(entry.name for entry in path.iterdir()) == sorted([*REPORT_FILES, OUTPUT_MANIFEST])
            and all((path / name).is_file() for name in REPORT_FILES)
            and "accuracy_matrix" in json.loads((path / "report.json").read_text())
        )
    except (OSError, ValueError):
        return False


def write_report(report: dict, out: Path, force: bool) -> None:
    """report.json, report.md and index.html into `out`, all or none."""
    with atomic_output_dir(out, force, is_own_output=is_report_dir) as staging:
        (staging / "report.json").write_text(as_json(report), encoding="utf-8")
        (staging / "report.md").write_text(markdown(report), encoding="utf-8")
        write_page(report, staging / "index.html")
