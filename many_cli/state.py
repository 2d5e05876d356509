"""The three files `many` writes besides the PEFT adapter, and their layouts.

Only this module builds or parses these key names; everything else reads and writes through
the typed headers and writers below.

Stats file (`many_stats.safetensors`, one per adapter, written by `many stats`):
  covariance/<input>   1-D, the upper triangle of Σ x xᵀ packed row by row (float32 or float64)
  prototype            1-D float32, the mean of L2-normalised pooled projector inputs (if images)
  exemplars            (images, width) float32, each image's L2-normalised pooled projector input
  metadata             format, format_version, adapter_fingerprint, base_fingerprint, token_rule,
                       images, tokens, inputs = JSON {input: {"modules": [...], "dim": d, "tokens": n}}
  An <input> is named after the first module (in name order) that reads it.

Bundle (`many_bundle.safetensors`, in a merge output):
  projector/<i>/<param>, prototype/<i>, exemplars/<i> for task i (0-based, merge order); <param> is named
                       inside projector_module: the module the adapters saved whole, or the
                       parent of several (Qwen3-VL's merger with its DeepStack mergers)
  metadata             format, format_version, tasks = JSON [names], projector_module, eta,
                       base_fingerprint (the base the merge was built on; "" when unknown),
                       parts = JSON {file: fingerprint} of the merged LoRA and the experts beside it
                       (relative paths), so a reader knows the merge's files belong together

State (`many_state.safetensors`, in a merge output; the sufficient statistics of a merge):
  gram/<group>         1-D, packed upper triangle of H = Σ_i w_i C_i (no ridge)
  ac/<i>/<module>      (r_i, d_in): w_i · A_i C_i
  ad/<i>/<module>      (r_i, d_in): w_i · A_i diag(C_i), for RegMean's α
  b/<i>/<module>       (d_out, r_i): s_i · B_i
  all float64, or all float32 under `merge --state-precision float32`
  metadata             format, format_version, base_fingerprint, balance, tasks, groups
  with w_i = 1 (token-weighted least squares) or 1 / tokens_i under --balance.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

import torch
from torch.nn.utils.rnn import pad_sequence

from many_cli.errors import InputError
from many_cli.files import atomic_output_file, file_fingerprint
from many_cli.tensorfiles import StreamingSafetensorsWriter, StreamWrapper, open_safetensors, save_tensors

STATS_FILE = "many_stats.safetensors"
BUNDLE_FILE = "many_bundle.safetensors"
EXPERTS_DIR = "experts"  # in a merge output: one PEFT LoRA adapter (scale 1) per task, by name
STATE_FILE = "many_state.safetensors"
FORMAT_VERSION = "1"
BLOCK = 512  # rows per block when packed triangles are streamed


def packed_length(dim: int) -> int:
    return dim * (dim + 1) // 2


def dim_of_packed(length: int) -> int:
    dim = (math.isqrt(8 * length + 1) - 1) // 2
    if packed_length(dim) != length:
        raise ValueError(f"{length} is not the length of a packed triangle")
    return dim


def upper_blocks(matrix: torch.Tensor, block: int = BLOCK):
    """The upper triangle of a square matrix in the packed layout, a block of rows at a time."""
    dim = matrix.shape[0]
    for start in range(0, dim, block):
        yield torch.cat([matrix[row, row:] for row in range(start, min(start + block, dim))])


def pack_symmetric(matrix: torch.Tensor) -> torch.Tensor:
    """The upper triangle of a symmetric matrix, row by row: no information is lost."""
    return torch.cat(list(upper_blocks(matrix)))


def _blocks(dim: int, take, block: int):
    """(start, rows) over a packed triangle whose entries offset..stop come from take(offset, stop):
    rows is the dense (b, dim - start) block of rows start..start+b-1 from column `start` on,
    each packed row right-aligned, zeros before its diagonal."""
    offset = 0
    for start in range(0, dim, block):
        lengths = [dim - row for row in range(start, min(start + block, dim))]
        flat = take(offset, offset + sum(lengths))
        yield start, pad_sequence(list(flat.split(lengths)), batch_first=True, padding_side="left")
        offset += sum(lengths)


def packed_blocks(packed: torch.Tensor, block: int = BLOCK):
    """`_blocks` of a packed triangle in memory."""
    return _blocks(dim_of_packed(packed.numel()), lambda start, stop: packed[start:stop], block)


def read_packed_blocks(path: Path, key: str, block: int = BLOCK, check_finite: bool = True):
    """`_blocks` of one packed tensor of a safetensors file, read slice by slice, so the whole
    triangle is never in memory; with `check_finite`, NaN or Inf is an InputError naming the file."""
    with open_safetensors(path) as handle:

        def take(start: int, stop: int) -> torch.Tensor:
            flat = handle.slice(key, start, stop)
            if check_finite and not bool(torch.isfinite(flat).all()):
                raise InputError(path, f"{key} holds NaN or Inf; re-create the file")
            return flat

        yield from _blocks(dim_of_packed(handle.shape(key)[0]), take, block)


def unpack_symmetric(packed: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The full symmetric matrix from `pack_symmetric`'s output, in `dtype`."""
    dim = dim_of_packed(packed.numel())
    out = torch.zeros(dim, dim, dtype=dtype)
    for start, rows in packed_blocks(packed):
        out[start : start + rows.shape[0], start:] = rows
    return out + out.triu(1).T


