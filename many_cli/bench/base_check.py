"""`many bench base-check`: what knowing the base by its weights costs, against loading it. A
LLaVA-1.5-7B-shaped base (Llama-2-7B language model, CLIP ViT-L/14-336 tower, bfloat16) is
written in 5 GB shards with their index, then fingerprinted and loaded in one run."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from many_cli.bench.tiny import clip_vit_l_336, tiny_llava_config
from many_cli.models import base_fingerprint, load_base_model
from many_cli.options import Placement
from many_cli.tensorfiles import WEIGHTS_INDEX, StreamingSafetensorsWriter

SHARD_BYTES = 5 << 30  # as transformers' save_pretrained shards a 7B model


@dataclass
class BaseCheckResult:
    layers: int
    shards: int
    weight_bytes: int
    check_seconds: float  # base_fingerprint: config and every tensor's byte windows
    load_seconds: float  # load_base_model in bfloat16 on the CPU

    @property
    def ratio(self) -> float:
        return self.check_seconds / self.load_seconds


def bench_base_check(
    work: Path, layers: int = 32, hidden: int = 4096, intermediate: int = 11008, vision_layers: int = 24
) -> BaseCheckResult:
    """Write the base under `work`, then time the check (best of three) and one load."""
    base = work / "base"
    shards, weight_bytes = _write_base(base, layers, hidden, intermediate, vision_layers)
    checks = []
    for _ in range(3):
        start = time.perf_counter()
        base_fingerprint(str(base))
        checks.append(time.perf_counter() - start)
    start = time.perf_counter()
    model = load_base_model(str(base), torch.device("cpu"), Placement(dtype="bfloat16"))
    load_seconds = time.perf_counter() - start
    del model
    return BaseCheckResult(layers, shards, weight_bytes, min(checks), load_seconds)


def _write_base(out: Path, layers: int, hidden: int, intermediate: int, vision_layers: int) -> tuple[int, int]:
    """config.json and the shards of the model (zero weights: the check and the load read the
    same bytes whatever they hold), written one tensor at a time."""
    from transformers import LlavaForConditionalGeneration

    heads = max(1, hidden // 128)
    config = tiny_llava_config(
        hidden=hidden,
        layers=layers,
        intermediate=intermediate,
        heads=heads,
        kv_heads=heads,
        vision=clip_vit_l_336(vision_layers),
    )
    with torch.device("meta"):
        shapes = {name: tuple(p.shape) for name, p in LlavaForConditionalGeneration(config).state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    groups, size = [[]], 0
    for name, shape in shapes.items():
        nbytes = 2 * torch.Size(shape).numel()
        if size + nbytes > SHARD_BYTES and groups[-1]:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    weight_map = {}
    for number, names in enumerate(groups, start=1):
        shard = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        layout = [(name, torch.bfloat16, shapes[name]) for name in names]
        with StreamingSafetensorsWriter(out / shard, layout, {"format": "pt"}) as writer:
            for name in names:
                writer.write(name, torch.zeros(shapes[name], dtype=torch.bfloat16))
                weight_map[name] = shard
    (out / WEIGHTS_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    return len(groups), sum(2 * torch.Size(shape).numel() for shape in shapes.values())
