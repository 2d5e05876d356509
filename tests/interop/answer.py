"""Greedy answers of a base model, with a LoRA adapter if given, as transformers and PEFT
give them in whatever environment runs this (a training tool's, an older stack's, `many`'s):
the reference each tool's output is compared with. One record at a time, no padding.

    python answer.py BASE [ADAPTER|-] DATA.json OUT.json   (DATA: LLaMA-Factory's sharegpt JSON)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import transformers
from PIL import Image
from transformers import AutoProcessor

MAX_NEW_TOKENS = 8


def model_class():
    # AutoModelForImageTextToText is the name since transformers 4.46's successors; 4.46 knows both.
    return getattr(transformers, "AutoModelForImageTextToText", None) or transformers.AutoModelForVision2Seq


def main(base: str, adapter: str, data: Path, out: Path) -> None:
    processor = AutoProcessor.from_pretrained(base)
    model = model_class().from_pretrained(base, torch_dtype=torch.float32).eval()
    if adapter != "-":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).eval()
    answers = []
    for record in json.loads(data.read_text()):
        prompt = record["messages"][0]["content"].replace("<image>", "").strip()
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        inputs = processor(text=[text], images=[Image.open(record["images"][0]).convert("RGB")], return_tensors="pt")
        inputs.pop("token_type_ids", None)  # what a fast tokenizer of 4.46 adds, and its generate refuses
        with torch.inference_mode():
            generated = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        tokens = generated[0, inputs["input_ids"].shape[1] :]
        answer = processor.batch_decode([tokens], skip_special_tokens=True)[0]
        answers.append({"image": record["images"][0], "prediction": answer.strip(), "tokens": tokens.tolist()})
    out.write_text(json.dumps(answers, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]))
