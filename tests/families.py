"""Tiny instances of the model families `many` supports, built from configs with a word-level
tokenizer and the family's own processor class (no download): each builder saves a base model
directory and returns it."""

from __future__ import annotations

import json
import wave
from pathlib import Path

import numpy as np
import torch
from helpers import load_base, make_adapter
from peft import LoraConfig
from PIL import Image
from transformers import PreTrainedTokenizerFast

from many_cli.bench.tiny import CHAT_TEMPLATE, WORDS, build_tiny_llava, family_tokenizer, qwen_vl_parts, tiny_tokenizer
from many_cli.families import projector_paths


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
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessorPil,
        Gemma3Processor,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    tokenizer = word_tokenizer(
        {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    )
    template = CHAT_TEMPLATE.replace("<image> ", "<start_of_image> ")
    tokenizer.chat_template = template
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessorPil(size={"height": 16, "width": 16}),
        tokenizer=tokenizer,
        chat_template=template,
        image_seq_length=4,
    )
    ids = tokenizer.convert_tokens_to_ids
    text = Gemma3TextConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        sliding_window=64,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    vision = SiglipVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=4
    )
    config = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        boi_token_index=ids("<start_of_image>"),
        eoi_token_index=ids("<end_of_image>"),
        image_token_index=ids("<image_soft_token>"),
    )
    return save_model(Gemma3ForConditionalGeneration, config, processor, out)


FAMILIES = {"llava": build_llava, "gemma3": build_gemma3}


def build_qwen2_audio(out: Path) -> Path:
    from transformers import (
        Qwen2AudioConfig,
        Qwen2AudioEncoderConfig,
        Qwen2AudioForConditionalGeneration,
        Qwen2AudioProcessor,
        Qwen2Config,
        WhisperFeatureExtractor,
    )

    tokenizer = word_tokenizer({"audio_token": "<|AUDIO|>"})
    template = CHAT_TEMPLATE.replace(
        "{% if item['type'] == 'image' %}<image> ", "{% if item['type'] == 'audio' %}<|AUDIO|> "
    )
    tokenizer.chat_template = template
    # One-second clips at 16 kHz: 100 mel frames of 8 bins, 25 audio tokens after the encoder's pooling.
    extractor = WhisperFeatureExtractor(feature_size=8, sampling_rate=16000, chunk_length=1, n_fft=400, hop_length=160)
    processor = Qwen2AudioProcessor(feature_extractor=extractor, tokenizer=tokenizer, chat_template=template)
    text = Qwen2Config(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    audio = Qwen2AudioEncoderConfig(
        num_mel_bins=8,
        encoder_layers=1,
        encoder_attention_heads=2,
        encoder_ffn_dim=32,
        d_model=16,
        max_source_positions=50,
    )
    config = Qwen2AudioConfig(
        audio_config=audio, text_config=text, audio_token_index=tokenizer.convert_tokens_to_ids("<|AUDIO|>")
    )
    return save_model(Qwen2AudioForConditionalGeneration, config, processor, out)


FAMILIES["qwen2_audio"] = build_qwen2_audio


def build_llava_next(out: Path) -> Path:
    """16 px crops on a grid up to 32 × 32: a 20 × 20 image becomes a base crop plus tiles."""
    from transformers import (
        CLIPVisionConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    from many_cli.bench.tiny import tiny_llava_config, tiny_tokenizer

    grid = [[16, 16], [16, 32], [32, 16], [32, 32]]
    tokenizer = tiny_tokenizer()
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}, image_grid_pinpoints=grid
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    vision = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=16,
        patch_size=8,
        projection_dim=16,
    )
    llava = tiny_llava_config(vision=vision)
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=llava.text_config,
        image_grid_pinpoints=grid,
        image_token_index=llava.image_token_index,
        vision_feature_select_strategy="default",
    )
    return save_model(LlavaNextForConditionalGeneration, config, processor, out)


FAMILIES["llava_next"] = build_llava_next
AUDIO_FAMILIES = {"qwen2_audio"}  # their records carry a WAV file instead of an image


