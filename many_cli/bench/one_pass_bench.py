"""`many bench one-pass`: what `many merge --one-pass` (RegMean++ in one walk) costs at a real
model's widths, against what the job runs today: one `many stats` pass per task and a plain
`many merge`. The base is `many bench e2e`'s (the family's real configuration, random bf16 weights,
no download; the depth may be cut to one layer, since every figure grows linearly in it), with
its adapters and calibration records; each phase runs in a process of its own, so that its peak
memory is its own."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from many_cli.bench.e2e import job_inputs
from many_cli.bench.merge_bench import run_python

_STATS = """
import json, sys, time
from pathlib import Path
from many_cli.stats import StatsOptions, collect_stats
base, adapter, data, device = sys.argv[1:]
start = time.perf_counter()
collect_stats(base, Path(adapter), Path(data), None, StatsOptions(device=device, batch_size=2))
print(json.dumps({"seconds": time.perf_counter() - start}))
"""

_MERGE = """
import json, sys, time
from pathlib import Path
from many_cli.merge import MergeOptions, merge
from many_cli.stats.walk import walker
base, out, device, memory, count, *rest = sys.argv[1:]
adapters, data = [Path(p) for p in rest[: int(count)]], [Path(p) for p in rest[int(count):]]
start = time.perf_counter()
if data:
    options = MergeOptions(one_pass=True, model=Path(base), device=device, walk_memory=float(memory))
    merge(adapters, Path(out), options, open_walk=walker(options, data))
else:
    merge(adapters, Path(out), MergeOptions(device=device))
print(json.dumps({"seconds": time.perf_counter() - start}))
"""


@dataclass(frozen=True)
class OnePassResult:
    family: str
    device: str
    layers: int
    tasks: int
    records: int
    stats_seconds: float  # one `many stats` run, mean over the tasks (model load included)
    stats_peak: int  # bytes, the largest of the tasks' runs
    merge_seconds: float  # plain `many merge` over the stats files
    merge_peak: int
    one_pass_seconds: float  # `many merge --one-pass` (model load included)
    one_pass_peak: int
    spilled_seconds: float  # the same with --walk-memory 0: every hidden state on disk
    spilled_peak: int

    @property
    def seconds_ratio(self) -> float:
        """The one-pass merge against today's job: every task's stats pass and a plain merge."""
        return self.one_pass_seconds / (self.tasks * self.stats_seconds + self.merge_seconds)

    @property
    def peak_ratio(self) -> float:
        return self.one_pass_peak / self.stats_peak


def bench_one_pass(
    family: str = "llava-1.5-7b",
    layers: int = 1,
    vision_layers: int = 1,
    tasks: int = 2,
    records: int = 4,
    device: str = "auto",
    workdir: Path | None = None,
) -> OnePassResult:
    with job_inputs(family, layers, vision_layers, tasks, records, device, workdir) as job:
        where = job.compute.type
        stats = [_child(_STATS, job.base, adapter, data, where) for adapter, data in zip(job.adapters, job.data)]
        merged = _child(_MERGE, job.base, job.root / "merged", where, 0, tasks, *job.adapters)
        walked = _child(_MERGE, job.base, job.root / "one_pass", where, 4, tasks, *job.adapters, *job.data)
        spilled = _child(_MERGE, job.base, job.root / "spilled", where, 0, tasks, *job.adapters, *job.data)
        return OnePassResult(
            family=family,
            device=str(job.compute),
            layers=job.config.get_text_config().num_hidden_layers,
            tasks=tasks,
            records=records,
            stats_seconds=sum(seconds for seconds, _ in stats) / tasks,
            stats_peak=max(peak for _, peak in stats),
            merge_seconds=merged[0],
            merge_peak=merged[1],
            one_pass_seconds=walked[0],
            one_pass_peak=walked[1],
            spilled_seconds=spilled[0],
            spilled_peak=spilled[1],
        )


def _child(script: str, *arguments: object) -> tuple[float, int]:
    """Seconds the child measured and its peak RSS in bytes."""
    line, peak = run_python(script, *arguments)
    return json.loads(line)["seconds"], peak