def _check_format(path: Path, metadata: Mapping[str, str], expected: str) -> None:
    if metadata.get("format") != expected:
        raise InputError(path, f"not a {expected} file (format is {metadata.get('format')!r})")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise InputError(
            path,
            f"{expected} format version {metadata.get('format_version')!r} "
            f"is not supported (expected {FORMAT_VERSION}); re-create it",
        )


def _json_field(path: Path, metadata: Mapping[str, str], field: str):
    try:
        return json.loads(metadata[field])
    except (KeyError, json.JSONDecodeError):
        raise InputError(path, f"metadata field {field!r} is missing or not JSON") from None


# ---------------------------------------------------------------- stats file


@dataclass(frozen=True)
class InputStats:
    key: str
    modules: tuple[str, ...]
    dim: int
    tokens: int


@dataclass(frozen=True)
class StatsHeader:
    """What a stats file says about itself; covariances are read lazily, one at a time."""

    path: Path
    adapter_fingerprint: str
    base_fingerprint: str
    images: int
    inputs: Mapping[str, InputStats]
    has_prototype: bool
    answer_weight: float = 1.0  # the weight of the positions that decide the answer
    module_names: Mapping[str, str] = field(default_factory=dict)  # saved name -> name on the base, where they differ
    split_qkv: tuple[int, int] | None = None  # (heads, kv heads): the adapter's InternLM2 wqkv LoRA was split
    asked_as: Mapping[str, object] = field(default_factory=dict)  # the prompting's record; {}: older files
    records: int = 0  # the calibration records counted, and those skipped (--skip-bad)
    skipped: int = 0
    modules_pattern: str | None = None  # --modules

    def input_of(self, module: str) -> InputStats | None:
        for stats in self.inputs.values():
            if module in stats.modules:
                return stats
        return None

    def covariance_blocks(self, key: str, check_finite: bool = True):
        """The packed covariance of one input, as `packed_blocks`, read from the file lazily."""
        return read_packed_blocks(self.path, _covariance_key(key), check_finite=check_finite)

    def packed(self, key: str) -> torch.Tensor:
        """The packed covariance of one input, as stored."""
        with open_safetensors(self.path) as handle:
            return handle.get(_covariance_key(key))

    def covariance(self, key: str) -> torch.Tensor:
        """The whole covariance of one input, symmetric, float64 (for references and tests)."""
        with open_safetensors(self.path) as handle:
            return unpack_symmetric(handle.get(_covariance_key(key)))

    def prototype(self) -> torch.Tensor | None:
        if not self.has_prototype:
            return None
        with open_safetensors(self.path) as handle:
            return handle.get("prototype")

    def exemplars(self) -> torch.Tensor | None:
        """Each calibration image's pooled direction; None where the file has no prototype."""
        with open_safetensors(self.path) as handle:
            return handle.get("exemplars") if "exemplars" in handle.keys() else None


