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


@dataclass(frozen=True)
class Record:
    source: str  # where it came from, for messages: "data.jsonl:12" or the image path
    image: Path | None
    prompt: str
    answer: str | None
    task: str = ""  # the record's "task" field, else the name of its file or folder
    audio: Path | None = None  # a 16-bit PCM WAV file, for audio-language models
    video: Path | None = None  # a folder of frames (name order) or a video file the processor reads

    @property
    def has_media(self) -> bool:
        return self.image is not None or self.audio is not None or self.video is not None


@dataclass(frozen=True)
class Media:
    """A record's inputs besides its text, read as the processor takes them."""
    image: Image.Image | None = None
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


def load_image(record: Record) -> Image.Image:
    """The record's image as 8-bit RGB; InputError naming the record if it cannot be read."""
    try:
        with Image.open(record.image) as image:
            return _as_rgb(image)
    except FileNotFoundError:
        raise InputError(record.source, f"image {record.image} not found") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as error:
        raise InputError(record.source, f"image {record.image} cannot be read ({error})") from None


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
    return [load_image(Record(record.source, frame, record.prompt, None)) for frame in frames]


def load_inputs(processor, record: Record) -> Media:
    """The record's image, audio and video (each may be None), read as the processor needs them."""
    audio = None
    if record.audio is not None:
        extractor = getattr(processor, "feature_extractor", None)
        if extractor is None:
            raise InputError(record.source, "has an audio file, but the model's processor takes no audio")
        audio = load_audio(record, extractor.sampling_rate)
    if record.video is not None and getattr(processor, "video_processor", None) is None:
        raise InputError(record.source, "has a video, but the model's processor takes no video")
    return Media(load_image(record) if record.image is not None else None, audio,
                 load_video(record) if record.video is not None else None)


