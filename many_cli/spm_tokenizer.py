"""A sentencepiece tokenizer as the slow tokenizers of older transformers ran it, which the
checkpoints of InternLM2 (its remote `tokenization_internlm2.py`) and of LLaVA's own code base
(`use_fast=False`, an image's place cut out of the prompt) were trained with."""

from __future__ import annotations

from transformers.tokenization_utils_sentencepiece import SentencePieceBackend


class SentencePieceTokenizer(SentencePieceBackend):
    """Sentencepiece encodes each text between special tokens afresh, as its model file says
    (LLaVA's `tokenizer_image_token` encodes each piece of the prompt around `<image>` so), `<s>`
    first; pieces decode through sentencepiece (byte fallback included)."""

    def __init__(self, **kwargs):
        super().__init__(**{**kwargs, "legacy": True, "special_tokens_pattern": "bos"})

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self.sp_model.decode(tokens)
