"""Tiny instances of the model families `many` supports, built from configs with a word-level
tokenizer and the family's own processor class (no download): each builder saves a base model
directory and returns it."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast

from many_cli.bench.tiny import CHAT_TEMPLATE, build_tiny_llava, tiny_tokenizer


def word_tokenizer(extra_special: dict[str, str]) -> PreTrainedTokenizerFast:
    """The tiny word-level tokenizer with the family's own special tokens (the family's processor
    brings its chat template)."""
    return tiny_tokenizer(extra_special, chat_template=None)


def save_model(model_class, config, processor, out: Path) -> Path:
    """A randomly initialised model (seed 0) and its processor, saved as a base model directory."""
    torch.manual_seed(0)
    model = model_class(config).eval()
    model.generation_config.pad_token_id = config.get_text_config().pad_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def build_llava(out: Path) -> Path:
    return build_tiny_llava(out)


def build_gemma3(out: Path) -> Path:
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil,
                              Gemma3Processor, Gemma3TextConfig, SiglipVisionConfig)

    tokenizer = word_tokenizer({"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                "image_token": "<image_soft_token>"})
    template = CHAT_TEMPLATE.replace("<image> ", "<start_of_image> ")
    tokenizer.chat_template = template
    processor = Gemma3Processor(image_processor=Gemma3ImageProcessorPil(size={"height": 16, "width": 16}),
                                tokenizer=tokenizer, chat_template=template, image_seq_length=4)
    ids = tokenizer.convert_tokens_to_ids
    text = Gemma3TextConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=8, vocab_size=len(tokenizer), max_position_embeddings=256,
                            sliding_window=64, pad_token_id=tokenizer.pad_token_id,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                image_size=16, patch_size=4)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                          boi_token_index=ids("<start_of_image>"), eoi_token_index=ids("<end_of_image>"),
                          image_token_index=ids("<image_soft_token>"))
    return save_model(Gemma3ForConditionalGeneration, config, processor, out)


FAMILIES = {"llava": build_llava, "gemma3": build_gemma3}



def build_qwen2_audio(out: Path) -> Path:
    from transformers import (Qwen2AudioConfig, Qwen2AudioEncoderConfig, Qwen2AudioForConditionalGeneration,
                              Qwen2AudioProcessor, Qwen2Config, WhisperFeatureExtractor)

    tokenizer = word_tokenizer({"audio_token": "<|AUDIO|>"})
    template = CHAT_TEMPLATE.replace("{% if item['type'] == 'image' %}<image> ",
                                     "{% if item['type'] == 'audio' %}<|AUDIO|> ")
    tokenizer.chat_template = template
    # One-second clips at 16 kHz: 100 mel frames of 8 bins, 25 audio tokens after the encoder's pooling.
    extractor = WhisperFeatureExtractor(feature_size=8, sampling_rate=16000, chunk_length=1, n_fft=400, hop_length=160)
    processor = Qwen2AudioProcessor(feature_extractor=extractor, tokenizer=tokenizer, chat_template=template)
    text = Qwen2Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=256,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    audio = Qwen2AudioEncoderConfig(num_mel_bins=8, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32,
                                    d_model=16, max_source_positions=50)
    config = Qwen2AudioConfig(audio_config=audio, text_config=text,
                              audio_token_index=tokenizer.convert_tokens_to_ids("<|AUDIO|>"))
    return save_model(Qwen2AudioForConditionalGeneration, config, processor, out)


FAMILIES["qwen2_audio"] = build_qwen2_audio


def build_llava_next(out: Path) -> Path:
    """16 px crops on a grid up to 32 × 32: a 20 × 20 image becomes a base crop plus tiles."""
    from transformers import (CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextImageProcessorPil, LlavaNextProcessor)

    from many_cli.bench.tiny import tiny_llava_config, tiny_tokenizer

    grid = [[16, 16], [16, 32], [32, 16], [32, 32]]
    tokenizer = tiny_tokenizer()
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
                                                 image_grid_pinpoints=grid)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=CHAT_TEMPLATE)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=16, patch_size=8, projection_dim=16)
    llava = tiny_llava_config(vision=vision)
    config = LlavaNextConfig(vision_config=vision, text_config=llava.text_config, image_grid_pinpoints=grid,
                             image_token_index=llava.image_token_index, vision_feature_select_strategy="default")
    return save_model(LlavaNextForConditionalGeneration, config, processor, out)


FAMILIES["llava_next"] = build_llava_next
AUDIO_FAMILIES = {"qwen2_audio"}  # their records carry a WAV file instead of an image
