"""Synthetic task adapters and stats files of a Llama-shaped language model, written in the
real formats (PEFT adapter directories with `many_stats.safetensors`), so that `many merge`
can be tried and measured without a model or data set.

    python -m many_cli.bench.synthetic OUT_DIR [--tasks 3] [--layers 2] [--hidden 64] ...
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save_file

from many_cli.adapters import ADAPTER_WEIGHTS, PEFT_PREFIX
from many_cli.files import file_fingerprint
from many_cli.state import STATS_FILE, pack_symmetric, write_stats


@dataclass(frozen=True)
class Shape:
    layers: int = 2
    hidden: int = 64
    intermediate: int = 128
    rank: int = 4
    projector_in: int = 32
    tokens: int = 512


def modules_by_input(shape: Shape, layer: int) -> dict[str, tuple[list[str], int]]:
    """The four distinct inputs of a Llama block: input key -> (modules reading it, width)."""
    prefix = f"model.language_model.layers.{layer}"
    attention, mlp = f"{prefix}.self_attn", f"{prefix}.mlp"
    return {
        f"{attention}.k_proj": ([f"{attention}.{name}" for name in ("k_proj", "q_proj", "v_proj")], shape.hidden),
        f"{attention}.o_proj": ([f"{attention}.o_proj"], shape.hidden),
        f"{mlp}.gate_proj": ([f"{mlp}.gate_proj", f"{mlp}.up_proj"], shape.hidden),
        f"{mlp}.down_proj": ([f"{mlp}.down_proj"], shape.intermediate),
    }


def output_width(module: str, shape: Shape) -> int:
    return shape.intermediate if module.endswith(("gate_proj", "up_proj")) else shape.hidden


def write_task(out: Path, shape: Shape, seed: int) -> Path:
    """One adapter directory: LoRA on q, k, v, o, gate, up, down, a projector under
    modules_to_save, and a stats file of positive-definite covariances."""
    generator = torch.Generator().manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    covariances, tokens, modules = {}, {}, {}
    for layer in range(shape.layers):
        for key, (readers, width) in modules_by_input(shape, layer).items():
            for module in readers:
                tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = torch.randn(
                    shape.rank, width, generator=generator) / width ** 0.5
                tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = torch.randn(
                    output_width(module, shape), shape.rank, generator=generator) * 0.01
            # Anisotropic inputs, like real activations: a decaying spectrum of directions.
            spread = torch.logspace(0, -2, width) * (1 + 0.1 * seed)
            activations = torch.randn(shape.tokens, width, generator=generator) * spread
            covariances[key] = pack_symmetric(activations.T @ activations)
            tokens[key], modules[key] = shape.tokens, readers
    projector = f"{PEFT_PREFIX}model.multi_modal_projector"
    tensors[f"{projector}.linear_1.weight"] = torch.randn(shape.hidden, shape.projector_in, generator=generator)
    tensors[f"{projector}.linear_1.bias"] = torch.zeros(shape.hidden)
    tensors[f"{projector}.linear_2.weight"] = torch.randn(shape.hidden, shape.hidden, generator=generator)
    tensors[f"{projector}.linear_2.bias"] = torch.zeros(shape.hidden)
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    LoraConfig(r=shape.rank, lora_alpha=2 * shape.rank, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        modules_to_save=["multi_modal_projector"],
        base_model_name_or_path="synthetic-llama").save_pretrained(str(out))
    prototype = torch.nn.functional.normalize(torch.randn(shape.projector_in, generator=generator), dim=0)
    write_stats(out / STATS_FILE, covariances=covariances, tokens=tokens, modules=modules,
                prototype=prototype, images=shape.tokens // 16,
                adapter_fingerprint=file_fingerprint(out / ADAPTER_WEIGHTS),
                base_fingerprint=synthetic_base_fingerprint(shape),
                token_rule="synthetic Gaussian activations")
    return out


def synthetic_base_fingerprint(shape: Shape) -> str:
    return "synthetic-" + json.dumps([shape.layers, shape.hidden, shape.intermediate]).replace(" ", "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to hold one adapter directory per task")
    parser.add_argument("--tasks", type=int, default=3)
    defaults = Shape()
    for field in ("layers", "hidden", "intermediate", "rank", "tokens"):
        parser.add_argument(f"--{field}", type=int, default=getattr(defaults, field))
    args = parser.parse_args()
    shape = Shape(args.layers, args.hidden, args.intermediate, args.rank, tokens=args.tokens)
    for task in range(args.tasks):
        path = write_task(args.out / f"task{task + 1}", shape, seed=task)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
