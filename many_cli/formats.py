"""Reading DATA as the user has it: a folder of images, many's own JSONL, and the files the training
tools write (LLaVA's JSON, LLaMA-Factory's sharegpt and alpaca with a `dataset_info.json` entry,
ms-swift's JSONL, InternVL's meta JSON) or a Hugging Face dataset. Each record's shape is told by
its fields (`--format` forces one); records come back lazily, malformed ones as BadRecord.

Adding a format: a reader here that yields `_entry_record(...)` for each raw entry (after mapping
its fields onto the shapes below), and its name in `options.DataFormat` (FORMATS follows from it)."""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator

from PIL import Image, UnidentifiedImageError

from many_cli.data import IMAGE_SUFFIXES, IMAGE_TAG, OTHER_TAGS, BadRecord, InlineImage, Record
from many_cli.errors import InputError
from many_cli.files import check_readable, refuse_overlap
from many_cli.options import FORMATS, Reading

_SHAPE_OF_FORMAT = {
    "many": "prompt",
    "llava": "conversation",
    "sharegpt": "conversation",
    "swift": "conversation",
    "internvl": "conversation",
    "alpaca": "alpaca",
}
_SHAPE_FIELDS = {"prompt": ("prompt",), "conversation": ("conversations", "messages"), "alpaca": ("instruction",)}
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_MEDIA_LISTS = {"images": "image", "videos": "video", "audios": "audio"}
_DATASET_INFO = "dataset_info.json"
_HF_FILES = {".parquet", ".arrow"}


def read_records(data: Path, reading: Reading = Reading()) -> Iterator[Record | BadRecord]:
    """Yield the records of DATA in order; malformed ones come back as BadRecord, so the caller
    decides whether to stop (the default) or skip them. DATA `DIR/dataset_info.json:NAME` is
    LLaMA-Factory's entry NAME."""
    if data.name.startswith(f"{_DATASET_INFO}:"):
        return _dataset_info_records(data.with_name(_DATASET_INFO), data.name.split(":", 1)[1], reading)
    if not data.exists():
        raise InputError(
            data,
            "data not found (expected a folder of images, a .jsonl or .json file, a Hugging Face "
            "dataset, or DIR/dataset_info.json:NAME)",
        )
    check_readable(data)
    if reading.format == "hf" or data.suffix in _HF_FILES or _is_saved_dataset(data):
        return _hf_records(data, reading)
    if data.is_dir():
        return _folder_records(data, reading.default_prompt)
    if data.suffix == ".jsonl":
        return _jsonl_records(data, reading)
    if data.suffix == ".json":
        return _json_records(data, reading)
    raise InputError(
        data,
        "unknown data format: expected a folder of images, a .jsonl or .json file, a .parquet "
        "or .arrow file, or a Hugging Face dataset folder",
    )


def read_all_records(sources: list[tuple[str | None, Path]], reading: Reading = Reading()) -> Iterator[Record]:
    """The records of every (task, source) in turn, each of the task named there (None: as the
    source names it); the first malformed one is an InputError naming it."""
    for task, source in sources:
        for record in read_records(source, reading):
            if isinstance(record, BadRecord):
                raise InputError(record.source, record.fault)
            yield record if task is None else replace(record, task=task)


def input_files(data: Path) -> list[Path]:
    """The files DATA leads to besides its records' media: DATA itself, a `dataset_info.json` and
    the file its entry names, an InternVL meta file and its annotations (for --out checks; a
    fault in them is left for reading to report)."""
    try:
        if data.name.startswith(f"{_DATASET_INFO}:"):
            info = data.with_name(_DATASET_INFO)
            return [info, _dataset_info_file(info, _load_json(info), data.name.split(":", 1)[1])[1]]
        if data.suffix == ".json" and data.is_file():
            meta = _load_json(data)
            if _is_internvl_meta(meta):
                return [data, *(_annotation(data, name, entry) for name, entry in meta.items())]
    except InputError:
        pass
    return [data]


def media_files(sources: list[Path], reading: Reading = Reading()) -> Iterator[Path]:
    """Every media file (or video folder) the records of `sources` name, read without opening any."""
    for source in sources:
        for record in read_records(source, reading):
            if isinstance(record, Record):
                yield from (path for path in record.images if isinstance(path, Path))
                yield from (path for path in (record.audio, record.video) if path is not None)


