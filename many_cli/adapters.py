"""Reading PEFT LoRA adapters (lazily, tensor by tensor) and writing the merged adapter."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import tempfile
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import torch

from many_cli.errors import InputError
from many_cli.files import file_fingerprint, read_json, refuse_special_file
from many_cli.layouts import rename_key
from many_cli.tensorfiles import StreamingSafetensorsWriter, StreamWrapper, open_safetensors

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLED_WEIGHTS = "adapter_model.bin"  # never unpickled but by the LLaVA layout's weights_only load
NON_LORA_TRAINABLES = "non_lora_trainables.bin"  # the original LLaVA layout's projector
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, PICKLED_WEIGHTS, NON_LORA_TRAINABLES)
PEFT_PREFIX = "base_model.model."
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>A|B)(?:\.[^.]+)?\.weight$")
_UNSUPPORTED_KEYS = {
    "lora_embedding_": "LoRA on embedding layers",
    "lora_magnitude_vector": "DoRA",
    ".lora_A.bias": "LoRA with lora_bias",
    ".lora_B.bias": "LoRA with lora_bias",
}
BASE_LAYER = ".base_layer.weight"  # PEFT saves a tied output layer's base weight beside its LoRA
FLOAT_CODES = {"F64", "F32", "F16", "BF16"}
SUPPORTED = "many merges PEFT LoRA adapters on linear layers (peft_type LORA, no DoRA, no lora_bias)"


@dataclass(frozen=True)
class LoraModule:
    """One adapted linear layer: τ = scale · B A, A (rank, d_in), B (d_out, rank)."""

    name: str
    rank: int
    scale: float
    d_in: int
    d_out: int


@dataclass(frozen=True)
class Adapter:
    """A PEFT LoRA adapter directory, read header-first; weights load on demand."""

    name: str
    path: Path
    fingerprint: str
    base_model: str | None
    modules: Mapping[str, LoraModule]
    projector_module: str | None  # the module saved whole (modules_to_save), or the parent of several
    projector_shapes: Mapping[str, tuple[int, ...]]  # parameter name inside projector_module -> shape
    saved_modules: tuple[str, ...] = ()
    saved_names: Mapping[str, str] = dataclasses.field(
        default_factory=dict
    )  # module -> its name in the file, where they differ
    base_weights: tuple[str, ...] = ()  # LoRA modules whose base weight PEFT saved too (a tied lm_head)

    @property
    def weights(self) -> Path:
        return self.path / ADAPTER_WEIGHTS

    def lora_factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        saved = self.saved_names.get(module, module)
        with open_safetensors(self.weights) as handle:
            return (
                handle.get(f"{PEFT_PREFIX}{saved}.lora_A.weight"),
                handle.get(f"{PEFT_PREFIX}{saved}.lora_B.weight"),
            )

    @property
    def saved_parameters(self) -> list[tuple[str, str]]:
        """(module, parameter) of every tensor saved whole (modules_to_save)."""
        pairs = []
        for relative in self.projector_shapes:
            key = f"{self.projector_module}.{relative}" if self.projector_module else relative
            module = max((m for m in self.saved_modules if key.startswith(f"{m}.")), key=len)
            pairs.append((module, key[len(module) + 1 :]))
        return pairs

    def projector_tensor(self, parameter: str) -> torch.Tensor:
        key = rename_key(
            f"{self.projector_module}.{parameter}" if self.projector_module else parameter, self.saved_names
        )
        with open_safetensors(self.weights) as handle:
            return handle.get(f"{PEFT_PREFIX}{key}")


def find_adapter_dirs(paths: list[Path]) -> list[Path]:
    """Adapter directories in task order: as given, or, for one folder that holds adapters,
    its adapter subdirectories in name order. A model folder (config.json) is one adapter in its
    maker's layout (InternVL's whole-model LoRA), converted or refused when it is read."""

    def is_adapter(path: Path) -> bool:
        return (path / ADAPTER_CONFIG).is_file() or (path / "config.json").is_file()

    if len(paths) == 1 and paths[0].is_dir() and not is_adapter(paths[0]):
        found = sorted(child for child in paths[0].iterdir() if child.is_dir() and is_adapter(child))
        if not found:
            raise InputError(paths[0], f"holds no adapter directory (none has {ADAPTER_CONFIG} or config.json)")
        return found
    for path in paths:
        if not path.is_dir():
            raise InputError(path, "adapter directory not found")
    return paths


def read_adapter(path: Path, renames: Mapping[str, str] | None = None) -> Adapter:
    """The adapter at `path`, its modules named as `renames` maps the names it was saved under
    (an older transformers layout, as `many stats` found them on the base model)."""
    renames = renames or {}
    config = check_supported_config(path)
    weights = path / ADAPTER_WEIGHTS
    refuse_special_file(weights)
    if not weights.is_file():
        pickled = path / PICKLED_WEIGHTS
        hint = " (adapter_model.bin is not read: re-save with safe_serialization=True)" if pickled.exists() else ""
        raise InputError(weights, f"file not found{hint}")

    saved = [name for name in config.get("modules_to_save") or []]
    factors: dict[str, dict[str, tuple[int, ...]]] = {}
    saved_shapes: dict[tuple[str, str], tuple[int, ...]] = {}  # (module, parameter) -> shape
    base_weights: list[str] = []
    with open_safetensors(weights) as handle:
        for key in handle.keys():
            for marker, what in _UNSUPPORTED_KEYS.items():
                if marker in key:
                    raise InputError(weights, f"holds {key!r}: {what} is not supported; {SUPPORTED}")
            if handle.dtype(key) not in FLOAT_CODES:
                raise InputError(weights, f"tensor {key!r} is {handle.dtype(key)}, not floating point")
            name = key.removeprefix(PEFT_PREFIX)
            match = LORA_KEY.match(name)
            if match:
                factors.setdefault(match["module"], {})[match["part"]] = handle.shape(key)
                continue
            if name.endswith(BASE_LAYER):
                base_weights.append(name.removesuffix(BASE_LAYER))
                continue
            split = _split_saved_module(name, saved)
            if split is None and _is_vocabulary_layer(name):
                raise InputError(
                    weights,
                    f"holds the whole layer {key!r}, as PEFT's save_embedding_layers saves an input or "
                    f"output embedding after the vocabulary was resized: the adapter needs that resized "
                    f"vocabulary, which the base does not have; many merges LoRA and modules_to_save "
                    f"only (train the layer under modules_to_save, or merge onto the resized base)",
                )
            if split is None:
                raise InputError(weights, f"unexpected tensor {key!r}: neither a LoRA factor nor under modules_to_save")
            saved_shapes[split] = handle.shape(key)

    modules = {}
    for module, shapes in sorted(factors.items()):
        if set(shapes) != {"A", "B"}:
            raise InputError(weights, f"module {module} has lora_A or lora_B but not both")
        lora = _lora_module(weights, config, module, shapes["A"], shapes["B"])
        modules[renames.get(module, module)] = dataclasses.replace(lora, name=renames.get(module, module))
    if not modules:
        raise InputError(weights, "holds no LoRA weights")
    for module in base_weights:
        if renames.get(module, module) not in modules:
            raise InputError(
                weights,
                f"unexpected tensor {PEFT_PREFIX}{module}{BASE_LAYER}: the base weight of a "
                f"module the adapter does not adapt",
            )
    saved_modules = tuple(sorted({renames.get(module, module) for module, _ in saved_shapes}))
    projector_module = _common_parent(saved_modules) if saved_modules else None
    projector_shapes = {
        rename_key(f"{module}.{parameter}", renames).removeprefix(f"{projector_module}."): shape
        for (module, parameter), shape in saved_shapes.items()
    }
    saved_names = {loaded: saved for saved, loaded in renames.items() if loaded != saved}
    return Adapter(
        path.name,
        path,
        adapter_fingerprint(path),
        config.get("base_model_name_or_path"),
        modules,
        projector_module,
        projector_shapes,
        saved_modules,
        saved_names,
        tuple(sorted(renames.get(module, module) for module in base_weights)),
    )


def loading_config(adapter: Adapter, renames: Mapping[str, str]):
    """The adapter's LoRA config for loading onto a model where `renames` gives each saved module's
    name: exactly the modules its weights adapt and save, by their full names there, each with the
    rank and alpha its own config declares (a target list of short, full or older names, or a
    regex, all come out the same): a peft LoraConfig."""
    from peft import LoraConfig

    saved = read_json(adapter.path / ADAPTER_CONFIG)
    rank, alpha = saved.get("r", PEFT_DEFAULT_RANK), saved.get("lora_alpha", PEFT_DEFAULT_ALPHA)
    ranks, alphas = {}, {}
    for module in adapter.modules.values():
        name = f"^{re.escape(renames[module.name])}"  # PEFT matches pattern keys anchored so, this module alone
        ranks[name] = module.rank
        alphas[name] = declared_rank_and_alpha(saved, module.name)[1]
    fields = {field.name for field in dataclasses.fields(LoraConfig)}
    config = LoraConfig(
        **{key: value for key, value in saved.items() if key in fields}
        | {
            "target_modules": sorted(renames[module] for module in adapter.modules),
            "modules_to_save": sorted(renames[module] for module in adapter.saved_modules) or None,
            "rank_pattern": {key: value for key, value in ranks.items() if value != rank},
            "alpha_pattern": {key: value for key, value in alphas.items() if value != alpha},
            "exclude_modules": None,
            "layers_to_transform": None,
            "layers_pattern": None,
            "inference_mode": True,
        }
    )
    return config


# The config fields that change what an adapter's weights do (the modules they adapt and save
# come from the weights themselves).
_SCALING_FIELDS = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern")


def adapter_fingerprint(path: Path) -> str:
    """sha256 over the adapter's weights and the config fields that scale them, so that a stats
    file goes stale when either changes."""
    config = read_json(path / ADAPTER_CONFIG)
    scaling = json.dumps({key: config.get(key) for key in _SCALING_FIELDS}, sort_keys=True)
    return hashlib.sha256(f"{file_fingerprint(path / ADAPTER_WEIGHTS)} {scaling}".encode()).hexdigest()[:16]


def other_base_note(adapter: Adapter, base: str) -> str | None:
    """A note when the adapter's config names another base model than `base`. Only a note: the
    same model sits at other paths on other machines (a hub id, a cache snapshot), and the stats
    file's base fingerprint is what merges check."""
    named = adapter.base_model
    if (
        not named
        or Path(named).name == Path(base).name
        or (Path(named).exists() and Path(base).exists() and Path(named).resolve() == Path(base).resolve())
    ):
        return None
    return (
        f"{adapter.path}: its adapter_config.json names the base model {named!r}; statistics are taken on "
        f"{base!r}: make sure it is the model the adapter was trained on"
    )


