"""`many bench e2e`: the whole job at a real model's size: a base model of the family's real
configuration with random weights (created on the target device, in bf16; no download),
`tasks` PEFT adapters (rank 16 on all seven projections, plus the projector), then `stats`
per task, one `merge` of every task, and `infer` against the base model, each phase in a
process of its own so that its peak memory is its own.

The depth may be reduced (`--layers`, `--vision-layers`) where the machine is small: the
language model's statistics, forward and merge scale linearly in its layers, the vision
tower's cost linearly in its layers, and the disk per task linearly in the adapted layers.
"""

from __future__ import annotations

import json
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from PIL import Image
from transformers import AutoModelForImageTextToText, PretrainedConfig

from many_cli.bench.merge_bench import run_merge, run_python
from many_cli.bench.tiny import IMAGE_SIZE, WORDS, clip_vit_l_336, qwen_vl_parts, tiny_llava_config, tiny_processor
from many_cli.families import projector_paths
from many_cli.models import resolve_device
from many_cli.state import STATS_FILE

LORA_RANK = 16


def llava_15_7b(layers: int | None, vision_layers: int | None) -> tuple[PretrainedConfig, object]:
    """LLaVA-1.5-7B: CLIP ViT-L/14 at 336 px (24 layers, features from the second to last),
    a two-layer GELU projector, Llama-2-7B (32 layers, 4096 wide, MLP 11008, vocabulary 32064)."""
    vision = clip_vit_l_336(vision_layers or 24)
    config = tiny_llava_config(
        hidden=4096, layers=layers or 32, intermediate=11008, heads=32, kv_heads=32, vision=vision
    )
    config.text_config.vocab_size = 32064
    config.text_config.rms_norm_eps = 1e-5
    config.vision_feature_layer = -2
    return config, tiny_processor(image_size=336, patch_size=14)


def qwen2_5_vl_7b(layers: int | None, vision_layers: int | None) -> tuple[PretrainedConfig, object]:
    """Qwen2.5-VL-7B: a 32-block windowed ViT (1280 wide, 14 px patches merged 2 × 2, full
    attention in blocks 7, 15, 23, 31), Qwen2.5-7B (28 layers, 3584 wide, MLP 18944, 4 KV
    heads, vocabulary 152064); images of 336 × 336 px (144 tokens)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil, Qwen2VLVideoProcessor
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig

    pixels = QWEN_IMAGE_SIZE**2
    tokenizer, image_processor, video_processor, tokens = qwen_vl_parts(
        Qwen2VLVideoProcessor, Qwen2VLImageProcessorPil, patch_size=14, min_pixels=pixels, max_pixels=pixels
    )
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=tokenizer.chat_template,
    )
    text = Qwen2_5_VLTextConfig(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=layers or 28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        max_position_embeddings=128000,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
    )
    vision = dict(
        depth=vision_layers or 32,
        hidden_size=1280,
        intermediate_size=3420,
        num_heads=16,
        out_hidden_size=3584,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=[7, 15, 23, 31],
        hidden_act="silu",
    )
    return Qwen2_5_VLConfig(
        text_config=text.to_dict(), vision_config=vision, tie_word_embeddings=False, **tokens
    ), processor


def tiny(layers: int | None, vision_layers: int | None) -> tuple[PretrainedConfig, object]:
    """The tests' tiny LLaVA: every path of the benchmark in a second."""
    config = tiny_llava_config(layers=layers or 2)
    config.vision_config.num_hidden_layers = vision_layers or 1
    return config, tiny_processor()


def vision_depth(config: PretrainedConfig) -> int:
    """The vision tower's layers: `num_hidden_layers` in CLIP, `depth` in Qwen-VL."""
    return getattr(config.vision_config, "num_hidden_layers", None) or config.vision_config.depth


QWEN_IMAGE_SIZE = 336
FAMILIES: dict[str, tuple[Callable[[int | None, int | None], tuple[PretrainedConfig, object]], int]] = {
    "llava-1.5-7b": (llava_15_7b, 336),
    "qwen2.5-vl-7b": (qwen2_5_vl_7b, QWEN_IMAGE_SIZE),
    "tiny": (tiny, IMAGE_SIZE),
}
TEXT_PROJECTIONS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclass(frozen=True)
class E2EResult:
    family: str
    device: str
    layers: int
    vision_layers: int
    tasks: int
    records: int
    stats_tokens: int  # per task
    stats_seconds: float  # the stats command per task, load and write included (mean)
    stats_loop_seconds: float  # the statistics pass alone, first task
    forward_seconds: float  # a plain forward over the same batches, same model
    stats_peak_host: int
    stats_peak_device: int
    merge_seconds: float
    merge_peak_host: int
    infer_base_seconds: float  # per image
    infer_many_seconds: float
    infer_peak_host: int
    infer_peak_device: int
    stats_bytes_per_task: int
    adapter_bytes_per_task: int
    merged_bytes: int

    @property
    def tokens_per_second(self) -> float:
        return self.stats_tokens / self.stats_loop_seconds

    @property
    def stats_ratio(self) -> float:
        return self.stats_loop_seconds / self.forward_seconds

    @property
    def latency_ratio(self) -> float:
        return self.infer_many_seconds / self.infer_base_seconds


