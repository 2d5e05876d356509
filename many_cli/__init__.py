"""many: merge the LoRA adapters and projectors of continual multimodal fine-tunes (MAny).

The Python API, for those who embed the tool: the same functions the commands call, each taking
one frozen options object (every field is the command line's option of the same name).

    import many_cli
    many_cli.collect_stats(base, adapter, data)                     # many stats
    many_cli.merge(adapters, out, many_cli.MergeOptions(rank=16))   # many merge
    merged = many_cli.load_merged(base, out)                        # many infer's model
    many_cli.answer(merged, [many_cli.Record(...)], max_new_tokens=8)
    many_cli.export(base, out, exported, many_cli.ExportOptions(projector="mean"))
    routed = many_cli.load_routed(exported)                        # an `--projector routed` export
"""

from many_cli.data import Record
from many_cli.export import ExportOptions, ExportReport, export
from many_cli.infer import InferOptions, MergedModel, Prediction, answer, load_merged, load_routed
from many_cli.merge import MergeOptions, MergeReport, merge
from many_cli.stats import StatsOptions, StatsReport, collect_stats

__version__ = "0.1.0"
__all__ = ["ExportOptions", "ExportReport", "InferOptions", "MergeOptions", "MergeReport", "MergedModel",
           "Prediction", "Record", "StatsOptions", "StatsReport", "answer", "collect_stats", "export",
           "load_merged", "load_routed", "merge"]
