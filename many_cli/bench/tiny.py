"""A tiny LLaVA built from configs, with a working word-level tokenizer, image processor and
chat template: no download, a few hundred kB. Tests, benchmarks and the sample use it.

The vocabulary is small words and digits, so tasks can answer with real words
("red", "three", ...) and the chat template is the usual USER/ASSISTANT one.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
WORDS = (
    "USER ASSISTANT : ? . , what is the a an of in on at to which how many colour color shape "
    "kind where it this picture image there are dot dots count name answer word one two three "
    "four five six seven eight nine zero red green blue yellow white black purple orange "
    "circle square triangle cross star left right top bottom middle centre center up down "
    "yes no small big describe grey say background"
).split()
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER : {% else %}ASSISTANT : {% endif %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image> {% elif item['type'] == 'text' %}{{ item['text'] }} {% endif %}"
    "{% endfor %}{% if message['role'] == 'assistant' %}{{ eos_token }} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT : {% endif %}"
)
TEXT_CHAT_TEMPLATE = (  # a plain language model's template: string contents
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER : {% else %}ASSISTANT : {% endif %}{{ message['content'] }} "
    "{% if message['role'] == 'assistant' %}{{ eos_token }} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT : {% endif %}"
)
LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IMAGE_SIZE = 16
PATCH_SIZE = 8


def tiny_tokenizer(
    extra_special: dict[str, str] | None = None, chat_template: str | None = CHAT_TEMPLATE
) -> PreTrainedTokenizerFast:
    """The word-level tokenizer of the tiny models; `extra_special` names a family's own special
    tokens (default: LLaVA's image token), added to the vocabulary after the usual ones."""
    extra_special = {"image_token": "<image>"} if extra_special is None else extra_special
    specials = SPECIAL + [token for token in extra_special.values() if token not in SPECIAL]
    vocab = {token: index for index, token in enumerate(specials + sorted(set(WORDS)))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens=extra_special,
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def family_tokenizer(specials: dict[str, str], image_text: str, video_text: str | None = None):
    """The word-level tokenizer with a family's special tokens, its chat template writing
    `image_text` where the user turn holds an image (and `video_text` where it holds a video)."""
    tokenizer = tiny_tokenizer(specials, chat_template=None)
    template = CHAT_TEMPLATE.replace("<image> ", image_text + " ")
    if video_text is not None:
        text = "{% elif item['type'] == 'text' %}"
        template = template.replace(text, "{% elif item['type'] == 'video' %}" + video_text + " " + text)
    tokenizer.chat_template = template
    return tokenizer


def qwen_vl_parts(
    video_processor_class, image_processor_class, patch_size: int = 8, min_pixels: int = 256, max_pixels: int = 1024
):
    """A Qwen-VL family's tokenizer, image and video processors (patches merged 2 × 2) and the
    config's special token ids."""
    tokenizer = family_tokenizer(
        {
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_start_token": "<|vision_start|>",
            "vision_end_token": "<|vision_end|>",
        },
        "<|vision_start|><|image_pad|><|vision_end|>",
        "<|vision_start|><|video_pad|><|vision_end|>",
    )
    pixels = {"patch_size": patch_size, "merge_size": 2, "temporal_patch_size": 2}
    image_processor = image_processor_class(min_pixels=min_pixels, max_pixels=max_pixels, **pixels)
    video_processor = video_processor_class(size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, **pixels)
    ids = tokenizer.convert_tokens_to_ids
    tokens = dict(
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    return tokenizer, image_processor, video_processor, tokens


def tiny_processor(image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE) -> LlavaProcessor:
    # The PIL image processor: the default one wants torchvision, which this project does not need.
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tiny_tokenizer(),
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def clip_vit_l_336(layers: int = 1) -> CLIPVisionConfig:
    """LLaVA-1.5's vision tower, CLIP ViT-L/14 at 336 px, with `layers` layers (24 in the real one)."""
    return CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=layers,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
    )


def tiny_clip(
    hidden: int = 16, layers: int = 1, image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE
) -> CLIPVisionConfig:
    """A small CLIP tower: two heads, an MLP twice its width, a projection as wide as it."""
    return CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=hidden,
    )


def tiny_llava_config(
    hidden: int = 32,
    layers: int = 2,
    intermediate: int | None = None,
    heads: int = 4,
    kv_heads: int = 2,
    vision: CLIPVisionConfig | None = None,
) -> LlavaConfig:
    """Defaults make a model of a few hundred kB; LLaVA-1.5-7B's language model is
    hidden=4096, intermediate=11008, heads=kv_heads=32 (at any depth)."""
    tokenizer = tiny_tokenizer()
    vision = vision or tiny_clip()
    text = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate or hidden * 3 // 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=len(tokenizer),
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
    )


def build_tiny_llava(out: Path, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """Save a randomly initialised tiny LLaVA and its processor to `out`."""
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(tiny_llava_config(hidden, layers)).eval()
    model.generation_config.pad_token_id = model.config.text_config.pad_token_id
    model.save_pretrained(out)
    tiny_processor().save_pretrained(out)
    return out


def build_tiny_llama(out: Path, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """Save a randomly initialised tiny Llama causal LM and its tokenizer (text chat template)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llava_config(hidden, layers).text_config).eval()
    model.generation_config.pad_token_id = model.config.pad_token_id
    model.save_pretrained(out)
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = TEXT_CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    return out
