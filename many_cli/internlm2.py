"""InternLM2, the language model of most InternVL2 and InternVL2.5 checkpoints, read as
transformers' Llama: the same computation, with Llama's names (`wqkv` split into q, k and v) and
the same tokenizer (sentencepiece, run as InternLM2's remote `tokenization_internlm2.py` runs it).

A fused `wqkv` holds its heads group by group: for each key-value head, its query heads, then its
key, then its value (`(kv_heads, queries_per_kv + 2, head_dim)` rows). A LoRA on `wqkv` is the
same LoRA on q, k and v: B's rows split as the weight's, A shared."""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import ContextManager

import torch
from transformers.core_model_loading import ConversionOps, WeightConverter, WeightRenaming

from many_cli.errors import InputError

ARCHITECTURE = "InternLM2ForCausalLM"
FUSED_QKV = "attention.wqkv"
_LAYER = r"^(language_model\.model\.layers\.\d+\.)"
# InternLM2's module names -> Llama's, under InternVL-Chat's `language_model.`
RENAMES = [
    (r"^language_model\.model\.tok_embeddings\.", "language_model.model.embed_tokens."),
    (r"^language_model\.output\.", "language_model.lm_head."),
    (_LAYER + r"attention\.wo\.", r"\1self_attn.o_proj."),
    (_LAYER + r"feed_forward\.w1\.", r"\1mlp.gate_proj."),
    (_LAYER + r"feed_forward\.w3\.", r"\1mlp.up_proj."),
    (_LAYER + r"feed_forward\.w2\.", r"\1mlp.down_proj."),
    (_LAYER + r"attention_norm\.", r"\1input_layernorm."),
    (_LAYER + r"ffn_norm\.", r"\1post_attention_layernorm."),
]
SPLIT_TARGETS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]


ROPE_SCALINGS = ("dynamic", "linear")  # InternLM2's, computed as Llama's of the same name


def rope_scaling(language: dict) -> str | None:
    """The kind of rotary scaling an InternLM2 `llm_config` names, if any."""
    scaling = language.get("rope_scaling") or {}
    return scaling.get("type") or scaling.get("rope_type") if scaling else None


def llama_config(language: dict):
    """The `LlamaConfig` of an InternLM2 `llm_config` (same layers, same rotary embedding)."""
    from transformers import LlamaConfig

    scaling = language.get("rope_scaling")
    rope = {"rope_type": "default", "rope_theta": float(language.get("rope_theta", 10000))}
    if scaling:  # one of ROPE_SCALINGS (checked where the checkpoint is first read)
        rope.update(rope_type=rope_scaling(language), factor=float(scaling["factor"]))
    return LlamaConfig(
        vocab_size=language["vocab_size"],
        hidden_size=language["hidden_size"],
        intermediate_size=language["intermediate_size"],
        num_hidden_layers=language["num_hidden_layers"],
        num_attention_heads=language["num_attention_heads"],
        num_key_value_heads=language.get("num_key_value_heads") or language["num_attention_heads"],
        hidden_act=language.get("hidden_act", "silu"),
        max_position_embeddings=language.get("max_position_embeddings", 2048),
        rms_norm_eps=language.get("rms_norm_eps", 1e-6),
        attention_bias=bool(language.get("bias", True)),
        mlp_bias=False,
        rope_parameters=rope,
        bos_token_id=language.get("bos_token_id", 1),
        eos_token_id=language.get("eos_token_id", 2),
        pad_token_id=language.get("pad_token_id", 0),
        tie_word_embeddings=False,
    )


