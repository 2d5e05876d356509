"""`many report`: the metrics against figures worked out by hand from rows written here, the
refusals of files that are not a continual run, the CI gates, byte-identical reruns, and the
page opened in a real headless browser."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import run_cli_output
from PIL import Image

# Task a: 4/4 after step 1, 3/4 after step 2, 2/4 after step 3; b: 2/4, then 3/4; c: 1/4.
CORRECT = [{"a": 4}, {"a": 3, "b": 2}, {"a": 2, "b": 3, "c": 1}]
RECORDS = 4
MATRIX = [[1.0, None, None], [0.75, 0.5, None], [0.5, 0.75, 0.25]]
AVERAGES = [1.0, 0.625, 0.5]
FORGETTING = {"a": 0.5, "b": -0.25, "c": None}  # best before the last step minus final
BACKWARD_TRANSFER = -0.125  # ((0.5 - 1.0) + (0.75 - 0.5)) / 2
UPPER = {"a": 1.0, "b": 0.75}
# In the last step, one image of c is routed to a and one of b to c; every other image goes home.
CONFUSION = [[4, 0, 0], [0, 3, 1], [1, 0, 3]]


def _rows(step: int, tasks: list[str], image: Path | None = None) -> list[dict]:
    merge = {"tasks": tasks, "fingerprint": f"merge{step}"}
    rows = []
    for task in tasks:
        for record in range(RECORDS):
            correct = record < CORRECT[step][task]
            routed = task
            if step == 2 and (task, record) in (("c", 3), ("b", 3)):
                routed = {"c": "a", "b": "c"}[task]
            rows.append(
                {
                    "prediction": "yes" if correct else "no",
                    "answer": "yes",
                    "correct": correct,
                    "task": task,
                    "routing": {name: float(name == routed) for name in tasks},
                    "routed_task": routed,
                    "lm": "merged",
                    "seconds": 0.1,
                    "prompt": f"{task} {record}?",
                    "merge": merge,
                    "image": str(image or f"{task}/{record}.png"),
                }
            )
    return rows


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _run(tmp_path: Path, image: Path | None = None) -> tuple[list[Path], list[Path]]:
    steps = [
        _write(tmp_path / f"step{step + 1}.jsonl", _rows(step, ["a", "b", "c"][: step + 1], image)) for step in range(3)
    ]
    upper = []
    for task, correct in (("a", 4), ("b", 3)):
        rows = [
            {
                "prediction": "yes" if record < correct else "no",
                "answer": "yes",
                "correct": record < correct,
                "task": task,
                "routing": {},
                "routed_task": None,
                "lm": "merged",
                "seconds": 0.1,
                "prompt": "?",
                "adapter": {"tasks": [task], "fingerprint": f"adapter-{task}"},
            }
            for record in range(RECORDS)
        ]
        upper.append(_write(tmp_path / f"upper_{task}.jsonl", rows))
    return steps, upper


def _report(capsys, tmp_path, *extra) -> tuple[int, str, str]:
    steps, upper = _run(tmp_path)
    return run_cli_output(
        capsys,
        "report",
        *steps,
        *[item for path in upper for item in ("--upper", path)],
        "--out",
        tmp_path / "report",
        *extra,
    )


def test_the_report_holds_the_figures_worked_out_by_hand(capsys, tmp_path):
    code, out, err = _report(capsys, tmp_path)
    assert code == 0, err
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["tasks"] == ["a", "b", "c"]
    assert report["accuracy_matrix"] == MATRIX
    assert report["average_accuracy"] == pytest.approx(AVERAGES)
    assert report["final_average_accuracy"] == pytest.approx(0.5)
    assert report["forgetting"] == pytest.approx(FORGETTING)
    assert report["average_forgetting"] == pytest.approx(0.125)
    assert report["backward_transfer"] == pytest.approx(BACKWARD_TRANSFER)
    assert report["upper_accuracy"] == UPPER
    assert report["ratio_to_upper"] == pytest.approx({"a": 0.5, "b": 1.0})
    assert report["routing_confusion"]["counts"] == CONFUSION
    assert report["routing_accuracy"] == pytest.approx({"a": 1.0, "b": 0.75, "c": 0.75})
    assert len(report["wrong_answers"]) == 2 + 1 + 3
    assert report["step_costs"] == [
        {"step": 2, "task": "a", "before": 1.0, "after": 0.75, "routed_home": 1.0},
        {"step": 3, "task": "a", "before": 0.75, "after": 0.5, "routed_home": 1.0},
    ]
    assert "final average accuracy 50.0%" in out
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "| 3 | 50.0 | 75.0 | 25.0 | 50.0 |" in markdown
    assert "| a | 50.0 | 100.0 | 50.0 | 100.0 | 0.500 | 100.0 |" in markdown


def test_reruns_are_byte_identical_and_replace_only_a_report(capsys, tmp_path):
    assert _report(capsys, tmp_path)[0] == 0
    first = {name: (tmp_path / "report" / name).read_bytes() for name in ("report.json", "report.md", "index.html")}
    assert _report(capsys, tmp_path)[0] == 0  # an earlier report is replaced without --force
    assert {name: (tmp_path / "report" / name).read_bytes() for name in first} == first
    (tmp_path / "report" / "notes.txt").write_text("mine")
    code, _, err = _report(capsys, tmp_path)
    assert code == 2 and "--force" in err
    assert (tmp_path / "report" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "gate, line",
    [
        (
            ("--min-final-accuracy", "0.6"),
            "final average accuracy 0.5000 is below --min-final-accuracy 0.6 (worst task: c, 0.2500)",
        ),
        (("--max-forgetting", "0.4"), "task a forgot 0.5000"),
    ],
)
def test_the_gates_fail_naming_the_worst_task(capsys, tmp_path, gate, line):
    code, _, err = _report(capsys, tmp_path, *gate)
    assert code == 1
    assert line in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "report" / "index.html").is_file()  # the report a failed gate explains is there


def test_gates_that_hold_pass(capsys, tmp_path):
    assert _report(capsys, tmp_path, "--min-final-accuracy", "0.5", "--max-forgetting", "0.5")[0] == 0


def _unanswered(row: dict) -> dict:
    return {key: value for key, value in row.items() if key != "answer"} | {"correct": None}


def _rewrite(path: Path, change) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    _write(path, change(rows))


@pytest.mark.parametrize(
    "case, fault",
    [
        ("data, not predictions", "line 1 is not a prediction row"),
        ("a task missing later", "scores no record of task 'a'"),
        ("a task partly scored later", "scores 3 records of task 'b'"),
        ("no new task", "scores the same tasks as"),
        ("two merges in one file", "was answered by another merge than line 1"),
        ("no answers for a task", "no record of task 'c' has an answer"),
        ("a merge without a task it scores", "scores task 'c', which the merge that answered it does not hold"),
        ("a merge with a task it does not score", "scores no record of task 'd', which its merge holds"),
        ("an edited correct", "line 1 says correct true, but its prediction 'zzz' and answer 'yes' say false"),
        ("correct without an answer", "line 1 says correct true, but its prediction 'yes' and answer None say null"),
        ("routed to a task of no merge", "row 1 is routed to 'zz', a task its merge does not hold"),
        ("a merge that does not extend the last", "which does not extend the merge of"),
    ],
)
def test_files_that_are_not_a_continual_run_are_refused_naming_the_file(capsys, tmp_path, case, fault):
    steps, _ = _run(tmp_path)
    broken = steps[2]
    if case == "data, not predictions":
        _write(broken, [{"image": "x.png", "prompt": "?", "answer": "yes"}])
    elif case == "a task missing later":
        _rewrite(broken, lambda rows: [row for row in rows if row["task"] != "a"])
    elif case == "a task partly scored later":
        _rewrite(broken, lambda rows: [row for row in rows if row["prompt"] != "b 0?"])
    elif case == "no new task":
        shutil.copy(steps[1], broken)
    elif case == "two merges in one file":
        _rewrite(broken, lambda rows: rows[:-1] + [{**rows[-1], "merge": {"tasks": ["a"], "fingerprint": "other"}}])
    elif case == "no answers for a task":
        _rewrite(broken, lambda rows: [_unanswered(row) if row["task"] == "c" else row for row in rows])
    else:
        merge = {
            "a merge without a task it scores": ["a", "b"],
            "a merge with a task it does not score": ["a", "b", "c", "d"],
            "a merge that does not extend the last": ["b", "a", "c"],
        }.get(case)
        first = {
            "an edited correct": {"prediction": "zzz", "correct": True},
            "correct without an answer": {"answer": None, "correct": True},
            "routed to a task of no merge": {"routed_task": "zz", "routing": {"zz": 1.0}},
        }.get(case, {})
        _rewrite(
            broken,
            lambda rows: [
                {
                    **row,
                    **(first if index == 0 else {}),
                    **({"merge": {**row["merge"], "tasks": merge}} if merge else {}),
                }
                for index, row in enumerate(rows)
            ],
        )
    code, _, err = run_cli_output(capsys, "report", *steps, "--out", tmp_path / "report")
    assert code == 2
    assert err.startswith(f"many: error: {broken}:") and fault in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "report").exists()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (.ci/run installs Debian's chromium)")
def test_the_page_renders_in_a_browser_with_the_report_s_numbers(capsys, tmp_path):
    image = tmp_path / "seen.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
    steps, upper = _run(tmp_path, image)
    assert (
        run_cli_output(
            capsys, "report", *steps, "--upper", upper[0], "--upper", upper[1], "--out", tmp_path / "report"
        )[0]
        == 0
    )
    page = tmp_path / "report" / "index.html"
    report = json.loads((tmp_path / "report" / "report.json").read_text())

    def chromium(*arguments: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [
                CHROMIUM,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={tmp_path / 'profile'}",
                "--enable-logging=stderr",
                "--v=0",
                *arguments,
                page.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )

    rendered = chromium("--dump-dom")
    assert rendered.returncode == 0, rendered.stderr[-2000:]
    console = [line for line in rendered.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    dom = rendered.stdout
    assert 'id="accuracy-heatmap"' in dom and "<svg" in dom.split('id="accuracy-heatmap"')[1][:200]
    from html.parser import HTMLParser

    shown = {}

    class Metrics(HTMLParser):
        def handle_starttag(self, tag, attributes):
            attributes = dict(attributes)
            if "data-metric" in attributes and "data-value" in attributes:
                shown[attributes["data-metric"]] = float(attributes["data-value"])

    Metrics().feed(dom)
    expected = {
        "final_average_accuracy": report["final_average_accuracy"],
        "average_forgetting": report["average_forgetting"],
        "backward_transfer": report["backward_transfer"],
        **{f"final:{task}": value for task, value in zip(report["tasks"], report["accuracy_matrix"][-1])},
        **{f"forgetting:{task}": value for task, value in report["forgetting"].items() if value is not None},
        **{f"upper:{task}": value for task, value in report["upper_accuracy"].items()},
        **{f"routing:{task}": value for task, value in report["routing_accuracy"].items()},
    }
    assert shown == pytest.approx(expected)
    wrong_table = dom.split('class="wrong"')[1]
    assert wrong_table.count("data:image/png;base64,") == len(report["wrong_answers"])  # each one's thumbnail

    screenshot = tmp_path / "page.png"
    shot = chromium(f"--screenshot={screenshot}", "--window-size=1200,1000")
    assert shot.returncode == 0 and screenshot.is_file(), shot.stderr[-2000:]
    colours = set(Image.open(screenshot).convert("RGB").getdata())
    near = lambda target: any(sum(abs(a - b) for a, b in zip(colour, target)) < 12 for colour in colours)  # noqa: E731
    # The heat map's cells at 100% and 25% (viridis) are on screen.
    assert near((253, 231, 37)) and near((59, 82, 139))


def test_an_upper_bound_scored_with_another_task_s_adapter_is_refused(capsys, tmp_path):
    steps, upper = _run(tmp_path)
    _rewrite(upper[1], lambda rows: [{**row, "adapter": {"tasks": ["a"], "fingerprint": "adapter-a"}} for row in rows])
    code, _, err = run_cli_output(capsys, "report", *steps, "--upper", upper[1], "--out", tmp_path / "report")
    assert code == 2 and err == f"many: error: {upper[1]}: scores task 'b' with the adapter of a: not that task's own\n"


def _experts_file(tmp_path: Path, change=lambda rows: rows) -> Path:
    """The last step's merge answered with --lm-routing experts: each record by the LoRA of the
    task its image was routed to, right when that is its own task (10 of the 12 rows)."""
    rows = [
        {**row, "lm": row["routed_task"], "correct": row["routed_task"] == row["task"]}
        | {"prediction": "yes" if row["routed_task"] == row["task"] else "no"}
        for row in _rows(2, ["a", "b", "c"])
    ]
    return _write(tmp_path / "experts.jsonl", change(rows))


def test_the_report_shows_what_routed_experts_keep_beside_the_merged_model_s_forgetting(capsys, tmp_path):
    code, _, err = _report(capsys, tmp_path)
    assert code == 0, err
    hint = (tmp_path / "report" / "report.md").read_text()
    assert "To forget nothing, serve this merge with `many infer --lm-routing experts`" in hint  # a forgot 50 points
    code, _, err = _report(capsys, tmp_path, "--experts", _experts_file(tmp_path))
    assert code == 0, err
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    # By hand: b's and c's fourth records were routed away (to c and a), everything else home.
    assert report["experts"]["accuracy"] == pytest.approx({"a": 1.0, "b": 0.75, "c": 0.75})
    assert report["experts"]["final_average_accuracy"] == pytest.approx(2.5 / 3)
    assert report["experts"]["answered_by_own_lora"] == pytest.approx(10 / 12)
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "the same merge answers 83.3% of these records (merged: 50.0%), 83.3% of them by their own" in markdown
    assert "| a | 50.0 | 100.0 | 50.0 | 100.0 | 0.500 | 100.0 | 100.0 |" in markdown
    page = (tmp_path / "report" / "index.html").read_text()
    assert 'id="trade-off"' in page and 'data-metric="experts:c" data-value="0.75"' in page


@pytest.mark.parametrize(
    "case, fault",
    [
        ("another merge", "was answered by merge merge1, not by the last step's (merge2"),
        ("fewer records", "scores other records than"),
        ("the merged LoRA only", "no row was answered by a task's own LoRA"),
    ],
)
def test_an_experts_file_of_other_records_or_another_merge_is_refused(capsys, tmp_path, case, fault):
    change = {
        "another merge": lambda rows: [{**row, "merge": {**row["merge"], "fingerprint": "merge1"}} for row in rows],
        "fewer records": lambda rows: rows[1:],
        "the merged LoRA only": lambda rows: [{**row, "lm": "merged"} for row in rows],
    }[case]
    experts = _experts_file(tmp_path, change)
    code, _, err = _report(capsys, tmp_path, "--experts", experts)
    assert code == 2 and err.startswith(f"many: error: {experts}: ") and fault in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "report").exists()
