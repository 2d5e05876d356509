"""The Python API: the functions the commands call, taking paths as `str` or `os.PathLike`, and
checking their arguments, so that every fault is a many_cli exception naming the argument or file
(`ArgumentError` for an argument of the wrong kind, `InputError` for bad input, `OutputError`
for standard output), never a raw TypeError and never an exit of the interpreter."""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any, Callable, Iterable

from many_cli import export, infer, merge, stats
from many_cli.data import Record
from many_cli.errors import ArgumentError

PathLike = str | os.PathLike


def collect_stats(
    base: PathLike,
    adapter: PathLike,
    data: PathLike,
    out: PathLike | None = None,
    options: stats.StatsOptions = stats.StatsOptions(),
    **kwargs: Any,
) -> stats.StatsReport:
    """`many stats`: statistics of base + adapter over data, written to out (default: beside the adapter)."""
    return _call(
        stats.collect_stats,
        _base(base),
        _path(adapter, "adapter"),
        _path(data, "data"),
        None if out is None else _path(out, "out"),
        _of(options, stats.StatsOptions, "options"),
        **kwargs,
    )


def merge_adapters(
    adapters: Iterable[PathLike],
    out: PathLike,
    options: merge.MergeOptions = merge.MergeOptions(),
    resume: PathLike | None = None,
    data: Iterable[PathLike] | None = None,
    **kwargs: Any,
) -> merge.MergeReport:
    """`many merge`: the adapters (in task order, or one folder holding them) merged into out;
    under `options.one_pass`, `data` is each task's calibration data, in task order (`--data`)."""
    if isinstance(adapters, (str, os.PathLike)) or not isinstance(adapters, Iterable):
        raise ArgumentError("adapters", f"must be a list of paths, got {type(adapters).__name__}")
    paths = [_path(adapter, "adapters") for adapter in adapters]
    if not paths:
        raise ArgumentError("adapters", "is empty: give at least one adapter directory")
    options = _of(options, merge.MergeOptions, "options")
    if data is not None and (isinstance(data, (str, os.PathLike)) or not isinstance(data, Iterable)):
        raise ArgumentError("data", f"must be a list of paths, got {type(data).__name__}")
    if data is not None and not options.one_pass:
        raise ArgumentError("data", "applies to MergeOptions(one_pass=True) only")
    if options.one_pass:
        from many_cli.stats.walk import walker

        kwargs["open_walk"] = walker(options, [_path(source, "data") for source in data or []])
    return _call(
        merge.merge,
        paths,
        _path(out, "out"),
        options,
        resume=None if resume is None else _path(resume, "resume"),
        **kwargs,
    )


def load_merged(
    base: PathLike, merged: PathLike, options: infer.InferOptions = infer.InferOptions()
) -> infer.MergedModel:
    """`many infer`'s model: base + the merged LoRA with the task projectors routed."""
    return infer.load_merged(_base(base), _path(merged, "merged"), _of(options, infer.InferOptions, "options"))


def load_routed(path: PathLike, options: infer.InferOptions = infer.InferOptions()) -> infer.MergedModel:
    """A `many export --projector routed` model, its task projectors routed again."""
    return infer.load_routed(_path(path, "path"), _of(options, infer.InferOptions, "options"))


def answer(merged: infer.MergedModel, records: Iterable[Record], max_new_tokens: int = 32) -> list[infer.Prediction]:
    """Greedy answers for records (one batch), each with its routing."""
    _of(merged, infer.MergedModel, "merged")
    records = list(records) if isinstance(records, Iterable) else records
    if not isinstance(records, list) or not records or not all(isinstance(r, Record) for r in records):
        raise ArgumentError("records", "must be a non-empty list of many_cli.Record")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ArgumentError("max_new_tokens", f"must be an integer ≥ 1, got {max_new_tokens!r}")
    return infer.answer(merged, records, max_new_tokens)


def export_model(
    base: PathLike,
    merged: PathLike,
    out: PathLike,
    options: export.ExportOptions = export.ExportOptions(),
    **kwargs: Any,
) -> export.ExportReport:
    """`many export`: the base with the merged LoRA folded in and one projector chosen, written to out."""
    return _call(
        export.export,
        _base(base),
        _path(merged, "merged"),
        _path(out, "out"),
        _of(options, export.ExportOptions, "options"),
        **kwargs,
    )


def _call(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`function(*args, **kwargs)`, an unknown keyword refused as an ArgumentError naming it."""
    accepted = inspect.signature(function).parameters
    unknown = sorted(name for name in kwargs if name not in accepted)
    if unknown:
        raise ArgumentError(unknown[0], f"is not an argument of many_cli's {function.__name__}; check its spelling")
    return function(*args, **kwargs)


def _path(value: object, argument: str) -> Path:
    if isinstance(value, (str, os.PathLike)) and str(value):
        if "\0" in str(value):
            raise ArgumentError(argument, "holds a NUL byte, which no file name can hold")
        return Path(value)
    raise ArgumentError(argument, f"must be a path (str or os.PathLike), got {value!r}")


def _base(value: object) -> str:
    """A base model: a local directory (str or PathLike) or a hub id."""
    return str(_path(value, "base"))


def _of(value: object, kind: type, argument: str) -> Any:
    if not isinstance(value, kind):
        raise ArgumentError(argument, f"must be a many_cli.{kind.__name__}, got {type(value).__name__}")
    return value
