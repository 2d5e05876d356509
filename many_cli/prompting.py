"""Asking an adapter as its training tool did: the tool's chat template and default system prompt,
the special tokens it writes itself, and the sizes it resizes images to before the processor.

What a run uses is a `Prompting`: the user's word (`Asking`: --template, --system, --min-pixels,
--max-pixels), else what the tool saved beside the adapter (ms-swift's `args.json`), else what
`many` recorded before (a stats file, a merge), else the base processor's own template. `AsTrained` wraps the base processor so that every prompt and
image the commands encode goes through it; the processor itself is not changed.

Adding a tool's template: one `ToolTemplate` in TOOL_TEMPLATES (its Jinja text, written from the
tool's own template definition, and its image rule), and its comparison in the interop suite."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from many_cli.errors import InputError

if TYPE_CHECKING:  # the command line imports this module before any image library
    from PIL import Image

BASE = "base"  # the base processor's own chat template
FILE = "file:"  # a chat template file's, by its name
ARGS_FILE = "args.json"  # what ms-swift saves beside each checkpoint: the run's arguments


@dataclass(frozen=True)
class ImageRule:
    """How a tool resizes an image before the processor: `llamafactory` scales it by √ so that
    its pixels lie in [min, max] (LLaMA-Factory's image_min_pixels and image_max_pixels), then,
    with `qwen` set, widens a side under 28 pixels (its Qwen2-VL plugin; its cap on aspect ratios
    above 200 is not applied here); `qwen_vl_utils` rounds
    both sides to multiples of 28 within [min, max] pixels (ms-swift's MIN_PIXELS and MAX_PIXELS)
    and the processor does not resize again. Both resize with Pillow's default filter."""

    kind: str
    min_pixels: int
    max_pixels: int
    qwen: bool = False

    @property
    def processor_resizes(self) -> bool:
        return self.kind != "qwen_vl_utils"

    def resize(self, image: Image.Image) -> Image.Image:
        if self.kind == "qwen_vl_utils":
            height, width = qwen_smart_resize(image.height, image.width, 28, self.min_pixels, self.max_pixels)
            return image.resize((width, height))
        if image.width * image.height > self.max_pixels:
            image = _scaled(image, self.max_pixels)
        if image.width * image.height < self.min_pixels:
            image = _scaled(image, self.min_pixels)
        if self.qwen and min(image.width, image.height) < 28:
            image = image.resize((max(image.width, 28), max(image.height, 28)))
        return image


def _scaled(image: Image.Image, pixels: int) -> Image.Image:
    """The image scaled by √(pixels / its pixels), each side truncated (LLaMA-Factory's rule)."""
    factor = math.sqrt(pixels / (image.width * image.height))
    return image.resize((int(image.width * factor), int(image.height * factor)))


def qwen_smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The (height, width) Qwen-VL's rule gives: each side a multiple of `factor` nearest the
    image's, then scaled by √ into [min_pixels, max_pixels], the aspect ratio kept."""
    if max(height, width) / min(height, width) > 200:
        raise InputError(None, f"an image of {width}x{height} is wider than Qwen-VL's aspect ratio limit of 200")
    h_bar, w_bar = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar, w_bar = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _chat_template(
    default_system: str, system: str, opening: str, user: str, image: str, answer: str, joint: str = ""
) -> str:
    """A tool's template as Jinja: `opening` (special tokens that start every conversation), then
    `system` (with {system}) when the system prompt is not empty (a conversation's own system turn,
    else `default_system`), each user turn as `user` (with {text}; an image part written as
    `image`), each answer as `answer` (with {text}), and `joint` before an answer and a later user
    turn, which the tool tokenizes apart from the piece before (a space, where the tokenizer would
    otherwise join a word to it)."""

    def written(slot: str) -> str:  # a slot as one Jinja expression: its text never trimmed
        pieces = re.split(r"\{(text|system)\}", slot)
        terms = [repr(piece) if index % 2 == 0 else piece for index, piece in enumerate(pieces) if piece]
        return "{{ " + " ~ ".join(terms or ["''"]) + " }}"

    return (
        "{%- set first = messages[0] if messages else none -%}"
        f"{{%- set system = first['content'] if first and first['role'] == 'system' else {default_system!r} -%}}"
        "{%- if system is not string -%}{%- set system = system | map(attribute='text') | join('') -%}{%- endif -%}"
        f"{written(opening)}"
        f"{{%- if system -%}}{written(system)}{{%- endif -%}}"
        "{%- for message in messages if message['role'] != 'system' -%}"
        "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
        "{%- else -%}{%- set parts = namespace(text='') -%}"
        "{%- for part in message['content'] -%}"
        f"{{%- if part['type'] == 'image' -%}}{{%- set parts.text = parts.text ~ {image!r} -%}}"
        "{%- elif part['type'] == 'text' -%}{%- set parts.text = parts.text ~ part['text'] -%}{%- endif -%}"
        "{%- endfor -%}{%- set text = parts.text -%}{%- endif -%}"
        f"{{%- if message['role'] == 'user' -%}}{{%- if not loop.first -%}}{written(joint)}{{%- endif -%}}{written(user)}"
        f"{{%- else -%}}{written(joint + answer)}{{%- endif -%}}"
        "{%- endfor -%}"
    )


@dataclass(frozen=True)
class ToolTemplate:
    """A training tool's template: its Jinja text (every special token written by it, none added
    by the tokenizer) and how it resizes images (None: the processor's own sizes)."""

    chat_template: str
    images: ImageRule | None


_VICUNA = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_CHATML = dict(
    default_system="You are a helpful assistant.",
    system="<|im_start|>system\n{system}<|im_end|>\n",
    opening="",
    user="<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n",
    image="<|vision_start|><|image_pad|><|vision_end|>",
    answer="{text}<|im_end|>\n",
)
_LLAMAFACTORY_PIXELS = (32 * 32, 768 * 768)  # image_min_pixels, image_max_pixels
_QWEN_VL_UTILS_PIXELS = (4 * 28 * 28, 16384 * 28 * 28)  # MIN_PIXELS, MAX_PIXELS

# "TOOL:NAME", NAME as the tool's own option spells it (LLaMA-Factory's `template:`, ms-swift's --template).
TOOL_TEMPLATES: dict[str, ToolTemplate] = {
    "llamafactory:llava": ToolTemplate(  # LLaMA-Factory's llava (vicuna): no BOS
        _chat_template(_VICUNA, "{system} ", "", "USER: {text} ASSISTANT:", "<image>", "{text}</s>", joint=" "),
        ImageRule("llamafactory", *_LLAMAFACTORY_PIXELS),
    ),
    "llamafactory:qwen2_vl": ToolTemplate(
        _chat_template(**_CHATML),
        ImageRule("llamafactory", *_LLAMAFACTORY_PIXELS, qwen=True),
    ),
    "swift:llava1_5_hf": ToolTemplate(  # ms-swift's: a BOS, the system on its own line, no default system
        _chat_template("", "{system}\n", "<s>", "USER: {text}\nASSISTANT:", "<image>\n", "{text}</s>", joint=" "),
        None,
    ),
    "swift:qwen2_vl": ToolTemplate(_chat_template(**_CHATML), ImageRule("qwen_vl_utils", *_QWEN_VL_UTILS_PIXELS)),
}


@dataclass(frozen=True)
class Asking:
    """The user's word on how to ask: a template (a TOOL_TEMPLATES name or a Jinja file), a system
    prompt, and the image pixel limits of the tool's resize. None: not said."""

    template: str | None = None
    system: str | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None

    def check(self) -> None:
        if self.template is not None and self.template != BASE and self.template not in TOOL_TEMPLATES:
            path = Path(self.template)
            if not path.is_file():
                raise InputError(
                    None,
                    f"--template is neither {BASE}, a training tool's template ({', '.join(TOOL_TEMPLATES)}) "
                    f"nor a chat template file: {self.template}",
                )
        for flag, value in (("--min-pixels", self.min_pixels), ("--max-pixels", self.max_pixels)):
            if value is not None and value < 1:
                raise InputError(None, f"{flag} must be ≥ 1, got {value}")
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            raise InputError(None, f"--min-pixels {self.min_pixels} is above --max-pixels {self.max_pixels}")


@dataclass(frozen=True)
class Prompting:
    """How records are asked: `template` (BASE, a TOOL_TEMPLATES name, or "file:NAME"), its Jinja
    text (None for the base's own), the system prompt (None: the template's default), the image
    rule, and where it was read from."""

    template: str = BASE
    chat_template: str | None = None
    system: str | None = None
    images: ImageRule | None = None
    source: str = "the base's own chat template"

    @property
    def record(self) -> dict:
        """What the stats file and the bundle keep of it: enough to ask again as it did."""
        record = {"template": self.template, "source": self.source}
        if self.template.startswith(FILE):
            record["chat_template"] = self.chat_template
        if self.system is not None:
            record["system"] = self.system
        if self.images is not None:
            record["pixels"] = [self.images.min_pixels, self.images.max_pixels]
        return record

    def wrap(self, processor):
        """The processor asking as this says (itself for the base's own template)."""
        return (
            processor if (self.template, self.system, self.images) == (BASE, None, None) else AsTrained(processor, self)
        )


def described(record: Mapping[str, object]) -> str:
    """A prompting's record in a few words, for the model card ("unknown" where none was kept)."""
    if not record:
        return "unknown (stats of an older many)"
    words = ["the base's own template" if record["template"] == BASE else f"`{record['template']}`"]
    if "system" in record:
        words.append(f"system {json.dumps(record['system'])}")
    if "pixels" in record:
        words.append("pixels {}-{}".format(*record["pixels"]))
    return ", ".join(words)


def recorded_prompting(path: Path, record: Mapping[str, object]) -> Prompting:
    """The prompting a stats file or bundle at `path` recorded ({}: the base's own template)."""
    if not record:
        return Prompting()
    template = record.get("template")
    try:
        if template == BASE:
            return Prompting(system=record.get("system"), source=str(path))
        if isinstance(template, str) and template.startswith(FILE) and isinstance(record.get("chat_template"), str):
            return Prompting(template, record["chat_template"], record.get("system"), None, str(path))
        tool = TOOL_TEMPLATES[template]
        images = tool.images
        if "pixels" in record:
            low, high = record["pixels"]
            images = ImageRule(images.kind, int(low), int(high), images.qwen)
        return Prompting(template, tool.chat_template, record.get("system"), images, str(path))
    except (KeyError, TypeError, ValueError, AttributeError):
        raise InputError(path, f"records a template this many does not know ({template!r}): give --template") from None


def prompting_for(
    adapter: Path | None, asking: Asking, recorded: Prompting | None = None
) -> tuple[Prompting, str | None]:
    """How to ask `adapter`'s records, and a note when nothing says how it was trained: the user's
    word first, then ms-swift's args.json beside the adapter, then what many recorded before
    (`recorded`: a stats file's or a merge's), then the base's own template."""
    saved = _swift_arguments(adapter) if adapter is not None else {}
    note = None
    if asking.template is not None:
        prompting = _named(asking.template, "--template")
    elif saved.get("template") in {name.partition(":")[2] for name in TOOL_TEMPLATES if name.startswith("swift:")}:
        prompting = _named(f"swift:{saved['template']}", str(adapter / ARGS_FILE))
    elif recorded is not None:
        prompting = recorded
    else:
        prompting = Prompting()
        if saved.get("template"):
            note = (
                f"{adapter / ARGS_FILE}: ms-swift's template {saved['template']!r} is not one many writes; the "
                f"base's own chat template is used (give --template FILE.jinja to ask as it trained)"
            )
        elif adapter is not None:
            note = (
                f"{adapter}: its folder does not say which chat template trained it; the base's own is used "
                f"(give --template: {BASE} to say so, or the tool's, e.g. llamafactory:llava)"
            )
    system = asking.system if asking.system is not None else saved.get("system", prompting.system)
    images = prompting.images
    if asking.min_pixels is not None or asking.max_pixels is not None:
        if images is None:
            raise InputError(
                None, f"--min-pixels and --max-pixels set a training tool's image sizes; {prompting.template} has none"
            )
        images = replace(
            images, min_pixels=asking.min_pixels or images.min_pixels, max_pixels=asking.max_pixels or images.max_pixels
        )
        if images.min_pixels > images.max_pixels:
            raise InputError(
                None, f"the smallest image ({images.min_pixels} pixels) is above the largest ({images.max_pixels})"
            )
    return replace(prompting, system=system, images=images), note


def _named(name: str, source: str) -> Prompting:
    """The base's own template (BASE), a tool's template by its name, or a chat template file's."""
    if name == BASE:
        return Prompting(source=source)
    if name in TOOL_TEMPLATES:
        tool = TOOL_TEMPLATES[name]
        return Prompting(name, tool.chat_template, None, tool.images, source)
    path = Path(name)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(path, f"the chat template file cannot be read ({error})") from None
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:  # transformers compiles it in this environment, at the first record
        ImmutableSandboxedEnvironment().parse(text)
    except TemplateSyntaxError as error:
        raise InputError(path, f"is not a Jinja chat template (line {error.lineno}: {error.message})") from None
    return Prompting(f"{FILE}{path.name}", text, None, None, source)


def _swift_arguments(adapter: Path) -> dict:
    """The template and system prompt of ms-swift's args.json beside the adapter ({} without one)."""
    path = adapter / ARGS_FILE
    if not path.is_file():
        return {}
    try:
        arguments = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(path, f"ms-swift's arguments cannot be read ({error})") from None
    if not isinstance(arguments, dict):
        raise InputError(path, "is not ms-swift's arguments (a JSON object)")
    found = {key: arguments.get(key) for key in ("template", "system")}
    for key, value in found.items():
        if value is not None and not isinstance(value, str):
            raise InputError(path, f"its {key!r} is not a string")
    return {key: value for key, value in found.items() if value is not None}


class AsTrained:
    """A processor that asks as a training tool did: its chat template and system prompt in every
    conversation, no special token added by the tokenizer (a tool's template writes them; any
    other template follows transformers' rule, `data.encode_records`'), and each image resized by
    the tool's rule first. Everything else is the wrapped processor's."""

    def __init__(self, processor, prompting: Prompting):
        self._processor = processor
        self.prompting = prompting

    def __getattr__(self, name: str):
        return getattr(self._processor, name)

    def apply_chat_template(self, conversation: list[dict], **kwargs):
        if self.prompting.system is not None and not (conversation and conversation[0]["role"] == "system"):
            conversation = [{"role": "system", "content": self.prompting.system}, *conversation]
        if self.prompting.chat_template is not None:
            kwargs["chat_template"] = self.prompting.chat_template
        return self._processor.apply_chat_template(conversation, **kwargs)

    def __call__(self, *args, **kwargs):
        rule = self.prompting.images
        if rule is not None and kwargs.get("images"):
            kwargs["images"] = [[rule.resize(image) for image in images] for images in kwargs["images"]]
            if not rule.processor_resizes:
                kwargs["do_resize"] = False
        if self.prompting.template in TOOL_TEMPLATES:
            kwargs["add_special_tokens"] = False
        return self._processor(*args, **kwargs)
