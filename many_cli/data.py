"""Calibration and evaluation records: a folder of images, a JSONL file, or a LLaVA-style JSON
conversation list. Records are read lazily; images are opened only when a batch needs them."""

from __future__ import annotations

import json
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from many_cli.errors import InputError
from many_cli.files import check_readable

DEFAULT_PROMPT = "Describe the image."
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


IMAGE_TAG = "<image>"  # where an image sits in a turn's text (LLaVA, LLaMA-Factory, ms-swift)


@dataclass(frozen=True)
class Record:
    """One conversation: its earlier turns, the last user turn (`prompt`) and, when it has one,
    the answer to it. Images go at the `<image>` tags of the texts, in order, or, when no text has
    a tag, at the start of the first user turn (as for a one-image record of many's JSONL)."""
    source: str  # where it came from, for messages: "data.jsonl:12" or the image path
    images: tuple[Path, ...]
    prompt: str
    answer: str | None
    task: str = ""  # the record's "task" field, else the name of its file or folder
    audio: Path | None = None  # a 16-bit PCM WAV file, for audio-language models
    video: Path | None = None  # a folder of frames (name order) or a video file the processor reads
    history: tuple[tuple[str, str], ...] = ()  # (role, text) of the turns before `prompt`

    @property
    def image(self) -> Path | None:
        """The record's first image."""
        return self.images[0] if self.images else None

    @property
    def has_media(self) -> bool:
        return bool(self.images) or self.audio is not None or self.video is not None


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


def read_records(data: Path, default_prompt: str = DEFAULT_PROMPT) -> Iterator[Record | BadRecord]:
    """Yield the records of DATA in order; malformed ones come back as BadRecord, so the caller
    decides whether to stop (the default) or skip them."""
    if not data.exists():
        raise InputError(data, "data not found (expected a folder of images, a .jsonl or a .json file)")
    check_readable(data)
    if data.is_dir():
        return _folder_records(data, default_prompt)
    if data.suffix == ".jsonl":
        return _jsonl_records(data)
    if data.suffix == ".json":
        return _llava_records(data)
    raise InputError(data, "unknown data format: expected a folder of images, a .jsonl or a .json file")


def read_all_records(sources: list[Path], default_prompt: str = DEFAULT_PROMPT) -> Iterator[Record]:
    """The records of every source in turn; the first malformed one is an InputError naming it."""
    for source in sources:
        for record in read_records(source, default_prompt):
            if isinstance(record, BadRecord):
                raise InputError(record.source, record.fault)
            yield record


