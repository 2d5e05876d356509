"""A tiny base model as the hub keeps them: built and saved by an older transformers (4.46.3,
in its own environment), so its checkpoint has the layout before 4.52 that today's
transformers, vLLM and the training tools all read. Head dimension 64 in the language model
and 32 in the tower: vLLM's CPU attention refuses smaller ones.

    python make_base.py SPEC.json FAMILY OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer
from tokenizers.processors import TemplateProcessing
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2TokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
)

HIDDEN, HEADS, LAYERS = 128, 2, 2
# At transformers' default 0.02 a random language model's logits stay flat: no LoRA could answer.
INIT_STD = 0.15


def tokenizer(spec: dict) -> PreTrainedTokenizerFast:
    qwen = "<|im_end|>" in spec["special"]
    kind = Qwen2TokenizerFast if qwen else PreTrainedTokenizerFast  # the class Qwen2VLProcessor insists on
    backend = Tokenizer.from_str(spec["tokenizer"])
    if not qwen:  # LLaVA-1.5's Llama tokenizer opens every text with its BOS
        backend.post_processor = TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", backend.token_to_id("<s>"))]
        )
    return kind(
        tokenizer_object=backend,
        bos_token=None if qwen else "<s>",
        eos_token="<|im_end|>" if qwen else "</s>",
        unk_token="<unk>",
        pad_token="<|endoftext|>" if qwen else "<pad>",
        additional_special_tokens=[
            token for token in spec["special"] if token not in ("<s>", "</s>", "<unk>", "<pad>")
        ],
    )


def llava(spec: dict, out: Path) -> None:
    words = tokenizer(spec)
    ids = words.convert_tokens_to_ids
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            projection_dim=64,
        ),
        text_config=LlamaConfig(
            hidden_size=HIDDEN,
            intermediate_size=2 * HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            num_key_value_heads=HEADS,
            vocab_size=len(words),
            max_position_embeddings=512,
            initializer_range=INIT_STD,
            bos_token_id=ids("<s>"),
            eos_token_id=ids("</s>"),
            pad_token_id=ids("<pad>"),
        ),
        image_token_index=ids("<image>"),
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        image_seq_length=(32 // 8) ** 2,  # else 4.46 takes 16 image tokens for unexpanded (legacy) input
        initializer_range=INIT_STD,
    )
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = ids("<pad>")
    model.generation_config.eos_token_id = ids("</s>")  # the top-level config has none to copy
    model.save_pretrained(out)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=words,
        patch_size=8,
        vision_feature_select_strategy="default",
        chat_template=spec["chat_template"],
    )
    processor.save_pretrained(out)
    # The hub's LLaVA processors carry this since transformers 4.47 counted the tower's CLS token:
    # without it a newer transformers writes one image token fewer than the tower gives.
    config_path = out / "processor_config.json"
    processor_config = json.loads(config_path.read_text()) if config_path.exists() else {}
    config_path.write_text(json.dumps({**processor_config, "num_additional_image_tokens": 1}, indent=2))


def qwen2_vl(spec: dict, out: Path) -> None:
    words = tokenizer(spec)
    ids = words.convert_tokens_to_ids
    config = Qwen2VLConfig(
        vocab_size=len(words),  # Qwen2's special tokens at its own ids: 151,657 rows
        tie_word_embeddings=True,  # as Qwen2-VL-2B: one matrix of them, not two
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=512,
        initializer_range=INIT_STD,
        rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]},  # halves of head_dim 64
        vision_config={
            "depth": 1,
            "embed_dim": 64,
            "hidden_size": HIDDEN,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        bos_token_id=None,
        eos_token_id=ids("<|im_end|>"),
        pad_token_id=ids("<|endoftext|>"),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = ids("<|endoftext|>")
    model.generation_config.eos_token_id = ids("<|im_end|>")
    model.save_pretrained(out)
    # Qwen2-VL-Instruct's own image sizes (the hub's preprocessor_config.json): patches of 14, merged 2 × 2.
    image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 16384, patch_size=14)
    Qwen2VLProcessor(
        image_processor=image_processor, tokenizer=words, chat_template=spec["chat_template"]
    ).save_pretrained(out)


if __name__ == "__main__":
    spec_path, family, out = sys.argv[1:]
    torch.manual_seed(0)
    {"llava": llava, "qwen2_vl": qwen2_vl}[family](json.loads(Path(spec_path).read_text()), Path(out))
