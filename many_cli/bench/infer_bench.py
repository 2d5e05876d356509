"""`many bench infer`: per-image latency of the merged model with routed projectors against
the plain base model, and the load times, measured in one run on the same images.

The model is a LLaVA with a CLIP-L-wide one-layer vision tower at 336 px (576 image tokens)
and a small Llama language model; tasks are random rank-16 LoRAs with their own projectors,
merged by `many merge` after `many stats` on a few images each.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from many_cli.bench.tiny import LLAMA_PROJECTIONS, clip_vit_l_336, tiny_llava_config, tiny_processor
from many_cli.data import Record, encode_records
from many_cli.infer import InferOptions, MergedModel, choose_adapters, load_merged
from many_cli.merge import MergeOptions, merge
from many_cli.models import load_base_model, resolve_device
from many_cli.stats import StatsOptions, collect_stats


@dataclass(frozen=True)
class InferBenchResult:
    device: str
    tasks: int
    images: int
    new_tokens: int
    base_seconds_per_image: float
    many_seconds_per_image: float
    base_load_seconds: float
    many_load_seconds: float
    experts_seconds_per_image: float

    @property
    def latency_ratio(self) -> float:
        return self.many_seconds_per_image / self.base_seconds_per_image

    @property
    def experts_latency_ratio(self) -> float:
        return self.experts_seconds_per_image / self.base_seconds_per_image


def build_world(root: Path, tasks: int, hidden: int, layers: int, seed: int = 0) -> tuple[Path, Path]:
    """A base model, `tasks` adapters with stats files, and their merge; returns (base, merged)."""
    vision = clip_vit_l_336()
    config = tiny_llava_config(
        hidden=hidden,
        layers=layers,
        intermediate=hidden * 11 // 4,
        heads=max(1, hidden // 128),
        kv_heads=max(1, hidden // 128),
        vision=vision,
    )
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(config).save_pretrained(root / "base")
    tiny_processor(image_size=336, patch_size=14).save_pretrained(root / "base")
    rng = np.random.default_rng(seed)
    adapters = []
    for task in range(tasks):
        model = get_peft_model(
            LlavaForConditionalGeneration.from_pretrained(root / "base"),
            LoraConfig(
                r=16,
                lora_alpha=32,
                target_modules=LLAMA_PROJECTIONS,
                exclude_modules=r".*vision_tower.*",
                modules_to_save=["multi_modal_projector"],
            ),
        )
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.01)
        adapter = root / "adapters" / f"task{task + 1}"
        model.save_pretrained(adapter)
        images = root / "data" / adapter.name
        images.mkdir(parents=True)
        for index in range(2):
            Image.fromarray((rng.random((336, 336, 3)) * 255).astype("uint8")).save(images / f"{index}.png")
        collect_stats(str(root / "base"), adapter, images, None, StatsOptions(device="cpu"))
        adapters.append(adapter)
    merge(adapters, root / "merged", MergeOptions())
    return root / "base", root / "merged"


def _timed(function):
    start = time.perf_counter()
    value = function()
    return value, time.perf_counter() - start


def seconds_per_image(
    model, inputs, new_tokens: int, experts: MergedModel | None = None, record: Record | None = None
) -> float:
    """Seconds per image for greedy decoding of exactly `new_tokens`, one image at a time
    (with `experts`, routing each image (`record`) to its task's LoRA first, as `many infer` does)."""
    start = time.perf_counter()
    with torch.inference_mode():
        for encoded in inputs:
            extra = {"adapter_names": choose_adapters(experts, encoded, [record])} if experts else {}
            model.generate(**encoded, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **extra)
    return (time.perf_counter() - start) / len(inputs)


def bench_infer(
    tasks: int = 4,
    hidden: int = 1024,
    layers: int = 4,
    images: int = 4,
    new_tokens: int = 16,
    device: str = "auto",
    repeats: int = 2,
) -> InferBenchResult:
    compute = resolve_device(device)
    with tempfile.TemporaryDirectory() as folder:
        base, merged = build_world(Path(folder), tasks, hidden, layers)
        plain, base_load = _timed(lambda: load_base_model(str(base), compute))
        ours, many_load = _timed(lambda: load_merged(str(base), merged, InferOptions(device=str(compute.type))))
        routed = load_merged(str(base), merged, InferOptions(device=str(compute.type), lm_routing="experts"))
        processor = AutoProcessor.from_pretrained(base)
        rng = np.random.default_rng(1)
        record = Record("bench", (Path("bench.png"),), "what colour is it ?", None)
        inputs = [
            encode_records(
                processor,
                [record],
                [Image.fromarray((rng.random((336, 336, 3)) * 255).astype("uint8"))],
                with_answers=False,
            ).to(compute)
            for _ in range(images)
        ]
        seconds_per_image(plain, inputs[:1], 2)
        seconds_per_image(ours.model, inputs[:1], 2)
        seconds_per_image(routed.model, inputs[:1], 2, routed, record)
        base_seconds = many_seconds = experts_seconds = float("inf")
        for _ in range(repeats):  # interleaved, best of each
            base_seconds = min(base_seconds, seconds_per_image(plain, inputs, new_tokens))
            many_seconds = min(many_seconds, seconds_per_image(ours.model, inputs, new_tokens))
            experts_seconds = min(experts_seconds, seconds_per_image(routed.model, inputs, new_tokens, routed, record))
    return InferBenchResult(
        str(compute), tasks, images, new_tokens, base_seconds, many_seconds, base_load, many_load, experts_seconds
    )
