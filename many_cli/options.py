"""Every command's settings, each option declared once (flag, default, help, and for an option with
a fixed set of values, that set as a `Literal` type, which `--help` shows); the command line is
built from these classes, and each class's `check()` refuses a bad setting before any work.

No torch here, nor anything that imports it: `many --help` and every refused option return
before the heavy libraries load. What needs torch to resolve (is CUDA there? which GPU indices
exist?) is resolved once, where the model or merge starts (`models.resolve_*`)."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import types
import typing
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

from many_cli.errors import InputError
from many_cli.files import read_json
from many_cli.methods import REGISTRY, ignored, readers
from many_cli.prompting import Asking
from many_cli.qlora import NONE as FULL_PRECISION
from many_cli.qlora import SCHEMES as QLORA_SCHEMES

DEFAULT_PROMPT = "Describe the image."

Device = Literal["auto", "cpu", "cuda"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
DataFormat = Literal["auto", "many", "llava", "sharegpt", "alpaca", "swift", "internvl", "hf"]
Method = Literal[tuple(REGISTRY)]  # the registered merge methods (`many_cli/methods/`)
StatePrecision = Literal["float64", "float32"]
Routing = Literal["nearest", "soft", "hard"]
LmRouting = Literal["merged", "experts"]
Qlora = Literal[(FULL_PRECISION, *QLORA_SCHEMES)]  # `many_cli/qlora.py`
PaddingSide = Literal["left", "right"]

FORMATS: tuple[str, ...] = get_args(DataFormat)  # "auto" tells the shape of each record by its fields
METHODS: tuple[str, ...] = get_args(Method)
STATE_PRECISIONS: tuple[str, ...] = get_args(StatePrecision)
NEAREST = "nearest"  # route each image to the task of its nearest calibration image (hard)
PLACEMENTS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's device_map strategies
MEAN, ROUTED = "mean", "routed"  # export --projector's words besides a task's name
DEFAULT_RIDGE = 1e-4
DEFAULT_ETA = 0.05
DEFAULT_DENSITY = 0.2
DEFAULT_CONFIDENCE = 0.5


def option(default: Any, flag: str, help: str) -> Any:
    """A settings field that is also a command-line option."""
    return dataclasses.field(default=default, metadata={"flag": flag, "help": help})


def check_types(settings: object) -> None:
    """The Python API's check that every option holds a value of its declared type (the command
    line's parser converts them first): a str where a number goes is one line naming the option."""
    hints = typing.get_type_hints(type(settings))
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        if "flag" not in field.metadata:
            continue
        shown = repr(value) if len(repr(value)) <= 40 else f"{repr(value)[:37]}..."
        if not _conforms(value, hints[field.name]):
            raise InputError(None, f"{field.metadata['flag']} must be {_described(hints[field.name])}, got {shown}")
        if isinstance(value, int) and not isinstance(value, bool):
            limit = sys.float_info.max if float in (hints[field.name], *get_args(hints[field.name])) else sys.maxsize
            if abs(value) > limit:
                raise InputError(None, f"{field.metadata['flag']} is too large ({shown}); at most {limit:.4g}")
        if isinstance(value, (str, os.PathLike)) and "\0" in str(value):
            raise InputError(None, f"{field.metadata['flag']} holds a NUL byte, which no name can hold")
        if isinstance(value, (str, os.PathLike)) and Path in (hints[field.name], *get_args(hints[field.name])):
            object.__setattr__(settings, field.name, Path(value))  # a str where a folder goes, as the parser gives it


def _conforms(value: object, kind: Any) -> bool:
    if typing.get_origin(kind) is Literal:
        return value in get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return any(_conforms(value, arm) for arm in get_args(kind))
    checks = {
        type(None): lambda: value is None,
        bool: lambda: isinstance(value, bool),
        int: lambda: isinstance(value, int) and not isinstance(value, bool),
        float: lambda: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: lambda: isinstance(value, str),
        Path: lambda: isinstance(value, (str, os.PathLike)),
    }
    return checks[kind]() if kind in checks else True


