"""The quick loop (`pytest -m "not slow"`, the README's inner loop) against the whole suite: its
time as a share of the whole suite's, and what of `many_cli` it runs (coverage.py). It must run
every module of the package and take under a quarter of the whole suite's time; the figure is
printed either way.

    .venv/bin/python .ci/quick_loop.py PYTEST_LOG     (the whole suite's output: its "in N s")
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUICK = ["-m", "pytest", "-m", "not slow", "-q", "-p", "no:cacheprovider"]


def whole_suite_seconds(log: Path) -> float:
    """pytest's own summary line of the whole suite: "... passed ... in 462.35s (0:07:42)"."""
    found = re.findall(r" in ([\d.]+)s", log.read_text())
    if not found:
        sys.exit(f"{log}: no pytest summary line (`... in N s`) to read the whole suite's time from")
    return float(found[-1])


def main() -> int:
    whole = whole_suite_seconds(Path(sys.argv[1]))
    start = time.perf_counter()
    subprocess.run([sys.executable, *QUICK], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    quick = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as scratch:
        # Child processes too (the tests run `many` as users do): coverage's own subprocess patch.
        config, summary = Path(scratch) / "coveragerc", Path(scratch) / "coverage.json"
        config.write_text(
            f"[run]\nsource = many_cli\npatch = subprocess\nparallel = true\ndata_file = {scratch}/coverage\n"
        )
        coverage = [sys.executable, "-m", "coverage"]
        subprocess.run(
            [*coverage, "run", f"--rcfile={config}", *QUICK], cwd=ROOT, check=True, stdout=subprocess.DEVNULL
        )
        subprocess.run([*coverage, "combine", f"--rcfile={config}", "-q"], cwd=ROOT, check=True)
        subprocess.run([*coverage, "json", f"--rcfile={config}", "-o", str(summary), "-q"], cwd=ROOT, check=True)
        files = json.loads(summary.read_text())["files"]
    modules = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "many_cli").rglob("*.py"))
    runs = {module: entry["summary"] for module, entry in files.items()}
    unreached = [  # a module with statements of which none ran (an empty __init__ has none to run)
        m for m in modules if m not in runs or (runs[m]["num_statements"] and not runs[m]["covered_lines"])
    ]
    covered = sum(entry["summary"]["covered_lines"] for entry in files.values())
    statements = sum(entry["summary"]["num_statements"] for entry in files.values())
    print(
        f"quick loop: {quick:.0f} s, {quick / whole:.0%} of the whole suite's {whole:.0f} s; it runs "
        f"{len(modules) - len(unreached)} of the {len(modules)} modules of many_cli and "
        f"{covered / statements:.0%} of their statements"
    )
    faults = [f"it runs nothing of {module}" for module in unreached]
    if quick >= whole / 4:
        faults.append("it takes a quarter of the whole suite's time or more")
    for fault in faults:
        print(f"quick loop: {fault}", file=sys.stderr)
    return 1 if faults else 0


if __name__ == "__main__":
    sys.exit(main())
