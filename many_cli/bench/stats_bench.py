"""`many bench stats`: the cost of gathering statistics against a plain forward pass and
against the FLOP floor, measured in one run on one model and one set of batches.

The model has LLaVA-1.5-7B's language-model widths (hidden 4096, MLP 11008, 32 heads) at a
reduced depth, a one-layer CLIP-L-wide vision tower at 336 px / patch 14 (576 image tokens),
and a rank-16 LoRA on q, k, v, o, gate, up, down plus a trained projector. Layers are
independent, so both the forward and the statistics scale linearly with depth.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from PIL import Image
from torch import nn
from transformers import LlavaForConditionalGeneration

from many_cli.bench.tiny import LLAMA_PROJECTIONS, clip_vit_l_336, tiny_llava_config, tiny_processor
from many_cli.data import Record, encode_records
from many_cli.families import find_projector
from many_cli.models import lora_layers, resolve_device, text_layers
from many_cli.stats import Exemplars, InputCovariances, accumulate, forward


@dataclass(frozen=True)
class StatsBenchResult:
    device: str
    tokens: int
    forward_seconds: float
    stats_seconds: float
    floor_seconds: float
    forward_flops: float
    covariance_flops: float
    peak_flops: float

    @property
    def ratio_to_forward(self) -> float:
        return self.stats_seconds / self.forward_seconds

    @property
    def ratio_to_floor(self) -> float:
        return self.stats_seconds / self.floor_seconds


def build_model(layers: int, hidden: int, intermediate: int, device: torch.device) -> nn.Module:
    vision = clip_vit_l_336()
    config = tiny_llava_config(
        hidden=hidden,
        layers=layers,
        intermediate=intermediate,
        heads=max(1, hidden // 128),
        kv_heads=max(1, hidden // 128),
        vision=vision,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    lora = LoraConfig(
        r=16,
        lora_alpha=32,
        target_modules=LLAMA_PROJECTIONS,
        exclude_modules=r".*vision_tower.*",
        modules_to_save=["multi_modal_projector"],
    )
    return get_peft_model(model, lora).to(device).eval()


def make_batches(records: int, batch_size: int, seed: int = 0) -> list:
    processor = tiny_processor(image_size=336, patch_size=14)
    rng = np.random.default_rng(seed)
    prompts = [
        "what colour is the shape in the picture ?",
        "how many dots are there ?",
        "where is the star ?",
        "describe the image .",
    ]
    batches = []
    for start in range(0, records, batch_size):
        # The images are generated in memory; the paths only name them.
        chunk = [
            Record(f"bench:{i}", (Path(f"bench{i}.png"),), prompts[i % len(prompts)], "red" if i % 2 else None)
            for i in range(start, min(start + batch_size, records))
        ]
        images = [Image.fromarray((rng.random((336, 336, 3)) * 255).astype("uint8")) for _ in chunk]
        batches.append(encode_records(processor, chunk, images))
    return batches


def run_forward(model, batches, device) -> float:
    start = time.perf_counter()
    for batch in batches:
        forward(model, batch, device)
    _synchronize(device)
    return time.perf_counter() - start


def run_stats(model, batches, device) -> tuple[float, list[int]]:
    """Seconds for the statistics pass, and the width of each distinct input it found."""
    start = time.perf_counter()
    layers = lora_layers(model)
    covariances = InputCovariances(layers, device, text_layers(model.get_base_model(), layers))
    prototype = Exemplars(find_projector(model))
    accumulate(model, ((batch, None) for batch in batches), covariances, device)  # the loop `many stats` runs
    for triangle in covariances.sums.values():
        triangle.packed()
    _synchronize(device)
    seconds = time.perf_counter() - start
    covariances.remove_hooks()
    prototype.remove_hook()
    return seconds, [triangle.dim for triangle in covariances.sums.values()]


def linear_flops(model, batches, device) -> float:
    """2 · rows · in · out over every nn.Linear a forward pass runs (attention scores and
    element-wise work are left out, so the floor is a lower bound)."""
    total = 0.0

    def count(module, args):
        nonlocal total
        total += 2.0 * args[0].numel() * module.out_features  # 2 · rows · in · out

    hooks = [module.register_forward_pre_hook(count) for module in model.modules() if isinstance(module, nn.Linear)]
    for batch in batches:
        forward(model, batch, device)
    for hook in hooks:
        hook.remove()
    return total


def covariance_flops(tokens: int, widths: list[int]) -> float:
    """Multiply-adds of the upper triangles: tokens · d(d+1)/2 · 2 per distinct input."""
    return float(sum(tokens * width * (width + 1) for width in widths))


def peak_matmul_flops(device: torch.device, size: int = 2048, repeats: int = 5) -> float:
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    a @ b
    _synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        _synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_stats(
    layers: int = 1,
    hidden: int = 4096,
    intermediate: int = 11008,
    records: int = 4,
    batch_size: int = 2,
    device: str = "auto",
    repeats: int = 2,
) -> StatsBenchResult:
    compute = resolve_device(device)
    model = build_model(layers, hidden, intermediate, compute)
    batches = make_batches(records, batch_size)
    run_forward(model, batches[:1], compute)  # warm up allocators and kernels
    forward_seconds = stats_seconds = float("inf")
    for _ in range(repeats):  # interleaved, best of each, so drift hits both alike
        forward_seconds = min(forward_seconds, run_forward(model, batches, compute))
        seconds, widths = run_stats(model, batches, compute)
        stats_seconds = min(stats_seconds, seconds)
    tokens = sum(int(batch["attention_mask"].sum()) for batch in batches)
    flops = linear_flops(model, batches, compute)
    cov = covariance_flops(tokens, widths)
    peak = peak_matmul_flops(compute)
    return StatsBenchResult(
        str(compute), tokens, forward_seconds, stats_seconds, (flops + cov) / peak, flops, cov, peak
    )