@contextmanager
def _metadata_of(path: Path) -> Iterator:
    """Open a `many` file; metadata that is there but malformed is an InputError naming the file."""
    with open_safetensors(path) as handle:
        try:
            yield handle
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise InputError(
                path, f"its metadata is malformed ({type(error).__name__}: {error}); re-create the file"
            ) from None


def read_stats_header(path: Path) -> StatsHeader:
    with _metadata_of(path) as handle:
        metadata = handle.metadata()
        _check_format(path, metadata, "many-stats")
        inputs = {}
        for key, entry in _json_field(path, metadata, "inputs").items():
            name = _covariance_key(key)
            if name not in handle.keys():
                raise InputError(path, f"tensor {name!r} is missing")
            dim = int(entry["dim"])
            if handle.shape(name) != (packed_length(dim),):
                raise InputError(
                    path,
                    f"tensor {name!r} has shape {handle.shape(name)}, "
                    f"expected the packed triangle of a {dim}×{dim} matrix",
                )
            inputs[key] = InputStats(key, tuple(entry["modules"]), dim, int(entry["tokens"]))
        if ("prototype" in handle.keys()) != ("exemplars" in handle.keys()):
            raise InputError(
                path,
                "holds a prototype without its calibration images' directions (exemplars), or "
                "those without a prototype: not a stats file of this many; run `many stats` again",
            )
        return StatsHeader(
            path=path,
            adapter_fingerprint=metadata.get("adapter_fingerprint", ""),
            base_fingerprint=metadata.get("base_fingerprint", ""),
            images=int(metadata.get("images", "0")),
            inputs=inputs,
            has_prototype="prototype" in handle.keys(),
            answer_weight=float(metadata.get("answer_weight", "1.0")),
            module_names=_string_map(path, metadata, "module_names"),
            split_qkv=_head_layout(path, metadata),
            asked_as=_json_object(path, metadata, "asked_as"),
            records=int(metadata.get("records", "0")),
            skipped=int(metadata.get("skipped", "0")),
            modules_pattern=metadata.get("modules_pattern"),
        )


def _head_layout(path: Path, metadata: Mapping[str, str]) -> tuple[int, int] | None:
    if "split_qkv" not in metadata:
        return None
    heads, kv_heads = (int(count) for count in json.loads(metadata["split_qkv"]))
    if heads < 1 or kv_heads < 1 or heads % kv_heads:
        raise InputError(path, f"its split_qkv {metadata['split_qkv']} is no (heads, key-value heads) layout")
    return heads, kv_heads


def _json_object(path: Path, metadata: Mapping[str, str], field_name: str) -> dict:
    """An optional metadata field holding a JSON object ({} when absent)."""
    value = _json_field(path, metadata, field_name) if field_name in metadata else {}
    if not isinstance(value, dict):
        raise InputError(path, f"metadata field {field_name!r} is not a JSON object")
    return value


def _string_map(path: Path, metadata: Mapping[str, str], field_name: str) -> dict[str, str]:
    """An optional metadata field holding a JSON object of strings."""
    if field_name not in metadata:
        return {}
    value = _json_field(path, metadata, field_name)
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in [*value, *value.values()]):
        raise InputError(path, f"metadata field {field_name!r} is not a JSON object of names")
    return value


def is_stats_file(path: Path) -> bool:
    """Whether `path` is a readable `many stats` file (which `many stats --out` may replace)."""
    try:
        with open_safetensors(path) as handle:
            return handle.metadata().get("format") == "many-stats"
    except InputError:
        return False


def _covariance_key(input_key: str) -> str:
    return f"covariance/{input_key}"


