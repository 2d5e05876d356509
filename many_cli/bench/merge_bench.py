"""`many bench merge`: `many merge` on adapters and stats files of LLaVA-1.5-7B's language-model
shapes (hidden 4096, MLP 11008, rank-16 LoRA on q, k, v, o, gate, up, down, a 21M-parameter
projector), written in the real formats with synthetic weights and positive-definite
covariances, against a dense RegMean reference and against the Cholesky floor, in one run.

Layers are independent, so every time and size here is linear in the number of layers.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import save_file

from many_cli.adapters import ADAPTER_WEIGHTS, PEFT_PREFIX, adapter_fingerprint
from many_cli.bench.tiny import LLAMA_PROJECTIONS
from many_cli.errors import InputError
from many_cli.state import STATE_FILE, STATS_FILE, StatsWriter, pack_symmetric, packed_length, read_stats_header

RIDGE = 1e-4


@dataclass(frozen=True)
class Shape:
    hidden: int = 4096
    intermediate: int = 11008
    rank: int = 16
    vision: int = 1024


def inputs_of_layer(layer: int, shape: Shape) -> dict[str, tuple[list[str], int]]:
    """The four distinct inputs of a Llama block: key -> (modules reading it, width)."""
    attention = f"model.language_model.layers.{layer}.self_attn"
    mlp = f"model.language_model.layers.{layer}.mlp"
    return {
        f"{attention}.k_proj": ([f"{attention}.{p}" for p in ("k_proj", "q_proj", "v_proj")], shape.hidden),
        f"{attention}.o_proj": ([f"{attention}.o_proj"], shape.hidden),
        f"{mlp}.gate_proj": ([f"{mlp}.gate_proj", f"{mlp}.up_proj"], shape.hidden),
        f"{mlp}.down_proj": ([f"{mlp}.down_proj"], shape.intermediate),
    }


def output_width(module: str, shape: Shape) -> int:
    return shape.intermediate if module.endswith(("gate_proj", "up_proj")) else shape.hidden


def synthetic_covariance(dim: int, generator: torch.Generator) -> torch.Tensor:
    """A positive-definite covariance with a decaying spectrum: L Lᵀ + a spread diagonal."""
    factor = torch.randn(dim, 64, generator=generator) / 8
    covariance = factor @ factor.T
    covariance.diagonal().add_(torch.logspace(0, -3, dim))
    return covariance


def write_task(out: Path, layers: int, shape: Shape, seed: int) -> Path:
    """One adapter directory in PEFT's format and its stats file, streamed input by input."""
    generator = torch.Generator().manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for layer in range(layers):
        for modules, width in inputs_of_layer(layer, shape).values():
            for module in modules:
                tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = (
                    torch.randn(shape.rank, width, generator=generator) / width**0.5
                )
                tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = (
                    torch.randn(output_width(module, shape), shape.rank, generator=generator) / 100
                )
    projector = f"{PEFT_PREFIX}model.multi_modal_projector"
    tensors[f"{projector}.linear_1.weight"] = torch.randn(shape.hidden, shape.vision, generator=generator).bfloat16()
    tensors[f"{projector}.linear_1.bias"] = torch.zeros(shape.hidden, dtype=torch.bfloat16)
    tensors[f"{projector}.linear_2.weight"] = torch.randn(shape.hidden, shape.hidden, generator=generator).bfloat16()
    tensors[f"{projector}.linear_2.bias"] = torch.zeros(shape.hidden, dtype=torch.bfloat16)
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    LoraConfig(
        r=shape.rank,
        lora_alpha=2 * shape.rank,
        target_modules=LLAMA_PROJECTIONS,
        modules_to_save=["multi_modal_projector"],
        base_model_name_or_path="synthetic-llava-7b",
    ).save_pretrained(str(out))

    inputs = {key: value for layer in range(layers) for key, value in inputs_of_layer(layer, shape).items()}
    with StatsWriter(
        out / STATS_FILE,
        dims={key: width for key, (_, width) in inputs.items()},
        tokens={key: 100_000 for key in inputs},
        modules={k: m for k, (m, _) in inputs.items()},
        images=1000,
        adapter_fingerprint=adapter_fingerprint(out),
        base_fingerprint="synthetic-llava-7b",
        token_rule="synthetic",
        prototype_width=shape.vision,
        exemplars=1,
    ) as writer:
        for key in writer.keys:
            writer.covariance(key, pack_symmetric(synthetic_covariance(inputs[key][1], generator)))
        prototype = torch.nn.functional.normalize(torch.randn(shape.vision, generator=generator), dim=0)
        writer.prototype(prototype)
        writer.exemplars(prototype[None])
    return out