def _common_parent(modules: tuple[str, ...]) -> str:
    """The one module, or the deepest module holding all of them."""
    if len(modules) == 1:
        return modules[0]
    parts = [module.split(".") for module in modules]
    common = [part[0] for part in zip(*parts) if len(set(part)) == 1]
    return ".".join(parts[0][: len(common)])


# PEFT's LoraConfig defaults, for a config that leaves a field out: read as PEFT reads it.
PEFT_DEFAULT_RANK = 8
PEFT_DEFAULT_ALPHA = 8

# Initialisations that change the base as well as the adapter (PiSSA, CorDA, OLoRA and LoRA-GA
# move the adapter's initial product out of the base weights; LoftQ quantises them): saved
# unconverted, the adapter belongs to that changed base, not to the one given.
_RESIDUAL_BASE_INITS = re.compile(r"(pissa|corda)(_niter_\d+)?|olora|loftq|lora_ga", re.IGNORECASE)


def check_supported_config(path: Path) -> dict:
    """The adapter's config, if it is of a kind many can merge (else an InputError naming it)."""
    config_path = path / ADAPTER_CONFIG
    config = read_json(config_path)
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise InputError(config_path, f"peft_type {peft_type!r} is not supported; {SUPPORTED}")
    _check_scaling_fields(config_path, config)
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and _RESIDUAL_BASE_INITS.fullmatch(init):
        raise InputError(
            config_path,
            f"init_lora_weights {init!r} trains the adapter on a changed base, and it was saved "
            f"unconverted; save it as a plain LoRA of the original base with PEFT's "
            f"model.save_pretrained(OUT, path_initial_model_for_weight_conversion=INITIAL_ADAPTER) "
            f"(LoftQ: merge onto the quantised base it was trained on, which many does not)",
        )
    for flag, what in [
        ("use_dora", "DoRA"),
        ("lora_bias", "lora_bias"),
        ("fan_in_fan_out", "fan_in_fan_out (Conv1D layers)"),
        ("target_parameters", "LoRA on parameters (target_parameters)"),
        ("layer_replication", "layer_replication"),
    ]:
        if config.get(flag):
            raise InputError(config_path, f"{what} is not supported; {SUPPORTED}")
    return config