def build_base(out: Path, config: PretrainedConfig, processor, device: torch.device) -> Path:
    """Random bf16 weights created directly on `device`, saved as a transformers model directory."""
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    model.generation_config.pad_token_id = config.get_text_config().pad_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)
    del model
    return out


def write_adapters(base: Path, root: Path, tasks: int, device: torch.device) -> list[Path]:
    """`tasks` PEFT adapters saved by `save_pretrained`: random LoRA factors on the seven
    projections and a perturbed copy of the projector, one seed per task."""
    model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.bfloat16).to(device)
    model = get_peft_model(
        model,
        LoraConfig(
            r=LORA_RANK,
            lora_alpha=2 * LORA_RANK,
            target_modules=TEXT_PROJECTIONS,
            modules_to_save=projector_paths(model),
        ),
    )
    adapters = []
    for task in range(tasks):
        generator = torch.Generator(device).manual_seed(task)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if parameter.requires_grad:  # the LoRA factors and the projector's trained copy
                    noise = torch.randn(parameter.shape, generator=generator, device=device, dtype=parameter.dtype)
                    if "lora_A" in name:
                        parameter.copy_(noise / parameter.shape[1] ** 0.5)
                    elif "lora_B" in name:
                        parameter.copy_(noise / 100)
                    else:
                        parameter.add_(noise * 0.01 * parameter.float().std().to(parameter.dtype))
        adapter = root / f"task{task + 1}"
        model.save_pretrained(adapter)
        adapters.append(adapter)
    return adapters


def write_records(out: Path, records: int, image_size: int, seed: int) -> Path:
    """A JSONL file of `records` noise images with prompts and one-word answers."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True)
    with open(out / "data.jsonl", "w") as lines:
        for index in range(records):
            image = Image.fromarray((rng.random((image_size, image_size, 3)) * 255).astype("uint8"))
            image.save(out / f"{index}.png")
            words = rng.choice(WORDS, size=8)
            lines.write(
                json.dumps({"image": f"{index}.png", "prompt": " ".join(words[:7]) + " ?", "answer": str(words[7])})
                + "\n"
            )
    return out / "data.jsonl"


_STATS_IN_CHILD = """
import json, sys, time
from pathlib import Path
import torch
from many_cli.bench.stats_bench import run_forward, run_stats
from many_cli.formats import read_records
from many_cli.infer import InferOptions, load_processor, load_task_adapter
from many_cli.models import resolve_device
from many_cli.stats import StatsOptions, StatsReport, collect_stats, encoded_batches
base, adapter, data, device, batch_size, measure = sys.argv[1:]
options = StatsOptions(device=device, batch_size=int(batch_size))
start = time.perf_counter()
report = collect_stats(base, Path(adapter), Path(data), None, options)
result = {"seconds": time.perf_counter() - start, "tokens": report.tokens}
if measure == "1":  # the statistics pass against a plain forward, same model, same batches
    compute = resolve_device(device)
    model = load_task_adapter(base, Path(adapter), InferOptions(device=device, fold=False)).model
    batches = [encoded for encoded, _ in encoded_batches(load_processor(base), read_records(Path(data)),
                                                         options, StatsReport(Path(data)))]
    run_forward(model, batches[:1], compute)
    result["forward"] = min(run_forward(model, batches, compute) for _ in range(2))
    result["loop"] = min(run_stats(model, batches, compute)[0] for _ in range(2))
if torch.cuda.is_available():
    result["device_peak"] = torch.cuda.max_memory_allocated()
print(json.dumps(result))
"""

_INFER_IN_CHILD = """
import json, sys
from pathlib import Path
import torch
from many_cli.bench.infer_bench import seconds_per_image
from many_cli.data import encode_loaded, load_inputs
from many_cli.formats import read_records
from many_cli.infer import InferOptions, load_merged, load_processor
from many_cli.models import load_base_model, resolve_device
base, merged, data, device, new_tokens = sys.argv[1:]
compute = resolve_device(device)
processor = load_processor(base)
inputs = [encode_loaded(processor, [record], [load_inputs(processor, record)], with_answers=False).to(compute)
          for record in read_records(Path(data))]
