"""Checked safetensors files: every way a file can be bad is an InputError naming it (reads),
and files far larger than memory are written one tensor at a time (writes)."""

from __future__ import annotations

import hashlib
import json
import struct
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Iterator, Mapping, Sequence

import torch
from safetensors import SafetensorError, safe_open

from many_cli.errors import InputError
from many_cli.files import check_readable, read_json, refuse_special_file

_DTYPE_CODES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}


@contextmanager
def open_safetensors(path: Path) -> Iterator:
    """Open a safetensors file lazily (memory-mapped), turning every way it can be bad
    into an InputError naming the file."""
    refuse_special_file(path)  # a FIFO is no file, and is not "not found"
    if not path.is_file():
        raise InputError(path, "file not found")
    check_readable(path)
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

    def dtype(self, key: str) -> str:
        """The stored dtype's safetensors code ("F32", "BF16", "I64", ...), without reading data."""
        return self._handle.get_slice(key).get_dtype()

    def raw(self, key: str) -> torch.Tensor:
        """One tensor as stored, of any dtype, unchecked (a model's buffers, copied as they are)."""
        try:
            return self._handle.get_tensor(key)
        except (SafetensorError, RuntimeError, ValueError) as error:
            raise InputError(self.path, f"cannot read tensor {key!r} ({error})") from None

    def get(self, key: str) -> torch.Tensor:
        """One tensor, checked: every tensor `many` reads is floating point and finite."""
        try:
            tensor = self._handle.get_tensor(key)
        except (SafetensorError, RuntimeError, ValueError) as error:
            raise InputError(self.path, f"cannot read tensor {key!r} ({error})") from None
        if not tensor.is_floating_point():
            raise InputError(self.path, f"tensor {key!r} is {tensor.dtype}, not floating point; re-create the file")
        if not bool(torch.isfinite(tensor).all()):
            raise InputError(self.path, f"tensor {key!r} holds NaN or Inf; re-create the file")
        return tensor


def check_tensors(path: Path) -> None:
    """Read every tensor of a safetensors file once, so a bad one is reported before any use."""
    with open_safetensors(path) as handle:
        for key in handle.keys():
            handle.get(key)


# A tensor's bytes are sampled, not read whole: a window at its start, middle and end. Any change
# that reaches a whole tensor (another seed, a fine-tune, a LoRA folded in) shows in each window,
# and the reads stay a few KiB a tensor however large the model.
_WINDOW = 1024
_HEADER_LIMIT = 100 << 20  # safetensors' own cap on a header


def weights_fingerprint(files: Sequence[Path]) -> str:
    """sha256, over every tensor of the weight `files` in name order, of its name, dtype, shape
    and three windows of its bytes as stored: the same weights however they are sharded, and
    whether in safetensors or in a (tensors-only) pickled torch file."""
    tensors = {}
    for path in files:
        entries = _header(path) if path.suffix == ".safetensors" else _pickled_entries(path)
        for name, entry in entries.items():
            tensors.setdefault(name, []).append((path, *entry))
    digest = hashlib.sha256()
    handles: dict[Path, BinaryIO] = {}
    try:
        for name in sorted(tensors):
            for path, dtype, shape, start, end, data in tensors[name]:
                digest.update(json.dumps([name, dtype, shape]).encode())
                middle = (start + end - _WINDOW) // 2
                for offset in sorted({start, max(start, middle), max(start, end - _WINDOW)}):
                    size = min(_WINDOW, end - offset)
                    if data is not None:
                        digest.update(data[offset : offset + size].numpy().tobytes())
                        continue
                    handle = handles.get(path) or handles.setdefault(path, open(path, "rb"))
                    handle.seek(offset)
                    digest.update(handle.read(size))
    finally:
        for handle in handles.values():
            handle.close()
    return digest.hexdigest()[:16]


