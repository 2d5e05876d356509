"""many: merge the LoRA adapters and projectors of continual multimodal fine-tunes (MAny).

The Python API, for those who embed the tool: the functions the commands call, each taking one
frozen options object (every field is the command line's option of the same name). Paths may be
`str` or `os.PathLike`; every fault is a many_cli exception (`InputError`, and its `ArgumentError`
for an argument of the wrong kind) naming the file or argument.

    import many_cli
    many_cli.collect_stats(base, adapter, data)                              # many stats
    many_cli.merge_adapters(adapters, out, many_cli.MergeOptions(rank=16))   # many merge
    merged = many_cli.load_merged(base, out)                                 # many infer's model
    many_cli.answer(merged, [many_cli.Record(...)], max_new_tokens=8)
    many_cli.export_model(base, out, exported, many_cli.ExportOptions(projector="mean"))
    routed = many_cli.load_routed(exported)                                  # a `--projector routed` export

Names are resolved on first use, so that `import many_cli.entry` (the console script) stays
light enough to take signals before torch loads.
"""

import importlib

__version__ = "0.1.0"

_API = {
    "Record": ("data", "Record"),
    "ExportOptions": ("export", "ExportOptions"),
    "ExportReport": ("export", "ExportReport"),
    "InferOptions": ("infer", "InferOptions"),
    "MergedModel": ("infer", "MergedModel"),
    "Prediction": ("infer", "Prediction"),
    "MergeOptions": ("merge", "MergeOptions"),
    "MergeReport": ("merge", "MergeReport"),
    "StatsOptions": ("stats", "StatsOptions"),
    "StatsReport": ("stats", "StatsReport"),
    **{
        name: ("api", name)
        for name in ("collect_stats", "merge_adapters", "load_merged", "load_routed", "answer", "export_model")
    },
    **{name: ("errors", name) for name in ("InputError", "ArgumentError", "OutputError")},
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'many_cli' has no attribute {name!r}")
    module, attribute = _API[name]
    return getattr(importlib.import_module(f"many_cli.{module}"), attribute)


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