def _check_scaling_fields(config_path: Path, config: dict) -> None:
    """The fields that scale the weights must have PEFT's types, so that many reads them as PEFT does."""

    def number(value: object, positive_integer: bool = False) -> bool:
        if isinstance(value, bool) or not isinstance(value, int if positive_integer else (int, float)):
            return False
        return value > 0 if positive_integer else math.isfinite(value)

    for field, default, integer in (("r", PEFT_DEFAULT_RANK, True), ("lora_alpha", PEFT_DEFAULT_ALPHA, False)):
        value = config.get(field, default)
        if not number(value, integer):
            kind = "a positive integer" if integer else "a number"
            raise InputError(config_path, f"{field} is {value!r}: PEFT expects {kind}")
    if not isinstance(config.get("use_rslora", False), bool):
        raise InputError(config_path, f"use_rslora is {config['use_rslora']!r}: PEFT expects true or false")
    for field, integer in (("rank_pattern", True), ("alpha_pattern", False)):
        pattern = config.get(field) or {}
        if not isinstance(pattern, dict):
            raise InputError(config_path, f"{field} is {pattern!r}: PEFT expects an object of module patterns")
        for key, value in pattern.items():
            try:
                re.compile(key)
            except re.error as error:
                raise InputError(config_path, f"{field} key {key!r} is not a regular expression ({error})") from None
            if not number(value, integer):
                raise InputError(
                    config_path,
                    f"{field} gives {key!r} {value!r}: PEFT expects a {'positive integer' if integer else 'number'}",
                )


