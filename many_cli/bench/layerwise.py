"""A documented experiment (issue 15): RegMean++'s layer-by-layer merging, where layer l's
covariances are taken under the merged layers below it instead of under each task's own
adapter, so that the merge of layer l sees the inputs the merged model will give it.

For each depth l ≥ 1, in order: merge the tasks with the statistics so far, load every task's
adapter beside that merge, route the LoRA layers below l to the merge and the rest to the
task's own adapter, and replace the stats file's covariances of layer l's inputs with those
measured so. The final `many merge` over the rewritten stats files is the result. The
projectors and prototypes are each task's own, as in `many stats`.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import replace
from pathlib import Path

import torch

from many_cli.data import read_records
from many_cli.infer import load_processor
from many_cli.merge import MergeOptions, merge
from many_cli.models import apply_adapters, load_base_model, lora_layers, text_layers
from many_cli.state import STATS_FILE, read_stats_header, write_stats
from many_cli.stats import TOKEN_RULE, InputCovariances, StatsOptions, StatsReport, accumulate, encoded_batches

_DEPTH = re.compile(r"\.layers\.(\d+)\.")


def layerwise_adapters(base: str, adapters: list[Path], calibration: list[Path], folder: Path,
                       options: MergeOptions = MergeOptions()) -> list[Path]:
    """Copies of `adapters` (with their stats files) whose covariances were taken layer by layer
    under the merge of the layers below; merge them with `options` for RegMean++'s result."""
    copies = [shutil.copytree(adapter, folder / adapter.name, dirs_exist_ok=True) for adapter in adapters]
    depths = sorted({int(match[1]) for module in read_stats_header(copies[0] / STATS_FILE).inputs.values()
                     for name in module.modules if (match := _DEPTH.search(name))})
    for depth in depths[1:]:
        merged = folder / f"merged_below_{depth}"
        merge(copies, merged, replace(options, force=True))
        for copy, data in zip(copies, calibration, strict=True):
            _retake_layer(base, copy, merged, data, depth)
    return copies


def _retake_layer(base: str, adapter: Path, merged: Path, data: Path, depth: int) -> None:
    """Rewrite `adapter`'s stats: layer `depth`'s inputs measured with the merge below it."""
    model = apply_adapters(load_base_model(base, torch.float32, torch.device("cpu")), base,
                           [(adapter, "task"), (merged, "merged")]).eval()
    layers = lora_layers(model)
    for name, layer in layers.items():
        if int(_DEPTH.search(name)[1]) < depth:
            layer.set_adapter("merged")
    at_depth = {name: layer for name, layer in layers.items() if int(_DEPTH.search(name)[1]) == depth}
    covariances = InputCovariances(at_depth, torch.device("cpu"), text_layers(model.get_base_model(), at_depth))
    processor = load_processor(base)  # left padding: the statistics do not depend on it
    options = StatsOptions(device="cpu")
    accumulate(model, encoded_batches(processor, read_records(data), options, StatsReport(adapter)), covariances,
               torch.device("cpu"))
    covariances.remove_hooks()
    measured = {module: triangle for key, triangle in covariances.sums.items() for module in covariances.members[key]}
    header = read_stats_header(adapter / STATS_FILE)
    packed = {}
    for key, entry in header.inputs.items():
        fresh = measured.get(entry.modules[0])
        packed[key] = header.packed(key) if fresh is None else fresh.packed()
    write_stats(adapter / STATS_FILE, covariances=packed,
                tokens={key: entry.tokens for key, entry in header.inputs.items()},
                modules={key: list(entry.modules) for key, entry in header.inputs.items()},
                prototype=header.prototype(), images=header.images,
                adapter_fingerprint=header.adapter_fingerprint, base_fingerprint=header.base_fingerprint,
                token_rule=f"{TOKEN_RULE}; layer by layer under the merge of the layers below (RegMean++)")
