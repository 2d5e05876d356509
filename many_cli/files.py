"""File plumbing shared by every command: safe safetensors access, streaming writes,
fingerprints and all-or-nothing output directories."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch
from safetensors import SafetensorError, safe_open

from many_cli.errors import InputError

_DTYPE_CODES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
}


@contextmanager
def open_safetensors(path: Path) -> Iterator:
    """Open a safetensors file lazily (memory-mapped), turning every way it can be bad
    into an InputError naming the file."""
    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        opened = safe_open(str(path), framework="pt")
        handle = opened.__enter__()
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        raise InputError(path, f"not a readable safetensors file ({error}); re-create it") from None
    try:
        yield _CheckedHandle(handle, path)
    finally:
        opened.__exit__(None, None, None)


class _CheckedHandle:
    """A safe_open handle whose reads fail as InputError, naming the file and the tensor."""

    def __init__(self, handle, path: Path):
        self._handle = handle
        self.path = path

    def keys(self) -> list[str]:
        return list(self._handle.keys())

    def metadata(self) -> dict[str, str]:
        return self._handle.metadata() or {}

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle.get_slice(key).get_shape())

    def slice(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Elements start..stop-1 of a 1-D tensor, read without loading the rest."""
        try:
            return self._handle.get_slice(key)[start:stop]
        except (SafetensorError, RuntimeError, ValueError) as error:
            raise InputError(self.path, f"cannot read tensor {key!r} ({error})") from None

    def get(self, key: str) -> torch.Tensor:
        try:
            return self._handle.get_tensor(key)
        except (SafetensorError, RuntimeError, ValueError) as error:
            raise InputError(self.path, f"cannot read tensor {key!r} ({error})") from None


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(path, f"not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise InputError(path, "expected a JSON object")
    return value


def file_fingerprint(path: Path) -> str:
    """sha256 of a file's bytes, read in chunks (adapters can be hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


class StreamingSafetensorsWriter:
    """Writes a safetensors file one tensor at a time, so that a file far larger than
    memory (a 7B merge state) never has to be held whole. The header is laid out first
    from the declared shapes; tensors must then be written in the declared order.

    safetensors' own `save_file` needs every tensor in memory at once, hence this."""

    def __init__(self, path: Path, layout: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: Mapping[str, str]):
        self._layout = list(layout)
        self._next = 0
        header: dict[str, object] = {"__metadata__": dict(metadata)}
        offset = 0
        for name, dtype, shape in self._layout:
            size = _numel(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _DTYPE_CODES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(encoded)))
        self._file.write(encoded)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected_name, dtype, shape = self._layout[self._next]
        if name != expected_name or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"expected {expected_name} {dtype} {shape}, got {name} "
                             f"{tensor.dtype} {tuple(tensor.shape)}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(data.numpy()))
        self._next += 1

    def write_pieces(self, name: str, pieces) -> None:
        """Write one declared 1-D tensor from consecutive pieces (rows of a triangle, say)."""
        expected_name, dtype, shape = self._layout[self._next]
        if name != expected_name:
            raise ValueError(f"expected {expected_name}, got {name}")
        written = 0
        for piece in pieces:
            data = piece.detach().to("cpu", dtype).contiguous().reshape(-1)
            self._file.write(memoryview(data.view(torch.uint8).numpy()))
            written += data.numel()
        if written != _numel(shape):
            raise ValueError(f"{name}: wrote {written} values, declared {_numel(shape)}")
        self._next += 1

    def close(self) -> None:
        self._file.close()
        if self._next != len(self._layout):
            raise ValueError(f"{len(self._layout) - self._next} declared tensors never written")


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


@contextmanager
def atomic_output_dir(out: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it becomes `out`, on any failure
    it is removed, so no command leaves a half-written output behind."""
    if out.exists() and not force:
        raise InputError(out, "output directory already exists; choose another --out or pass --force")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _apply_umask(staging)
    if out.exists():
        retired = out.with_name(f".{out.name}.old")
        shutil.rmtree(retired, ignore_errors=True)
        out.rename(retired)
        staging.rename(out)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        staging.rename(out)


def _apply_umask(directory: Path) -> None:
    """mkdtemp makes a private directory; give it and its files the user's usual permissions."""
    mask = os.umask(0)
    os.umask(mask)
    directory.chmod(0o777 & ~mask)
    for path in directory.iterdir():
        path.chmod(0o666 & ~mask)