def _is_vocabulary_layer(name: str) -> bool:
    """An input or output embedding's weight, as transformers names them across families."""
    return re.search(r"(^|\.)(embed_tokens|lm_head|wte|word_embeddings|embed_out|output)\.weight$", name) is not None


def _split_saved_module(name: str, saved: list[str]) -> tuple[str, str] | None:
    """('model.multi_modal_projector', 'linear_1.weight') from a modules_to_save key."""
    padded = "." + name
    for target in saved:
        start = padded.find(f".{target}.")
        if start >= 0:
            end = start + len(target)
            return name[:end], name[end + 1 :]
    return None


def _lora_module(
    weights: Path, config: dict, module: str, a_shape: tuple[int, ...], b_shape: tuple[int, ...]
) -> LoraModule:
    rank = a_shape[0]
    if len(a_shape) != 2 or len(b_shape) != 2 or b_shape[1] != rank:
        raise InputError(
            weights, f"module {module}: lora_A {a_shape} and lora_B {b_shape} are not the factors of one linear layer"
        )
    declared, alpha = declared_rank_and_alpha(config, module)
    if declared != rank:
        raise InputError(weights, f"module {module}: the config declares rank {declared}, the weights have rank {rank}")
    scale = alpha / rank**0.5 if config.get("use_rslora") else alpha / rank
    return LoraModule(module, rank, float(scale), a_shape[1], b_shape[0])