def _described(kind: Any) -> str:
    if typing.get_origin(kind) is Literal:
        return "one of " + ", ".join(map(str, get_args(kind)))
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return " or ".join(_described(arm) for arm in get_args(kind))
    names = {type(None): "None", bool: "True or False", int: "an integer", float: "a number", str: "a string"}
    return names.get(kind, "a path" if kind is Path else getattr(kind, "__name__", str(kind)))


def _one_of(flag: str, value: object, kind: Any) -> None:
    """The Python API's check of a `Literal` option (the command line's parser checks it first)."""
    choices = get_args(kind)
    if value not in choices:
        raise InputError(None, f"{flag} must be one of {', '.join(choices)}, got {value!r}")


@dataclass(frozen=True)
class Placement:
    """Where a model loads, as the options give it and checked: the device and dtype by name, and
    --device-map as accelerate takes it: None, a strategy, or the {module: device} its JSON file
    (`map_file`) holds, read once, here. Its GPU indices are checked where torch is loaded."""

    device: str = "auto"
    dtype: str = "auto"
    device_map: str | dict[str, Any] | None = None
    map_file: str | None = None


def _placement(device: str, dtype: str, device_map: str | None) -> Placement:
    _one_of("--device", device, Device)
    _one_of("--dtype", dtype, Dtype)
    if device_map is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InputError(
            None,
            "--device-map places one model over this machine's devices; under torchrun "
            "each rank holds a model of its own: use one or the other",
        )
    if device_map is None or device_map in PLACEMENTS:
        return Placement(device, dtype, device_map)
    if not device_map.strip():
        raise InputError(
            None, f"--device-map is empty: give {', '.join(PLACEMENTS)} or a JSON file of {{module name: device}}"
        )
    placement = read_json(Path(device_map))
    if not placement:
        raise InputError(
            device_map, f"--device-map takes {', '.join(PLACEMENTS)} or a JSON file of {{module name: device}}"
        )
    if "disk" in placement.values():
        raise InputError(
            device_map,
            "places modules on disk; many does not offload to disk (PEFT would "
            "rewrite the base checkpoint's files): give them to cpu",
        )
    return Placement(device, dtype, placement, device_map)


@dataclass(frozen=True)
class LoadsModel:
    """The settings of a command that loads a model: where it runs, in which dtype, and how
    accelerate places it; their placement is checked and read once, by `check()`."""

    # What the command computes beside the model, named in the help of the options below.
    BESIDE_THE_MODEL: ClassVar[str] = "the rest"
    DTYPE_NOTE: ClassVar[str] = ""

    device: Device = option(
        "auto",
        "--device",
        "Where the model runs, and {beside_the_model} (auto: CUDA when torch sees it).",
    )
    dtype: Dtype = option("auto", "--dtype", "Model dtype (auto: the checkpoint's{dtype_note}).")
    device_map: str | None = option(
        None,
        "--device-map",
        "Place the model with accelerate over this machine's GPUs and CPU: auto, balanced, sequential, or a "
        "JSON file {{module: device}}; {beside_the_model} on --device.",
    )

    @cached_property
    def placement(self) -> Placement:
        return _placement(self.device, self.dtype, self.device_map)


@dataclass(frozen=True)
class ReadsBase:
    """The setting of a command that reads the base's weights: which weights an adapter trained on."""

    qlora: Qlora = option(
        FULL_PRECISION,
        "--qlora",
        "The base as a QLoRA adapter saw it in training: each weight transformers loads in 4 bits "
        "quantised (nf4 or fp4, blocks of 64; -double: the block scales quantised too, LLaMA-Factory's "
        "quantization_bit: 4 default) and back. Give the same to stats, merge, infer and export.",
    )