def count_records(data: Path) -> int | None:
    """How many records DATA holds, when that is cheap to know (for progress bars)."""
    if data.is_dir():
        return sum(1 for path in data.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
    if data.suffix == ".jsonl":
        with open(data, "rb") as handle:
            return sum(1 for line in handle if line.strip())
    return None


def load_image(source: str, path: Path) -> Image.Image:
    """An image of the record `source` as 8-bit RGB; InputError naming the record if it cannot be read."""
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
    try:
        with wave.open(str(record.audio), "rb") as handle:
            if handle.getsampwidth() != 2:
                raise InputError(record.source, f"audio {record.audio} is not 16-bit PCM WAV")
            if handle.getframerate() != sampling_rate:
                raise InputError(record.source, f"audio {record.audio} is sampled at {handle.getframerate()} Hz; "
                                                f"the model needs {sampling_rate} Hz")
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
        return str(record.video)
    frames = sorted(path for path in record.video.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
    if not frames:
        raise InputError(record.source, f"video folder {record.video} holds no frames "
                                        f"({', '.join(sorted(IMAGE_SUFFIXES))})")
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
    return Media(tuple(load_image(record.source, path) for path in record.images), audio,
                 load_video(record) if record.video is not None else None)


def _folder_records(folder: Path, prompt: str) -> Iterator[Record]:
    images = sorted(path for path in folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise InputError(folder, f"holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    for path in images:
        yield Record(str(path), (path,), prompt, None, folder.name)


def _jsonl_records(path: Path) -> Iterator[Record | BadRecord]:
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            source = f"{path}:{number}"
            try:
                entry = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                yield BadRecord(source, "is not UTF-8 text")
                continue
            except json.JSONDecodeError as error:
                yield BadRecord(source, f"not JSON ({error.msg})")
                continue
            yield _entry_record(source, path.parent, entry, path.stem)


def _llava_records(path: Path) -> Iterator[Record | BadRecord]:
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(path, f"not valid JSON ({error})") from None
    if not isinstance(entries, list):
        raise InputError(path, "expected a list of records (LLaVA or LLaMA-Factory style)")
    for index, entry in enumerate(entries):
        yield _entry_record(f"{path}[{index}]", path.parent, entry, path.stem)


# A record's shape, told by its fields: many's own (prompt), a conversation (LLaVA and LLaMA-Factory
# sharegpt: conversations of from/value; LLaMA-Factory and ms-swift: messages of role/content), or
# LLaMA-Factory alpaca (instruction, input, output). Media: one "image", "audio", "video" (many's
# own, LLaVA) or the tools' lists "images", "videos", "audios" (paths, or ms-swift's {"path": ...}).
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_MEDIA_LISTS = {"images": "image", "videos": "video", "audios": "audio"}
_OTHER_TAGS = ("<video>", "<audio>")  # a record holds one of each, placed before the first user text


def _entry_record(source: str, root: Path, entry: object, task: str) -> Record | BadRecord:
    if not isinstance(entry, dict):
        return BadRecord(source, "expected a JSON object")
    media = _media(entry)
    if isinstance(media, str):
        return BadRecord(source, media)
    turns = _conversation(entry)
    if isinstance(turns, str):
        return BadRecord(source, turns)
    texts = " ".join(text for _, text in turns)
    tags = texts.count(IMAGE_TAG)
    if tags and tags != len(media["images"]):
        return BadRecord(source, f"has {tags} {IMAGE_TAG} tags for {len(media['images'])} images; give one tag per "
                                 f"image, or none (then the images open the first user turn)")
    for tag in _OTHER_TAGS:
        if tag in texts and tag[1:-1] not in media:
            return BadRecord(source, f"its text holds {tag} but the record names no {tag[1:-1]}")
    if not isinstance(entry.get("task", ""), (str, type(None))):
        return BadRecord(source, "field task is not a string")
    last_user = max(index for index, (role, _) in enumerate(turns) if role == "user")
    answer = turns[last_user + 1][1] if last_user + 1 < len(turns) else None
    return Record(source, tuple(root / path for path in media["images"]), turns[last_user][1], answer,
                  str(entry.get("task") or task), _path(root, media.get("audio")), _path(root, media.get("video")),
                  tuple(turns[:last_user]))


def _path(root: Path, name: str | None) -> Path | None:
    return None if name is None else root / name


def _conversation(entry: dict) -> list[tuple[str, str]] | str:
    """(role, text) of every turn, whatever the shape; a string saying what is wrong otherwise. The
    turns alternate user and assistant after an optional system turn, and end on either."""
    if "prompt" in entry:
        if not isinstance(entry["prompt"], str) or not isinstance(entry.get("answer", ""), (str, type(None))):
            return "fields prompt and answer must be strings"
        turns = [("user", entry["prompt"])] + ([("assistant", entry["answer"])] if entry.get("answer") is not None else [])
    elif "instruction" in entry:
        prompt = "\n".join(str(entry[key]) for key in ("instruction", "input") if entry.get(key))
        turns = [("user", prompt)] + ([("assistant", str(entry["output"]))] if entry.get("output") else [])
    elif isinstance(entry.get("conversations"), list) or isinstance(entry.get("messages"), list):
        turns = []
        for turn in entry.get("conversations", entry.get("messages")):
            role = turn.get("from", turn.get("role")) if isinstance(turn, dict) else None
            text = turn.get("value", turn.get("content")) if isinstance(turn, dict) else None
            if role not in _ROLES or not isinstance(text, str):
                return f"has a turn with role {role!r} and no text: expected from/value or role/content"
            turns.append((_ROLES[role], text))
    else:
        return ("is of no shape many reads: expected prompt (many's JSONL), conversations or messages (LLaVA, "
                "LLaMA-Factory sharegpt, ms-swift) or instruction (LLaMA-Factory alpaca)")
    if isinstance(entry.get("system"), str) and entry["system"] and "prompt" not in entry:
        turns.insert(0, ("system", entry["system"]))  # LLaMA-Factory's system column
    roles = [role for role, _ in turns if role != "system"]
    if not roles or any(role == "system" for role, _ in turns[1:]) or \
            roles != ["user", "assistant"] * (len(roles) // 2) + ["user"] * (len(roles) % 2):
        return (f"has the turns {[role for role, _ in turns]}: expected user and assistant turns in turn, from "
                f"the user's, after an optional system turn")
    return turns


def _media(entry: dict) -> dict | str:
    """The record's media: {"images": [path, ...], "audio": path, "video": path} (the last two when
    given), or a string saying what is not read: no media a record names is ever dropped."""
    for kind in ("image", "audio", "video"):
        if entry.get(kind) is not None and not isinstance(entry[kind], str):
            return f"field {kind} is not a string"
    media: dict = {"images": [entry["image"]] if entry.get("image") is not None else []}
    media.update({kind: entry[kind] for kind in ("audio", "video") if entry.get(kind) is not None})
    for field, kind in _MEDIA_LISTS.items():
        items = entry.get(field) or []
        if not isinstance(items, list):
            return f"field {field} is not a list"
        paths = [item.get("path") if isinstance(item, dict) else item for item in items]
        if not all(isinstance(path, str) for path in paths):
            return f"field {field} holds an entry that is not a path"
        if kind == "image":
            media["images"] += paths
        elif len(paths) + (kind in media) > 1:
            return f"names {len(paths) + (kind in media)} {field}: one {kind} per record is read"
        elif paths:
            media[kind] = paths[0]
    return media


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
            lead = ([] if tagged else ["image"] * len(record.images))
            parts += [{"type": kind} for kind in lead + [k for k in ("audio", "video") if getattr(record, k)]]
        conversation.append({"role": role, "content": parts + _text_parts(text)})
    return conversation


def _text_parts(text: str) -> list[dict]:
    """A turn's text as typed parts, an image at each tag; a text without tags stays as it is."""
    if IMAGE_TAG not in text and not any(tag in text for tag in _OTHER_TAGS):
        return [{"type": "text", "text": text}]
    for tag in _OTHER_TAGS:
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
        prompt = processor.apply_chat_template(messages(record, False, multimodal), add_generation_prompt=True,
                                               tokenize=False)
        full = processor.apply_chat_template(messages(record, True, multimodal), tokenize=False)
        if not full.startswith(prompt):
            raise InputError(record.source, "the chat template does not write the answer after the generation "
                                            "prompt, so its tokens cannot be told apart (--answer-weight)")
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
    return encode_records(processor, records, [image for item in media for image in item.images], with_answers,
                          audios=[item.audio for item in media if item.audio is not None],
                          videos=[item.video for item in media if item.video is not None])


def encode_records(processor, records: list[Record], images: list, with_answers: bool = True,
                   audios: list | None = None, videos: list | None = None) -> dict:
    """Model inputs for a batch: the chat template's text, tokenized with the images; the
    generation prompt closes every conversation that ends on the user's turn."""
    multimodal = is_multimodal(processor)
    if images and not multimodal:
        raise InputError(records[0].source, "has an image, but the model is a plain language model")
    texts = []
    for record in records:
        answered = with_answers and record.answer is not None
        texts.append(processor.apply_chat_template(messages(record, with_answers, multimodal),
                                                   add_generation_prompt=not answered, tokenize=False))
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
    encoded = processor(text=texts, **media, return_tensors="pt", padding=True)
    encoded.pop("labels", None)  # PaliGemma's processor adds training labels: nothing here trains
    return encoded
