"""Training the tiny LLaVA of the synthetic world: a base (blank, or pretrained on the broad
mixture), one LoRA + projector adapter per task, one adapter fine-tuned through all tasks in
sequence, and one trained on all tasks at once (the multi-task ceiling of one model). Plain
PyTorch loops over pre-encoded pools; the loss covers the answer tokens only."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlavaForConditionalGeneration

from many_cli.bench.tiny import LLAMA_PROJECTIONS, tiny_clip, tiny_llava_config, tiny_processor
from many_cli.bench.world import IMAGE_SIZE, Example, WorldTask, generalist_example, task_rng
from many_cli.data import Record, encode_records

PATCH = 8
POOL = 1024  # training examples drawn per task (or for the mixture)


INIT_STD = 0.15  # at transformers' 0.02, final-norm-bounded logits stay below ~1.3: no LoRA could answer


@dataclass(frozen=True)
class TrainOptions:
    pretrain_steps: int = 600
    task_steps: int = 400
    batch_size: int = 32
    rank: int = 8
    pretrain_lr: float = 2e-3
    task_lr: float = 5e-3
    layers: int = 2  # the language model's decoder layers


def world_processor():
    return tiny_processor(image_size=IMAGE_SIZE, patch_size=PATCH)


def world_model(seed: int, layers: int = 2) -> LlavaForConditionalGeneration:
    """Random weights; the vision tower stays as initialised (frozen random features, as a
    LLaVA's CLIP stays frozen), the language model's matrices drawn at INIT_STD."""
    vision = tiny_clip(hidden=32, layers=2, image_size=IMAGE_SIZE, patch_size=PATCH)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(
        tiny_llava_config(hidden=64, layers=layers, intermediate=128, heads=4, kv_heads=2, vision=vision)
    )
    language = [model.get_submodule("model.language_model"), model.lm_head]
    for parameter in (p for module in language for p in module.parameters() if p.dim() == 2):
        torch.nn.init.normal_(parameter, std=INIT_STD)
    model.get_submodule("model.vision_tower").requires_grad_(False)
    model.generation_config.pad_token_id = model.config.text_config.pad_token_id
    return model


def adapter_config(rank: int) -> LoraConfig:
    return LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=LLAMA_PROJECTIONS,
        exclude_modules=r".*vision_tower.*",
        modules_to_save=["multi_modal_projector"],
    )


@dataclass
class Pool:
    """Encoded training examples, batches drawn by index."""

    encoded: dict
    labels: torch.Tensor

    def batch(self, rng: random.Random, size: int) -> dict:
        rows = torch.tensor(rng.sample(range(len(self.labels)), size))
        return {**{key: value[rows] for key, value in self.encoded.items()}, "labels": self.labels[rows]}


def encode_pool(processor, examples: list[Example]) -> Pool:
    processor.tokenizer.padding_side = "right"
    # The images are in memory; a record's path only says that it has one.
    records = [
        Record(f"train/{index}", (Path(f"{index}.png"),), example.prompt, example.answer)
        for index, example in enumerate(examples)
    ]
    encoded = dict(encode_records(processor, records, [example.image for example in examples], with_answers=True))
    ids, mask = encoded["input_ids"], encoded["attention_mask"].bool()
    # Learn what the assistant says: every position after the last "ASSISTANT :".
    marker = processor.tokenizer.convert_tokens_to_ids("ASSISTANT")
    positions = torch.arange(ids.shape[1])
    start = torch.where(ids == marker, positions, -1).max(dim=1).values + 2
    labels = torch.where((positions >= start[:, None]) & mask, ids, -100)
    return Pool(encoded, labels)


def task_pool(processor, task: WorldTask, seed: int) -> Pool:
    rng = task_rng(task.name, "train", seed)
    return encode_pool(processor, [task.example(rng) for _ in range(POOL)])


def generalist_pool(processor, seed: int) -> Pool:
    rng = task_rng("generalist", "train", seed)
    return encode_pool(processor, [generalist_example(rng) for _ in range(4 * POOL)])


def train(
    model: torch.nn.Module,
    pool: Pool,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    log: Callable[[int, float], None] | None = None,
) -> None:
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimiser = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: 1 - step / max(steps, 1))
    rng = random.Random(seed)
    model.train()
    for step in range(steps):
        loss = model(**pool.batch(rng, batch_size), use_cache=False).loss
        loss.backward()
        optimiser.step()
        schedule.step()
        optimiser.zero_grad(set_to_none=True)
        if log is not None:
            log(step, loss.item())
    model.eval()


def build_base(out: Path, pretrained: bool, seed: int, options: TrainOptions) -> Path:
    """A blank base (random weights: all task knowledge will sit in the adapters), or one whose
    language model and projector were pretrained on the broad mixture."""
    processor = world_processor()
    model = world_model(seed, options.layers)
    if pretrained:
        train(
            model,
            generalist_pool(processor, seed),
            options.pretrain_steps,
            options.pretrain_lr,
            options.batch_size,
            seed,
        )
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def train_adapter(
    base: Path, task: WorldTask, out: Path, seed: int, options: TrainOptions, base_name: str | None = None
) -> Path:
    """A fresh LoRA (language model) + projector (modules_to_save) trained on one task from the base."""
    torch.manual_seed(seed)  # PEFT's initialisation of A
    model = get_peft_model(LlavaForConditionalGeneration.from_pretrained(base), adapter_config(options.rank))
    train(
        model, task_pool(world_processor(), task, seed), options.task_steps, options.task_lr, options.batch_size, seed
    )
    config = model.peft_config["default"]
    config.target_modules = sorted(config.target_modules)  # PEFT keeps a set: fix the order written
    if base_name is not None:  # what the adapter's config names as its base, when not where it was trained
        config.base_model_name_or_path = base_name
    model.save_pretrained(out)
    return out


def train_sequentially(
    base: Path, tasks: tuple[WorldTask, ...], out: Path, seed: int, options: TrainOptions
) -> list[Path]:
    """One adapter fine-tuned through every task in order; its state after each task."""
    torch.manual_seed(seed)
    model: PeftModel = get_peft_model(LlavaForConditionalGeneration.from_pretrained(base), adapter_config(options.rank))
    processor = world_processor()
    saved = []
    for task in tasks:
        train(model, task_pool(processor, task, seed), options.task_steps, options.task_lr, options.batch_size, seed)
        model.save_pretrained(out / f"after_{task.name}")
        saved.append(out / f"after_{task.name}")
    return saved


def train_jointly(base: Path, tasks: tuple[WorldTask, ...], out: Path, seed: int, options: TrainOptions) -> Path:
    """One LoRA + projector of the merged rank (Σ r_i) trained on every task's data at once, for
    the steps all the per-task adapters take together: what one model of that size holds at best."""
    torch.manual_seed(seed)
    model = get_peft_model(
        LlavaForConditionalGeneration.from_pretrained(base), adapter_config(len(tasks) * options.rank)
    )
    examples = []
    for task in tasks:  # each task's own pool, as its adapter trains on
        rng = task_rng(task.name, "train", seed)
        examples += [task.example(rng) for _ in range(POOL)]
    pool = encode_pool(world_processor(), examples)
    train(model, pool, len(tasks) * options.task_steps, options.task_lr, options.batch_size, seed)
    model.save_pretrained(out)
    return out
