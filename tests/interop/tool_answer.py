"""Greedy answers of an adapter through LLaMA-Factory's own inference (`llamafactory.chat.ChatModel`,
its template, the adapter loaded as the tool loads it), in the tool's environment: the reference
`many infer --adapter` and a one-task merge are compared with.

One mend, where the tool's inference does not run the model as its training did: for Qwen2-VL,
LLaMA-Factory's training collator gives M-RoPE the image tokens' positions (`mm_token_type_ids`,
1 at each image token), but its ChatModel (0.9.5 under transformers 5.6) passes none to
`generate`, which then places the image tokens as text (1 of 12 answers differs on the interop
suite's tiny Qwen2-VL). The ids are added here as the collator builds them.

    python tool_answer.py BASE ADAPTER TEMPLATE DATA.json OUT.json [QUANTIZATION_BIT]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

MAX_NEW_TOKENS = 8


def main(base: str, adapter: str, template: str, data: Path, out: Path, bits: str = "") -> None:
    from llamafactory.chat import ChatModel

    arguments = dict(
        model_name_or_path=base,
        adapter_name_or_path=adapter,
        template=template,
        finetuning_type="lora",
        infer_dtype="float32",
        do_sample=False,
        max_new_tokens=MAX_NEW_TOKENS,
    )
    if bits:
        arguments.update(quantization_bit=int(bits), quantization_method="bnb")
    chat = ChatModel(arguments)
    _image_positions_as_trained(chat.engine.model)
    answers = []
    for record in json.loads(data.read_text()):
        turn = record["messages"][0]
        response = chat.chat([{"role": turn["role"], "content": turn["content"]}], images=record["images"])[0]
        answers.append({"image": record["images"][0], "prediction": response.response_text.strip()})
    out.write_text(json.dumps(answers, indent=1))


def _image_positions_as_trained(model) -> None:
    generate, image_token = model.generate, getattr(model.config, "image_token_id", None)

    def as_trained(*args, **kwargs):
        if kwargs.get("image_grid_thw") is not None and "mm_token_type_ids" not in kwargs:
            kwargs["mm_token_type_ids"] = (kwargs["inputs"] == image_token).long()
        return generate(*args, **kwargs)

    model.generate = as_trained


if __name__ == "__main__":
    main(*sys.argv[1:3], sys.argv[3], Path(sys.argv[4]), Path(sys.argv[5]), *sys.argv[6:])
