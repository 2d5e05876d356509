"""Greedy answers of vLLM (its CPU build) serving a model folder, with a LoRA if given: what a
user serving `many`'s output runs. The prompts are the model's own chat template, as in
answer.py, so the two can be compared answer for answer.

    python serve.py MODEL [LORA RANK|- -] DATA.json OUT.json      (DATA: LLaMA-Factory's sharegpt JSON)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image

MAX_NEW_TOKENS = 8  # answer.py's


def main(model: str, lora: str, rank: str, data: Path, out: Path) -> None:
    from transformers import AutoProcessor
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    serving = {"enable_lora": True, "max_lora_rank": int(rank), "max_loras": 1} if lora != "-" else {}
    engine = LLM(
        model=model,
        dtype="float32",
        enforce_eager=True,
        max_model_len=256,
        limit_mm_per_prompt={"image": 1},
        seed=0,
        **serving,
    )
    processor = AutoProcessor.from_pretrained(model)
    records = json.loads(data.read_text())
    prompts = []
    for record in records:
        prompt = record["messages"][0]["content"].replace("<image>", "").strip()
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        prompts.append({"prompt": text, "multi_modal_data": {"image": Image.open(record["images"][0]).convert("RGB")}})
    request = LoRARequest("merged", 1, lora) if lora != "-" else None
    outputs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_NEW_TOKENS), lora_request=request)
    answers = [
        {
            "image": record["images"][0],
            "prediction": output.outputs[0].text.strip(),
            "tokens": list(output.outputs[0].token_ids),
        }
        for record, output in zip(records, outputs)
    ]
    out.write_text(json.dumps(answers, indent=1))


if __name__ == "__main__":  # vLLM's engine runs in worker processes, which import this module again
    main(*sys.argv[1:4], Path(sys.argv[4]), Path(sys.argv[5]))
