"""A documented experiment (issue 15): RegMean++'s layer-by-layer merging, where the covariances
of a layer are taken under the merged layers below it instead of under each task's own adapter,
so that its merge sees the inputs the merged model will give it.

The merge proceeds in stages, bottom up: whole layers, or (`by_module`) the four groups of a
Llama-style layer in the order they run (q/k/v, then o, then gate/up, then down), since o reads
what the merged q/k/v produce and down what the merged gate/up produce. For each stage after
the first, in order: merge the tasks with the statistics so far, load every task's adapter
beside that merge, route the LoRA layers of earlier stages to the merge and the rest to the
task's own adapter, and replace the stats file's covariances of that stage's inputs with those
measured so. The final `many merge` over the rewritten stats files is the result. The
projectors and prototypes are each task's own, as in `many stats`.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import replace
from pathlib import Path

import torch

from many_cli.formats import read_records
from many_cli.infer import load_processor
from many_cli.merge import MergeOptions, merge
from many_cli.models import apply_adapters, load_base_model, lora_layers, text_layers
from many_cli.options import Placement
from many_cli.state import STATS_FILE, read_stats_header, write_stats
from many_cli.stats import TOKEN_RULE, InputCovariances, StatsOptions, StatsReport, accumulate, encoded_batches

_DEPTH = re.compile(r"\.layers\.(\d+)\.")
# A Llama-style layer's projections in the order they run; a group reads what earlier groups wrote.
_GROUPS = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "o_proj": 1, "gate_proj": 2, "up_proj": 2, "down_proj": 3}


def _stage(module: str, by_module: bool) -> int:
    depth = int(_DEPTH.search(module)[1])
    if not by_module:
        return depth
    leaf = module.rsplit(".", 1)[-1]
    if leaf not in _GROUPS:
        raise ValueError(f"{module}: not a Llama-style projection, so its place in the layer is unknown")
    return depth * (max(_GROUPS.values()) + 1) + _GROUPS[leaf]


def layerwise_adapters(
    base: str,
    adapters: list[Path],
    calibration: list[Path],
    folder: Path,
    options: MergeOptions = MergeOptions(),
    by_module: bool = False,
) -> list[Path]:
    """Copies of `adapters` (with their stats files) whose covariances were taken stage by stage
    under the merge of the stages below; merge them with `options` for RegMean++'s result."""
    copies = [shutil.copytree(adapter, folder / adapter.name, dirs_exist_ok=True) for adapter in adapters]
    stages = sorted(
        {
            _stage(name, by_module)
            for module in read_stats_header(copies[0] / STATS_FILE).inputs.values()
            for name in module.modules
        }
    )
    for stage in stages[1:]:
        merged = folder / f"merged_below_{stage}"
        merge(copies, merged, replace(options, force=True))
        for copy, data in zip(copies, calibration, strict=True):
            _retake_stage(base, copy, merged, data, stage, by_module)
    return copies


def _retake_stage(base: str, adapter: Path, merged: Path, data: Path, stage: int, by_module: bool) -> None:
    """Rewrite `adapter`'s stats: the inputs of stage `stage` measured with the merge below it."""
    model = apply_adapters(
        load_base_model(base, torch.device("cpu"), Placement(dtype="float32")),
        base,
        [(adapter, "task"), (merged, "merged")],
    ).eval()
    layers = lora_layers(model)
    for name, layer in layers.items():
        if _stage(name, by_module) < stage:
            layer.set_adapter("merged")
    at_stage = {name: layer for name, layer in layers.items() if _stage(name, by_module) == stage}
    covariances = InputCovariances(at_stage, torch.device("cpu"), text_layers(model.get_base_model(), at_stage))
    processor = load_processor(base)  # left padding: the statistics do not depend on it
    options = StatsOptions(device="cpu")
    accumulate(
        model,
        encoded_batches(processor, read_records(data), options, StatsReport(adapter)),
        covariances,
        torch.device("cpu"),
    )
    covariances.remove_hooks()
    measured = {module: triangle for key, triangle in covariances.sums.items() for module in covariances.members[key]}
    header = read_stats_header(adapter / STATS_FILE)
    packed = {}
    for key, entry in header.inputs.items():
        fresh = measured.get(entry.modules[0])
        packed[key] = header.packed(key) if fresh is None else fresh.packed()
    granularity = "module group by module group" if by_module else "layer by layer"
    write_stats(
        adapter / STATS_FILE,
        covariances=packed,
        tokens={key: entry.tokens for key, entry in header.inputs.items()},
        modules={key: list(entry.modules) for key, entry in header.inputs.items()},
        prototype=header.prototype(),
        exemplars=header.exemplars(),
        images=header.images,
        adapter_fingerprint=header.adapter_fingerprint,
        base_fingerprint=header.base_fingerprint,
        token_rule=f"{TOKEN_RULE}; {granularity} under the merge of what runs below (RegMean++)",
    )
