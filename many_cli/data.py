"""A record once read (`formats` reads the files): its media opened when a batch needs them, its
conversation through the chat template, and the batch encoded as the model takes it."""

from __future__ import annotations

import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from many_cli.errors import InputError
from many_cli.files import refuse_special_file

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


IMAGE_TAG = "<image>"  # where an image sits in a turn's text (LLaVA, LLaMA-Factory, ms-swift)
OTHER_TAGS = ("<video>", "<audio>")  # a record holds one of each, placed before the first user text


@dataclass(frozen=True, eq=False)
class InlineImage:
    """An image a data set holds itself (a Hugging Face image column), named for messages."""

    label: str
    image: Image.Image

    def __str__(self) -> str:
        return self.label


@dataclass(frozen=True)
class Record:
    """One conversation: its earlier turns, the last user turn (`prompt`) and, when it has one,
    the answer to it. Images go at the `<image>` tags of the texts, in order, or, when no text has
    a tag, at the start of the first user turn (as for a one-image record of many's JSONL)."""

    source: str  # where it came from, for messages: "data.jsonl:12" or the image path
    images: tuple[Path | InlineImage, ...]
    prompt: str
    answer: str | None
    task: str = ""  # the record's "task" field, else the name of its file or folder
    audio: Path | None = None  # a 16-bit PCM WAV file, for audio-language models
    video: Path | None = None  # a folder of frames (name order) or a video file the processor reads
    history: tuple[tuple[str, str], ...] = ()  # (role, text) of the turns before `prompt`

    @property
    def image(self) -> Path | InlineImage | None:
        """The record's first image."""
        return self.images[0] if self.images else None


@dataclass(frozen=True)
class Media:
    """A record's inputs besides its text, read as the processor takes them."""

    images: tuple[Image.Image, ...] = ()
    audio: np.ndarray | None = None
    video: list[Image.Image] | str | None = None


@dataclass(frozen=True)
class BadRecord:
    source: str
    fault: str


def load_image(source: str, path: Path | InlineImage) -> Image.Image:
    """An image of the record `source` as 8-bit RGB; InputError naming the record if it cannot be read."""
    if isinstance(path, InlineImage):
        return _as_rgb(path.image)
    refuse_special_file(path, source, "image")
    try:
        with Image.open(path) as image:
            return _as_rgb(image)
    except FileNotFoundError:
        raise InputError(source, f"image {path} not found") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as error:
        raise InputError(source, f"image {path} cannot be read ({error})") from None


def _as_rgb(image: Image.Image) -> Image.Image:
    """The image upright (its EXIF orientation applied, as transformers' own `load_image` does)
    in 8-bit RGB. Pillow's convert("RGB") clips 16- and 32-bit grey values at 255 (all white):
    they are scaled to 8 bits first, as the 16-bit range they hold."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        grey = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8))
    return image.convert("RGB")


def load_audio(record: Record, sampling_rate: int) -> np.ndarray:
    """The record's WAV file as mono float32 in [-1, 1]; InputError naming the record if it cannot
    be read or is not at the model's sampling rate (resample it first: many does not)."""
    refuse_special_file(record.audio, record.source, "audio")
    try:
        with wave.open(str(record.audio), "rb") as handle:
            if handle.getsampwidth() != 2:
                raise InputError(record.source, f"audio {record.audio} is not 16-bit PCM WAV")
            if handle.getframerate() != sampling_rate:
                raise InputError(
                    record.source,
                    f"audio {record.audio} is sampled at {handle.getframerate()} Hz; "
                    f"the model needs {sampling_rate} Hz",
                )
            frames = np.frombuffer(handle.readframes(handle.getnframes()), dtype="<i2")
            channels = handle.getnchannels()
    except FileNotFoundError:
        raise InputError(record.source, f"audio {record.audio} not found") from None
    except (wave.Error, EOFError) as error:
        raise InputError(record.source, f"audio {record.audio} cannot be read ({error})") from None
    return frames.reshape(-1, channels).mean(axis=1).astype(np.float32) / 32768.0