def split_qkv(fused: torch.Tensor, heads: int, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k and v of a fused `wqkv` weight, bias or LoRA B (rows: the fused output features)."""
    groups = fused.reshape(kv_heads, heads // kv_heads + 2, -1, *fused.shape[1:])
    head_dim = groups.shape[2]
    q = groups[:, :-2].reshape(heads * head_dim, *fused.shape[1:])
    k = groups[:, -2].reshape(kv_heads * head_dim, *fused.shape[1:])
    v = groups[:, -1].reshape(kv_heads * head_dim, *fused.shape[1:])
    return q.contiguous(), k.contiguous(), v.contiguous()


def fused_rows(model, converted: dict[str, str]) -> dict[str, tuple[str, torch.Tensor]]:
    """q, k and v's weight names in `model` -> (the checkpoint's `wqkv` key, their rows in it),
    for the converted keys `converted` (first part's name -> key) that are `wqkv`s."""
    fused = {name: key for name, key in converted.items() if key.endswith(f"{FUSED_QKV}.weight")}
    if not fused:
        return {}
    text = model.config.get_text_config()  # Llama's, as InternLM2 is read
    heads, kv_heads = text.num_attention_heads, text.num_key_value_heads
    rows = split_qkv(torch.arange((heads + 2 * kv_heads) * text.head_dim), heads, kv_heads)
    return {
        name.replace(SPLIT_TARGETS[0], target): (key, part)
        for name, key in fused.items()
        for target, part in zip(SPLIT_TARGETS, rows)
    }


class SplitGroupedQKV(ConversionOps):
    """transformers' loader op: a fused `wqkv` tensor -> q_proj, k_proj, v_proj."""

    def convert(self, input_dict, source_patterns, target_patterns, **kwargs):
        text = kwargs["config"].get_text_config()
        tensors = next(iter(input_dict.values()))
        fused = tensors[0] if isinstance(tensors, list) else tensors
        parts = split_qkv(fused, text.num_attention_heads, text.num_key_value_heads)
        return dict(zip(target_patterns, parts))


def weight_transforms() -> list:
    """The renamings and the `wqkv` split, in the form transformers' loader takes them."""
    return [
        *(WeightRenaming(source, target) for source, target in RENAMES),
        WeightConverter(source_patterns=FUSED_QKV, target_patterns=SPLIT_TARGETS, operations=[SplitGroupedQKV()]),
    ]


def has_fused_qkv(modules) -> bool:
    return any(module.endswith(FUSED_QKV) for module in modules)


def head_layout(model) -> tuple[int, int] | None:
    """(query heads, key-value heads) of an InternVL model, where an InternLM2 is read as Llama,
    else None."""
    if model.config.model_type != "internvl":
        return None
    text = model.config.get_text_config()
    return text.num_attention_heads, text.num_key_value_heads


def split_adapter(directory: Path, layout: tuple[int, int] | None) -> ContextManager[Path]:
    """The adapter `directory` as it loads on a model of that head `layout`: a temporary copy
    with each `wqkv` LoRA split when it has one, else the folder itself."""
    from many_cli.adapters import converted_copy, read_adapter

    if layout is None or not has_fused_qkv(read_adapter(directory).modules):
        return nullcontext(directory)
    return converted_copy(directory, partial(write_split_adapter, heads=layout[0], kv_heads=layout[1]))


def write_split_adapter(source: Path, out: Path, heads: int, kv_heads: int) -> None:
    """A PEFT copy of the adapter `source` with each `wqkv` LoRA as q, k and v LoRAs (Llama's
    names under the same prefix; A shared, B split): exactly the same update of the model."""
    import json
    import re

    from many_cli.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, declared_rank_and_alpha, read_adapter
    from many_cli.files import read_json
    from many_cli.tensorfiles import open_safetensors, save_tensors

    adapter = read_adapter(source)
    config = read_json(source / ADAPTER_CONFIG)
    if config.get("use_dora"):
        raise InputError(source / ADAPTER_CONFIG, "is a DoRA adapter on InternLM2's wqkv, which many does not split")
    tensors, targets = {}, []
    with open_safetensors(adapter.weights) as handle:
        for key in handle.keys():
            value = handle.get(key)
            head, fused, tail = key.partition(f".{FUSED_QKV}.")
            if not fused:
                tensors[key] = value
                continue
            parts = (value,) * 3 if ".lora_A." in f".{tail}" else split_qkv(value, heads, kv_heads)
            for target, part in zip(SPLIT_TARGETS, parts):
                tensors[f"{head}.{target}.{tail}"] = part.contiguous()
    ranks, alphas = {}, {}  # each module's own, as its config declares them, under its new names
    for module in adapter.modules:
        prefix, fused, _ = module.partition(f".{FUSED_QKV}")
        names = [f"{prefix}.{target}" for target in SPLIT_TARGETS] if fused else [module]
        rank, alpha = declared_rank_and_alpha(config, module)
        targets += names
        ranks |= {f"^{re.escape(name)}": rank for name in names}
        alphas |= {f"^{re.escape(name)}": alpha for name in names}
    config |= {"target_modules": sorted(targets), "rank_pattern": ranks, "alpha_pattern": alphas}
    out.mkdir(parents=True, exist_ok=True)
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_tensors(out / ADAPTER_WEIGHTS, tensors, {"format": "pt"})