def _text_config(config_class, tokenizer, **extra):
    """The tiny language model every family shares: 2 layers of width 32."""
    return config_class(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **extra,
    )


def build_qwen2_vl(out: Path) -> Path:
    """8 px patches merged 2 × 2: a 20 × 20 image is 4 patches (1 token), 20 × 40 is 8."""
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessorPil,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig

    tokenizer, image_processor, video_processor, tokens = qwen_vl_parts(Qwen2VLVideoProcessor, Qwen2VLImageProcessorPil)
    processor = Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=tokenizer.chat_template,
    )
    text = _text_config(
        Qwen2VLTextConfig,
        tokenizer,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
    )
    vision = dict(
        depth=1,
        embed_dim=16,
        hidden_size=32,
        num_heads=2,
        patch_size=8,
        spatial_merge_size=2,
        temporal_patch_size=2,
        mlp_ratio=2,
    )
    config = Qwen2VLConfig(text_config=text.to_dict(), vision_config=vision, **tokens)
    return save_model(Qwen2VLForConditionalGeneration, config, processor, out)


def build_qwen2_5_vl(out: Path) -> Path:
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessorPil,
        Qwen2VLVideoProcessor,
    )
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig

    tokenizer, image_processor, video_processor, tokens = qwen_vl_parts(Qwen2VLVideoProcessor, Qwen2VLImageProcessorPil)
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=tokenizer.chat_template,
    )
    text = _text_config(
        Qwen2_5_VLTextConfig,
        tokenizer,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
    )
    # Window attention over 2 × 2 merged tokens (32 px windows), its last block full attention.
    vision = dict(
        depth=2,
        hidden_size=16,
        intermediate_size=32,
        num_heads=2,
        out_hidden_size=32,
        patch_size=8,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=32,
        fullatt_block_indexes=[1],
    )
    config = Qwen2_5_VLConfig(text_config=text.to_dict(), vision_config=vision, **tokens)
    return save_model(Qwen2_5_VLForConditionalGeneration, config, processor, out)


def build_internvl(out: Path) -> Path:
    """16 px tiles (4 × 4 patches, pixel-shuffled to 4 tokens); a wide image is cut into tiles
    plus a thumbnail."""
    from transformers import (
        GotOcr2ImageProcessorPil,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVideoProcessor,
        Qwen2Config,
    )

    tokenizer = family_tokenizer(
        {
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
        "<IMG_CONTEXT>",
    )
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": 16, "width": 16}, crop_to_patches=True, min_patches=1, max_patches=4
    )
    processor = InternVLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=InternVLVideoProcessor(size={"height": 16, "width": 16}),
        image_seq_length=4,
        chat_template=tokenizer.chat_template,
    )
    vision = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=[16, 16],
        patch_size=[4, 4],
    )
    config = InternVLConfig(
        vision_config=vision,
        text_config=_text_config(Qwen2Config, tokenizer).to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=4,
    )
    return save_model(InternVLForConditionalGeneration, config, processor, out)


FAMILIES.update(qwen2_vl=build_qwen2_vl, qwen2_5_vl=build_qwen2_5_vl, internvl=build_internvl)