def stats_bytes_per_layer(shape: Shape) -> int:
    return 4 * (3 * packed_length(shape.hidden) + packed_length(shape.intermediate))


_MERGE_IN_CHILD = """
import sys, time
from pathlib import Path
from many_cli.merge import MergeOptions, merge
*adapters, out, resume, ridge, precision, device = sys.argv[1:]
start = time.perf_counter()
merge([Path(a) for a in adapters], Path(out), MergeOptions(ridge=float(ridge), state_precision=precision,
                                                           device=device),
      resume=Path(resume) if resume else None)
print(time.perf_counter() - start)
"""


def run_python(script: str, *arguments: object) -> tuple[str, int]:
    """The last line a Python child running `script` prints, and its peak RSS in bytes; a
    process of its own, so that the peak is the child's work alone."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = subprocess.Popen([sys.executable, "-c", script, *map(str, arguments)], stdout=out, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            raise RuntimeError(f"benchmark child failed: {err.read().decode()[-2000:]}")
        out.seek(0)
        return out.read().decode().splitlines()[-1], usage.ru_maxrss * 1024


def run_merge(
    adapters: list[Path], out: Path, resume: Path | None = None, state_precision: str = "float64", device: str = "cpu"
) -> tuple[float, int]:
    """Seconds of the merge itself (after the interpreter and libraries have loaded) and the
    peak RSS in bytes of the whole process."""
    seconds, peak = run_python(_MERGE_IN_CHILD, *adapters, out, resume or "", RIDGE, state_precision, device)
    return float(seconds), peak


def run_timed(command: list[str]) -> float:
    """Wall seconds of a command run as a process (after a first run warms the page cache)."""
    subprocess.run(command, check=True, capture_output=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - start


def run_merge_process(adapters: list[Path], out: Path) -> float:
    """Wall seconds of `many merge ADAPTERS --out OUT`, the process a user runs."""
    command = [sys.executable, "-m", "many_cli", "merge", *map(str, adapters), "--out", str(out)]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - start


def dense_regmean_layer(
    adapters: list[Path], layer: int, shape: Shape, dtype: torch.dtype = torch.float64
) -> tuple[dict[str, torch.Tensor], float]:
    """RegMean as existing tools compute it: materialise each τ_i = s B_i A_i (d_out × d_in),
    Σ τ_i C_i, and solve against d_out right-hand sides (in `dtype`). Returns τ* per module, seconds."""
    start = time.perf_counter()
    merged = {}
    scale = 2.0  # lora_alpha / r
    for key, (modules, width) in inputs_of_layer(layer, shape).items():
        gram = torch.zeros(width, width, dtype=dtype)
        numerators = {module: 0 for module in modules}
        for adapter in adapters:
            covariance = read_stats_header(adapter / STATS_FILE).covariance(key).to(dtype)
            gram += covariance
            with safe_open(str(adapter / ADAPTER_WEIGHTS), "pt") as weights:
                for module in modules:
                    a = weights.get_tensor(f"{PEFT_PREFIX}{module}.lora_A.weight").to(dtype)
                    b = weights.get_tensor(f"{PEFT_PREFIX}{module}.lora_B.weight").to(dtype)
                    numerators[module] = numerators[module] + (scale * b @ a) @ covariance
            del covariance
        gram.diagonal().add_(RIDGE * gram.diagonal().mean())
        for module in modules:
            merged[module] = torch.linalg.solve(gram, numerators[module].T).T
    return merged, time.perf_counter() - start


def cholesky_floor(layers: int, shape: Shape) -> float:
    """Seconds for the one factorization per distinct input that any exact merge needs."""
    generator = torch.Generator().manual_seed(1)
    total = 0.0
    for width in [shape.hidden] * 3 + [shape.intermediate]:
        lower = synthetic_covariance(width, generator).double().mT  # column-major: LAPACK's fastest case
        start = time.perf_counter()
        torch.linalg.cholesky_ex(lower, out=(lower, torch.empty((), dtype=torch.int32)))
        total += time.perf_counter() - start
        del lower
    return total * layers


def merged_deltas(out: Path, layer: int) -> dict[str, torch.Tensor]:
    deltas = {}
    with safe_open(str(out / ADAPTER_WEIGHTS), "pt") as handle:
        for key in handle.keys():
            if f".layers.{layer}." in key and key.endswith("lora_A.weight"):
                module = key[len(PEFT_PREFIX) : -len(".lora_A.weight")]
                b = handle.get_tensor(key.replace("lora_A", "lora_B")).double()
                deltas[module] = b @ handle.get_tensor(key).double()
    return deltas


def largest_difference(reference: dict[str, torch.Tensor], ours: dict[str, torch.Tensor]) -> float:
    """The largest relative Frobenius difference of `ours` from `reference`, over modules."""
    return max(float((ours[module] - expected).norm() / expected.norm()) for module, expected in reference.items())


def largest_output_difference(
    reference: dict[str, torch.Tensor], ours: dict[str, torch.Tensor], adapters: list[Path], layer: int, shape: Shape
) -> float:
    """The largest ‖(τ − τ_ref) H½‖ / ‖τ_ref H½‖ over the modules of `layer`: the difference in
    the layer's outputs over every task's calibration inputs (H = Σ C_i, from the stats files)."""
    worst = 0.0
    for key, (modules, _) in inputs_of_layer(layer, shape).items():
        gram = 0
        for adapter in adapters:
            gram = gram + read_stats_header(adapter / STATS_FILE).covariance(key)
        for module in modules:
            difference = ours[module] - reference[module]
            worst = max(
                worst,
                float(
                    (
                        ((difference @ gram) * difference).sum()
                        / ((reference[module] @ gram) * reference[module]).sum()
                    ).sqrt()
                ),
            )
        del gram
    return worst


@dataclass(frozen=True)
class MergeBenchResult:
    layers: int
    tasks: int
    dense_layers: int
    merge_seconds: float
    peak_rss: int
    bytes_read: int
    bytes_written: int
    dense_seconds_per_layer: float
    dense_error: float
    floor_seconds: float
    stats_bytes_per_layer: int
    state_bytes_per_layer: int
    adapter_bytes: int
    dense_delta_bytes: int
    resume_seconds: float
    one_task_seconds: float
    float32_state_bytes_per_layer: int
    float32_state_error: float
    float32_state_seconds: float
    process_seconds: float  # `many merge` as a process: start-up, reading, merging, writing
    startup_seconds: float  # what that process spends importing before it reads anything
    dense32_seconds_per_layer: float

    @property
    def speedup_over_dense(self) -> float:
        return self.dense_seconds_per_layer * self.layers / self.merge_seconds

    @property
    def process_speedup_over_dense32(self) -> float:
        """The whole `many merge` process against dense float32 RegMean of the same layers."""
        return self.dense32_seconds_per_layer * self.layers / self.process_seconds

    @property
    def process_ratio_to_floor(self) -> float:
        """The whole process against one factorization per input plus the start-up."""
        return self.process_seconds / (self.floor_seconds + self.startup_seconds)

    @property
    def ratio_to_floor(self) -> float:
        return self.merge_seconds / self.floor_seconds

    @property
    def float32_state_ratio_to_floor(self) -> float:
        return self.float32_state_seconds / self.floor_seconds

    @property
    def resume_ratio(self) -> float:
        """--resume with one more task against a fresh one-task merge plus one factorization per input."""
        return self.resume_seconds / (self.one_task_seconds + self.floor_seconds)


def _size(path: Path) -> int:
    return (
        sum(item.stat().st_size for item in path.rglob("*") if item.is_file()) if path.is_dir() else path.stat().st_size
    )


def bench_merge(
    layers: int = 32, tasks: int = 6, shape: Shape = Shape(), workdir: Path | None = None, dense_layers: int = 1
) -> MergeBenchResult:
    root = Path(tempfile.mkdtemp(prefix="many-bench-", dir=workdir))
    try:
        needed = (tasks + 1) * stats_bytes_per_layer(shape) * layers * 3  # stats, state, headroom
        free = shutil.disk_usage(root).free
        if needed > free:
            fitting = max(1, int(free / ((tasks + 1) * stats_bytes_per_layer(shape) * 3)))
            raise InputError(
                root,
                f"needs about {needed / 1e9:.0f} GB of disk, {free / 1e9:.0f} GB are free; "
                f"try --layers {fitting} (times scale linearly with layers)",
            )
        adapters = [write_task(root / "adapters" / f"task{i + 1}", layers, shape, seed=i) for i in range(tasks + 1)]
        first, extra = adapters[:tasks], adapters[tasks]
        merged = root / "merged"
        merge_seconds, peak_rss = run_merge(first, merged)
        process_seconds = run_merge_process(first, root / "process")
        startup_seconds = run_timed([sys.executable, "-c", "import many_cli.merge"])
        resume_seconds, _ = run_merge([extra], root / "resumed", resume=merged)
        one_task_seconds, _ = run_merge([extra], root / "one")
        floor = cholesky_floor(layers, shape)
        float32_seconds, _ = run_merge(first, root / "merged32", state_precision="float32")
        run_merge([extra], root / "resumed32", resume=root / "merged32", state_precision="float32")
        float32_state_error = largest_output_difference(
            merged_deltas(root / "resumed", 0), merged_deltas(root / "resumed32", 0), adapters, 0, shape
        )

        dense_seconds, dense32_seconds, worst = 0.0, 0.0, 0.0
        for layer in range(dense_layers):
            reference, seconds = dense_regmean_layer(first, layer, shape)
            dense_seconds += seconds
            worst = max(worst, largest_difference(reference, merged_deltas(merged, layer)))
            del reference
            dense32_seconds += dense_regmean_layer(first, layer, shape, torch.float32)[1]
        dense_delta_bytes = (
            4
            * layers
            * sum(
                output_width(m, shape) * width for modules, width in inputs_of_layer(0, shape).values() for m in modules
            )
        )
        return MergeBenchResult(
            layers=layers,
            tasks=tasks,
            dense_layers=dense_layers,
            merge_seconds=merge_seconds,
            peak_rss=peak_rss,
            bytes_read=sum(_size(a / STATS_FILE) + _size(a / ADAPTER_WEIGHTS) for a in first),
            bytes_written=_size(merged),
            dense_seconds_per_layer=dense_seconds / dense_layers,
            dense_error=worst,
            floor_seconds=floor,
            stats_bytes_per_layer=_size(first[0] / STATS_FILE) // layers,
            state_bytes_per_layer=_size(merged / STATE_FILE) // layers,
            adapter_bytes=_size(merged / ADAPTER_WEIGHTS),
            dense_delta_bytes=dense_delta_bytes,
            resume_seconds=resume_seconds,
            one_task_seconds=one_task_seconds,
            float32_state_bytes_per_layer=_size(root / "merged32" / STATE_FILE) // layers,
            float32_state_error=float32_state_error,
            float32_state_seconds=float32_seconds,
            process_seconds=process_seconds,
            startup_seconds=startup_seconds,
            dense32_seconds_per_layer=dense32_seconds / dense_layers,
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