def declared_rank_and_alpha(config: dict, module: str) -> tuple[int, float]:
    """The rank and lora_alpha an adapter's config gives `module` (its rank_pattern and
    alpha_pattern matched as PEFT matches them), with PEFT's defaults where it gives none."""
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    declared = rank_pattern.get(pattern_key(rank_pattern, module), config.get("r", PEFT_DEFAULT_RANK))
    alpha = alpha_pattern.get(pattern_key(alpha_pattern, module), config.get("lora_alpha", PEFT_DEFAULT_ALPHA))
    return declared, alpha


def pattern_key(pattern_keys: Iterable[str], module: str) -> str:
    """The first key of a rank_pattern or alpha_pattern that matches `module`, as PEFT matches
    them (`peft.utils.other.get_pattern_key`): the key is a regular expression that must match the
    module's full name, or a dot-separated tail of it; `module` itself when none does. Here
    so that `merge` reads adapters without importing PEFT (and transformers with it)."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return module


def _pattern_key(module: str, older_peft: bool) -> str:
    r"""The rank_pattern key that matches `module` alone, never one whose name ends like it
    (`model.layers.0.mlp` vs `vision.model.layers.0.mlp`). PEFT matches a key K against each
    module's full name as `(.*\.)?(K)$`, first key first, so an anchor does it; the PEFT of the
    stacks before transformers 4.52 matches `.*\.K$`, which needs a dot before K: the name's
    first part then goes into a look-behind that both forms accept."""
    if not older_peft:
        return f"^{re.escape(module)}"
    first, dot, rest = module.partition(".")
    if not dot:
        raise InputError(
            None,
            f"module {module} needs a rank of its own, which PEFT 0.13 cannot give a "
            f"top-level module: --rank R gives every module one rank",
        )
    return rf"(?<=^{re.escape(first)}\.){re.escape(rest)}"


@dataclass(frozen=True)
class MergedModule:
    """One module of a merged adapter: its LoRA factors are A (rank, d_in) and B (d_out, rank)."""

    name: str
    rank: int
    d_in: int
    d_out: int


class MergedAdapterWriter(StreamWrapper):
    """Writes a merged LoRA as a standard PEFT adapter with scale 1 everywhere (lora_alpha = r,
    per-module ranks through rank_pattern and alpha_pattern), streaming the factors to disk
    module by module, in the order declared, so that they never all sit in memory. `names` maps
    a module's name in the model to the name the adapter is to give it (an older layout).
    `fused` maps a module to (the module a checkpoint fuses it into, its rows there): the parts'
    LoRAs are written as one LoRA on the fused module, A stacked and B placed by rows (rank the
    sum of theirs), which updates the fused weight exactly as the parts update theirs."""

    def __init__(
        self,
        out_dir: Path,
        modules: list[MergedModule],
        base_model: str | None,
        names: Mapping[str, str] | None = None,
        fused: Mapping[str, tuple[str, torch.Tensor]] | None = None,
    ):
        self._fused = {module.name: fused[module.name] for module in modules if module.name in (fused or {})}
        if names is not None:
            unnamed = [module.name for module in modules if module.name not in names and module.name not in self._fused]
            if unnamed:
                raise InputError(
                    base_model,
                    f"its checkpoint holds no weight of {unnamed[0]}: the merged adapter cannot be "
                    f"named as the checkpoint names its modules (leave out --for-transformers and --checkpoint-names)",
                )
        self._names = dict(names) if names is not None else {module.name: module.name for module in modules}
        self._parts: dict[str, list[MergedModule]] = {}  # fused module -> its parts, in write order
        for module in modules:
            if module.name in self._fused:
                self._parts.setdefault(self._fused[module.name][0], []).append(module)
        self._rows = {  # the fused weight's rows: every part's rows, merged or not
            target: sum(len(rows) for other, (group, rows) in (fused or {}).items() if group == target)
            for target in self._parts
        }
        self._pending: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        shapes = {}  # output module -> (rank, d_in, d_out), a fused one declared where its last part is written
        for module in modules:
            if module.name not in self._fused:
                shapes[self._names[module.name]] = (module.rank, module.d_in, module.d_out)
            elif module is self._parts[self._fused[module.name][0]][-1]:
                target = self._fused[module.name][0]
                shapes[target] = (sum(part.rank for part in self._parts[target]), module.d_in, self._rows[target])
        ranks = {name: rank for name, (rank, _, _) in shapes.items()}
        common = Counter(ranks.values()).most_common(1)[0][0]
        pattern = {_pattern_key(name, names is not None): rank for name, rank in ranks.items() if rank != common}
        config = {
            "peft_type": "LORA",
            "task_type": None,
            "base_model_name_or_path": base_model,
            "r": common,
            "lora_alpha": common,
            "target_modules": sorted(ranks),
            "lora_dropout": 0.0,
            "bias": "none",
            "use_rslora": False,
            "use_dora": False,
            "fan_in_fan_out": False,
            "modules_to_save": None,
            "init_lora_weights": True,
            "inference_mode": True,
        }
        if pattern:  # one uniform rank: no pattern keys at all (vLLM and others read `r` alone)
            config |= {"rank_pattern": pattern, "alpha_pattern": dict(pattern)}
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        layout = []
        for name, (rank, d_in, d_out) in shapes.items():
            layout.append((f"{PEFT_PREFIX}{name}.lora_A.weight", torch.float32, (rank, d_in)))
            layout.append((f"{PEFT_PREFIX}{name}.lora_B.weight", torch.float32, (d_out, rank)))
        self._writer = StreamingSafetensorsWriter(out_dir / ADAPTER_WEIGHTS, layout, {"format": "pt"})

    def write(self, module: str, a: torch.Tensor, b: torch.Tensor) -> None:
        if module in self._fused:
            target = self._fused[module][0]
            self._pending.setdefault(target, {})[module] = (a, b)
            if len(self._pending[target]) < len(self._parts[target]):
                return
            parts = self._pending.pop(target)
            a = torch.cat([parts[part.name][0].to(torch.float32) for part in self._parts[target]])
            b = torch.zeros(self._rows[target], a.shape[0])
            column = 0
            for part in self._parts[target]:
                factor = parts[part.name][1]
                b[self._fused[part.name][1], column : column + factor.shape[1]] = factor.to(torch.float32)
                column += factor.shape[1]
            name = target
        else:
            name = self._names[module]
        self._writer.write(f"{PEFT_PREFIX}{name}.lora_A.weight", a.to(torch.float32))
        self._writer.write(f"{PEFT_PREFIX}{name}.lora_B.weight", b.to(torch.float32))


@contextmanager
def converted_copy(path: Path, write: Callable[[Path, Path], None]) -> Iterator[Path]:
    """A temporary PEFT copy of the adapter `path`, of the same name, that `write(path, copy)`
    converts; an error about the copy names `path`, the user's folder."""
    with tempfile.TemporaryDirectory(prefix="many-layout-") as scratch:
        converted = Path(scratch) / path.name
        write(path, converted)
        try:
            yield converted
        except InputError as error:
            raise InputError(
                str(error.path).replace(str(converted), str(path)) if error.path else None,
                error.fault.replace(str(converted), str(path)),
            ) from None