class StatsWriter(StreamWrapper):
    """Streams a stats file: each input's packed covariance in key order, then the prototype,
    so that a 7B model's covariances never sit in memory together.

    `dims[input]` is its width, `tokens[input]` the rows it counted, `modules[input]` the modules
    that read it; `extra` adds metadata (`many stats` sets the header's text `tokens` there)."""

    def __init__(
        self,
        path: Path,
        *,
        dims: Mapping[str, int],
        tokens: Mapping[str, int],
        modules: Mapping[str, list[str]],
        images: int,
        adapter_fingerprint: str,
        base_fingerprint: str,
        token_rule: str,
        prototype_width: int | None,
        dtype: torch.dtype = torch.float32,
        extra: Mapping[str, str] | None = None,
        exemplars: int = 0,
    ):
        self.keys = sorted(dims)  # the order covariances must be written in
        layout = [(_covariance_key(key), dtype, (packed_length(dims[key]),)) for key in self.keys]
        if prototype_width is not None:
            layout.append(("prototype", torch.float32, (prototype_width,)))
            if exemplars:
                layout.append(("exemplars", torch.float32, (exemplars, prototype_width)))
        inputs = {
            key: {"modules": sorted(modules[key]), "dim": int(dims[key]), "tokens": int(tokens[key])} for key in dims
        }
        metadata = {
            "format": "many-stats",
            "format_version": FORMAT_VERSION,
            "adapter_fingerprint": adapter_fingerprint,
            "base_fingerprint": base_fingerprint,
            "token_rule": token_rule,
            "images": str(images),
            "tokens": str(max(tokens.values(), default=0)),
            "inputs": json.dumps(inputs),
            **(extra or {}),
        }
        self._writer = StreamingSafetensorsWriter(path, layout, metadata)

    def covariance(self, key: str, packed: torch.Tensor) -> None:
        self._writer.write(_covariance_key(key), packed.contiguous())

    def prototype(self, prototype: torch.Tensor) -> None:
        self._writer.write("prototype", prototype.to(torch.float32).contiguous())

    def exemplars(self, exemplars: torch.Tensor) -> None:
        self._writer.write("exemplars", exemplars.to(torch.float32).contiguous())


def write_stats(
    path: Path,
    *,
    covariances: Mapping[str, torch.Tensor],
    tokens: Mapping[str, int],
    modules: Mapping[str, list[str]],
    prototype: torch.Tensor | None,
    images: int,
    adapter_fingerprint: str,
    base_fingerprint: str,
    token_rule: str,
    extra: Mapping[str, str] | None = None,
    exemplars: torch.Tensor | None = None,
) -> None:
    """Write a stats file all or nothing. `covariances[input]` is packed (`pack_symmetric`), all
    of one dtype; `modules[input]` lists the modules that read that input; `exemplars` (with a
    prototype) holds each image's pooled direction."""
    dtype = next(iter(covariances.values())).dtype if covariances else torch.float32
    with (
        atomic_output_file(path) as partial,
        StatsWriter(
            partial,
            dims={key: dim_of_packed(packed.numel()) for key, packed in covariances.items()},
            tokens=tokens,
            modules=modules,
            images=images,
            adapter_fingerprint=adapter_fingerprint,
            base_fingerprint=base_fingerprint,
            token_rule=token_rule,
            dtype=dtype,
            prototype_width=None if prototype is None else prototype.numel(),
            extra=extra,
            exemplars=0 if prototype is None or exemplars is None else exemplars.shape[0],
        ) as writer,
    ):
        for key in writer.keys:
            writer.covariance(key, covariances[key])
        if prototype is not None:
            writer.prototype(prototype)
            if exemplars is not None:
                writer.exemplars(exemplars)


# ---------------------------------------------------------------- bundle


def _projector_key(index: int, parameter: str) -> str:
    return f"projector/{index}/{parameter}"


def _prototype_key(index: int) -> str:
    return f"prototype/{index}"


def _exemplars_key(index: int) -> str:
    return f"exemplars/{index}"