plain = load_base_model(base, compute)
ours = load_merged(base, Path(merged), InferOptions(device=device)).model
seconds_per_image(plain, inputs[:1], 2)
seconds_per_image(ours, inputs[:1], 2)
base_seconds = many_seconds = float("inf")
for _ in range(2):  # interleaved, best of each
    base_seconds = min(base_seconds, seconds_per_image(plain, inputs, int(new_tokens)))
    many_seconds = min(many_seconds, seconds_per_image(ours, inputs, int(new_tokens)))
result = {"base": base_seconds, "many": many_seconds}
if torch.cuda.is_available():
    result["device_peak"] = torch.cuda.max_memory_allocated()
print(json.dumps(result))
"""


def _child(script: str, *arguments: object) -> tuple[dict, int]:
    """The JSON a child Python prints last, and the child's peak RSS in bytes."""
    line, peak = run_python(script, *arguments)
    return json.loads(line), peak


def _size(path: Path) -> int:
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())


@dataclass(frozen=True)
class JobInputs:
    """What a benchmark at a real model's size runs on: a scratch folder, the base, the task
    adapters and each one's calibration records, the compute device, the base's configuration."""

    root: Path
    base: Path
    adapters: list[Path]
    data: list[Path]
    compute: torch.device
    config: PretrainedConfig


@contextmanager
def job_inputs(
    family: str,
    layers: int | None,
    vision_layers: int | None,
    tasks: int,
    records: int,
    device: str,
    workdir: Path | None,
) -> Iterator[JobInputs]:
    """The family's base (random bf16 weights), `tasks` adapters and their records, in a scratch
    folder removed afterwards."""
    compute = resolve_device(device)
    build, image_size = FAMILIES[family]
    config, processor = build(layers, vision_layers)
    with tempfile.TemporaryDirectory(prefix="many-bench-", dir=workdir) as folder:
        root = Path(folder)
        base = build_base(root / "base", config, processor, compute)
        adapters = write_adapters(base, root / "adapters", tasks, compute)
        data = [write_records(root / "data" / a.name, records, image_size, seed=i) for i, a in enumerate(adapters)]
        yield JobInputs(root, base, adapters, data, compute, config)


def bench_e2e(
    family: str = "llava-1.5-7b",
    layers: int | None = None,
    vision_layers: int | None = None,
    tasks: int = 6,
    records: int = 4,
    batch_size: int = 2,
    new_tokens: int = 8,
    device: str = "auto",
    workdir: Path | None = None,
) -> E2EResult:
    with job_inputs(family, layers, vision_layers, tasks, records, device, workdir) as job:
        root, base, adapters, data, compute, config = (
            job.root,
            job.base,
            job.adapters,
            job.data,
            job.compute,
            job.config,
        )
        stats = [
            _child(_STATS_IN_CHILD, base, adapter, records_file, compute.type, batch_size, int(index == 0))
            for index, (adapter, records_file) in enumerate(zip(adapters, data))
        ]
        merge_seconds, merge_peak = run_merge(adapters, root / "merged", device=compute.type)
        infer, infer_peak = _child(_INFER_IN_CHILD, base, root / "merged", data[0], compute.type, new_tokens)
        return E2EResult(
            family=family,
            device=str(compute),
            layers=config.get_text_config().num_hidden_layers,
            vision_layers=vision_depth(config),
            tasks=tasks,
            records=records,
            stats_tokens=stats[0][0]["tokens"],
            stats_seconds=sum(measures["seconds"] for measures, _ in stats) / tasks,
            stats_loop_seconds=stats[0][0]["loop"],
            forward_seconds=stats[0][0]["forward"],
            stats_peak_host=max(peak for _, peak in stats),
            stats_peak_device=max(measures.get("device_peak", 0) for measures, _ in stats),
            merge_seconds=merge_seconds,
            merge_peak_host=merge_peak,
            infer_base_seconds=infer["base"],
            infer_many_seconds=infer["many"],
            infer_peak_host=infer_peak,
            infer_peak_device=infer.get("device_peak", 0),
            stats_bytes_per_task=(adapters[0] / STATS_FILE).stat().st_size,
            adapter_bytes_per_task=_size(adapters[0]) - (adapters[0] / STATS_FILE).stat().st_size,
            merged_bytes=_size(root / "merged"),
        )