@dataclass(frozen=True)
class Reading:
    """How DATA is read: the prompt a folder of images is asked, the format (`auto`: told by each
    record's fields), and the folder that media paths are relative to (default: the data file's,
    LLaMA-Factory's dataset folder, or InternVL's `root`): LLaVA's --image_folder, LLaMA-Factory's
    media_dir."""

    default_prompt: str = DEFAULT_PROMPT
    format: str = "auto"
    media_dir: Path | None = None

    def check(self) -> None:
        check_types(self)
        _one_of("--format", self.format, DataFormat)
        if self.media_dir is not None and not self.media_dir.is_dir():
            raise InputError(self.media_dir, "--media-dir is not a folder")


@dataclass(frozen=True)
class DataOptions:
    """The options of the commands that read DATA (stats, infer), declared once; those commands'
    settings derive from it and have a `prompt`."""

    data_format: DataFormat = option(
        "auto", "--format", "The data's format: auto (told by each record's fields), or the tool that wrote it."
    )
    media_dir: Path | None = option(
        None,
        "--media-dir",
        "The folder the data's media paths are relative to (LLaVA's --image_folder, LLaMA-Factory's media_dir).",
    )

    template: str | None = option(
        None,
        "--template",
        "Ask as the adapter was trained: base (the base processor's chat template), a training tool's "
        "template (llamafactory:llava, llamafactory:qwen2_vl, swift:llava1_5_hf, swift:qwen2_vl: its chat "
        "template, default system prompt and image sizes) or a chat template file (Jinja). Default: "
        "ms-swift's args.json beside the adapter, else what many recorded in its stats, else base (with a note).",
    )
    system: str | None = option(
        None, "--system", "The system prompt the adapter trained with (default: the template's; '' for none)."
    )
    min_pixels: int | None = option(
        None,
        "--min-pixels",
        "The tool's smallest image, in pixels, as trained (LLaMA-Factory's image_min_pixels, ms-swift's MIN_PIXELS).",
    )
    max_pixels: int | None = option(
        None,
        "--max-pixels",
        "The tool's largest image, in pixels, as trained (LLaMA-Factory's image_max_pixels, ms-swift's MAX_PIXELS).",
    )

    @property
    def reading(self) -> Reading:
        return Reading(self.prompt, self.data_format, self.media_dir)

    @property
    def asking(self) -> Asking:
        return Asking(self.template, self.system, self.min_pixels, self.max_pixels)


@dataclass(frozen=True)
class StatsOptions(DataOptions, LoadsModel, ReadsBase):
    """Every setting of one `many stats` run."""

    BESIDE_THE_MODEL: ClassVar[str] = "the statistics gather"
    DTYPE_NOTE: ClassVar[str] = "; the statistics sum in float32 regardless"

    batch_size: int = option(8, "--batch-size", "Records per forward pass.")
    max_samples: int | None = option(None, "--max-samples", "Use at most this many records.")
    prompt: str = option(DEFAULT_PROMPT, "--prompt", "Prompt for a folder of images.")
    skip_bad: bool = option(
        False, "--skip-bad", "Skip unreadable records (counted in the metadata) instead of stopping."
    )
    padding_side: PaddingSide = option("right", "--padding-side", "The statistics do not depend on it.")
    force: bool = option(False, "--force", "Replace an --out that is not a many stats file.")
    text_only: bool = option(
        False,
        "--text-only",
        "Accept data with no image, video or audio at all for a "
        "multimodal model (its statistics then see no media token).",
    )
    answer_weight: float = option(
        1.0,
        "--answer-weight",
        "Weight in Σ x xᵀ of the positions that decide the answer (the last prompt "
        "position and the answer's tokens); 1 counts every token alike.",
    )
    modules: str | None = option(
        None,
        "--modules",
        "Also record the inputs of the base model's linear layers whose "
        "names match this regular expression (full match, as PEFT's target_modules string), "
        "so that the stats cover modules other tasks' adapters target.",
    )
    under: Path | None = option(
        None,
        "--under",
        "Take the inputs in the merged model of this `many merge` output (its LoRA, this task's "
        "projector) rather than under the task's own adapter: RegMean++'s inputs, which the merged "
        "layers below a layer give it. Merge again with the files so written.",
    )

    def check(self) -> None:
        """Refuse every invalid setting before any work starts."""
        check_types(self)
        self.reading.check()
        self.asking.check()
        if self.modules is not None:
            try:
                re.compile(self.modules)
            except re.error as error:
                raise InputError(None, f"--modules is not a regular expression ({error}): {self.modules!r}") from None
        if self.batch_size < 1:
            raise InputError(None, f"--batch-size must be ≥ 1, got {self.batch_size}")
        if not (self.answer_weight > 0 and math.isfinite(self.answer_weight)):
            raise InputError(None, f"--answer-weight must be a finite number > 0, got {self.answer_weight}")
        if self.max_samples is not None and self.max_samples < 1:
            raise InputError(None, f"--max-samples must be ≥ 1, got {self.max_samples}")
        _one_of("--padding-side", self.padding_side, PaddingSide)
        self.placement  # noqa: B018 (checks --device, --dtype and --device-map, and keeps the result)


