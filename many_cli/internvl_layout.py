"""OpenGVLab's own InternVL-Chat checkpoints (`model_type: internvl_chat`, written for their remote
code) read as transformers' `InternVLForConditionalGeneration`, without running that code: the
config translated, the weights renamed (and the tower's fused qkv split) by transformers' own
loader as it streams the shards, and the processor built as the checkpoint's own code prepares
an image (448 px tiles up to `max_dynamic_patch`, a thumbnail, ImageNet normalisation,
`<img><IMG_CONTEXT>…</img>`) and the chat template its config names.

Language models read: Qwen2/Qwen2.5, Llama and InternLM2 (InternVL2, 2.5, 3, 3.5 and their -MPO,
-Instruct and -Pretrained variants); InternLM2 is read as Llama (`internlm2`).

Also InternVL's own LoRA fine-tuning (`internvl_chat_finetune.py --use_llm_lora R`), which saves
the whole model with the LoRA inside: its LoRA (rank R, alpha 2R, as `wrap_llm_lora` is called)
and its `mlp1` are taken out as a PEFT adapter; anything else that differs from the base is
refused."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator, Mapping

from many_cli.errors import InputError

MODEL_TYPE = "internvl_chat"
NOT_WRITTEN = None  # export and --checkpoint-names write OpenGVLab's layout
_LANGUAGE_MODELS = {"Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama", "InternLM2ForCausalLM": "llama"}
_INTERNLM2 = "InternLM2ForCausalLM"
_IMAGE_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
_IMAGENET_MEAN, _IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

# The conversation templates of OpenGVLab's `internvl/conversation.py` that InternVL-Chat configs
# name: (system message, the separator ending each turn). All are ChatML-shaped.
_SYSTEM_2024 = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
)
_SYSTEM_2025 = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)
_TEMPLATES = {
    "Hermes-2": (_SYSTEM_2024, "<|im_end|>"),
    "internlm2-chat": (_SYSTEM_2024, "<|im_end|>"),
    "internvl2_5": (_SYSTEM_2025, "<|im_end|>\n"),
}


def is_opengvlab_internvl(config: Mapping) -> bool:
    return config.get("model_type") == MODEL_TYPE


def check_readable_layout(base: str, config: Mapping) -> None:
    """Refuse, in one line, an InternVL-Chat checkpoint whose parts many does not translate."""
    from many_cli import internlm2

    architecture = (config.get("llm_config") or {}).get("architectures", [None])[0]
    template = config.get("template")
    rope = internlm2.rope_scaling(config.get("llm_config") or {}) if architecture == _INTERNLM2 else None
    faults = [
        (
            architecture not in _LANGUAGE_MODELS,
            f"its language model {architecture} is not read yet (many reads InternVL-Chat with "
            f"{', '.join(_LANGUAGE_MODELS)})",
        ),
        (
            config.get("ps_version", "v1") not in ("v1", "v2"),
            f"its pixel shuffle {config.get('ps_version')!r} is neither v1 nor v2",
        ),
        (
            bool(config.get("dynamic_image_size")) and not config.get("use_thumbnail"),
            "it tiles images without a thumbnail, which transformers' InternVL does not do",
        ),
        (template not in _TEMPLATES, f"its chat template {template!r} is none of {', '.join(_TEMPLATES)}"),
        (
            rope is not None and rope not in internlm2.ROPE_SCALINGS,
            f"its rope scaling {rope!r} is none of {', '.join(internlm2.ROPE_SCALINGS)}",
        ),
        (bool(config.get("use_backbone_lora") or config.get("use_llm_lora")), _NOT_A_BASE),
    ]
    for failed, fault in faults:
        if failed:
            raise InputError(base, f"is an OpenGVLab InternVL-Chat checkpoint, but {fault}")


_NOT_A_BASE = (
    "it carries a LoRA inside the whole model (use_llm_lora or use_backbone_lora: a checkpoint "
    "internvl_chat_finetune.py saved): give it as the adapter, and as --model the base it was trained from"
)


def internvit_config(vision: Mapping, image_size: int, norm_type: str = "layer_norm"):
    """transformers' `InternVLVisionConfig` of an InternViT tower that OpenGVLab's `vision` config
    describes, read at `image_size` (`norm_type`: where the config does not say, as InternViT-6B's
    first code, which knew RMSNorm only)."""
    from transformers import InternVLVisionConfig

    return InternVLVisionConfig(
        hidden_size=vision["hidden_size"],
        num_hidden_layers=vision["num_hidden_layers"],
        num_attention_heads=vision["num_attention_heads"],
        intermediate_size=vision["intermediate_size"],
        hidden_act=vision.get("hidden_act", "gelu"),
        attention_bias=vision.get("qkv_bias", True),
        use_qk_norm=vision.get("qk_normalization", False),
        norm_type=vision.get("norm_type", norm_type),
        layer_norm_eps=vision.get("layer_norm_eps", 1e-6),
        image_size=image_size,
        patch_size=vision["patch_size"],
        num_channels=vision.get("num_channels", 3),
        use_absolute_position_embeddings=True,
        use_mean_pooling=True,
    )


def native_config(config: Mapping, image_token_id: int):
    """The `InternVLConfig` transformers builds for what the InternVL-Chat `config` describes;
    `image_token_id` is its tokenizer's `<IMG_CONTEXT>`."""
    from transformers import CONFIG_MAPPING, InternVLConfig

    vision = dict(config["vision_config"])
    tower = internvit_config(vision, config.get("force_image_size") or vision["image_size"])
    language = dict(config["llm_config"])
    tied = bool(config.get("tie_word_embeddings", False))  # OpenGVLab unties them for every size
    if language["architectures"][0] == _INTERNLM2:
        from many_cli import internlm2

        text = internlm2.llama_config(language)
    else:
        text = CONFIG_MAPPING[_LANGUAGE_MODELS[language["architectures"][0]]](
            **{key: value for key, value in language.items() if key not in ("architectures", "auto_map", "model_type")}
            | {"tie_word_embeddings": tied}
        )
    patches = (tower.image_size[0] // tower.patch_size[0]) * (tower.image_size[1] // tower.patch_size[1])
    return InternVLConfig(
        vision_config=tower,
        text_config=text,
        image_token_id=image_token_id,
        image_seq_length=int(patches * config.get("downsample_ratio", 0.5) ** 2),
        downsample_ratio=config.get("downsample_ratio", 0.5),
        vision_feature_layer=config.get("select_layer", -1),
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=tied,
    )


# InternViT's names (OpenGVLab's `modeling_intern_vit.py`) -> transformers' InternVL tower's, each
# a regex on a key from the tower's root, applied in order; the fused `attn.qkv` is split apart.
TOWER_RENAMES = [
    (r"^(encoder\.)layers\.", r"\1layer."),
    (r"^(embeddings\.)class_embedding$", r"\1cls_token"),
    (r"^(embeddings\.)position_embedding$", r"\1position_embeddings"),
    (r"^(embeddings\.)patch_embedding\.", r"\1patch_embeddings.projection."),
    (r"^(encoder\.layer\.\d+\.)ls1$", r"\1lambda_1"),
    (r"^(encoder\.layer\.\d+\.)ls2$", r"\1lambda_2"),
    (r"^(encoder\.layer\.\d+\.)norm1\.", r"\1layernorm_before."),
    (r"^(encoder\.layer\.\d+\.)norm2\.", r"\1layernorm_after."),
    (r"^(encoder\.layer\.\d+\.)attn\.proj\.", r"\1attention.projection_layer."),
    (r"^(encoder\.layer\.\d+\.)attn\.q_norm\.", r"\1attention.q_norm."),
    (r"^(encoder\.layer\.\d+\.)attn\.k_norm\.", r"\1attention.k_norm."),
]


def opengvlab_transforms() -> list:
    """OpenGVLab's names -> the names transformers' InternVL loader already maps (its LLaVA-style
    older layout), the tower's fused qkv split into q, k and v (bias too), and InternLM2 read as
    Llama. One group per pattern: transformers joins the patterns, and numbers only the first
    group of each."""
    from transformers.core_model_loading import Chunk, WeightConverter, WeightRenaming

    from many_cli import internlm2

    renames = [
        (r"^vision_model\.", "vision_tower."),
        *((rf"^(vision_tower\.{pattern[2:]}", replacement) for pattern, replacement in TOWER_RENAMES),
        (r"^mlp1\.0\.", "multi_modal_projector.layer_norm."),
        (r"^mlp1\.1\.", "multi_modal_projector.linear_1."),
        (r"^mlp1\.3\.", "multi_modal_projector.linear_2."),
    ]
    split = WeightConverter(
        source_patterns="attn.qkv",
        target_patterns=["attention.q_proj", "attention.k_proj", "attention.v_proj"],
        operations=[Chunk(dim=0)],
    )
    return [*(WeightRenaming(source, target) for source, target in renames), split, *internlm2.weight_transforms()]


def own_names():
    """transformers' InternVL loader reads OpenGVLab's names while this lasts."""
    from many_cli.layouts import registered_names

    return registered_names("internvl", opengvlab_transforms())


def meta_model(base: str, config: Mapping):
    from transformers import InternVLForConditionalGeneration

    image_token_id = load_tokenizer(base, config).context_image_token_id
    return InternVLForConditionalGeneration(native_config(config, image_token_id))


def exported_config(base: str, config: Mapping) -> None:
    """None: an export copies the checkpoint's config as it is."""
    return None


def weight_paths(base: str, config: Mapping) -> list[Path]:
    from many_cli.tensorfiles import weight_files

    return [Path(base).expanduser() / name for name in weight_files(Path(base).expanduser())]


def load_model(base: str, config: Mapping, dtype, device_map):
    """The checkpoint as `InternVLForConditionalGeneration`, every tensor accounted for: one that
    loads nowhere, or a parameter left without one, is refused naming the base."""
    from transformers import InternVLForConditionalGeneration

    native = native_config(config, load_tokenizer(base, config).context_image_token_id)
    where = {"device_map": device_map} if device_map is not None else {}
    with own_names():
        model, loading = InternVLForConditionalGeneration.from_pretrained(
            base, config=native, dtype=dtype, use_safetensors=True, output_loading_info=True, **where
        )
    if config.get("ps_version", "v1") == "v1":
        _keep_tiles_transposed(model.model)
    leftover = sorted(loading["unexpected_keys"]) or sorted(loading["missing_keys"])
    if leftover:
        what = "loads nowhere in" if loading["unexpected_keys"] else "is missing for"
        raise InputError(
            base,
            f"its tensor {leftover[0]} {what} transformers' InternVL ({len(leftover)} such): "
            f"an InternVL-Chat layout many does not translate",
        )
    return model


def _keep_tiles_transposed(model) -> None:
    """OpenGVLab's pixel shuffle `v1` (InternVL-Chat-V1-5, Mini-InternVL-V1-5) leaves each tile's
    token grid transposed, where v2 (what transformers implements) swaps height and width back:
    this model's tiles keep v1's order, as the checkpoint was trained."""
    shuffle = type(model).pixel_shuffle

    def pixel_shuffle_v1(vision_features, scale_factor: float = 0.5):
        return shuffle(model, vision_features, scale_factor).transpose(1, 2).contiguous()

    model.pixel_shuffle = pixel_shuffle_v1


def load_tokenizer(base: str, config: Mapping):
    """The checkpoint's own tokenizer (transformers' class for it; InternLM2's run as its remote
    code runs it), told InternVL's image tokens."""
    from transformers import AutoTokenizer

    if config["llm_config"]["architectures"][0] == _INTERNLM2:
        from many_cli.spm_tokenizer import SentencePieceTokenizer as kind
    else:
        kind = AutoTokenizer
    try:
        tokenizer = kind.from_pretrained(base, trust_remote_code=False, extra_special_tokens=_IMAGE_TOKENS)
    except (OSError, ValueError, TypeError) as error:
        raise InputError(base, f"its tokenizer cannot be read ({' '.join(str(error).split())[:200]})") from None
    missing = [token for token in list(_IMAGE_TOKENS.values())[:3] if token not in tokenizer.get_vocab()]
    if missing:
        raise InputError(base, f"its tokenizer has no {missing[0]} token: not an InternVL-Chat tokenizer")
    return tokenizer


def load_processor(base: str, config: Mapping):
    """InternVL's processor for the checkpoint: its tiling and image size, its tokenizer, the chat
    template its config names."""
    from transformers import GotOcr2ImageProcessorPil, InternVLProcessor, InternVLVideoProcessor

    tokenizer = load_tokenizer(base, config)
    native = native_config(config, tokenizer.context_image_token_id)
    size = {"height": native.vision_config.image_size[0], "width": native.vision_config.image_size[1]}
    return InternVLProcessor(
        image_processor=GotOcr2ImageProcessorPil(
            size=size,
            crop_to_patches=bool(config.get("dynamic_image_size")),
            min_patches=config.get("min_dynamic_patch", 1),
            max_patches=config.get("max_dynamic_patch", 6),
            image_mean=_IMAGENET_MEAN,
            image_std=_IMAGENET_STD,
        ),
        tokenizer=tokenizer,
        video_processor=InternVLVideoProcessor(size=size, image_mean=_IMAGENET_MEAN, image_std=_IMAGENET_STD),
        image_seq_length=native.image_seq_length,
        chat_template=chat_template(config["template"]),
    )


def chat_template(name: str) -> str:
    """The Jinja chat template of OpenGVLab's conversation template `name`: its system message,
    then each turn `<|im_start|>ROLE\\n…SEP`, an image as `<IMG_CONTEXT>\\n` before the turn's text
    (as `chat()` puts `<image>\\n` before the question)."""
    system, separator = _TEMPLATES[name]
    sep = separator.replace("\n", "\\n")
    return (
        "{% set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' else none %}"
        f"{{{{ '<|im_start|>system\\n' }}}}"
        f"{{% if system is none %}}{{{{ '{system}' }}}}"
        "{% elif system is string %}{{ system }}"
        "{% else %}{% for part in system %}{{ part['text'] }}{% endfor %}{% endif %}"
        f"{{{{ '{sep}' }}}}"
        "{% for message in messages if message['role'] != 'system' %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' }}"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}"
        "{% for part in message['content'] if part['type'] == 'image' %}{{ '<IMG_CONTEXT>\\n' }}{% endfor %}"
        "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] }}{% endfor %}"
        "{% endif %}"
        f"{{{{ '{sep}' }}}}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )


def internlm2_heads(base: str) -> tuple[int, int] | None:
    """(query heads, key-value heads) of an InternVL-Chat checkpoint `base` with InternLM2 inside
    (the layout its fused wqkv, and a LoRA on it, split by), else None."""
    language = (config_of(base) or {}).get("llm_config") or {}
    if language.get("architectures", [None])[0] != _INTERNLM2:
        return None
    return language["num_attention_heads"], language.get("num_key_value_heads") or language["num_attention_heads"]


def config_of(base: str) -> dict | None:
    """The base's config.json when it is an OpenGVLab InternVL-Chat checkpoint, else None."""
    from many_cli.files import read_json

    path = Path(base).expanduser() / "config.json"
    if not path.is_file():
        return None
    config = read_json(path)
    return config if is_opengvlab_internvl(config) else None


# ---------------------------------------------------------------- InternVL's whole-model LoRA checkpoints

_WRAPPED = "language_model.base_model.model."  # PEFT's wrapping of the language model, inside the whole model
_WHOLE_LORA_KEY = re.compile(
    r"^language_model\.base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.default\.weight$"
)


def is_whole_model_lora(path: Path) -> bool:
    """A folder InternVL's fine-tuning saved with --use_llm_lora (no PEFT adapter beside it)."""
    config = config_of(str(path))
    return bool(config and config.get("use_llm_lora")) and not (path / "adapter_config.json").exists()


def _whole_model_tensors(path: Path) -> Iterator[tuple[str, object]]:
    """(key, tensor) of every weight of a whole-model checkpoint, shard by shard."""
    from many_cli.tensorfiles import open_safetensors, weight_files

    for name in weight_files(path):
        with open_safetensors(path / name) as handle:
            for key in handle.keys():
                yield key, handle.get(key)


def write_peft_adapter(source: Path, out: Path) -> None:
    """The LoRA and the projector of a whole-model checkpoint as a PEFT adapter `out`, named as
    ms-swift names them for the same model (`language_model.model.…`, `mlp1`)."""
    from many_cli.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX
    from many_cli.tensorfiles import save_tensors

    rank = config_of(str(source))["use_llm_lora"]
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise InputError(source / "config.json", f"its use_llm_lora {rank!r} is not a rank ≥ 1")
    tensors, targets = {}, set()
    for key, value in _whole_model_tensors(source):
        match = _WHOLE_LORA_KEY.match(key)
        if match:
            targets.add(f"language_model.{match['module']}")
            tensors[f"{PEFT_PREFIX}language_model.{match['module']}.lora_{match['part']}.weight"] = value.contiguous()
        elif key.startswith("mlp1."):
            tensors[f"{PEFT_PREFIX}{key}"] = value.contiguous()
        elif "lora_" in key:
            raise InputError(
                source, f"holds the LoRA tensor {key!r} outside the language model, which many does not map"
            )
    if not targets:
        raise InputError(source, "holds no LoRA weights in its language model (use_llm_lora is set)")
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,  # internvl_chat_finetune.py: wrap_llm_lora(r=R, lora_alpha=2 * R)
        "target_modules": sorted(targets),
        "modules_to_save": ["mlp1"],
        "base_model_name_or_path": None,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_tensors(out / ADAPTER_WEIGHTS, tensors, {"format": "pt"})


def check_against_base(source: Path, base: str) -> None:
    """Every tensor of the whole-model checkpoint but its LoRA and `mlp1` must be the base's own:
    many merges the LoRA and the projector, so a changed tower or embedding would be lost."""
    import torch

    from many_cli.tensorfiles import open_safetensors, weight_files

    base_dir = Path(base).expanduser()
    owners = {}
    for name in weight_files(base_dir):
        with open_safetensors(base_dir / name) as handle:
            owners.update(dict.fromkeys(handle.keys(), base_dir / name))
    for key, value in _whole_model_tensors(source):
        if _WHOLE_LORA_KEY.match(key) or key.startswith("mlp1."):
            continue
        plain = key.replace(_WRAPPED, "language_model.", 1).replace(".base_layer.", ".")
        if plain not in owners:
            raise InputError(source, f"holds {key!r}, which the base {base} does not have: trained from another base?")
        with open_safetensors(owners[plain]) as handle:
            own = handle.get(plain)
        if own.shape != value.shape or not torch.equal(own, value):
            raise InputError(
                source,
                f"its {key} differs from the base {base}'s: its fine-tuning changed more than the LoRA "
                f"and mlp1, which is all many merges (or it was trained from another base)",
            )