@dataclass(frozen=True)
class BundleHeader:
    path: Path
    tasks: tuple[str, ...]
    projector_module: str | None
    eta: float
    shapes: Mapping[str, tuple[int, ...]]
    base_fingerprint: str = ""
    parts: Mapping[str, str] = field(default_factory=dict)  # empty in bundles older than the record
    asked_as: tuple[Mapping[str, object], ...] = ()  # each task's prompting record ({}: unknown)

    def projector_shapes(self, index: int) -> dict[str, tuple[int, ...]]:
        """Task `index`'s projector: parameter name -> shape."""
        prefix = _projector_key(index, "")
        return {key[len(prefix) :]: shape for key, shape in self.shapes.items() if key.startswith(prefix)}

    def projector(self, index: int) -> dict[str, torch.Tensor]:
        """Task `index`'s projector weights, by parameter name (a state dict)."""
        with open_safetensors(self.path) as handle:
            return {name: handle.get(_projector_key(index, name)) for name in self.projector_shapes(index)}

    def module_state(self, index: int, path: str) -> dict[str, torch.Tensor]:
        """Task `index`'s weights for the module whose name ends with `path` (the projector or a
        companion), by parameter name inside it; empty if the task holds none for it."""
        marker = f".{path}."
        inside = {}
        for name in self.projector_shapes(index):
            full = f".{self.projector_module}.{name}"
            if marker in full:
                inside[full[full.index(marker) + len(marker) :]] = name
        with open_safetensors(self.path) as handle:
            return {parameter: handle.get(_projector_key(index, name)) for parameter, name in inside.items()}

    def prototype(self, index: int) -> torch.Tensor | None:
        """Task `index`'s prototype, or None where its adapter had no stats."""
        if _prototype_key(index) not in self.shapes:
            return None
        with open_safetensors(self.path) as handle:
            return handle.get(_prototype_key(index))

    def exemplars(self, index: int) -> torch.Tensor | None:
        """Task `index`'s calibration images' pooled directions, or None where it has no prototype."""
        if _exemplars_key(index) not in self.shapes:
            return None
        with open_safetensors(self.path) as handle:
            return handle.get(_exemplars_key(index))


def read_bundle_header(path: Path) -> BundleHeader:
    with _metadata_of(path) as handle:
        metadata = handle.metadata()
        _check_format(path, metadata, "many-bundle")
        eta = float(metadata.get("eta", "nan"))
        if not (eta > 0 and math.isfinite(eta)):
            raise InputError(path, f"its default η {metadata.get('eta')!r} is not a finite number > 0")
        tasks = _json_field(path, metadata, "tasks")
        if (
            not isinstance(tasks, list)
            or not tasks
            or not all(map(_is_task_name, tasks))
            or len(set(tasks)) != len(tasks)
        ):
            raise InputError(
                path,
                f"its metadata field 'tasks' is not a list of distinct task names ({tasks!r}); re-create the merge",
            )
        parts = _json_field(path, metadata, "parts") if "parts" in metadata else {}
        if not isinstance(parts, dict) or not all(isinstance(v, str) for v in parts.values()):
            raise InputError(
                path, "its metadata field 'parts' is not an object of file fingerprints; re-create the merge"
            )
        asked_as = _json_field(path, metadata, "asked_as") if "asked_as" in metadata else [{} for _ in tasks]
        header = BundleHeader(
            path,
            tuple(tasks),
            metadata.get("projector_module") or None,
            eta,
            {key: handle.shape(key) for key in handle.keys()},
            metadata.get("base_fingerprint", ""),
            parts,
            tuple(asked_as) if isinstance(asked_as, list) else (),
        )
        _check_bundle_tensors(header)
        if len(header.asked_as) != len(tasks) or not all(isinstance(record, dict) for record in header.asked_as):
            raise InputError(path, "its metadata field 'asked_as' is not one object per task; re-create the merge")
        return header


def _is_task_name(name: object) -> bool:
    """A task is named after its adapter folder, and its expert is written under that name: a name
    read from a file must be one folder name, never a path that leads elsewhere."""
    return isinstance(name, str) and bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name