def refuse_output_over_data(
    out: Path, sources: list[Path], reading: Reading, is_own_kind: Callable[[Path], bool]
) -> None:
    """Refuse an `out` that is, holds or lies inside a file that reading `sources` opens: the data
    files always, and, when `out` exists as something other than this command's own kind of
    output, every media file the records name (so that not even --force replaces one)."""
    refuse_overlap(out, [path for source in sources for path in input_files(source)])
    if out.exists() and not is_own_kind(out):
        refuse_overlap(out, media_files(sources, reading))


def count_records(data: Path) -> int | None:
    """How many records DATA holds, when that is cheap to know (for progress bars)."""
    if data.is_dir() and not _is_saved_dataset(data):
        return sum(1 for path in data.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
    if data.suffix == ".jsonl" and data.is_file():
        with open(data, "rb") as handle:
            return sum(1 for line in handle if line.strip())
    return None


# ---------------------------------------------------------------- files


def _folder_records(folder: Path, prompt: str) -> Iterator[Record]:
    images = sorted(path for path in folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise InputError(folder, f"holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    for path in images:
        yield Record(str(path), (path,), prompt, None, folder.name)


def _jsonl_records(
    path: Path,
    reading: Reading,
    root: Path | None = None,
    task: str | None = None,
    shape: str | None = None,
    mapping: Callable[[object], object] = lambda entry: entry,
) -> Iterator[Record | BadRecord]:
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
            except RecursionError:
                yield BadRecord(source, "nested too deeply")
                continue
            yield _entry_record(
                source,
                reading.media_dir or root or path.parent,
                mapping(entry),
                task or path.stem,
                shape or _SHAPE_OF_FORMAT.get(reading.format),
            )


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(path, f"not valid JSON ({error})") from None
    except RecursionError:
        raise InputError(path, "not valid JSON for many (nested too deeply)") from None


def _json_records(path: Path, reading: Reading) -> Iterator[Record | BadRecord]:
    entries = _load_json(path)
    if path.name == _DATASET_INFO and isinstance(entries, dict):
        raise InputError(
            path,
            f"is LLaMA-Factory's list of datasets: give one as --data {path}:NAME (its datasets: "
            f"{', '.join(sorted(entries)) or 'none'})",
        )
    if _is_internvl_meta(entries):
        return _internvl_records(path, entries, reading)
    if not isinstance(entries, list):
        raise InputError(
            path,
            "expected a list of records (LLaVA, LLaMA-Factory) or InternVL's meta file (an "
            "object of datasets, each with root and annotation)",
        )
    return _list_records(
        path, entries, reading.media_dir or path.parent, path.stem, _SHAPE_OF_FORMAT.get(reading.format)
    )


def _list_records(path: Path, entries: list, root: Path, task: str, shape: str | None) -> Iterator[Record | BadRecord]:
    for index, entry in enumerate(entries):
        yield _entry_record(f"{path}[{index}]", root, entry, task, shape)


def _is_internvl_meta(entries: object) -> bool:
    return (
        isinstance(entries, dict)
        and bool(entries)
        and all(isinstance(v, dict) and "annotation" in v for v in entries.values())
    )


def _annotation(path: Path, name: str, entry: dict) -> Path:
    annotation = path.parent / str(entry["annotation"])
    if not annotation.is_file():
        raise InputError(path, f"dataset {name!r}: annotation {annotation} not found")
    return annotation


def _internvl_records(path: Path, meta: dict, reading: Reading) -> Iterator[Record | BadRecord]:
    """InternVL's meta file: {name: {"root": media folder, "annotation": a JSONL of conversations}};
    each dataset is a task of its name. Relative paths are taken from the meta file's folder."""
    for name, entry in meta.items():
        annotation = _annotation(path, name, entry)
        root = reading.media_dir or path.parent / str(entry.get("root", ""))
        for _ in range(_repeat_time(path, name, entry)):
            yield from _jsonl_records(annotation, reading, root=root, task=name, shape="conversation")


def _repeat_time(path: Path, name: str, entry: dict) -> int:
    """How many times InternVL trains on each record of a dataset: its whole `repeat_time`. A
    fraction (InternVL then trains on a random share of the records) is refused: name the share
    in the annotation file instead."""
    repeat = entry.get("repeat_time", 1)
    if isinstance(repeat, bool) or not isinstance(repeat, (int, float)) or repeat <= 0:
        raise InputError(path, f"dataset {name!r}: repeat_time {repeat!r} is not a positive number")
    if repeat != int(repeat):
        raise InputError(
            path,
            f"dataset {name!r}: repeat_time {repeat!r} makes InternVL train on a random share of its "
            f"records, which many cannot repeat; give it a whole number and the records to read in its annotation",
        )
    return int(repeat)


def _dataset_info_records(info: Path, name: str, reading: Reading) -> Iterator[Record | BadRecord]:
    """LLaMA-Factory's `dataset_info.json` entry NAME: its file (relative to the dataset folder, as
    its media), read with the entry's formatting, column and tag mapping."""
    entry, path = _dataset_info_file(info, _load_json(info), name)
    mapping = _LlamaFactoryMapping(info, name, entry)
    root = reading.media_dir or info.parent
    if path.suffix == ".jsonl":
        records = _jsonl_records(path, reading, root=root, task=name, shape=mapping.shape, mapping=mapping.apply)
    else:
        try:
            entries = _load_json(path)
        except InputError as error:
            raise InputError(info, f"dataset {name!r}: its file_name {path}: {error.fault}") from None
        if not isinstance(entries, list):
            raise InputError(info, f"dataset {name!r}: its file_name {path} holds no list of records")
        records = (
            _entry_record(f"{path}[{index}]", root, mapping.apply(value), name, mapping.shape)
            for index, value in enumerate(entries)
        )
    yield from records


def _dataset_info_file(info: Path, datasets: object, name: str) -> tuple[dict, Path]:
    """The entry NAME of a `dataset_info.json` and the data file it names."""
    entry = datasets.get(name) if isinstance(datasets, dict) else None
    if not isinstance(entry, dict):
        known = ", ".join(sorted(datasets)) if isinstance(datasets, dict) and datasets else "none"
        raise InputError(info, f"has no dataset {name!r} (its datasets: {known})")
    if "file_name" not in entry:
        raise InputError(info, f"dataset {name!r} names no local file_name (hub and script datasets are not read)")
    path = info.parent / str(entry["file_name"])
    if not path.is_file():
        raise InputError(info, f"dataset {name!r}: {path} not found")
    return entry, path


class _LlamaFactoryMapping:
    """A dataset_info.json entry's `formatting`, `columns` and `tags`, applied to one raw record."""

    def __init__(self, info: Path, name: str, entry: dict):
        formatting = entry.get("formatting", "alpaca")
        refusals = {
            "formatting": (formatting not in ("alpaca", "sharegpt"), f"is {formatting!r}: expected alpaca or sharegpt"),
            "ranking": (
                bool(entry.get("ranking")),
                "marks preference pairs (chosen and rejected), which many does not read",
            ),
            "num_samples": (
                "num_samples" in entry,
                "makes LLaMA-Factory train on a random sample of the records, which many cannot repeat "
                "(leave it out, and give --max-samples for the first N)",
            ),
        }
        for field, (refused, why) in refusals.items():
            if refused:
                raise InputError(info, f"dataset {name!r}: {field} {why}")
        self.shape = "conversation" if formatting == "sharegpt" else "alpaca"
        defaults = (
            {"messages": "conversations", "system": "system"}
            if self.shape == "conversation"
            else {"prompt": "instruction", "query": "input", "response": "output", "system": "system"}
        )
        self.columns = {**defaults, **{kind: kind for kind in _MEDIA_LISTS}, **(entry.get("columns") or {})}
        tags = {
            "role_tag": "from",
            "content_tag": "value",
            "user_tag": "human",
            "assistant_tag": "gpt",
            "system_tag": "system",
            **(entry.get("tags") or {}),
        }
        self.role, self.content = tags["role_tag"], tags["content_tag"]
        self.roles = {tags["user_tag"]: "user", tags["assistant_tag"]: "assistant", tags["system_tag"]: "system"}

    def apply(self, value: object) -> object:
        if not isinstance(value, dict):
            return value
        record = {kind: value[self.columns[kind]] for kind in _MEDIA_LISTS if self.columns[kind] in value}
        if self.columns["system"] in value:
            record["system"] = value[self.columns["system"]]
        if self.shape == "alpaca":
            own = {"prompt": "instruction", "query": "input", "response": "output"}
            return {
                **record,
                **{field: value[self.columns[key]] for key, field in own.items() if self.columns[key] in value},
            }
        turns = value.get(self.columns["messages"])
        if isinstance(turns, list):
            turns = [
                {"role": self.roles.get(turn.get(self.role), turn.get(self.role)), "content": turn.get(self.content)}
                if isinstance(turn, dict)
                else turn
                for turn in turns
            ]
        return {**record, "messages": turns}


def _is_saved_dataset(data: Path) -> bool:
    """A folder `datasets.save_to_disk` wrote (one split, or a DatasetDict)."""
    return data.is_dir() and ((data / "state.json").is_file() or (data / "dataset_dict.json").is_file())


def _hf_records(data: Path, reading: Reading) -> Iterator[Record | BadRecord]:
    """A Hugging Face dataset: a save_to_disk folder, or a parquet, arrow, JSON or JSONL file. Its
    rows have the shapes above; image columns hold PIL images, {"bytes", "path"} or paths. The
    dataset is opened now (its faults raised at once), its rows read lazily."""
    return _hf_rows(data, _load_dataset(data), reading)


def _load_dataset(data: Path):
    """The one split of the dataset at `data`, its image columns left undecoded (many opens each
    image itself, so that one that cannot be read names its record)."""
    try:
        import datasets
    except ImportError:
        raise InputError(
            data, "is a Hugging Face dataset; reading it needs the datasets package: pip install 'many-cli[datasets]'"
        ) from None
    datasets.disable_progress_bars()  # its bars would bury many's one-line reports
    try:
        if data.is_dir():
            loaded = datasets.load_from_disk(str(data))
        elif data.suffix == ".parquet":
            loaded = datasets.Dataset.from_parquet(str(data))
        elif data.suffix == ".arrow":
            loaded = datasets.Dataset.from_file(str(data))
        else:
            loaded = datasets.Dataset.from_json(str(data))
    except Exception as error:  # noqa: BLE001 - datasets raises many kinds for a file it cannot read
        raise InputError(
            data,
            f"cannot be read as a Hugging Face dataset ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:200] if str(error) else ''})",
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if len(loaded) != 1:
            raise InputError(data, f"holds the splits {', '.join(loaded)}: give one split's folder ({data}/SPLIT)")
        loaded = next(iter(loaded.values()))
    for column, feature in loaded.features.items():
        if isinstance(feature, datasets.Image) and feature.decode:
            loaded = loaded.cast_column(column, datasets.Image(decode=False))
    return loaded


def _hf_rows(data: Path, loaded, reading: Reading) -> Iterator[Record | BadRecord]:
    """A Hugging Face dataset's rows as records; an image column's unreadable bytes are a BadRecord."""
    root = reading.media_dir or (data if data.is_dir() else data.parent)
    task = data.name if data.is_dir() else data.stem
    for index, row in enumerate(loaded):
        source = f"{data}[{index}]"
        try:
            entry = _inline_media(source, row)
        except _UnreadableImage as fault:
            yield BadRecord(source, str(fault))
            continue
        yield _entry_record(source, root, entry, task, _SHAPE_OF_FORMAT.get(reading.format))


class _UnreadableImage(Exception):
    """An image column's bytes that Pillow cannot read."""


def _inline_media(source: str, row: dict) -> dict:
    """A dataset row with its image columns' decoded images, bytes or paths made into paths or
    InlineImages (a single image column becomes the list form)."""
    row = dict(row)
    for field in ("image", "images"):
        if row.get(field) is None:
            continue
        values = row[field] if isinstance(row[field], list) else [row[field]]
        row.pop(field)
        row["images"] = [_inline_image(source, f"{field}[{index}]", value) for index, value in enumerate(values)]
    return row


def _inline_image(source: str, column: str, value: object) -> object:
    """One image of a dataset row, as an InlineImage named `SOURCE.COLUMN` or a path."""
    label = f"{source}.{column}"
    if isinstance(value, Image.Image):
        return InlineImage(label, value)
    if isinstance(value, dict) and value.get("bytes"):
        try:
            return InlineImage(label, Image.open(io.BytesIO(value["bytes"])))
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as error:
            why = "not an image format Pillow knows" if isinstance(error, UnidentifiedImageError) else str(error)
            raise _UnreadableImage(f"its {column} holds bytes that are not a readable image ({why})") from None
    if isinstance(value, dict) and value.get("path"):
        return value["path"]
    return value


# ---------------------------------------------------------------- one record


def _entry_record(source: str, root: Path, entry: object, task: str, shape: str | None = None) -> Record | BadRecord:
    if not isinstance(entry, dict):
        return BadRecord(source, "expected a JSON object")
    shape = shape or _shape_of(entry)
    if shape.startswith("!"):
        return BadRecord(source, shape[1:])
    media = _media(entry)
    if isinstance(media, str):
        return BadRecord(source, media)
    turns = _conversation(entry, shape)
    if isinstance(turns, str):
        return BadRecord(source, turns)
    texts = " ".join(text for _, text in turns)
    tags = texts.count(IMAGE_TAG)
    if tags and tags != len(media["images"]):
        return BadRecord(
            source,
            f"has {tags} {IMAGE_TAG} tags for {len(media['images'])} images; give one tag per "
            f"image, or none (then the images open the first user turn)",
        )
    for tag in OTHER_TAGS:
        if tag in texts and tag[1:-1] not in media:
            return BadRecord(source, f"its text holds {tag} but the record names no {tag[1:-1]}")
    if not isinstance(entry.get("task", ""), (str, type(None))):
        return BadRecord(source, "field task is not a string")
    last_user = max(index for index, (role, _) in enumerate(turns) if role == "user")
    answer = turns[last_user + 1][1] if last_user + 1 < len(turns) else None
    try:
        images = tuple(_image_source(source, root, index, image) for index, image in enumerate(media["images"]))
        remote = next((media[kind] for kind in ("audio", "video") if _is_inline_or_remote(media.get(kind))), None)
    except _UnreadableImage as fault:
        return BadRecord(source, str(fault))
    if remote is not None:
        return BadRecord(source, f"names its audio or video as {remote[:40]!r}: many reads those from local files only")
    return Record(
        source,
        images,
        turns[last_user][1],
        answer,
        str(entry.get("task") or task),
        _path(root, media.get("audio")),
        _path(root, media.get("video")),
        tuple(turns[:last_user]),
    )


_REMOTE = re.compile(r"(?i)(https?|ftp|s3|gs)://")
_BASE64 = re.compile(r"[A-Za-z0-9+/\s]+={0,2}")


def _image_source(source: str, root: Path, index: int, image: str | InlineImage) -> Path | InlineImage:
    """An image as a record names it: a path (relative to `root`), a `data:` URI or a bare base64
    string (as ms-swift and many Hub data sets carry them), read into an InlineImage; a URL is
    refused, since many fetches nothing."""
    if isinstance(image, InlineImage):
        return image
    column = f"image[{index}]"
    if _REMOTE.match(image):
        raise _UnreadableImage(
            f"its {column} is the URL {image[:80]}: many fetches no remote media; download it first "
            f"(for example with huggingface_hub or curl) and name the local file"
        )
    encoded = image.partition(",")[2] if image.startswith("data:") else image
    bare_base64 = len(image) >= 64 and _BASE64.fullmatch(image) and not _is_file(root / image)
    if image.startswith("data:") or bare_base64:
        if image.startswith("data:") and ";base64," not in image[:100]:
            raise _UnreadableImage(f"its {column} is a data: URI that is not base64-encoded")
        try:
            data = base64.b64decode(encoded, validate=False)
        except (binascii.Error, ValueError):
            data = b""
        if not data:
            raise _UnreadableImage(f"its {column} is not valid base64")
        return _inline_image(source, column, {"bytes": data})
    return root / image


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a name too long for the file system is no file
        return False


def _is_inline_or_remote(value: str | None) -> bool:
    return isinstance(value, str) and (value.startswith("data:") or bool(_REMOTE.match(value)))


def _shape_of(entry: dict) -> str:
    """The record's shape by its fields, or "!" and what is wrong."""
    shapes = [shape for shape, fields in _SHAPE_FIELDS.items() if any(field in entry for field in fields)]
    if len(shapes) > 1:
        return (
            f"!is ambiguous: it has the fields of several shapes ({', '.join(shapes)}); pass --format "
            f"({', '.join(FORMATS[1:])})"
        )
    if not shapes and any(field in entry for field in ("image", "answer", "audio", "video")):
        return "prompt"  # many's own record, short of its prompt: said as such
    if not shapes:
        return (
            "!is of no shape many reads: expected prompt (many's JSONL), conversations or messages (LLaVA, "
            "LLaMA-Factory sharegpt, ms-swift, InternVL) or instruction (LLaMA-Factory alpaca)"
        )
    return shapes[0]


def _path(root: Path, name: str | None) -> Path | None:
    return None if name is None else root / name


def _conversation(entry: dict, shape: str) -> list[tuple[str, str]] | str:
    """(role, text) of every turn of a record of `shape`; a string saying what is wrong otherwise.
    The turns alternate user and assistant after an optional system turn, and end on either."""
    if shape == "prompt":
        if not isinstance(entry.get("prompt"), str) or not isinstance(entry.get("answer", ""), (str, type(None))):
            return "lacks the string field(s) prompt (and answer, when given, must be a string)"
        turns = [("user", entry["prompt"])] + (
            [("assistant", entry["answer"])] if entry.get("answer") is not None else []
        )
    elif shape == "alpaca":
        if not isinstance(entry.get("instruction"), str):
            return "lacks the string field instruction (LLaMA-Factory alpaca)"
        prompt = "\n".join(str(entry[key]) for key in ("instruction", "input") if entry.get(key))
        turns = [("user", prompt)] + ([("assistant", str(entry["output"]))] if entry.get("output") else [])
    else:
        raw = entry.get("conversations", entry.get("messages"))
        if not isinstance(raw, list):
            return "lacks a list of turns (conversations or messages)"
        turns = []
        for turn in raw:
            role = turn.get("from", turn.get("role")) if isinstance(turn, dict) else None
            text = turn.get("value", turn.get("content")) if isinstance(turn, dict) else None
            if role not in _ROLES or not isinstance(text, str):
                return f"has a turn with role {role!r} and no text: expected from/value or role/content"
            turns.append((_ROLES[role], text))
    if isinstance(entry.get("system"), str) and entry["system"] and shape != "prompt":
        turns.insert(0, ("system", entry["system"]))  # LLaMA-Factory's system column
    roles = [role for role, _ in turns if role != "system"]
    if (
        not roles
        or any(role == "system" for role, _ in turns[1:])
        or roles != ["user", "assistant"] * (len(roles) // 2) + ["user"] * (len(roles) % 2)
    ):
        return (
            f"has the turns {[role for role, _ in turns]}: expected user and assistant turns in turn, from "
            f"the user's, after an optional system turn"
        )
    return turns


def _media(entry: dict) -> dict | str:
    """The record's media: {"images": [...], "audio": path, "video": path} (the last two when
    given), or a string saying what is not read: no media a record names is ever dropped."""
    image = entry.get("image")
    if image is not None and not isinstance(image, (str, list)):
        return "field image is not a path or a list of paths"
    for kind in ("audio", "video"):
        if entry.get(kind) is not None and not isinstance(entry[kind], str):
            return f"field {kind} is not a string"
    media: dict = {"images": list(image) if isinstance(image, list) else [image] if image is not None else []}
    media.update({kind: entry[kind] for kind in ("audio", "video") if entry.get(kind) is not None})
    for field, kind in _MEDIA_LISTS.items():
        items = entry.get(field) or []
        if not isinstance(items, list):
            return f"field {field} is not a list"
        paths = [item.get("path") if isinstance(item, dict) else item for item in items]
        if kind == "image":
            media["images"] += paths
        elif len(paths) + (kind in media) > 1:
            return f"names {len(paths) + (kind in media)} {field}: one {kind} per record is read"
        elif paths:
            media[kind] = paths[0]
        if not all(isinstance(path, (str, InlineImage)) for path in paths):
            return f"field {field} holds an entry that is not a path"
    if not all(isinstance(path, (str, InlineImage)) for path in media["images"]):
        return "field image holds an entry that is not a path"
    return media
