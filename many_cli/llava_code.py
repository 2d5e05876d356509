"""Checkpoints of LLaVA-1.5's own code base, the paper's two models as MCITlib fine-tunes them, read as
transformers' `LlavaForConditionalGeneration` without LLaVA's code: LLaVA-1.5 itself
(liuhaotian/llava-v1.5-7b, a CLIP tower) and InternVL-Chat-7B (OpenGVLab/InternVL-Chat-ViT-6B-
Vicuna-7B and -13B, InternViT-6B as its tower, read as transformers' InternVL tower).

Its checkpoint is LLaVA's own (`LlavaLlamaForCausalLM`, `model.layers.N…`, `model.mm_projector.{0,2}`,
often pickled `.bin` shards, read with torch's tensors-only unpickler); as LLaVA's loader does, the
tower is read from the folder `mm_vision_tower` names (InternViT-6B-224px, at 336 px, 448 if its
name says so, its position embeddings interpolated; or CLIP's, at its own image processor's size),
the hidden state `mm_vision_select_layer` picks, its patches (`mm_vision_select_feature: patch`).
The image is padded to a square of the image mean, resized, centre-cropped and normalised as
LLaVA's `process_images` does (ImageNet's mean and std for InternViT, the CLIP folder's own); the prompt is
LLaVA's `vicuna_v1` conversation and is tokenized piece by piece around the image, as
`tokenizer_image_token` does. The tower tensors a checkpoint may carry itself are not read (LLaVA's
loader does not read them either), and a warning says so. `many export` writes this layout back
(LLaVA's keys, in safetensors), which LLaVA's `load_pretrained_model` loads."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping

from many_cli.errors import InputError

_ARCHITECTURE = "LlavaLlamaForCausalLM"
_INTERNVIT_NAMES = ("intern_vit_6b", "internvit_6b", "InternViT-6B", "internvit6b")  # as LLaVA-InternVL matches
IMAGE_TOKEN = "<image>"
_IMAGENET_MEAN, _IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# LLaVA's conv_vicuna_v1
_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
# LLaVA's names -> transformers' LLaVA names (its language model under `model.language_model`)
_BASE_KEYS = {
    r"^model\.mm_projector\.0\.": "model.multi_modal_projector.linear_1.",
    r"^model\.mm_projector\.2\.": "model.multi_modal_projector.linear_2.",
    r"^model\.(embed_tokens|layers|norm)\.": r"model.language_model.\1.",
}
_TOWER = "model.vision_tower."  # the model's tower; the checkpoint's own copy is under it too
NOT_WRITTEN = (
    "is a checkpoint of LLaVA's own code base, whose names many does not write a merged LoRA in yet "
    "(merge --checkpoint-names): export the merge into the checkpoint (many export), which LLaVA's code loads"
)


def config_of(base: str) -> dict | None:
    """The base's config.json when it is a checkpoint of LLaVA's own code base, else None."""
    from many_cli.files import read_json

    path = Path(base).expanduser() / "config.json"
    if not path.is_file():
        return None
    config = read_json(path)
    return config if config.get("mm_vision_tower") and config.get("architectures") == [_ARCHITECTURE] else None


def check_readable_layout(base: str, config: Mapping) -> None:
    """Refuse, in one line, a LLaVA-code checkpoint whose parts many does not translate."""
    folder = tower_folder(base, config)
    faults = [
        (
            _is_clip(folder) == _is_internvit(config),
            f"its tower {folder} is neither InternViT-6B (by its name, as LLaVA-InternVL's code tells) "
            f"nor a CLIP vision model (by its config)",
        ),
        (
            config.get("mm_projector_type") != "mlp2x_gelu",
            f"its projector {config.get('mm_projector_type')!r} is not mlp2x_gelu",
        ),
        (
            config.get("mm_vision_select_feature", "patch") != "patch",
            f"it selects {config.get('mm_vision_select_feature')!r} features, not patch",
        ),
        (
            config.get("image_aspect_ratio", "pad") != "pad",
            f"its image_aspect_ratio {config.get('image_aspect_ratio')!r} is not pad",
        ),
        (
            bool(config.get("mm_use_im_start_end")) or bool(config.get("mm_use_im_patch_token")),
            "it wraps images in <im_start>/<im_patch> tokens",
        ),
    ]
    for failed, fault in faults:
        if failed:
            raise InputError(base, f"is a checkpoint of LLaVA's own code base, but {fault}")


def _is_internvit(config: Mapping) -> bool:
    return any(name in str(config["mm_vision_tower"]) for name in _INTERNVIT_NAMES)


def _is_clip(folder: Path) -> bool:
    from many_cli.files import read_json

    return read_json(folder / "config.json").get("model_type") in ("clip", "clip_vision_model")


def tower_folder(base: str, config: Mapping) -> Path:
    """The folder `mm_vision_tower` names: as written, else relative to the checkpoint."""
    named = Path(str(config["mm_vision_tower"])).expanduser()
    folder = Path(os.path.normpath(named if named.is_absolute() else Path(base).expanduser() / named))
    if not (folder / "config.json").is_file():
        raise InputError(
            Path(base) / "config.json",
            f"its mm_vision_tower {str(named)!r} is no model folder here ({folder}): download the "
            f"tower it names (OpenGVLab/InternViT-6B-224px, openai/clip-vit-large-patch14-336) and "
            f"set mm_vision_tower to its folder",
        )
    return folder


def _tower_config(base: str, config: Mapping):
    """transformers' config of the tower its folder describes: CLIP's own, or InternVL's for
    InternViT-6B at its own size (its position embeddings' grid, interpolated to the input's)."""
    from transformers import CLIPVisionConfig

    from many_cli.files import read_json
    from many_cli.internvl_layout import internvit_config

    folder = tower_folder(base, config)
    if not _is_internvit(config):
        return CLIPVisionConfig.from_pretrained(folder)
    vision = read_json(folder / "config.json")
    return internvit_config(vision, vision["image_size"], norm_type="rms_norm")


def _clip_preprocessing(base: str, config: Mapping) -> dict:
    """The image settings of the CLIP tower's folder (LLaVA's code reads its image processor)."""
    from transformers import CLIPImageProcessor

    own = CLIPImageProcessor.from_pretrained(tower_folder(base, config))
    return {
        "size": own.size,
        "crop_size": own.crop_size,
        "image_mean": own.image_mean,
        "image_std": own.image_std,
        "resample": own.resample,
    }


def image_size(base: str, config: Mapping) -> int:
    """The side images are cropped to: the CLIP folder's; InternViT's by LLaVA-InternVL's rule
    (clip_encoder.py: 448 when the tower's name says so, else 336)."""
    if not _is_internvit(config):
        return _clip_preprocessing(base, config)["crop_size"]["height"]
    return 448 if "448" in str(config["mm_vision_tower"]) else 336


def native_config(base: str, config: Mapping):
    """The `LlavaConfig` transformers builds for the checkpoint; its `<image>` token is the first
    id past the vocabulary (never embedded: see `load_model`)."""
    from transformers import LlamaConfig, LlavaConfig

    skipped = {"architectures", "model_type", "auto_map", "transformers_version"}
    text = LlamaConfig(**{key: value for key, value in config.items() if key not in skipped})
    tower = _tower_config(base, config)
    patch = tower.patch_size if isinstance(tower.patch_size, int) else tower.patch_size[0]
    patches = (image_size(base, config) // patch) ** 2
    return LlavaConfig(
        vision_config=tower,
        text_config=text,
        image_token_id=text.vocab_size,
        image_seq_length=patches,
        projector_hidden_act="gelu",
        vision_feature_layer=config.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy="default",  # patch features: the class token dropped
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


def meta_model(base: str, config: Mapping):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration(native_config(base, config))


def weight_paths(base: str, config: Mapping) -> list[Path]:
    """The weight files of the checkpoint and of its tower's folder."""
    return [*_weight_paths(Path(base).expanduser()), *_weight_paths(tower_folder(base, config))]


def _weight_paths(folder: Path) -> list[Path]:
    from many_cli.tensorfiles import model_weight_files

    return [folder / name for name in model_weight_files(folder)]


def own_names():
    """transformers' LLaVA loader reads LLaVA's own names while this lasts."""
    from transformers.core_model_loading import WeightRenaming

    from many_cli.layouts import registered_names

    return registered_names("llava", [WeightRenaming(source, target) for source, target in _BASE_KEYS.items()])


def exported_config(base: str, config: Mapping) -> dict:
    """The config an export of the checkpoint writes: its tower named by its full path (the
    export's folder is elsewhere)."""
    return {**config, "mm_vision_tower": str(tower_folder(base, config).resolve())}


def load_model(base: str, config: Mapping, dtype, device_map):
    """The checkpoint as `LlavaForConditionalGeneration`: its language model and projector as
    transformers' loader reads them (renamed), then the tower from its own folder, shard by shard,
    into the model's own tensors; every tensor accounted for."""
    import warnings

    from transformers import LlavaForConditionalGeneration

    native = native_config(base, config)
    where = {"device_map": device_map} if device_map is not None else {}
    with own_names():
        model, loading = LlavaForConditionalGeneration.from_pretrained(
            base, config=native, dtype=dtype, output_loading_info=True, **where
        )
    carried = [key for key in loading["unexpected_keys"] if key.startswith(_TOWER)]
    unexpected = sorted(set(loading["unexpected_keys"]) - set(carried))
    missing = sorted(key for key in loading["missing_keys"] if not key.startswith(_TOWER))  # read below
    if unexpected or missing:
        what = "loads nowhere in" if unexpected else "is missing for"
        raise InputError(
            base,
            f"its tensor {(unexpected or missing)[0]} {what} transformers' LLaVA "
            f"({len(unexpected or missing)} such): a layout of LLaVA's code many does not translate",
        )
    if carried:
        warnings.warn(  # printed as one line by the command line
            f"{base}: its {len(carried)} tower tensors are not read; the tower is read from "
            f"{tower_folder(base, config)}, as LLaVA's code reads it (mm_vision_tower)",
            stacklevel=2,
        )
    _load_tower(model.model.vision_tower, tower_folder(base, config), internvit=_is_internvit(config))
    _never_embed_image_tokens(model, native.image_token_id)
    return model


def _load_tower(tower, folder: Path, internvit: bool) -> None:
    """The tower's weights from `folder` into transformers' tower `tower`, in place, one file at a
    time: InternViT's (OpenGVLab's names renamed, the fused qkv split into q, k and v), or a CLIP
    vision model's, whose names are transformers' own (of a whole CLIP checkpoint, as LLaVA's
    `CLIPVisionModel.from_pretrained` does, the vision model's: its text model is no tower's)."""
    import torch

    from many_cli.internvl_layout import TOWER_RENAMES
    from many_cli.tensorfiles import load_pickled_tensors, open_safetensors

    expected, loaded = set(tower.state_dict()), set()
    for path in _weight_paths(folder):
        if path.suffix == ".safetensors":
            with open_safetensors(path) as handle:
                tensors = {key: handle.get(key) for key in handle.keys()}
        else:
            tensors = load_pickled_tensors(path)
        if not internvit:  # transformers' CLIP tower holds what CLIP's folder keeps under vision_model.
            tensors = {key[13:]: value for key, value in tensors.items() if key.startswith("vision_model.")}
        converted = {}
        for key, value in tensors.items():
            name = key
            for pattern, replacement in TOWER_RENAMES if internvit else ():
                name = re.sub(pattern, replacement, name)
            if name.endswith(("attn.qkv.weight", "attn.qkv.bias")):
                stem, parameter = name.rsplit(".attn.qkv.", 1)
                for part, chunk in zip(("q_proj", "k_proj", "v_proj"), torch.chunk(value, 3, dim=0)):
                    converted[f"{stem}.attention.{part}.{parameter}"] = chunk
            else:
                converted[name] = value
        strays = sorted(set(converted) - expected)
        if strays:
            raise InputError(path, f"its tensor for {strays[0]} loads nowhere in the tower ({len(strays)} such)")
        tower.load_state_dict(converted, strict=False)
        loaded |= set(converted)
    if expected - loaded:
        raise InputError(folder, f"leaves the tower's {sorted(expected - loaded)[0]} without weights: another tower?")


def _never_embed_image_tokens(model, image_token_id: int) -> None:
    """LLaVA's code puts an image's features where `<image>` stood, never embedding it; here the
    token has an id past the vocabulary, embedded as token 0 before its place is overwritten by
    the image's features (as transformers' own models with such ids do)."""
    import torch

    def embed_image_tokens_as_zero(module, args):
        ids = args[0]
        return (torch.where(ids == image_token_id, torch.zeros_like(ids), ids), *args[1:])

    model.get_input_embeddings().register_forward_pre_hook(embed_image_tokens_as_zero)


def load_tokenizer(base: str):
    """The checkpoint's sentencepiece tokenizer as LLaVA's code runs it (`use_fast=False`), with
    `<image>` as one special token past the vocabulary."""
    from many_cli.spm_tokenizer import SentencePieceTokenizer

    try:
        return SentencePieceTokenizer.from_pretrained(base, extra_special_tokens={"image_token": IMAGE_TOKEN})
    except (OSError, ValueError, TypeError) as error:
        raise InputError(base, f"its tokenizer cannot be read ({' '.join(str(error).split())[:200]})") from None


def load_processor(base: str, config: Mapping):
    """LLaVA's processor for the checkpoint: LLaVA's image preprocessing at the tower's size,
    its tokenizer, the vicuna_v1 conversation."""
    from transformers import LlavaImageProcessorPil, LlavaProcessor

    tokenizer = load_tokenizer(base)
    native = native_config(base, config)
    side = image_size(base, config)
    images = (
        {"size": {"shortest_edge": side}, "crop_size": {"height": side, "width": side}}
        | {"image_mean": _IMAGENET_MEAN, "image_std": _IMAGENET_STD}
        if _is_internvit(config)
        else _clip_preprocessing(base, config)
    )
    patch = native.vision_config.patch_size
    return LlavaProcessor(
        image_processor=LlavaImageProcessorPil(do_pad=True, **images),
        tokenizer=tokenizer,
        patch_size=patch if isinstance(patch, int) else patch[0],
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )


# LLaVA's vicuna_v1 conversation (SeparatorStyle.TWO): "SYSTEM USER: <image>\nQUESTION ASSISTANT: ANSWER</s>"
CHAT_TEMPLATE = (
    "{% set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' else none %}"
    f'{{% if system is none %}}{{{{ "{_SYSTEM}" }}}}'
    "{% elif system is string %}{{ system }}"
    "{% else %}{% for part in system %}{{ part['text'] }}{% endfor %}{% endif %}"
    "{{ ' ' }}"
    "{% for message in messages if message['role'] != 'system' %}"
    "{{ ('USER' if message['role'] == 'user' else 'ASSISTANT') + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] if part['type'] == 'image' %}{{ '<image>\\n' }}{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] }}{% endfor %}"
    "{% endif %}"
    "{{ '</s>' if message['role'] == 'assistant' else ' ' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
