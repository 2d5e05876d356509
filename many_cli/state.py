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
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import save_file

from many_cli.errors import InputError
from many_cli.files import open_safetensors

STATS_FILE = "many_stats.safetensors"
BUNDLE_FILE = "many_bundle.safetensors"
STATE_FILE = "many_state.safetensors"
FORMAT_VERSION = "1"


def packed_length(dim: int) -> int:
    return dim * (dim + 1) // 2


def dim_of_packed(length: int) -> int:
    dim = (math.isqrt(8 * length + 1) - 1) // 2
    if packed_length(dim) != length:
        raise ValueError(f"{length} is not the length of a packed triangle")
    return dim


def pack_symmetric(matrix: torch.Tensor) -> torch.Tensor:
    """The upper triangle of a symmetric matrix, row by row: no information is lost."""
    dim = matrix.shape[0]
    return torch.cat([matrix[row, row:] for row in range(dim)])


def packed_rows(packed: torch.Tensor, block: int = 512):
    """Yield (start, rows) over the packed upper triangle: rows is the dense (b, d - start)
    block of rows start..start+b-1 from column `start` on, zeros below the diagonal."""
    dim = dim_of_packed(packed.numel())
    offset = 0
    for start in range(0, dim, block):
        height = min(block, dim - start)
        rows = torch.zeros(height, dim - start, dtype=packed.dtype)
        for row in range(height):
            length = dim - start - row
            rows[row, row:] = packed[offset:offset + length]
            offset += length
        yield start, rows


def add_packed_to_upper_(matrix: torch.Tensor, packed: torch.Tensor, weight: float = 1.0) -> None:
    """matrix's upper triangle += weight · the packed one (the lower triangle is left alone)."""
    dim = matrix.shape[0]
    offset = 0
    for row in range(dim):
        length = dim - row
        matrix[row, row:].add_(packed[offset:offset + length], alpha=weight)
        offset += length


def upper_rows(matrix: torch.Tensor):
    """The upper triangle of a square matrix, row by row: the packed layout, in pieces."""
    for row in range(matrix.shape[0]):
        yield matrix[row, row:]


def times_packed_symmetric(a: torch.Tensor, packed: torch.Tensor, block: int = 512) -> torch.Tensor:
    """A C for a packed symmetric C, without forming C: with U its upper triangle,
    A C = A U + A Uᵀ − A diag(C), summed block by block in A's dtype."""
    out = torch.zeros(a.shape[0], dim_of_packed(packed.numel()), dtype=a.dtype)
    for start, rows in packed_rows(packed, block):
        rows = rows.to(a.dtype)
        stop = start + rows.shape[0]
        out[:, start:] += a[:, start:stop] @ rows
        out[:, start:stop] += a[:, start:] @ rows.T
        out[:, start:stop] -= a[:, start:stop] * rows.diagonal()
    return out


def unpack_symmetric(packed: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The full symmetric matrix from `pack_symmetric`'s output, in `dtype`."""
    dim = dim_of_packed(packed.numel())
    out = torch.zeros(dim, dim, dtype=dtype)
    add_packed_to_upper_(out, packed)
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

    def covariance(self, key: str) -> torch.Tensor:
        """The packed covariance of one input, checked for NaN and Inf."""
        with open_safetensors(self.path) as handle:
            packed = handle.get(f"covariance/{key}")
        if not torch.isfinite(packed).all():
            raise InputError(self.path, f"covariance of {key} holds NaN or Inf; re-run many stats")
        return packed

    def prototype(self) -> torch.Tensor | None:
        if not self.has_prototype:
            return None
        with open_safetensors(self.path) as handle:
            return handle.get("prototype")


def read_stats_header(path: Path) -> StatsHeader:
    with open_safetensors(path) as handle:
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


def write_stats(path: Path, *, covariances: Mapping[str, torch.Tensor], tokens: Mapping[str, int],
                modules: Mapping[str, list[str]], prototype: torch.Tensor | None, images: int,
                adapter_fingerprint: str, base_fingerprint: str, token_rule: str,
                extra: Mapping[str, str] | None = None) -> None:
    """Write a stats file. `covariances[input]` is packed (`pack_symmetric`); `modules[input]`
    lists the modules that read that input. Written to a temporary name, then renamed."""
    tensors = {f"covariance/{key}": packed.contiguous() for key, packed in covariances.items()}
    if prototype is not None:
        tensors["prototype"] = prototype.to(torch.float32).contiguous()
    inputs = {key: {"modules": sorted(modules[key]), "dim": dim_of_packed(packed.numel()),
                    "tokens": int(tokens[key])} for key, packed in covariances.items()}
    metadata = {
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
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata=metadata)
    partial.replace(path)


# ---------------------------------------------------------------- bundle

@dataclass(frozen=True)
class BundleHeader:
    path: Path
    tasks: tuple[str, ...]
    projector_module: str | None
    eta: float
    shapes: Mapping[str, tuple[int, ...]]


def read_bundle_header(path: Path) -> BundleHeader:
    with open_safetensors(path) as handle:
        metadata = handle.metadata()
        _check_format(path, metadata, "many-bundle")
        return BundleHeader(path, tuple(_json_field(path, metadata, "tasks")),
                            metadata.get("projector_module") or None,
                            float(metadata.get("eta", "nan")),
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
    with open_safetensors(path) as handle:
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