@dataclass(frozen=True)
class MergeOptions(ReadsBase):
    """Every setting of one merge."""

    method: Method = option(
        "many", "--method", "many is LPM (the paper's); the others are the baselines it is compared with."
    )
    scale: float = option(1.0, "--scale", "λ: the merged task vector is applied as W + λ τ*.")
    ridge: float = option(DEFAULT_RIDGE, "--ridge", "ρ: H + ρ·mean(diag H)·I; 0 is pure least squares.")
    balance: bool = option(False, "--balance", "Weigh tasks equally, not by calibration tokens.")
    density: float = option(DEFAULT_DENSITY, "--density", "TIES: fraction of each task vector kept.")
    eta: float = option(DEFAULT_ETA, "--eta", "Default routing temperature η stored in the bundle.")
    alpha: float = option(
        1.0,
        "--alpha",
        "RegMean's off-diagonal reduction: H_α = α H + (1−α) diag(H), each "
        "task's A C likewise; 1 is LPM's exact least squares.",
    )
    rank: int | None = option(
        None,
        "--rank",
        "Every merged module of rank exactly R (one uniform r): the best "
        "rank-R approximation in each layer's output space; exact where "
        "Σ r_i ≤ R. Default: rank Σ r_i per module.",
    )
    state_precision: StatePrecision | None = option(
        None,
        "--state-precision",
        "float32 halves the state's disk (H rounded once per merge; "
        "solving stays float64). Default: the resumed state's, else "
        "float64.",
    )
    force: bool = option(False, "--force", "Replace --out if it exists.")
    device: Device = option("cpu", "--device", "Where to factor and solve.")
    experts: bool = option(
        True,
        "--experts/--no-experts",
        "Keep each task's own LoRA under experts/ for `many infer --lm-routing experts`.",
    )
    for_transformers: str | None = option(
        None,
        "--for-transformers",
        "The transformers version the merged adapter is to load with (e.g. 4.46.3): below 4.52 "
        "its modules are named as the base checkpoint names them (LLaVA's language_model.model."
        "layers…), as PEFT needs there; experts/ keep today's names. Default: 4.52 and later.",
    )
    name_as_checkpoint: bool = option(
        False,
        "--checkpoint-names",
        "Name the merged LoRA's modules as the base checkpoint (--model) names its weights: for "
        "OpenGVLab's InternVL-Chat, its own names, InternLM2's q/k/v fused into wqkv again (LMDeploy, "
        "vLLM's InternVL-Chat, InternVL's merge_lora.py); experts/ keep today's names.",
    )
    model: Path | None = option(
        None,
        "--model",
        "The base model folder: what --one-pass runs, and whose checkpoint names the modules under "
        "--checkpoint-names or --for-transformers below 4.52 (checked against the base the stats "
        "files record).",
    )
    one_pass: bool = option(
        False,
        "--one-pass",
        "RegMean++ in one pass: retake every task's statistics in the merged model, one stage of "
        "each decoder layer at a time (the inputs the merged stages below give it, the task's "
        "projector), merging each stage before the next; needs --model and --data for each adapter.",
    )
    walk_memory: float = option(
        4.0,
        "--walk-memory",
        "--one-pass: GiB of hidden states (one layer's input, for every calibration record) kept "
        "on the device; the rest is spilled to disk beside --out.",
    )

    def check(self) -> None:
        """Refuse every invalid setting before any work starts."""
        check_types(self)
        _one_of("--method", self.method, Method)
        if self.for_transformers is not None and not re.fullmatch(r"\d+\.\d+(\.\d+)?", self.for_transformers):
            raise InputError(None, f"--for-transformers takes a version such as 4.46.3, got {self.for_transformers!r}")
        if self.checkpoint_names and self.model is None:
            asked = "--checkpoint-names" if self.name_as_checkpoint else f"--for-transformers {self.for_transformers}"
            raise InputError(
                None, f"{asked} names the modules as the base's checkpoint does: give that base with --model BASE"
            )
        if self.one_pass and self.model is None:
            raise InputError(None, "--one-pass runs the base model: give it with --model BASE")
        if self.model is not None and not (self.checkpoint_names or self.one_pass):
            raise InputError(
                None,
                "--model applies to --one-pass, --checkpoint-names and --for-transformers below 4.52 only; leave it out",
            )
        if not (self.walk_memory >= 0 and math.isfinite(self.walk_memory)):
            raise InputError(None, f"--walk-memory must be a finite number of GiB ≥ 0, got {self.walk_memory}")
        if self.walk_memory != 4.0 and not self.one_pass:
            raise InputError(None, "--walk-memory applies to --one-pass only; leave it out")
        if not (self.ridge >= 0 and math.isfinite(self.ridge)):
            raise InputError(None, f"--ridge must be a finite number ≥ 0, got {self.ridge}")
        if not math.isfinite(self.scale):
            raise InputError(None, f"--scale must be finite, got {self.scale}")
        if not 0 < self.density <= 1:
            raise InputError(None, f"--density must lie in (0, 1], got {self.density}")
        if not (self.eta > 0 and math.isfinite(self.eta)):
            raise InputError(None, f"--eta must be a finite number > 0, got {self.eta}")
        if not 0 <= self.alpha <= 1:
            raise InputError(None, f"--alpha must lie in [0, 1], got {self.alpha}")
        if self.state_precision is not None:
            _one_of("--state-precision", self.state_precision, StatePrecision)
        if self.rank is not None and self.rank < 1:
            raise InputError(None, f"--rank must be ≥ 1, got {self.rank}")
        others = ignored(self.method)
        for field in dataclasses.fields(self):  # another method's setting, given to this one
            if field.name in others and getattr(self, field.name) != field.default:
                applies = ", ".join(f"--method {method}" for method in readers(field.name))
                raise InputError(
                    None,
                    f"{field.metadata['flag']} does not apply to --method {self.method} "
                    f"(it applies to {applies}); leave it out",
                )
        _one_of("--device", self.device, Device)

    @property
    def checkpoint_names(self) -> bool:
        """Whether the merged adapter names its modules as the base checkpoint does: when asked,
        and for a transformers before 4.52, which moved the vision-language models' language model
        (and tower and projector) under `model.`."""
        if self.name_as_checkpoint:
            return True
        if self.for_transformers is None:
            return False
        return tuple(int(part) for part in self.for_transformers.split(".")[:2]) < (4, 52)