def _check_bundle_tensors(bundle: BundleHeader) -> None:
    """The tensors agree with the task list: each key belongs to a listed task, every task holds the
    same projector parameters (shapes alike), and prototypes and exemplars share one width."""
    count = len(bundle.tasks)

    def fault(what: str) -> InputError:
        return InputError(bundle.path, f"{what}: its tensors disagree with its {count} tasks; re-create the merge")

    for key in bundle.shapes:
        parts = key.split("/")
        if (
            parts[0] not in ("projector", "prototype", "exemplars")
            or len(parts) < 2
            or not parts[1].isdigit()
            or int(parts[1]) >= count
            or (parts[0] == "projector") != (len(parts) == 3)
        ):
            raise fault(f"tensor {key!r} belongs to no task")
    projectors = [bundle.projector_shapes(index) for index in range(count)]
    if bundle.projector_module and any(shapes != projectors[0] or not shapes for shapes in projectors):
        raise fault(f"the tasks' projectors ({bundle.projector_module}) differ in parameters or shapes")
    if not bundle.projector_module and any(projectors):
        raise fault("projector tensors without a projector_module")
    widths = {bundle.shapes[key][-1] for key in bundle.shapes if key.split("/")[0] in ("prototype", "exemplars")}
    bad = [
        key
        for key in bundle.shapes
        if key.startswith("prototype/")
        and len(bundle.shapes[key]) != 1
        or key.startswith("exemplars/")
        and len(bundle.shapes[key]) != 2
    ]
    if len(widths) > 1 or bad:
        raise fault(f"prototypes and exemplars of different widths or shapes ({sorted(widths)})")
    alone = [
        index
        for index in range(count)
        if (_prototype_key(index) in bundle.shapes) != (_exemplars_key(index) in bundle.shapes)
    ]
    if alone:
        raise fault(f"task {bundle.tasks[alone[0]]} has a prototype without exemplars, or exemplars without one")


def read_merge_output(merged: Path) -> BundleHeader:
    """A merge output's bundle, checked to belong with the merged LoRA and experts beside it (the
    fingerprints it records) and with its merge state when the state is there."""
    bundle = read_bundle_header(merged / BUNDLE_FILE)
    if bundle.parts:
        found = merge_parts(merged)
        for name in sorted(set(bundle.parts) | set(found)):
            if found.get(name) != bundle.parts.get(name):
                fault = (
                    f"file not found (the merge's bundle {BUNDLE_FILE} records it)"
                    if name not in found
                    else f"is not the file this merge wrote (its bundle {BUNDLE_FILE} records another): "
                    f"the merge's files do not belong together, another merge's copied in?"
                )
                raise InputError(merged / name, f"{fault}; restore the merge's own files or re-create it")
    if (merged / STATE_FILE).exists():
        state = read_state_header(merged / STATE_FILE)
        check_one_merge(state, bundle)
        if bundle.base_fingerprint and state.base_fingerprint != bundle.base_fingerprint:
            raise InputError(
                state.path,
                f"was built on another base than its bundle {BUNDLE_FILE} records: not the files of one "
                f"merge; re-create the merge",
            )
    return bundle


def merge_parts(merged: Path) -> dict[str, str]:
    """Fingerprints of what a reader of the merge uses beside the bundle, by path relative to the
    merge: the merged LoRA's two files and each expert's."""
    names = ["adapter_config.json", "adapter_model.safetensors"]
    experts = merged / EXPERTS_DIR
    if experts.is_dir():
        names += sorted(
            path.relative_to(merged).as_posix()
            for path in experts.glob("*/*")
            if path.name in ("adapter_config.json", "adapter_model.safetensors")
        )
    return {name: file_fingerprint(merged / name) for name in names if (merged / name).is_file()}


def recorded_base(merged: Path) -> tuple[Path, str] | None:
    """(the file that records it, the fingerprint) of the base a merge output was built on: its
    bundle's record (its state's, for merges made before the bundle kept it); None for a merge of
    adapters without stats files, which knows no base."""
    bundle = read_bundle_header(merged / BUNDLE_FILE)
    if bundle.base_fingerprint:
        return bundle.path, bundle.base_fingerprint
    state = merged / STATE_FILE
    fingerprint = read_state_header(state).base_fingerprint if state.is_file() else ""
    return (state, fingerprint) if fingerprint else None


