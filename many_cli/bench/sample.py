"""`many bench sample`: write `sample_adapters/`, the shipped sample, from scratch and
deterministically: a tiny generalist LLaVA (its tokenizer, image processor and chat template),
one LoRA + projector adapter per task of the synthetic world, trained from the base in task
order, and each task's calibration and held-out evaluation sets (JSONL + PNG)."""

from __future__ import annotations

import warnings
from pathlib import Path

from many_cli.bench.training import TrainOptions, build_base, train_adapter
from many_cli.bench.world import TASKS, write_split
from many_cli.files import atomic_output_dir

CALIBRATION = 32
EVALUATION = 48
SEED = 0


def write_sample(out: Path, force: bool = False) -> Path:
    options = TrainOptions()
    with atomic_output_dir(out, force) as staging, warnings.catch_warnings():
        # PEFT looks for the base named in the adapters' configs, which is only there once renamed.
        warnings.filterwarnings("ignore", message="Could not find a config file")
        base = build_base(staging / "base", pretrained=True, seed=SEED, options=options)
        for task in TASKS:
            write_split(staging / "data" / task.name, task, "calibration", CALIBRATION, SEED)
            write_split(staging / "data" / task.name, task, "evaluation", EVALUATION, SEED)
            adapter = train_adapter(base, task, staging / "adapters" / task.name, SEED, options, f"{out}/base")
            # PEFT's boilerplate card names the temporary folder the base was trained in.
            (adapter / "README.md").unlink(missing_ok=True)
    return out
