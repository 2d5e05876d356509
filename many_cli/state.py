"""The three files `many` writes besides the PEFT adapter, and their layouts.

Stats file (`many_stats.safetensors`, one per adapter, written by `many stats`):
  covariance/<input>   1-D, the upper triangle of Σ x xᵀ packed row by row (float32 or float64)
  prototype            1-D float32, the mean of L2-normalised pooled projector inputs (if images)
  metadata             format, format_version, adapter_fingerprint, base_fingerprint, token_rule,
                       images, tokens, inputs = JSON {input: {"modules": [...], "dim": d, "tokens": n}}
  An <input> is named after the first module (in name order) that reads it.

Bundle (`many_bundle.safetensors`, in a merge output):
  projector/<i>/<param>, prototype/<i> for task i (0-based, merge order)
  metadata             format, format_version, tasks = JSON [names], projector_module, eta

State (`many_state.safetensors`, in a merge output; the sufficient statistics of a merge):
  gram/<group>         1-D float64, packed upper triangle of H = Σ_i w_i C_i (no ridge)
  ac/<i>/<module>      float64 (r_i, d_in): w_i · A_i C_i
  b/<i>/<module>       float64 (d_out, r_i): s_i · B_i
  metadata             format, format_version, base_fingerprint, balance, tasks, groups
  with w_i = 1 (token-weighted least squares) or 1 / tokens_i under --balance.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import torch
from torch.nn.utils.rnn import pad_sequence

from many_cli.errors import InputError
from many_cli.files import atomic_output_file, open_safetensors, save_tensors

STATS_FILE = "many_stats.safetensors"
BUNDLE_FILE = "many_bundle.safetensors"
EXPERTS_DIR = "experts"  # in a merge output: one PEFT LoRA adapter (scale 1) per task, by name
STATE_FILE = "many_state.safetensors"
FORMAT_VERSION = "1"
BLOCK = 512  # rows per block when packed triangles are streamed


def packed_length(dim: int) -> int:
    return dim * (dim + 1) // 2


def dim_of_packed(length: int) -> int:
    dim = (math.isqrt(8 * length + 1) - 1) // 2
    if packed_length(dim) != length:
        raise ValueError(f"{length} is not the length of a packed triangle")
    return dim


def upper_blocks(matrix: torch.Tensor, block: int = BLOCK):
    """The upper triangle of a square matrix in the packed layout, a block of rows at a time."""
    dim = matrix.shape[0]
    for start in range(0, dim, block):
        yield torch.cat([matrix[row, row:] for row in range(start, min(start + block, dim))])


def pack_symmetric(matrix: torch.Tensor) -> torch.Tensor:
    """The upper triangle of a symmetric matrix, row by row: no information is lost."""
    return torch.cat(list(upper_blocks(matrix)))


def _blocks(dim: int, take, block: int):
    """(start, rows) over a packed triangle whose entries offset..stop come from take(offset, stop):
    rows is the dense (b, dim - start) block of rows start..start+b-1 from column `start` on,
    each packed row right-aligned, zeros before its diagonal."""
    offset = 0
    for start in range(0, dim, block):
        lengths = [dim - row for row in range(start, min(start + block, dim))]
        flat = take(offset, offset + sum(lengths))
        yield start, pad_sequence(list(flat.split(lengths)), batch_first=True, padding_side="left")
        offset += sum(lengths)


def packed_blocks(packed: torch.Tensor, block: int = BLOCK):
    """`_blocks` of a packed triangle in memory."""
    return _blocks(dim_of_packed(packed.numel()), lambda start, stop: packed[start:stop], block)


def read_packed_blocks(path: Path, key: str, block: int = BLOCK, check_finite: bool = True):
    """`_blocks` of one packed tensor of a safetensors file, read slice by slice, so the whole
    triangle is never in memory; with `check_finite`, NaN or Inf is an InputError naming the file."""
    with open_safetensors(path) as handle:
        def take(start: int, stop: int) -> torch.Tensor:
            flat = handle.slice(key, start, stop)
            if check_finite and not bool(torch.isfinite(flat).all()):
                raise InputError(path, f"{key} holds NaN or Inf; re-create the file")
            return flat

        yield from _blocks(dim_of_packed(handle.shape(key)[0]), take, block)


def unpack_symmetric(packed: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The full symmetric matrix from `pack_symmetric`'s output, in `dtype`."""
    dim = dim_of_packed(packed.numel())
    out = torch.zeros(dim, dim, dtype=dtype)
    for start, rows in packed_blocks(packed):
        out[start:start + rows.shape[0], start:] = rows
    return out + out.triu(1).T


