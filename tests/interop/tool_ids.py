"""The token ids a training tool's own preprocessing gives each record of a data file, as it trains
on them, run in the tool's environment (`many_ids.py` gives what `many stats` feeds for the same).

    python tool_ids.py llamafactory CONFIG.yaml DATASET_DIR OUT.json   (the training run's YAML, its dataset read from DATASET_DIR)
    python tool_ids.py ms-swift ADAPTER DATA.jsonl OUT.json            (the checkpoint's args.json: its model, model type, template)
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path


def llamafactory(config: Path, dataset_dir: str) -> list[list[int]]:
    import yaml
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    arguments = {**yaml.safe_load(config.read_text()), "dataset_dir": dataset_dir, "output_dir": tempfile.mkdtemp()}
    model_args, data_args, training_args, _, _ = get_train_args(arguments)
    tokenizer_module = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
    dataset = get_dataset(template, model_args, data_args, training_args, stage="sft", **tokenizer_module)
    return [list(row["input_ids"]) for row in dataset["train_dataset"]]


def ms_swift(adapter: Path, data: Path) -> list[list[int]]:
    from swift import get_processor, get_template

    arguments = json.loads((adapter / "args.json").read_text())
    processor = get_processor(arguments["model"], model_type=arguments["model_type"], use_hf=True)
    template = get_template(processor, default_system=arguments.get("system"), template_type=arguments["template"])
    template.set_mode("train")
    return [list(template.encode(json.loads(line))["input_ids"]) for line in data.read_text().splitlines()]


if __name__ == "__main__":
    tool, first, second, out = sys.argv[1:]
    ids = llamafactory(Path(first), second) if tool == "llamafactory" else ms_swift(Path(first), Path(second))
    Path(out).write_text(json.dumps(ids))