def _folder_records(folder: Path, prompt: str) -> Iterator[Record]:
    images = sorted(path for path in folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise InputError(folder, f"holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    for path in images:
        yield Record(str(path), path, prompt, None, folder.name)


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


def _record_from_fields(source: str, root: Path, entry: object, task: str) -> Record | BadRecord:
    if not isinstance(entry, dict):
        return BadRecord(source, "expected a JSON object")
    if not isinstance(entry.get("prompt"), str):
        return BadRecord(source, "lacks the string field(s) prompt")
    for optional in ("image", "audio", "video", "answer"):  # a record without any is a text record
        if entry.get(optional) is not None and not isinstance(entry[optional], str):
            return BadRecord(source, f"field {optional} is not a string")
    image = root / entry["image"] if entry.get("image") is not None else None
    audio = root / entry["audio"] if entry.get("audio") is not None else None
    video = root / entry["video"] if entry.get("video") is not None else None
    return Record(source, image, entry["prompt"], entry.get("answer"), str(entry.get("task") or task), audio, video)


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
# LLaMA-Factory alpaca (instruction, input, output). Media: LLaVA's "image", the tools' lists.
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_MEDIA_LISTS = {"images": "image", "videos": "video", "audios": "audio"}
_MEDIA_TAGS = ("<image>", "<video>", "<audio>")


def _entry_record(source: str, root: Path, entry: object, task: str) -> Record | BadRecord:
    if not isinstance(entry, dict):
        return BadRecord(source, "expected a JSON object")
    media = _media(entry)
    if isinstance(media, str):
        return BadRecord(source, media)
    if "prompt" in entry:
        own = {key: value for key, value in entry.items() if key not in _MEDIA_LISTS}
        return _record_from_fields(source, root, {**own, **media}, task)
    if "instruction" in entry:
        prompt = "\n".join(str(entry[key]) for key in ("instruction", "input") if entry.get(key))
        turns: object = [("user", prompt)] + ([("assistant", entry["output"])] if entry.get("output") else [])
    elif isinstance(entry.get("conversations"), list) or isinstance(entry.get("messages"), list):
        turns = _turns(entry.get("conversations", entry.get("messages")))
        if isinstance(turns, str):
            return BadRecord(source, turns)
    else:
        return BadRecord(source, "is of no shape many reads: expected prompt (many's JSONL), conversations or "
                                 "messages (LLaVA, LLaMA-Factory sharegpt, ms-swift) or instruction (alpaca)")
    if [role for role, _ in turns] not in (["user"], ["user", "assistant"]):
        return BadRecord(source, f"holds the turns {[role for role, _ in turns]}: many reads one user turn and "
                                 f"its answer (a system turn or several turns are not read yet)")
    prompt = turns[0][1]
    for tag in _MEDIA_TAGS:
        if tag in prompt and tag[1:-1] not in media:
            return BadRecord(source, f"its prompt holds {tag} but the record names no {tag[1:-1]} "
                                     f"(expected a field {tag[1:-1]} or {tag[1:-1]}s)")
        prompt = prompt.replace(tag, "")
    fields = {"prompt": prompt.strip(), "answer": turns[1][1] if len(turns) > 1 else None, **media}
    return _record_from_fields(source, root, {**fields, "task": entry.get("task")}, task)


def _turns(turns: list) -> list[tuple[str, str]] | str:
    """(role, text) of each turn, in both tag styles; a string saying what is wrong otherwise."""
    read = []
    for turn in turns:
        if not isinstance(turn, dict):
            return "has a turn that is not a JSON object"
        role, text = turn.get("from", turn.get("role")), turn.get("value", turn.get("content"))
        if role not in _ROLES or not isinstance(text, str):
            return f"has a turn with role {role!r} and no text: expected from/value or role/content"
        read.append((_ROLES[role], text))
    return read


def _media(entry: dict) -> dict[str, str] | str:
    """The record's media as many's fields (one of each kind), or a string saying what is not read:
    no image, video or audio a record names is ever dropped."""
    media = {kind: entry[kind] for kind in ("image", "video", "audio") if entry.get(kind) is not None}
    for field, kind in _MEDIA_LISTS.items():
        items = entry.get(field) or []
        if not isinstance(items, list):
            return f"field {field} is not a list"
        paths = [item.get("path") if isinstance(item, dict) else item for item in items]
        if not all(isinstance(path, str) for path in paths):
            return f"field {field} holds an entry that is not a path"
        if len(paths) > 1 or (paths and kind in media):
            return f"names {len(paths) + (kind in media)} {field}: records with several are not read yet"
        if paths:
            media[kind] = paths[0]
    return media


def messages(record: Record, with_answer: bool = True, multimodal: bool = True) -> list[dict]:
    """The conversation of the token rule: one user turn [media, prompt], and the answer when there is
    one (and it is wanted: statistics take it, inference asks for it). A plain language model's
    tokenizer gets the usual string contents instead of typed parts."""
    def content(text: str, media: Record | None = None) -> list[dict] | str:
        if not multimodal:
            return text
        kinds = [] if media is None else [kind for kind in ("image", "audio", "video") if getattr(media, kind)]
        return [{"type": kind} for kind in kinds] + [{"type": "text", "text": text}]

    turns = [{"role": "user", "content": content(record.prompt, record)}]
    if with_answer and record.answer is not None:
        turns.append({"role": "assistant", "content": content(record.answer)})
    return turns


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
    return encode_records(processor, records, [item.image for item in media if item.image is not None], with_answers,
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
    nested = [[next(remaining)] if record.image is not None else [] for record in records]
    media = {"images": nested} if images else {}
    if audios:
        media.update(audio=audios, sampling_rate=processor.feature_extractor.sampling_rate)
    if videos:
        media["videos"] = videos
    encoded = processor(text=texts, **media, return_tensors="pt", padding=True)
    encoded.pop("labels", None)  # PaliGemma's processor adds training labels: nothing here trains
    return encoded