def check_one_merge(state: "StateHeader", bundle: BundleHeader) -> None:
    """A merge output's state and bundle must hold the same tasks in the same order."""
    names = tuple(task.name for task in state.tasks)
    if names != bundle.tasks:
        raise InputError(
            state.path,
            f"holds the tasks {list(names)}, its bundle {bundle.path.name} "
            f"{list(bundle.tasks)}: not the files of one merge; re-create the merge",
        )


@dataclass(frozen=True)
class BundleTask:
    """One task as the bundle keeps it."""

    name: str
    projector: Mapping[str, torch.Tensor]  # parameter name -> weight (empty: no projector)
    prototype: torch.Tensor | None
    exemplars: torch.Tensor | None = None
    asked_as: Mapping[str, object] = field(default_factory=dict)  # how its records were asked ({}: unknown)


def write_bundle(
    path: Path, tasks: list[BundleTask], projector_module: str | None, eta: float, base_fingerprint: str
) -> None:
    """Written last of the merge's files that readers use: it records the fingerprints of the others
    (`merge_parts` of its folder) and the base the merge was built on."""
    tensors: dict[str, torch.Tensor] = {}
    for index, task in enumerate(tasks):
        for name, weight in task.projector.items():
            tensors[_projector_key(index, name)] = weight.contiguous()
        if task.prototype is not None:
            tensors[_prototype_key(index)] = task.prototype.contiguous()
        if task.exemplars is not None:
            tensors[_exemplars_key(index)] = task.exemplars.contiguous()
    metadata = {
        "format": "many-bundle",
        "format_version": FORMAT_VERSION,
        "tasks": json.dumps([t.name for t in tasks]),
        "projector_module": projector_module or "",
        "eta": repr(eta),
        "base_fingerprint": base_fingerprint,
        "parts": json.dumps(merge_parts(path.parent), sort_keys=True),
        "asked_as": json.dumps([dict(task.asked_as) for task in tasks]),
    }
    save_tensors(path, tensors, metadata)


# ---------------------------------------------------------------- merge state


@dataclass(frozen=True)
class StateTask:
    name: str
    adapter_fingerprint: str
    modules: tuple[str, ...]
    tokens: Mapping[str, int]  # calibration tokens per group


def _gram_key(group: str) -> str:
    return f"gram/{group}"


def _ac_key(index: int, module: str) -> str:
    return f"ac/{index}/{module}"


def _ad_key(index: int, module: str) -> str:
    return f"ad/{index}/{module}"


def _b_key(index: int, module: str) -> str:
    return f"b/{index}/{module}"