def build_mistral3(out: Path) -> Path:
    """Pixtral: 4 px patches merged 2 × 2, images kept at their aspect ratio up to 32 px."""
    from transformers import (
        Mistral3Config,
        Mistral3ForConditionalGeneration,
        MistralConfig,
        PixtralImageProcessorPil,
        PixtralProcessor,
        PixtralVisionConfig,
    )

    tokenizer = family_tokenizer(
        {"image_token": "[IMG]", "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]"}, "[IMG]"
    )
    image_processor = PixtralImageProcessorPil(size={"longest_edge": 32}, patch_size={"height": 4, "width": 4})
    processor = PixtralProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=4,
        spatial_merge_size=2,
        chat_template=tokenizer.chat_template,
    )
    vision = PixtralVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        head_dim=8,
        image_size=32,
        patch_size=4,
    )
    config = Mistral3Config(
        vision_config=vision,
        text_config=_text_config(MistralConfig, tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=2,
        vision_feature_layer=-1,
    )
    return save_model(Mistral3ForConditionalGeneration, config, processor, out)


def _idefics_parts(image_processor_class):
    """Idefics3's layout: each image a 16 px global tile (4 × 4 patches, pixel-shuffled by 2 into
    4 tokens) plus, for a large image, its 16 px sub-tiles."""
    specials = {
        "fake_image_token": "<fake_token_around_image>",
        "image_token": "<image>",
        "end_of_utterance_token": "<end_of_utterance>",
        "global_image_token": "<global-img>",
    }
    specials.update({f"row_{row}_col_{col}": f"<row_{row}_col_{col}>" for row in (1, 2) for col in (1, 2)})
    tokenizer = family_tokenizer(specials, "<image>")
    image_processor = image_processor_class(
        size={"longest_edge": 32}, max_image_size={"longest_edge": 16}, do_image_splitting=True
    )
    vision = dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=4
    )
    return tokenizer, image_processor, vision


def build_idefics3(out: Path) -> Path:
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
    )

    tokenizer, image_processor, vision = _idefics_parts(Idefics3ImageProcessorPil)
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4, chat_template=tokenizer.chat_template
    )
    return _save_idefics(out, Idefics3Config, Idefics3ForConditionalGeneration, processor, vision)


def _save_idefics(out: Path, config_class, model_class, processor, vision: dict) -> Path:
    """An Idefics3-layout model (Idefics3, SmolVLM) of `processor` saved to `out`."""
    from transformers import LlamaConfig

    tokenizer = processor.tokenizer
    config = config_class(
        vision_config=vision,
        text_config=_text_config(LlamaConfig, tokenizer).to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=2,
    )
    return save_model(model_class, config, processor, out)


def build_smolvlm(out: Path) -> Path:
    """Idefics3's layout under SmolVLM's own classes (its processor also takes videos)."""
    from transformers import (
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
        SmolVLMImageProcessorPil,
        SmolVLMProcessor,
        SmolVLMVideoProcessor,
    )

    tokenizer, image_processor, vision = _idefics_parts(SmolVLMImageProcessorPil)
    processor = SmolVLMProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=SmolVLMVideoProcessor(),
        image_seq_len=4,
        chat_template=tokenizer.chat_template,
    )
    return _save_idefics(out, SmolVLMConfig, SmolVLMForConditionalGeneration, processor, vision)