def load_video(record: Record) -> list[Image.Image] | str:
    """A folder's frames (its images in name order) as RGB; a file is left to the processor."""
    if not record.video.exists():
        raise InputError(record.source, f"video {record.video} not found")
    if not record.video.is_dir():
        refuse_special_file(record.video, record.source, "video")
        return str(record.video)
    frames = sorted(path for path in record.video.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
    if not frames:
        raise InputError(
            record.source, f"video folder {record.video} holds no frames ({', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    return [load_image(record.source, frame) for frame in frames]


def load_inputs(processor, record: Record) -> Media:
    """The record's images, audio and video (each may be absent), read as the processor needs them."""
    audio = None
    if record.audio is not None:
        extractor = getattr(processor, "feature_extractor", None)
        if extractor is None:
            raise InputError(record.source, "has an audio file, but the model's processor takes no audio")
        audio = load_audio(record, extractor.sampling_rate)
    if record.video is not None and getattr(processor, "video_processor", None) is None:
        raise InputError(record.source, "has a video, but the model's processor takes no video")
    return Media(
        tuple(load_image(record.source, path) for path in record.images),
        audio,
        load_video(record) if record.video is not None else None,
    )


def messages(record: Record, with_answer: bool = True, multimodal: bool = True) -> list[dict]:
    """The conversation of the token rule: every turn, the answer to the last one when there is one
    (and it is wanted: statistics take it, inference asks for it). Images sit at their tags, or
    open the first user turn with the audio and video. A plain language model's tokenizer gets
    the usual string contents instead of typed parts."""
    turns = [*record.history, ("user", record.prompt)]
    if with_answer and record.answer is not None:
        turns.append(("assistant", record.answer))
    if not multimodal:
        return [{"role": role, "content": text} for role, text in turns]
    tagged = any(IMAGE_TAG in text for _, text in turns)
    first_user = next(index for index, (role, _) in enumerate(turns) if role == "user")
    conversation = []
    for index, (role, text) in enumerate(turns):
        parts = []
        if index == first_user:
            lead = [] if tagged else ["image"] * len(record.images)
            parts += [{"type": kind} for kind in lead + [k for k in ("audio", "video") if getattr(record, k)]]
        conversation.append({"role": role, "content": parts + _text_parts(text)})
    return conversation


def _text_parts(text: str) -> list[dict]:
    """A turn's text as typed parts, an image at each tag; a text without tags stays as it is."""
    if IMAGE_TAG not in text and not any(tag in text for tag in OTHER_TAGS):
        return [{"type": "text", "text": text}]
    for tag in OTHER_TAGS:
        text = text.replace(tag, "")
    pieces = text.split(IMAGE_TAG)
    parts = []
    for index, piece in enumerate(pieces):
        if index:
            parts.append({"type": "image"})
        if piece.strip() or index == len(pieces) - 1:  # every turn ends on its text, even an empty one
            parts.append({"type": "text", "text": piece.strip()})
    return parts


def answer_token_counts(processor, records: list[Record]) -> list[int]:
    """How many tokens each record's answer takes in the chat template (0 without an answer):
    the tokens between the generation prompt and the conversation's end."""
    multimodal = is_multimodal(processor)
    tokenizer = tokenizer_of(processor)
    counts = []
    for record in records:
        if record.answer is None:
            counts.append(0)
            continue
        prompt = processor.apply_chat_template(
            messages(record, False, multimodal), add_generation_prompt=True, tokenize=False
        )
        full = processor.apply_chat_template(messages(record, True, multimodal), tokenize=False)
        if not full.startswith(prompt):
            raise InputError(
                record.source,
                "the chat template does not write the answer after the generation "
                "prompt, so its tokens cannot be told apart (--answer-weight)",
            )
        lengths = [len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in (full, prompt)]
        counts.append(lengths[0] - lengths[1])
    return counts


def is_multimodal(processor) -> bool:
    """A multimodal processor, as opposed to a plain language model's tokenizer."""
    return hasattr(processor, "tokenizer")


def tokenizer_of(processor):
    return processor.tokenizer if is_multimodal(processor) else processor


def encode_loaded(processor, records: list[Record], media: list[Media], with_answers: bool = True) -> dict:
    """`encode_records` for records whose media `load_inputs` read."""
    return encode_records(
        processor,
        records,
        [image for item in media for image in item.images],
        with_answers,
        audios=[item.audio for item in media if item.audio is not None],
        videos=[item.video for item in media if item.video is not None],
    )


def encode_records(
    processor,
    records: list[Record],
    images: list,
    with_answers: bool = True,
    audios: list | None = None,
    videos: list | None = None,
) -> dict:
    """Model inputs for a batch: the chat template's text, tokenized with the images; the
    generation prompt closes every conversation that ends on the user's turn."""
    multimodal = is_multimodal(processor)
    if images and not multimodal:
        raise InputError(records[0].source, "has an image, but the model is a plain language model")
    texts = []
    for record in records:
        answered = with_answers and record.answer is not None
        texts.append(
            processor.apply_chat_template(
                messages(record, with_answers, multimodal), add_generation_prompt=not answered, tokenize=False
            )
        )
    if not multimodal:  # the template already wrote the special tokens
        return processor(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    # One list of images per record: what every multimodal processor accepts (Gemma3 requires it).
    remaining = iter(images)
    nested = [[next(remaining) for _ in record.images] for record in records]
    media = {"images": nested} if images else {}
    if audios:
        media.update(audio=audios, sampling_rate=processor.feature_extractor.sampling_rate)
    if videos:
        media["videos"] = videos
    # transformers' rule for a chat template's text: the tokenizer adds no special token to a text
    # whose template wrote the BOS itself (else a template with {{ bos_token }} gets two)
    bos = tokenizer_of(processor).bos_token
    own_bos = {"add_special_tokens": False} if bos and all(text.startswith(bos) for text in texts) else {}
    encoded = processor(text=texts, **media, return_tensors="pt", padding=True, **own_bos)
    encoded.pop("labels", None)  # PaliGemma's processor adds training labels: nothing here trains
    return encoded
