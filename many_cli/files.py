"""File plumbing shared by every command: safe safetensors access, streaming writes,
fingerprints and all-or-nothing output directories."""

from __future__ import annotations

import ctypes
import fcntl
import glob
import hashlib
import json
import os
import secrets
import shutil
import signal
import struct
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

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


def check_readable(path: Path) -> None:
    """An unreadable input is named as such (not as missing or corrupt, as libraries report it)."""
    try:
        if path.is_dir():
            next(os.scandir(path), None)
        else:
            open(path, "rb").close()
    except OSError as error:
        raise InputError(path, f"cannot be read ({error.strerror or error})") from None


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise InputError(path, "file not found")
    check_readable(path)
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
        header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
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


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """safetensors' `save_file`, but byte for byte the same on every run (its metadata order
    is not): tensors by element size, then name, as safetensors lays them out."""
    names = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
    writer = StreamingSafetensorsWriter(path, [(name, tensors[name].dtype, tuple(tensors[name].shape))
                                               for name in names], metadata)
    for name in names:
        writer.write(name, tensors[name])
    writer.close()


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def refuse_overlap(out: Path, inputs: Iterable[Path | str]) -> None:
    """An output that is, contains or lies inside an input would destroy it: refuse it
    (symbolic links and hard links are seen through)."""
    target = out.resolve()
    for source in inputs:
        path = Path(source)
        if not path.exists():
            continue
        resolved = path.resolve()
        same = out.exists() and os.path.samefile(out, path)
        if same or target == resolved or target in resolved.parents or resolved in target.parents:
            raise InputError(out, f"the output would overwrite the input {source}; choose an --out "
                                  f"outside every input")
    if target == Path.cwd().resolve() or target in Path.cwd().resolve().parents:
        raise InputError(out, "the output may not be the current directory or one of its parents")


def refuse_foreign_file(out: Path, force: bool, is_own_kind: Callable[[Path], bool], kind: str) -> None:
    """Replacing an existing file is fine when it is this command's own kind of output;
    anything else needs --force. A directory is never replaced by a file."""
    if out.is_dir():
        raise InputError(out, "is a directory; --out takes a file name")
    if out.exists() and not force and not is_own_kind(out):
        raise InputError(out, f"exists and is not a {kind}; choose another --out or pass --force to replace it")


@contextmanager
def atomic_output_file(out: Path) -> Iterator[Path]:
    """Yield a temporary sibling file; on success it replaces `out` in one rename, on any
    failure (or signal) it is removed."""
    with _locked_output(out):
        partial = _fresh_sibling(out, lambda path: os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)))
        try:
            yield partial
            os.replace(partial, out)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise


@contextmanager
def atomic_output_dir(out: Path, force: bool, is_own_output: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it becomes `out`, on any failure (or
    signal) it is removed, so no command leaves a half-written output behind and `out` is at
    every moment either the old output or the new one. An existing `out` is replaced only with
    `force`, or when `is_own_output` recognises it as this command's own complete earlier output."""
    with _locked_output(out):  # checked under the lock, after a killed run's output is put back
        if out.exists() and not out.is_dir():
            raise InputError(out, "exists and is not a directory; remove it or choose another --out")
        if out.exists() and not force and not (is_own_output and is_own_output(out)):
            mine = " and is not this command's own earlier output, untouched" if is_own_output else ""
            raise InputError(out, f"output directory already exists{mine}; choose another --out or pass --force")
        if out.exists():
            _check_removable(out)
        staging = _fresh_sibling(out, lambda path: os.mkdir(path, 0o777))
        try:
            yield staging
            _swap_in(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


# Hidden siblings of an output NAME: the lock of the writing process, the staging copy being
# written, and the old output during a replacement. A run killed outright (SIGKILL, power loss)
# leaves them; the next writer of NAME, once it holds the lock, restores or removes them.
def _lock_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.many-lock")


def _old_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.many-old")


def _partial_prefix(out: Path) -> str:
    return f".{out.name}.many-partial-"


@contextmanager
def _locked_output(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on `out` while it is written: a second writer is refused at once.
    Parent directories this creates are removed again if the write fails."""
    try:
        created = _make_parents(out.parent)
    except OSError as error:
        raise InputError(out, f"cannot create its folder ({error.strerror or error}); choose another --out") from None
    try:
        handle = _acquire_lock(out)
        try:
            _recover(out)
            yield
        finally:
            _lock_path(out).unlink(missing_ok=True)  # still holding it: nobody can be waiting
            handle.close()
    except BaseException:
        for directory in created:
            with suppress(OSError):
                directory.rmdir()
        raise


def _acquire_lock(out: Path):
    path = _lock_path(out)
    while True:
        try:
            handle = open(path, "a")
        except OSError as error:
            raise InputError(out, f"cannot write here ({error.strerror or error}); choose another --out") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise InputError(out, "another many process is writing this output now; wait for it to "
                                  "finish or choose another --out") from None
        try:
            if os.path.samestat(os.fstat(handle.fileno()), os.stat(path)):
                return handle
        except FileNotFoundError:
            pass
        handle.close()  # the lock file was removed by its previous holder meanwhile: take the new one


def _recover(out: Path) -> None:
    """Undo what a killed writer left: put the old output back if the new one never arrived,
    and remove staging copies."""
    old = _old_path(out)
    if old.exists() or old.is_symlink():
        if out.exists():
            _remove(old)
        else:
            old.rename(out)
    for leftover in out.parent.glob(glob.escape(_partial_prefix(out)) + "*"):
        _remove(leftover)


def _check_removable(out: Path) -> None:
    """Replacing `out` removes the old one: refuse before any work if something in it may not be
    removed (a folder without write permission), rather than leave the old output hidden beside."""
    for root, directories, _ in os.walk(out):
        for folder in [root, *(os.path.join(root, name) for name in directories)]:
            if not os.path.islink(folder) and not os.access(folder, os.W_OK | os.X_OK):
                raise InputError(out, f"cannot be replaced: you may not remove what {folder} holds (no write "
                                      f"permission); choose another --out or fix its permissions")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fresh_sibling(out: Path, create: Callable[[str], None]) -> Path:
    """A new hidden sibling of `out`, made by `create` with the user's usual permissions (umask)."""
    while True:
        path = out.with_name(_partial_prefix(out) + secrets.token_hex(4))
        try:
            create(str(path))
            return path
        except FileExistsError:
            continue


def _make_parents(directory: Path) -> list[Path]:
    """mkdir -p, returning the directories it created, deepest first."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for path in reversed(missing):
        path.mkdir(exist_ok=True)
    return missing


def _swap_in(staging: Path, out: Path) -> None:
    """Make `staging` the output `out`. Where the kernel can exchange two names at once
    (renameat2), `out` is never missing; elsewhere the two renames run with SIGINT and SIGTERM
    held back, and a SIGKILL between them is undone by the next writer (`_recover`)."""
    if not out.exists():
        staging.rename(out)
    elif _exchange(staging, out):
        _remove(staging)  # now the old output (or the symbolic link that named it)
    else:
        old = _old_path(out)
        with _signals_held():
            out.rename(old)
            staging.rename(out)
        _remove(old)


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths atomically with Linux's renameat2(RENAME_EXCHANGE); False where unsupported."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0


@contextmanager
def _signals_held() -> Iterator[None]:
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
