"""The interop suite's inputs, written with `many`'s own environment: for each family, the
tokenizer and chat template its base is built with (`spec.json`, read by make_base.py under
an older transformers), and two tasks' pictures with their training, calibration and
evaluation splits (data/SPLIT/) as the training tools take them: LLaMA-Factory's sharegpt JSON
declared in the split's `dataset_info.json` under the task's name, and ms-swift's JSONL.

    python make_data.py OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from many_cli.bench.tiny import SPECIAL, WORDS
from many_cli.bench.world import TASKS, examples

FAMILY_TASKS = ("1_colour", "3_shape")
SPLITS = {"train": 64, "calibration": 16, "evaluation": 12}
QWEN_SPECIAL = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|vision_start|>", "<|vision_end|>"]
QWEN_SPECIAL += ["<|image_pad|>", "<|video_pad|>"]
# The words of the tools' own templates (LLaMA-Factory's llava system prompt, Vicuna's; ChatML's) beside the tasks'.
TEMPLATE_WORDS = (
    "system user assistant You are helpful A The chat between curious and artificial intelligence gives "
    "detailed polite answers questions ' s"
).split()
LLAVA_TEMPLATE = (  # llava-hf/llava-1.5-7b-hf's chat_template.json: no system prompt
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
QWEN_TEMPLATE = (  # Qwen2-VL-Instruct's ChatML, as its hub checkpoints carry it (images and text only)
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}{% if item['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif item['type'] == 'text' %}{{ item['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def word_tokenizer(special: list[str]) -> str:
    """The tiny models' word-level tokenizer, with the tools' template words."""
    vocab = {token: index for index, token in enumerate(special + sorted(set(WORDS) | set(TEMPLATE_WORDS)))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return backend.to_str()


# Qwen2's special tokens at its own ids: ms-swift's Qwen2-VL template finds the image and video
# tokens by id (151655, 151656), so a tokenizer that numbers them otherwise trains on unexpanded images.
QWEN_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
}


def qwen_tokenizer(special: list[str]) -> str:
    """A byte-level BPE built as Qwen2's is (its split rule, NFC, byte-level bytes), trained on the
    tiny world's words, its special tokens at Qwen2's ids (the ids between them never written):
    transformers 5 rebuilds a Qwen2 tokenizer from its vocab.json and merges.txt alone, so it must
    be one."""
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    words = sorted(set(WORDS) | set(TEMPLATE_WORDS))
    corpus = [" ".join(words), "\n".join(words), *words, *(f" {word}" for word in words)]
    ordinary = [token for token in special if token not in QWEN_IDS]
    trainer = trainers.BpeTrainer(
        vocab_size=2000,
        special_tokens=ordinary,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer)
    tokenizer = json.loads(backend.to_str())
    vocab = tokenizer["model"]["vocab"]
    unused = (f"<|unused_{index}|>" for index in range(max(QWEN_IDS.values())))
    for token, index in sorted(QWEN_IDS.items(), key=lambda item: item[1]):
        while len(vocab) < index:
            vocab[next(unused)] = len(vocab)
        vocab[token] = index
        tokenizer["added_tokens"].append(
            {"id": index, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
        )  # fmt: skip
    return json.dumps(tokenizer)


FAMILIES = {
    "llava": {
        "special": SPECIAL,
        "chat_template": LLAVA_TEMPLATE,
        "tokenizer": word_tokenizer,
    },
    "qwen2_vl": {
        "special": ["<unk>", *QWEN_SPECIAL],
        "chat_template": QWEN_TEMPLATE,
        "tokenizer": qwen_tokenizer,
    },
}


def write_task(folder: Path, task) -> dict[str, list[dict]]:
    """Each split's records (absolute image paths), the pictures saved under folder/images/."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, count in SPLITS.items():
        records = []
        for index, example in enumerate(examples(task, split, count, seed=0)):
            image = folder / "images" / f"{task.name}-{split}-{index:03d}.png"
            example.image.save(image)
            records.append({"image": str(image.resolve()), "prompt": example.prompt, "answer": example.answer})
        splits[split] = records
    return splits


def write_tool_data(data: Path, task: str, splits: dict[str, list[dict]], infos: dict[str, dict]) -> None:
    """data/SPLIT/TASK.json (sharegpt) and TASK.jsonl (ms-swift), each split's dataset_info.json
    naming the task's file as TASK."""
    for split, records in splits.items():
        conversations = [
            {
                "messages": [
                    {"role": "user", "content": f"<image>{record['prompt']}"},
                    {"role": "assistant", "content": record["answer"]},
                ],
                "images": [record["image"]],
            }
            for record in records
        ]
        folder = data / split
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{task}.json").write_text(json.dumps(conversations, indent=1))
        with open(folder / f"{task}.jsonl", "w") as handle:  # ms-swift's: one conversation a line
            handle.writelines(json.dumps(conversation) + "\n" for conversation in conversations)
        infos.setdefault(split, {})[task] = {
            "file_name": f"{task}.json",
            "formatting": "sharegpt",
            "columns": {"messages": "messages", "images": "images"},
            "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
        }


def main(out: Path) -> None:
    by_name = {task.name: task for task in TASKS}
    for family, spec in FAMILIES.items():
        folder = out / family
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "spec.json").write_text(
            json.dumps({**spec, "tokenizer": spec["tokenizer"](spec["special"])}, indent=1)
        )
        data, infos = folder / "data", {}
        for task in FAMILY_TASKS:
            write_tool_data(data, task, write_task(data, by_name[task]), infos)
        for split, info in infos.items():
            (data / split / "dataset_info.json").write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