@dataclass(frozen=True)
class InferOptions(DataOptions, LoadsModel, ReadsBase):
    """Every setting of one `many infer` run."""

    BESIDE_THE_MODEL: ClassVar[str] = "the routed projector runs"

    eta: float | None = option(None, "--eta", "Routing temperature η (default: the bundle's).")
    routing: Routing = option(
        NEAREST,
        "--routing",
        "nearest: the task of the nearest calibration image; soft: projectors weighted by "
        "softmax(cos(f, prototype) / η), the paper's; hard: the closest prototype's task.",
    )
    max_new_tokens: int = option(32, "--max-new-tokens", "Tokens generated per answer, at most.")
    batch_size: int = option(8, "--batch-size", "Records per generate call.")
    fold: bool = option(
        True, "--fold/--no-fold", "Fold the merged LoRA into the weights (decoding then costs what the base costs)."
    )
    prompt: str = DEFAULT_PROMPT  # the CLI's --prompt also chooses the mode (a text prompt alone)
    lm_routing: LmRouting = option(
        "merged", "--lm-routing", "merged: one merged LoRA; experts: each image's task's own LoRA."
    )
    confidence: float = option(
        DEFAULT_CONFIDENCE,
        "--confidence",
        "experts: below this routing weight, answer with the merged LoRA (soft "
        "routing; nearest and hard routing give one task weight 1).",
    )
    min_accuracy: float | None = option(
        None, "--min-accuracy", "Exit 1 when the average per-task accuracy is below this."
    )

    def check(self) -> None:
        """Refuse every invalid setting before any work starts."""
        check_types(self)
        self.reading.check()
        self.asking.check()
        _one_of("--routing", self.routing, Routing)
        if self.eta is not None and not (self.eta > 0 and math.isfinite(self.eta)):
            raise InputError(None, f"--eta must be a finite number > 0, got {self.eta}")
        _one_of("--lm-routing", self.lm_routing, LmRouting)
        if not 0 <= self.confidence <= 1:
            raise InputError(None, f"--confidence is a routing weight in [0, 1], got {self.confidence}")
        if self.min_accuracy is not None and not 0 <= self.min_accuracy <= 1:
            raise InputError(None, f"--min-accuracy is an accuracy in [0, 1], got {self.min_accuracy}")
        if self.max_new_tokens < 1:
            raise InputError(None, f"--max-new-tokens must be ≥ 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise InputError(None, f"--batch-size must be ≥ 1, got {self.batch_size}")
        if self.eta is not None and self.routing != "soft":
            raise InputError(
                None, f"--eta does not apply to --routing {self.routing} (it applies to --routing soft); leave it out"
            )
        if self.confidence != DEFAULT_CONFIDENCE and self.lm_routing != "experts":
            raise InputError(
                None,
                f"--confidence does not apply to --lm-routing {self.lm_routing} (it applies to "
                f"--lm-routing experts); leave it out",
            )
        self.placement  # noqa: B018 (checks --device, --dtype and --device-map, and keeps the result)


@dataclass(frozen=True)
class ExportOptions(ReadsBase):
    """Every setting of one export."""

    projector: str = option(
        ROUTED,
        "--projector",
        "A task's name (its projector), mean (the tasks' projectors averaged) or routed "
        "(the mean in the weights, and the bundle beside them for many_cli.load_routed).",
    )
    force: bool = option(False, "--force", "Replace --out if it exists.")

    def check(self) -> None:
        """Refuse every invalid setting before any work starts (a task's name is checked against the merge)."""
        check_types(self)
        if not self.projector:
            raise InputError(None, f"--projector is empty: give a task's name, {MEAN} or {ROUTED}")


@dataclass(frozen=True)
class ReportOptions:
    """Every setting of one `many report`: its CI gates."""

    min_final_accuracy: float | None = option(
        None, "--min-final-accuracy", "Exit 1 when the final average accuracy is below this (0 to 1)."
    )
    max_forgetting: float | None = option(
        None,
        "--max-forgetting",
        "Exit 1 when a task's forgetting (best earlier accuracy minus final) is above this (0 to 1).",
    )
    force: bool = option(False, "--force", "Replace an --out that is not an earlier report.")

    def check(self) -> None:
        """Refuse every invalid setting before any work starts."""
        check_types(self)
        for flag, value in (
            ("--min-final-accuracy", self.min_final_accuracy),
            ("--max-forgetting", self.max_forgetting),
        ):
            if value is not None and not 0 <= value <= 1:
                raise InputError(None, f"{flag} is an accuracy in [0, 1], got {value}")
