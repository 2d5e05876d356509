"""`many bench startup`: how long the command line takes to answer `--help`, a refused option and
a missing path, against the time `python -c "import torch"` takes on the same machine, and
whether any of them imported torch (read from Python's own `-X importtime` report)."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass

MISSING = "/nonexistent/many-bench-startup"

# (what is measured, the command line's arguments)
QUICK_CASES = [
    ("many --help", ["--help"]),
    ("many merge --help", ["merge", "--help"]),
    ("merge: a bad --method", ["merge", "--method", "nope", MISSING, "--out", MISSING]),
    ("merge: a missing adapter", ["merge", MISSING, "--out", MISSING]),
]
CASES = [
    *QUICK_CASES,
    *[
        (f"many {command} --help", [command, "--help"])
        for command in ("stats", "infer", "export", "convert", "demo", "bench")
    ],
    ("many bench merge --help", ["bench", "merge", "--help"]),
    ("stats: a bad --dtype", ["stats", "--model", MISSING, "--adapter", MISSING, "--data", MISSING, "--dtype", "f8"]),
    ("stats: a missing adapter", ["stats", "--model", MISSING, "--adapter", MISSING, "--data", MISSING]),
    (
        "infer: a bad --routing",
        ["infer", "--model", MISSING, "--merged", MISSING, "--data", MISSING, "--routing", "nope"],
    ),
    ("infer: a missing merge", ["infer", "--model", MISSING, "--merged", MISSING, "--data", MISSING]),
    ("export: a missing merge", ["export", "--model", MISSING, "--merged", MISSING, "--out", MISSING]),
    ("convert: a missing checkpoint", ["convert", MISSING, "--out", MISSING]),
]


@dataclass(frozen=True)
class Case:
    name: str
    seconds: float
    exit_status: int
    imports_torch: bool


@dataclass(frozen=True)
class StartupResult:
    torch_seconds: float
    cases: list[Case]


def _timed(arguments: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *arguments], capture_output=True, text=True)
    return time.perf_counter() - start, done


def imports_torch(importtime_report: str) -> bool:
    """Whether a `python -X importtime` report (its standard error) shows torch imported."""
    return any(
        line.startswith("import time:") and line.rsplit("|", 1)[-1].strip() == "torch"
        for line in importtime_report.splitlines()
    )


def bench_startup(quick: bool = False) -> StartupResult:
    """Each case run as a fresh process: once to warm the page cache (not with `quick`), once
    timed, once under `-X importtime` to see what it imported. The reference is one `import torch` process, timed after a warm-up run so that
    both sides read their files from the page cache."""
    _timed(["-c", "import torch"])
    torch_seconds, _ = _timed(["-c", "import torch"])
    cases = []
    for name, arguments in QUICK_CASES if quick else CASES:
        if not quick:  # warm-up: the page cache, as for torch (the quick run reads it warm enough)
            _timed(["-m", "many_cli", *arguments])
        seconds, done = _timed(["-m", "many_cli", *arguments])
        _, traced = _timed(["-X", "importtime", "-m", "many_cli", *arguments])
        cases.append(Case(name, seconds, done.returncode, imports_torch(traced.stderr)))
    return StartupResult(torch_seconds, cases)