@dataclass(frozen=True)
class StateHeader:
    path: Path
    base_fingerprint: str
    base_model: str | None
    balance: bool
    tasks: tuple[StateTask, ...]
    groups: Mapping[str, tuple[str, ...]]
    shapes: Mapping[str, tuple[int, ...]]

    def factor_shapes(self) -> dict[tuple[int, str], tuple[int, int, int]]:
        """(task index, module) -> (rank, d_in, d_out) of every task's factors."""
        return {
            (index, module): (*self.shapes[_ac_key(index, module)], self.shapes[_b_key(index, module)][0])
            for index, task in enumerate(self.tasks)
            for module in task.modules
        }

    @property
    def precision(self) -> str:
        """The dtype the state's tensors are stored in: "float64" or "float32"."""
        if not self.groups:
            return "float64"
        with open_safetensors(self.path) as handle:
            return "float32" if handle.dtype(_gram_key(next(iter(self.groups)))) == "F32" else "float64"

    def gram_dim(self, group: str) -> int:
        return dim_of_packed(self.shapes[_gram_key(group)][0])

    def gram_blocks(self, group: str, check_finite: bool = True):
        """The packed Gram matrix of one group, as `packed_blocks`, read from the file lazily."""
        return read_packed_blocks(self.path, _gram_key(group), check_finite=check_finite)

    def factors(self, index: int, module: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(w·A C, w·A diag(C), s·B) of task `index` for `module`, float64 whatever the stored precision."""
        with open_safetensors(self.path) as handle:
            return tuple(handle.get(key(index, module)).double() for key in (_ac_key, _ad_key, _b_key))


def read_state_header(path: Path) -> StateHeader:
    with _metadata_of(path) as handle:
        metadata = handle.metadata()
        _check_format(path, metadata, "many-state")
        tasks = tuple(
            StateTask(entry["name"], entry["adapter_fingerprint"], tuple(entry["modules"]), entry["tokens"])
            for entry in _json_field(path, metadata, "tasks")
        )
        if not all(_is_task_name(task.name) for task in tasks):
            raise InputError(
                path, f"its task names {[task.name for task in tasks]!r} are not folder names; re-create the merge"
            )
        groups = {key: tuple(modules) for key, modules in _json_field(path, metadata, "groups").items()}
        header = StateHeader(
            path,
            metadata.get("base_fingerprint", ""),
            metadata.get("base_model") or None,
            metadata.get("balance") == "true",
            tasks,
            groups,
            {key: handle.shape(key) for key in handle.keys()},
        )
        missing = [
            key
            for key in [_gram_key(group) for group in groups]
            + [
                make(index, module)
                for index, task in enumerate(tasks)
                for module in task.modules
                for make in (_ac_key, _ad_key, _b_key)
            ]
            if key not in header.shapes
        ]
        if missing:
            raise InputError(path, f"tensor {missing[0]!r} is missing; re-create the merge")
        return header


@dataclass(frozen=True)
class StateGroup:
    """What the state holds for one input: its Gram matrix and, in order, each task's factors
    for the modules that read it: (task index, module, rank, d_out)."""

    key: str
    dim: int
    factors: tuple[tuple[int, str, int, int], ...]


class StateWriter(StreamWrapper):
    """Streams a merge state to disk group by group: declared first, then written in order."""

    def __init__(
        self,
        path: Path,
        groups: list[StateGroup],
        *,
        base_fingerprint: str,
        base_model: str | None,
        balance: bool,
        tasks: list[StateTask],
        members: Mapping[str, tuple[str, ...]],
        dtype: torch.dtype = torch.float64,
    ):
        self._dtype = dtype
        layout = []
        for group in groups:
            layout.append((_gram_key(group.key), dtype, (packed_length(group.dim),)))
            for index, module, rank, d_out in group.factors:
                layout.append((_ac_key(index, module), dtype, (rank, group.dim)))
                layout.append((_ad_key(index, module), dtype, (rank, group.dim)))
                layout.append((_b_key(index, module), dtype, (d_out, rank)))
        metadata = {
            "format": "many-state",
            "format_version": FORMAT_VERSION,
            "base_fingerprint": base_fingerprint,
            "base_model": base_model or "",
            "balance": "true" if balance else "false",
            "tasks": json.dumps(
                [
                    {
                        "name": task.name,
                        "adapter_fingerprint": task.adapter_fingerprint,
                        "modules": list(task.modules),
                        "tokens": dict(task.tokens),
                    }
                    for task in tasks
                ]
            ),
            "groups": json.dumps({key: list(modules) for key, modules in members.items()}),
        }
        self._writer = StreamingSafetensorsWriter(path, layout, metadata)

    def gram(self, group: str, gram: torch.Tensor) -> None:
        """The group's Gram matrix (its upper triangle is what is kept), or that triangle packed."""
        self._writer.write_pieces(_gram_key(group), [gram] if gram.dim() == 1 else upper_blocks(gram))

    def factors(self, index: int, module: str, ac: torch.Tensor, ad: torch.Tensor, b: torch.Tensor) -> None:
        self._writer.write(_ac_key(index, module), ac.to(self._dtype))
        self._writer.write(_ad_key(index, module), ad.to(self._dtype))
        self._writer.write(_b_key(index, module), b.to(self._dtype))