def build_paligemma(out: Path) -> Path:
    from transformers import (
        GemmaConfig,
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessorPil,
        SiglipVisionConfig,
    )

    tokenizer = family_tokenizer({"image_token": "<image>"}, "<image>")
    image_processor = SiglipImageProcessorPil(size={"height": 16, "width": 16})
    image_processor.image_seq_length = 16
    processor = PaliGemmaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template
    )  # adds its <loc…>/<seg…> tokens
    vision = SiglipVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=4
    )
    config = PaliGemmaConfig(
        vision_config=vision,
        text_config=_text_config(GemmaConfig, tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        projection_dim=32,
        hidden_size=32,
        vocab_size=len(tokenizer),
    )
    return save_model(PaliGemmaForConditionalGeneration, config, processor, out)


def build_llava_onevision(out: Path) -> Path:
    """16 px crops on a grid up to 32 × 32, as LLaVA-NeXT, with a video token."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessorPil,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )

    grid = [[16, 16], [16, 32], [32, 16], [32, 32]]
    tokenizer = family_tokenizer({"image_token": "<image>", "video_token": "<video>"}, "<image>", "<video>")
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": 16, "width": 16}, image_grid_pinpoints=grid)
    video_processor = LlavaOnevisionVideoProcessor(size={"height": 16, "width": 16})
    processor = LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        num_image_tokens=16,
        vision_feature_select_strategy="full",
        chat_template=tokenizer.chat_template,
    )
    vision = SiglipVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=4
    )
    ids = tokenizer.convert_tokens_to_ids
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=_text_config(Qwen2Config, tokenizer).to_dict(),
        image_token_index=ids("<image>"),
        video_token_index=ids("<video>"),
        image_grid_pinpoints=grid,
        vision_feature_select_strategy="full",
    )
    return save_model(LlavaOnevisionForConditionalGeneration, config, processor, out)


FAMILIES.update(
    mistral3=build_mistral3,
    idefics3=build_idefics3,
    smolvlm=build_smolvlm,
    paligemma=build_paligemma,
    llava_onevision=build_llava_onevision,
)


def build_qwen3_vl(out: Path) -> Path:
    """Qwen2-VL's layout with DeepStack: the second vision block's patches also go, through their
    own merger, into the language model's first layers."""
    from transformers import (
        Qwen2VLImageProcessorPil,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig

    tokenizer, image_processor, video_processor, tokens = qwen_vl_parts(Qwen3VLVideoProcessor, Qwen2VLImageProcessorPil)
    processor = Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=tokenizer.chat_template,
    )
    text = _text_config(
        Qwen3VLTextConfig,
        tokenizer,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [1, 1, 2],
            "mrope_interleaved": True,
        },
    )
    vision = dict(
        depth=2,
        hidden_size=16,
        intermediate_size=32,
        num_heads=2,
        out_hidden_size=32,
        patch_size=8,
        spatial_merge_size=2,
        temporal_patch_size=2,
        num_position_embeddings=16,
        deepstack_visual_indexes=[0],
    )
    config = Qwen3VLConfig(text_config=text.to_dict(), vision_config=vision, **tokens)
    return save_model(Qwen3VLForConditionalGeneration, config, processor, out)


FAMILIES["qwen3_vl"] = build_qwen3_vl


# The language model's projections, whatever the family calls it (Idefics3: text_model).
TEXT_TARGETS = r".*(language_model|text_model).*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
COLOURS = (np.array([200, 40, 40]), np.array([40, 40, 200]))  # task 0's images are red, task 1's blue
SHAPES = ((20, 20, 3), (20, 40, 3), (40, 20, 3))  # cut into different numbers of crops, tiles or patches


def family_adapter(base: Path, out: Path, seed: int) -> Path:
    """A LoRA on the language model with the family's projector and its companions (Qwen3-VL's
    DeepStack mergers) trained (modules_to_save)."""
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=TEXT_TARGETS, modules_to_save=projector_paths(load_base(base))
    )
    return make_adapter(base, out, config, seed)


def write_records(folder: Path, name: str, count: int, seed: int, task: int, audio: bool) -> Path:
    """Images in the task's colour and of three shapes (or one-second 16 kHz clips: noise, and a
    tone in task 1's), with
    prompts of varied words, so that calibration spans every layer's input."""
    rng = np.random.default_rng(seed)
    (folder / name).mkdir(parents=True)
    with open(folder / f"{name}.jsonl", "w") as handle:
        for index in range(count):
            if audio:
                media = {"audio": f"{name}/{index}.wav"}
                with wave.open(str(folder / media["audio"]), "wb") as clip:
                    clip.setnchannels(1), clip.setsampwidth(2), clip.setframerate(16000)
                    tone = 8000 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000) * task  # task 1 hums
                    clip.writeframes((tone + rng.normal(0, 3000, 16000)).astype("<i2").tobytes())
            else:
                media = {"image": f"{name}/{index}.png"}
                shape = SHAPES[index % len(SHAPES)]
                pixels = np.clip(COLOURS[task] + rng.normal(0, 30, shape), 0, 255).astype("uint8")
                Image.fromarray(pixels).save(folder / media["image"])
            handle.write(
                json.dumps({**media, "prompt": " ".join(rng.choice(WORDS, 12)), "answer": str(rng.choice(WORDS))})
                + "\n"
            )
    return folder / f"{name}.jsonl"