def _check_format(path: Path, metadata: Mapping[str, str], expected: str) -> None:
    if metadata.get("format") != expected:
        raise InputError(path, f"not a {expected} file (format is {metadata.get('format')!r})")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise InputError(path, f"{expected} format version {metadata.get('format_version')!r} "
                               f"is not supported (expected {FORMAT_VERSION}); re-create it")


def _json_field(path: Path, metadata: Mapping[str, str], field: str):
    try:
        return json.loads(metadata[field])
    except (KeyError, json.JSONDecodeError):
        raise InputError(path, f"metadata field {field!r} is missing or not JSON") from None


# ---------------------------------------------------------------- stats file

@dataclass(frozen=True)
class InputStats:
    key: str
    modules: tuple[str, ...]
    dim: int
    tokens: int


@dataclass(frozen=True)
class StatsHeader:
    """What a stats file says about itself; covariances are read lazily, one at a time."""
    path: Path
    adapter_fingerprint: str
    base_fingerprint: str
    token_rule: str
    images: int
    inputs: Mapping[str, InputStats]
    has_prototype: bool

    def input_of(self, module: str) -> InputStats | None:
        for stats in self.inputs.values():
            if module in stats.modules:
                return stats
        return None

    def covariance_blocks(self, key: str, check_finite: bool = True):
        """The packed covariance of one input, as `packed_blocks`, read from the file lazily."""
        return read_packed_blocks(self.path, f"covariance/{key}", check_finite=check_finite)

    def prototype(self) -> torch.Tensor | None:
        if not self.has_prototype:
            return None
        with open_safetensors(self.path) as handle:
            return handle.get("prototype")


@contextmanager
def _metadata_of(path: Path) -> Iterator:
    """Open a `many` file; metadata that is there but malformed is an InputError naming the file."""
    with open_safetensors(path) as handle:
        try:
            yield handle
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise InputError(path, f"its metadata is malformed ({type(error).__name__}: {error}); "
                                   f"re-create the file") from None


def read_stats_header(path: Path) -> StatsHeader:
    with _metadata_of(path) as handle:
        metadata = handle.metadata()
        _check_format(path, metadata, "many-stats")
        inputs = {}
        for key, entry in _json_field(path, metadata, "inputs").items():
            name = f"covariance/{key}"
            if name not in handle.keys():
                raise InputError(path, f"tensor {name!r} is missing")
            dim = int(entry["dim"])
            if handle.shape(name) != (packed_length(dim),):
                raise InputError(path, f"tensor {name!r} has shape {handle.shape(name)}, "
                                       f"expected the packed triangle of a {dim}×{dim} matrix")
            inputs[key] = InputStats(key, tuple(entry["modules"]), dim, int(entry["tokens"]))
        return StatsHeader(
            path=path,
            adapter_fingerprint=metadata.get("adapter_fingerprint", ""),
            base_fingerprint=metadata.get("base_fingerprint", ""),
            token_rule=metadata.get("token_rule", ""),
            images=int(metadata.get("images", "0")),
            inputs=inputs,
            has_prototype="prototype" in handle.keys(),
        )


def is_stats_file(path: Path) -> bool:
    """Whether `path` is a readable `many stats` file (which `many stats --out` may replace)."""
    try:
        with open_safetensors(path) as handle:
            return handle.metadata().get("format") == "many-stats"
    except InputError:
        return False


def stats_metadata(*, dims: Mapping[str, int], tokens: Mapping[str, int], modules: Mapping[str, list[str]],
                   images: int, adapter_fingerprint: str, base_fingerprint: str, token_rule: str,
                   extra: Mapping[str, str] | None = None) -> dict[str, str]:
    inputs = {key: {"modules": sorted(modules[key]), "dim": int(dim), "tokens": int(tokens[key])}
              for key, dim in dims.items()}
    return {
        "format": "many-stats",
        "format_version": FORMAT_VERSION,
        "adapter_fingerprint": adapter_fingerprint,
        "base_fingerprint": base_fingerprint,
        "token_rule": token_rule,
        "images": str(images),
        "tokens": str(max(tokens.values(), default=0)),
        "inputs": json.dumps(inputs),
        **(extra or {}),
    }