def load_pickled_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a pickled torch file (`pytorch_model.bin`, `adapter_model.bin`), read
    with torch's tensors-only unpickler, memory-mapped: nothing else in the file can run."""
    if not path.exists():
        raise InputError(path, "file not found")
    check_readable(path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001 - any unpickling refusal or corruption is bad input
        first_line = str(error).splitlines()[0][:200] if str(error) else ""
        raise InputError(path, f"is not a tensors-only torch file ({type(error).__name__}: {first_line})") from None
    if not isinstance(loaded, dict) or not all(isinstance(value, torch.Tensor) for value in loaded.values()):
        raise InputError(path, "does not hold a dictionary of tensors")
    return loaded


def _pickled_entries(path: Path) -> dict[str, tuple[str, list[int], int, int, torch.Tensor]]:
    """name -> (dtype, shape, 0, byte length, its bytes) of every tensor of a pickled file, as
    `_header` tells a safetensors file's (the same windows of the same bytes)."""
    entries = {}
    for name, tensor in load_pickled_tensors(path).items():
        data = tensor.contiguous().reshape(-1).view(torch.uint8)
        entries[name] = (_DTYPE_CODES[tensor.dtype], list(tensor.shape), 0, data.numel(), data)
    return entries


def _header(path: Path) -> dict[str, tuple[str, list[int], int, int, None]]:
    """name -> (dtype, shape, first byte, end, None) of every tensor of a safetensors file, in file
    offsets (which safe_open does not tell: the fingerprint reads byte windows)."""
    check_readable(path)
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > _HEADER_LIMIT:
                raise ValueError(f"header of {length} bytes")
            header = json.loads(handle.read(length))
        size = path.stat().st_size
        tensors = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            start, end = (8 + length + int(offset) for offset in entry["data_offsets"])
            if not 8 + length <= start <= end <= size:
                raise ValueError(f"tensor {name!r} lies outside the file")
            tensors[name] = (str(entry["dtype"]), list(entry["shape"]), start, end, None)
        return tensors
    except (OSError, struct.error, ValueError, KeyError, TypeError, AttributeError) as error:
        raise InputError(path, f"not a readable safetensors file ({error}); re-create it") from None


class StreamingSafetensorsWriter:
    """Writes a safetensors file one tensor at a time, so that a file far larger than
    memory (a 7B merge state) never has to be held whole. The header is laid out first
    from the declared shapes; tensors must then be written in the declared order. Used as a
    context manager: closed (and checked complete) when the block ends, its partial file
    removed when the block fails.

    safetensors' own `save_file` needs every tensor in memory at once, hence this."""

    def __init__(
        self, path: Path, layout: Sequence[tuple[str, torch.dtype, tuple[int, ...]]], metadata: Mapping[str, str]
    ):
        self._path = path
        self._layout = list(layout)
        self._next = 0
        header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
        offset = 0
        for name, dtype, shape in self._layout:
            size = _numel(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(encoded)))
        self._file.write(encoded)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected_name, dtype, shape = self._layout[self._next]
        if name != expected_name or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise ValueError(
                f"expected {expected_name} {dtype} {shape}, got {name} {tensor.dtype} {tuple(tensor.shape)}"
            )
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

    def abort(self) -> None:
        """Close and remove the partial file."""
        self._file.close()
        self._path.unlink(missing_ok=True)

    def __enter__(self) -> StreamingSafetensorsWriter:
        return self

    def __exit__(self, kind, error, trace) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


class StreamWrapper:
    """A writer of one file format over a StreamingSafetensorsWriter (`_writer`), used as a
    context manager as that one is."""

    _writer: StreamingSafetensorsWriter

    def close(self) -> None:
        self._writer.close()

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace) -> None:
        self._writer.__exit__(kind, error, trace)


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """safetensors' `save_file`, but byte for byte the same on every run (its metadata order
    is not): tensors by element size, then name, as safetensors lays them out."""
    names = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
    layout = [(name, tensors[name].dtype, tuple(tensors[name].shape)) for name in names]
    with StreamingSafetensorsWriter(path, layout, metadata) as writer:
        for name in names:
            writer.write(name, tensors[name])


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


WEIGHTS_INDEX = "model.safetensors.index.json"
PICKLED_WEIGHTS_INDEX = "pytorch_model.bin.index.json"


def weight_files(folder: Path) -> list[str]:
    """The safetensors files transformers loads a model from, relative to its folder: those its
    index names (each checked to stay inside the folder), else model.safetensors."""
    index = folder / WEIGHTS_INDEX
    if not index.is_file():
        if not (folder / "model.safetensors").is_file():
            raise InputError(folder, "holds no model.safetensors nor its index (many loads no pickled checkpoint)")
        return ["model.safetensors"]
    return _indexed_shards(index)


def _indexed_shards(index: Path) -> list[str]:
    """The shards a weight index names, each checked to stay inside its folder."""
    weight_map = read_json(index).get("weight_map", {})
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputError(index, 'has no "weight_map" object naming the shards')
    names = sorted(set(weight_map.values()), key=str)
    for name in names:
        _check_shard_name(index, name)
    return names


def model_weight_files(folder: Path) -> list[str]:
    """The weight files a model folder is loaded from, relative to it: its safetensors, or else
    its pickled shards (`pytorch_model.bin`, or those its index names), for the maker's layouts
    whose checkpoints come so (LLaVA's own code)."""
    if (folder / "model.safetensors").is_file() or (folder / WEIGHTS_INDEX).is_file():
        return weight_files(folder)
    if (folder / PICKLED_WEIGHTS_INDEX).is_file():
        return _indexed_shards(folder / PICKLED_WEIGHTS_INDEX)
    if (folder / "pytorch_model.bin").is_file():
        return ["pytorch_model.bin"]
    raise InputError(folder, "holds no model weights (model.safetensors, pytorch_model.bin or their index)")


def safetensors_name(name: str) -> str:
    """The safetensors file an export writes for the weight file `name` (a pickled shard's
    transformers name turned into its safetensors one)."""
    if not name.endswith(".bin"):
        return name
    stem = name.removesuffix(".bin")
    return ("model" + stem.removeprefix("pytorch_model") if stem.startswith("pytorch_model") else stem) + ".safetensors"


def _check_shard_name(index: Path, name: object) -> None:
    """A shard is named relative to the model's folder and stays inside it: the export writes
    the same name under --out, so an absolute name or a `..` would lead outside it (or onto the
    shard being read)."""
    parts = PurePosixPath(name).parts if isinstance(name, str) else ()
    if not parts or PurePosixPath(name).is_absolute() or ".." in parts or "\\" in name:
        raise InputError(
            index,
            f"names the shard {name!r}, which is not a path inside the model's folder; "
            f"name each shard relative to it (for example model-00001-of-00002.safetensors)",
        )
