"""Output safety and plain-file checks shared by every command: all-or-nothing output files and
directories, overlap and foreign-file refusals, readable inputs, JSON and fingerprints. No torch:
the command line uses it before any heavy import (safetensors files are `tensorfiles`)."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import glob
import hashlib
import json
import os
import secrets
import shutil
import signal
import stat
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

from many_cli.errors import InputError, OutputError


def special_file_kind(path: Path) -> str | None:
    """What `path` is when it is neither a regular file nor a folder ("a FIFO", "a character
    device", ...): reading one can wait forever (a pipe with no writer) or never end."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    kinds = {
        stat.S_ISFIFO: "a FIFO (named pipe)",
        stat.S_ISCHR: "a character device",
        stat.S_ISBLK: "a block device",
        stat.S_ISSOCK: "a socket",
    }
    return next((kind for test, kind in kinds.items() if test(mode)), None)


def refuse_special_file(path: Path, source: object = None, what: str = "") -> None:
    """An InputError naming `source` (or `path`) when `path` is a FIFO, a device or a socket."""
    kind = special_file_kind(path)
    if kind is not None:
        named = f"{what} {path} is" if source is not None else "is"
        raise InputError(
            path if source is None else source,
            f"{named.strip()} {kind}, not a regular file; many reads regular files only (save it to a file first)",
        )


def check_readable(path: Path) -> None:
    """An unreadable input is named as such (not as missing or corrupt, as libraries report it);
    so is one that is not a regular file or a folder, before anything waits on it."""
    refuse_special_file(path)
    try:
        if path.is_dir():
            next(os.scandir(path), None)
        else:
            open(path, "rb").close()
    except OSError as error:
        raise InputError(path, f"cannot be read ({error.strerror or error})") from None


def read_json(path: Path) -> dict:
    refuse_special_file(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    check_readable(path)
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(path, f"not valid JSON ({error})") from None
    except RecursionError:
        raise InputError(path, "not valid JSON for many (nested too deeply)") from None
    if not isinstance(value, dict):
        raise InputError(path, "expected a JSON object")
    return value


def file_fingerprint(path: Path) -> str:
    """sha256 of a file's bytes, read in chunks (adapters can be hundreds of MB)."""
    check_readable(path)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def refuse_overlap(out: Path, inputs: Iterable[Path | str]) -> None:
    """An output that is, contains or lies inside an input would destroy it: refuse it
    (symbolic links and hard links are seen through)."""
    target = resolved_path(out)
    for source in inputs:
        path = Path(source)
        try:
            if not path.exists():
                continue
        except OSError:  # a name too long for the file system: nothing there to overwrite
            continue
        resolved = resolved_path(path)
        same = out.exists() and os.path.samefile(out, path)
        if same or target == resolved or target in resolved.parents or resolved in target.parents:
            raise InputError(out, f"the output would overwrite the input {source}; choose an --out outside every input")
    if target == Path.cwd().resolve() or target in Path.cwd().resolve().parents:
        raise InputError(out, "the output may not be the current directory or one of its parents")


def resolved_path(path: Path) -> Path:
    """`path` made absolute, its symbolic links and `..` resolved; a symbolic link loop is an
    InputError naming it."""
    try:
        return path.resolve()
    except (RuntimeError, OSError) as error:  # RuntimeError: a loop (Python < 3.13)
        raise InputError(
            path, f"cannot be resolved ({getattr(error, 'strerror', None) or error}: a symbolic link loop?)"
        ) from None


def refuse_foreign_file(out: Path, force: bool, is_own_kind: Callable[[Path], bool], kind: str) -> None:
    """Replacing an existing file is fine when it is this command's own kind of output;
    anything else needs --force. A directory is never replaced by a file."""
    if out.is_dir():
        raise InputError(out, "is a directory; --out takes a file name")
    if out.exists() and not force and not is_own_kind(out):
        raise InputError(out, f"exists and is not a {kind}; choose another --out or pass --force to replace it")


@contextmanager
def atomic_output_file(out: Path) -> Iterator[Path]:
    """Yield a temporary path for `out` (of the same name, inside a hidden staging folder beside
    it); on success it replaces `out` in one rename, on any failure (or signal) it is removed."""
    with _locked_output(out), _naming_a_full_disk(out):
        _refuse_another_users_in_a_sticky_folder(out)
        staging = _fresh_staging(out)
        try:
            yield staging / out.name
            os.replace(staging / out.name, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def atomic_output_dir(out: Path, force: bool, is_own_output: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it becomes `out`, on any failure (or
    signal) it is removed, so no command leaves a half-written output behind and `out` is at
    every moment either the old output or the new one. An existing `out` is replaced only with
    `force`, or when `is_own_output` recognises it as this command's own complete earlier output,
    and even then only when it is empty or holds exactly what `many` wrote there (its manifest):
    no folder is ever emptied that `many` did not fill."""
    # Checked under the lock, after a killed run's output is put back.
    with _locked_output(out), _naming_a_full_disk(out):
        if out.exists() and not out.is_dir():
            raise InputError(out, "exists and is not a directory; remove it or choose another --out")
        if out.exists() and any(out.iterdir()):
            _refuse_foreign_folder(out)
            if not force and not (is_own_output and is_own_output(out)):
                mine = " and is not this command's own earlier output" if is_own_output else ""
                raise InputError(out, f"output directory already exists{mine}; choose another --out or pass --force")
            _check_removable(out)
        _refuse_another_users_in_a_sticky_folder(out)
        staging = _fresh_staging(out)
        try:
            yield staging
            written = {name: kind for name, kind in _entries(staging).items() if name != _STAGING_MARKER}
            (staging / OUTPUT_MANIFEST).write_text(json.dumps(written, indent=1, sort_keys=True) + "\n")
            (staging / _STAGING_MARKER).unlink()  # from here the manifest alone tells it is many's
            _check_still_replaceable(out)
            _swap_in(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


@contextmanager
def _naming_a_full_disk(out: Path) -> Iterator[None]:
    """A write that fails for want of space (or a read-only disk) names the output it was for."""
    try:
        yield
    except OSError as error:
        if error.errno not in _DISK_FULL:
            raise
        raise OutputError(f"{out}: cannot be written ({os.strerror(error.errno)}); nothing was replaced") from None


# Written last into every output folder: each entry `many` put there (relative path -> size in
# bytes, or the kind of a folder or link), so that --force replaces that folder only while it holds
# nothing else. Sizes, not digests: hashing an exported 7B model would cost more than writing it.
OUTPUT_MANIFEST = ".many-output.json"


def written_by_many(folder: Path) -> bool:
    """Whether `folder` holds exactly the entries `many` wrote there, each of the size it wrote."""
    return _first_foreign_entry(folder) is None


def _refuse_foreign_folder(out: Path) -> None:
    foreign = _first_foreign_entry(out)
    if foreign is not None:
        raise InputError(
            out,
            f"holds {foreign}, which many did not write there; many replaces only an empty folder or "
            f"its own output, even with --force: choose another --out (or empty the folder yourself)",
        )


def _check_still_replaceable(out: Path) -> None:
    """Checked again at the swap: what appeared in `out` while the new output was written (a note
    saved into it, a folder made at its name) is the user's, and the old output stays as it is."""
    if not (out.exists() or out.is_symlink()):
        return
    if not out.is_dir():
        raise InputError(out, "appeared while many was writing it and is not a directory; nothing was replaced")
    foreign = _first_foreign_entry(out)
    if foreign is not None:
        raise InputError(
            out,
            f"{foreign} appeared in it while many was writing the new output; nothing was replaced "
            f"(your file is kept): move it out of the folder and run again, or choose another --out",
        )


def _first_foreign_entry(folder: Path) -> str | None:
    """The first entry under `folder` (in name order) that its manifest does not list as it is now,
    or the manifest itself when it is missing or unreadable; None when all of it is many's."""
    manifest = folder / OUTPUT_MANIFEST
    try:
        written = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):  # a forged manifest is no manifest
        written = None
    entries = _entries(folder)
    if not isinstance(written, dict):
        return str(folder / min(entries)) if entries else None
    for name, kind in sorted(entries.items()):
        if written.get(name) != kind:
            return str(folder / name) + ("" if name not in written else " (changed since)")
    return None


def _entries(folder: Path) -> dict[str, int | str]:
    """Every entry under `folder` but the manifest: relative path -> size, or "folder" / "link"
    (a link is never followed, so nothing of the user's can hide behind one)."""
    entries: dict[str, int | str] = {}
    for root, directories, names in os.walk(folder):
        for name in directories + names:
            path = Path(root) / name
            relative = path.relative_to(folder).as_posix()
            if relative != OUTPUT_MANIFEST:
                entries[relative] = "link" if path.is_symlink() else "folder" if path.is_dir() else path.lstat().st_size
    return entries


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
    _refuse_passing_through_missing_folders(out)
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


def _refuse_passing_through_missing_folders(out: Path) -> None:
    """`D/sub/..` names D, but making its folders would create D/sub first: refuse such a path,
    naming the output it means."""
    prefix = Path(out.anchor)
    for part in out.parts[len(out.anchor and [out.anchor]) :]:
        if part == ".." and not prefix.exists():
            raise InputError(
                out, f"passes through {prefix}, which does not exist; write the output as {resolved_path(out)}"
            )
        prefix = prefix / part


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
            raise InputError(
                out, "another many process is writing this output now; wait for it to finish or choose another --out"
            ) from None
        try:
            if os.path.samestat(os.fstat(handle.fileno()), os.stat(path)):
                return handle
        except FileNotFoundError:
            pass
        handle.close()  # the lock file was removed by its previous holder meanwhile: take the new one


def _recover(out: Path) -> None:
    """Undo what a killed writer left: put the old output back if the new one never arrived, and
    remove staging folders. Only what carries many's own mark is touched (a staging marker inside,
    or a manifest its entries still match): a user's folder of the same name is left as it is."""
    old = _old_path(out)
    if old.is_dir() and not old.is_symlink() and _is_many_leftover(old):
        if out.exists() or out.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.rename(out)
    for leftover in out.parent.glob(glob.escape(_partial_prefix(out)) + "*"):
        if leftover.is_dir() and not leftover.is_symlink() and _is_many_leftover(leftover):
            shutil.rmtree(leftover, ignore_errors=True)


def _is_many_leftover(folder: Path) -> bool:
    """A staging folder (its marker inside), or an output of many's whole as it wrote it, or an
    empty folder (an empty output moved aside): nothing of anyone else's is in it."""
    try:
        return (folder / _STAGING_MARKER).is_file() or not any(folder.iterdir()) or written_by_many(folder)
    except OSError:
        return False


def _check_removable(out: Path) -> None:
    """Replacing `out` removes the old one: refuse before any work if something in it may not be
    removed (a folder without write permission), rather than leave the old output hidden beside."""
    for root, directories, _ in os.walk(out):
        for folder in [root, *(os.path.join(root, name) for name in directories)]:
            if not os.path.islink(folder) and not os.access(folder, os.W_OK | os.X_OK):
                raise InputError(
                    out,
                    f"cannot be replaced: you may not remove what {folder} holds (no write "
                    f"permission); choose another --out or fix its permissions",
                )


def _refuse_another_users_in_a_sticky_folder(out: Path) -> None:
    """In a sticky folder (/tmp) only the owner of an entry (or of the folder) may rename or remove
    it: replacing another user's output there would fail at the swap, after all the work."""
    try:
        entry, folder = out.lstat(), out.parent.stat()
    except OSError:
        return  # nothing there to replace
    me = os.geteuid()
    if folder.st_mode & stat.S_ISVTX and me != 0 and me not in (entry.st_uid, folder.st_uid):
        raise InputError(
            out,
            "cannot be replaced: it belongs to another user, in a folder where only an entry's owner may "
            "replace it (the sticky bit, as in /tmp); choose another --out",
        )


# Inside every staging folder from its creation until its output is complete: it tells a later run
# that the folder is many's to remove, whatever its name.
_STAGING_MARKER = ".many-staging"


def _fresh_staging(out: Path) -> Path:
    """A new hidden staging folder beside `out`, made with the user's usual permissions (umask)
    and marked as many's."""
    while True:
        path = out.with_name(_partial_prefix(out) + secrets.token_hex(4))
        try:
            path.mkdir(0o777)
            break
        except FileExistsError:
            continue
    try:
        (path / _STAGING_MARKER).write_text("a staging folder of many's; the next run on this output removes it\n")
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    return path


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
        _remove_replaced(staging)  # now the old output (or the symbolic link that named it)
    else:
        old = _old_path(out)
        if old.exists() or old.is_symlink():  # a user's, left by _recover
            raise InputError(old, f"is not many's, and many needs that name to replace {out}; rename it and run again")
        with signals_held():
            out.rename(old)
            staging.rename(out)
        _remove_replaced(old)


def _remove_replaced(old: Path) -> None:
    """Remove the replaced output, unless something of the user's reached it in the instant
    between the last check and the swap: then it stays, hidden beside the new output, whole."""
    if old.is_symlink():
        old.unlink()
    elif _is_many_leftover(old):
        shutil.rmtree(old, ignore_errors=True)


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths atomically with Linux's renameat2(RENAME_EXCHANGE); False where unsupported."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0


@contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM held back in this block, delivered (if they came) as it ends."""
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def require_inputs(inputs: Mapping[Path, str]) -> None:
    """Refuse the first input path that does not exist with its fault ("adapter directory not
    found"). A DATA of the form `dataset_info.json:NAME` exists when its file does."""
    for path, fault in inputs.items():
        refuse_special_file(path)
        file_part = str(path).rpartition(":")[0]
        if not (path.exists() or (file_part and Path(file_part).is_file())):
            raise InputError(path, fault)