def write_stats(path: Path, *, covariances: Mapping[str, torch.Tensor], tokens: Mapping[str, int],
                modules: Mapping[str, list[str]], prototype: torch.Tensor | None, images: int,
                adapter_fingerprint: str, base_fingerprint: str, token_rule: str,
                extra: Mapping[str, str] | None = None) -> None:
    """Write a stats file. `covariances[input]` is packed (`pack_symmetric`); `modules[input]`
    lists the modules that read that input. Written to a temporary name, then renamed."""
    tensors = {f"covariance/{key}": packed.contiguous() for key, packed in covariances.items()}
    if prototype is not None:
        tensors["prototype"] = prototype.to(torch.float32).contiguous()
    metadata = stats_metadata(dims={key: dim_of_packed(packed.numel()) for key, packed in covariances.items()},
                              tokens=tokens, modules=modules, images=images,
                              adapter_fingerprint=adapter_fingerprint, base_fingerprint=base_fingerprint,
                              token_rule=token_rule, extra=extra)
    with atomic_output_file(path) as partial:
        save_tensors(partial, tensors, metadata)


# ---------------------------------------------------------------- bundle

@dataclass(frozen=True)
class BundleHeader:
    path: Path
    tasks: tuple[str, ...]
    projector_module: str | None
    eta: float
    shapes: Mapping[str, tuple[int, ...]]


def read_bundle_header(path: Path) -> BundleHeader:
    with _metadata_of(path) as handle:
        metadata = handle.metadata()
        _check_format(path, metadata, "many-bundle")
        eta = float(metadata.get("eta", "nan"))
        if not (eta > 0 and math.isfinite(eta)):
            raise InputError(path, f"its default η {metadata.get('eta')!r} is not a finite number > 0")
        return BundleHeader(path, tuple(_json_field(path, metadata, "tasks")),
                            metadata.get("projector_module") or None, eta,
                            {key: handle.shape(key) for key in handle.keys()})


def bundle_metadata(tasks: list[str], projector_module: str | None, eta: float) -> dict[str, str]:
    return {"format": "many-bundle", "format_version": FORMAT_VERSION,
            "tasks": json.dumps(tasks), "projector_module": projector_module or "", "eta": repr(eta)}


# ---------------------------------------------------------------- merge state

@dataclass(frozen=True)
class StateTask:
    name: str
    adapter_fingerprint: str
    modules: tuple[str, ...]
    tokens: Mapping[str, int]  # calibration tokens per group


@dataclass(frozen=True)
class StateHeader:
    path: Path
    base_fingerprint: str
    base_model: str | None
    balance: bool
    tasks: tuple[StateTask, ...]
    groups: Mapping[str, tuple[str, ...]]
    shapes: Mapping[str, tuple[int, ...]]


def read_state_header(path: Path) -> StateHeader:
    with _metadata_of(path) as handle:
        metadata = handle.metadata()
        _check_format(path, metadata, "many-state")
        tasks = tuple(StateTask(entry["name"], entry["adapter_fingerprint"], tuple(entry["modules"]),
                                entry["tokens"]) for entry in _json_field(path, metadata, "tasks"))
        groups = {key: tuple(modules) for key, modules in _json_field(path, metadata, "groups").items()}
        return StateHeader(path, metadata.get("base_fingerprint", ""),
                           metadata.get("base_model") or None,
                           metadata.get("balance") == "true", tasks, groups,
                           {key: handle.shape(key) for key in handle.keys()})


def state_metadata(base_fingerprint: str, base_model: str | None, balance: bool,
                   tasks: list[StateTask], groups: Mapping[str, tuple[str, ...]]) -> dict[str, str]:
    return {
        "format": "many-state",
        "format_version": FORMAT_VERSION,
        "base_fingerprint": base_fingerprint,
        "base_model": base_model or "",
        "balance": "true" if balance else "false",
        "tasks": json.dumps([{"name": task.name, "adapter_fingerprint": task.adapter_fingerprint,
                              "modules": list(task.modules), "tokens": dict(task.tokens)}
                             for task in tasks]),
        "groups": json.dumps({key: list(modules) for key, modules in groups.items()}),
    }
