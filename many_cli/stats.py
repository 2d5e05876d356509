"""`many stats`: stream calibration records through base + adapter and accumulate, for every
distinct input of the adapted layers, Σ x xᵀ over the unmasked positions, and the visual
prototype of the task. Under torchrun each rank takes a disjoint shard and the sums are
all-reduced before rank 0 writes the file."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from many_cli.adapters import (
    ADAPTER_FILES,
    ADAPTER_WEIGHTS,
    adapter_fingerprint,
    check_supported_config,
    other_base_note,
    read_adapter,
)
from many_cli.cpm import pooled_direction
from many_cli.data import BadRecord, Record, answer_token_counts, encode_loaded, load_inputs
from many_cli.distributed import World, all_gather_json, all_gather_rows, join_world
from many_cli.errors import InputError
from many_cli.families import ImageTracker, find_projector
from many_cli.files import file_fingerprint, refuse_foreign_file, refuse_overlap
from many_cli.formats import count_records, read_records, refuse_output_over_data
from many_cli.llava_layout import peft_adapter_dir
from many_cli.models import (
    adapter_renames,
    apply_adapters,
    base_fingerprint,
    computes_own_positions,
    linear_layers,
    load_base_model,
    load_processor,
    lora_layers,
    refuse_other_base,
    text_layers,
)
from many_cli.options import StatsOptions
from many_cli.state import BLOCK, BUNDLE_FILE, STATS_FILE, is_stats_file, recorded_base, write_stats

TOKEN_RULE = (
    "chat template over one user turn [image, prompt], plus the assistant answer when "
    "there is one (else the generation prompt); every position whose attention mask is 1, "
    "image tokens included"
)
UNDER = "merged"  # the PEFT name of the merge's LoRA that --under runs the task's data through


@dataclass
class StatsReport:
    out: Path
    rank: int = 0
    records: int = 0
    skipped: int = 0
    tokens: int = 0
    images: int = 0
    inputs: int = 0
    modules: int = 0
    notes: list[str] = field(default_factory=list)


class Progress:
    """What the CLI's progress bar is told: records and tokens done so far."""

    def __init__(self, total: int | None):
        self.total = total

    def advance(self, records: int, tokens: int) -> None:
        """Override to report progress."""


def collect_stats(
    base: str,
    adapter: Path,
    data: Path,
    out: Path | None = None,
    options: StatsOptions = StatsOptions(),
    progress: Callable[[int | None], Progress] = Progress,
) -> StatsReport:
    """Statistics of base + adapter over `data`, written to `out` (default: next to the adapter).
    An original-LLaVA-layout adapter is run through its PEFT conversion."""
    options.check()
    out = out or adapter / STATS_FILE
    refuse_overlap(
        out, [base, *(adapter / name for name in ADAPTER_FILES), *([options.under] if options.under else [])]
    )
    refuse_output_over_data(out, [data], options.reading, is_stats_file)
    refuse_foreign_file(out, options.force, is_stats_file, "many stats file")
    with peft_adapter_dir(adapter) as converted:
        return _collect(base, converted, data, out, options, progress)


def _collect(
    base: str, adapter: Path, data: Path, out: Path, options: StatsOptions, progress: Callable[[int | None], Progress]
) -> StatsReport:
    world = join_world(options.device)
    device = world.device
    records = read_records(data, options.reading)  # raises on a missing or empty source at once
    adapter_fingerprint = _adapter_fingerprint(adapter)
    fingerprint = base_fingerprint(base)
    if options.under is not None:
        _check_merge(options.under, base, fingerprint)
    model, processor, layers, renames = _load(base, adapter, options, device)
    report = StatsReport(out, world.rank)
    note = other_base_note(read_adapter(adapter), base)
    if note:
        report.notes.append(note)
    covariances = InputCovariances(layers, device, text_layers(model.get_base_model(), layers))
    exemplars = Exemplars(find_projector(model))
    ImageTracker(model, exemplars)
    start, stop = _shard(data, options, world)
    tracker = progress(stop - start if stop is not None else None)

    def done(records: int, tokens: int) -> None:
        report.records += records
        report.tokens += tokens
        tracker.advance(records, tokens)

    try:
        shard = islice(islice(records, options.max_samples), start, stop)
        accumulate(model, encoded_batches(processor, shard, options, report), covariances, device, done)
    finally:
        covariances.remove_hooks()
        exemplars.remove_hook()
    totals = _totals(covariances, exemplars, world, report)
    media_expected = find_projector(model) is not None and not options.text_only
    _check_totals(totals, report, data, adapter, media_expected, remedy=_overflow_remedy(model, options))
    if world.rank == 0:
        _write(out, totals, report, adapter_fingerprint, fingerprint, options, renames)
    world.leave()
    return report


def accumulate(
    model: nn.Module,
    batches: Iterable[tuple[dict, torch.Tensor | None]],
    covariances: "InputCovariances",
    device: torch.device,
    done: Callable[[int, int], None] = lambda records, tokens: None,
) -> None:
    """The statistics pass: one forward per encoded batch, its attention mask (and the weight of
    each position, if any) given to the hooks first; `done(records, tokens)` after each batch."""
    for encoded, weights in batches:
        mask = encoded["attention_mask"].bool()
        covariances.begin_batch(mask.to(device), None if weights is None else weights.to(device))
        forward(model, encoded, device)
        covariances.end_batch()
        done(mask.shape[0], int(mask.sum()))


@dataclass
class _Totals:
    """What a stats run sums (over every rank under torchrun)."""

    sums: dict[str, torch.Tensor]  # input -> packed Σ x xᵀ
    rows: dict[str, int]  # input -> rows counted
    members: dict[str, list[str]]  # input -> the modules that read it, in the order the forward met them
    exemplars: torch.Tensor | None  # (images, width): each image's pooled direction, in record order
    batches: list[int]  # how many of the exemplars each forward met, in order

    @property
    def images(self) -> int:
        return 0 if self.exemplars is None else self.exemplars.shape[0]

    def prototype(self) -> torch.Tensor | None:
        """The mean exemplar, summed a forward at a time, as stats files have always been written
        (the order of a float32 sum decides its last bit, and the file's bytes)."""
        if not self.images:
            return None
        sums = [batch.sum(dim=0) for batch in self.exemplars.split(self.batches)]
        return sum(sums[1:], sums[0]) / self.images


def _load(base: str, adapter: Path, options: StatsOptions, device: torch.device):
    """base + adapter, its processor (padding as asked) and the layers PEFT adapted."""
    processor = load_processor(base, options.padding_side)  # a folder without one fails before the model loads
    model = load_base_model(base, device, options.placement)
    renames = {
        saved: loaded for saved, loaded in adapter_renames(model, read_adapter(adapter)).items() if saved != loaded
    }
    model = apply_adapters(model, base, [(adapter, "default"), *([(options.under, UNDER)] if options.under else [])])
    model = (model if options.device_map is not None else model.to(device)).eval()
    layers = {  # the task's own layers; under a merge, others may be the merge's alone
        name: layer
        for name, layer in lora_layers(model).items()
        if "default" in {*layer.lora_A, *layer.lora_embedding_A}
    }
    if not layers:
        raise InputError(adapter, "PEFT created no LoRA layer in the base model")
    if options.under:  # the merged LoRA everywhere (none where the merge has none); the projector stays the task's
        for layer in lora_layers(model).values():
            layer.set_adapter(UNDER)
    if options.modules is not None:
        merge_only = {name: layer for name, layer in lora_layers(model).items() if name not in layers}
        extra = {
            **linear_layers(model.get_base_model(), options.modules),
            **{name: layer for name, layer in merge_only.items() if re.fullmatch(options.modules, name)},
        }
        if not extra and not any(re.fullmatch(options.modules, name) for name in layers):
            # a pattern that names only layers the adapter adapts already asks for nothing more
            raise InputError(base, f"no linear layer's name matches --modules {options.modules!r}")
        layers = {**extra, **layers}
    return model, processor, layers, renames


def _check_merge(merged: Path, base: str, fingerprint: str) -> None:
    """--under needs a merge output built on this base."""
    if not (merged / ADAPTER_WEIGHTS).is_file() or not (merged / BUNDLE_FILE).is_file():
        raise InputError(merged, f"--under is not a `many merge` output (it needs {ADAPTER_WEIGHTS} and {BUNDLE_FILE})")
    built_on = recorded_base(merged)
    if built_on:
        refuse_other_base(*built_on, base, fingerprint)


def _shard(data: Path, options: StatsOptions, world: World) -> tuple[int, int | None]:
    """Records [start, stop) of this rank: consecutive whole batches, so that the ranks' exemplars,
    gathered in rank order, are in record order and every batch holds the records one process's
    would. One process reads them all (stop None: however many there are)."""
    if world.size == 1:
        return 0, None
    total = count_records(data)
    if total is None:  # a format that cannot be counted without reading it: read it once
        total = sum(1 for _ in read_records(data, options.reading))
    if options.max_samples is not None:
        total = min(total, options.max_samples)
    batches = -(-total // options.batch_size)
    chunk = -(-batches // world.size) * options.batch_size
    return min(world.rank * chunk, total), min((world.rank + 1) * chunk, total)


def encoded_batches(
    processor, records: Iterable[Record | BadRecord], options: StatsOptions, report: StatsReport
) -> Iterator[tuple[dict, torch.Tensor | None]]:
    """Encoded batches, each with the weight of every position (None: all weigh 1)."""
    for batch in _batches(_good_records(records, options.skip_bad, report), options.batch_size):
        kept, encoded = _encode(processor, batch, options.skip_bad, report)
        if encoded is None:
            continue
        weights = None
        if options.answer_weight != 1:
            weights = deciding_weights(
                encoded["attention_mask"], answer_token_counts(processor, kept), options.answer_weight
            )
        yield encoded, weights


def deciding_weights(mask: torch.Tensor, answer_tokens: list[int], weight: float) -> torch.Tensor:
    """Per position: `weight` for the last `answer + 1` unmasked positions of each row (the last
    prompt position, which predicts the answer's first token, and the answer's tokens), else 1."""
    weights = torch.ones(mask.shape, dtype=torch.float32)
    for row, count in enumerate(answer_tokens):
        positions = mask[row].nonzero().flatten()
        weights[row, positions[-(count + 1) :]] = weight
    return weights


def _totals(covariances: "InputCovariances", exemplars: "Exemplars", world: World, report: StatsReport) -> _Totals:
    totals = _Totals(
        {key: triangle.packed() for key, triangle in covariances.sums.items()},
        {key: triangle.rows_added for key, triangle in covariances.sums.items()},
        covariances.members,
        exemplars.result(),
        exemplars.batches,
    )
    return _all_reduce(totals, report, world.device) if world.size > 1 else totals


def _check_totals(
    totals: _Totals, report: StatsReport, data: Path, adapter: Path, media_expected: bool, remedy: str
) -> None:
    if report.records == 0:
        raise InputError(data, "no usable record" + (f" ({report.skipped} skipped)" if report.skipped else ""))
    if media_expected and totals.images == 0:
        raise InputError(
            data,
            "holds no image, video or audio, but the model is multimodal: its statistics would "
            "miss every media token; give the data its media, or pass --text-only",
        )
    for key, packed in totals.sums.items():
        if not bool(torch.isfinite(packed).all()):
            raise InputError(
                adapter, f"the input of {', '.join(totals.members[key])} holds NaN or Inf on this data ({remedy})"
            )
    report.images = totals.images
    report.inputs, report.modules = len(totals.sums), sum(len(names) for names in totals.members.values())


def _overflow_remedy(model: nn.Module, options: StatsOptions) -> str:
    """What to try when the statistics overflowed: a wider dtype, or a smaller answer weight."""
    remedies = [] if model.dtype == torch.float32 else ["run the model in float32 (--dtype float32)"]
    if options.answer_weight != 1:
        remedies.append(
            f"a smaller --answer-weight than {options.answer_weight:g} (the sums of its squares overflow float32)"
        )
    return " or ".join(remedies) or "the model itself gives NaN or Inf on this data in float32"


def _write(
    out: Path,
    totals: _Totals,
    report: StatsReport,
    adapter_fingerprint: str,
    fingerprint: str,
    options: StatsOptions,
    renames: dict[str, str],
) -> None:
    pattern = options.modules
    token_rule = (
        TOKEN_RULE
        if options.answer_weight == 1
        else (f"{TOKEN_RULE}; the last prompt position and the answer's tokens weigh {options.answer_weight:g}")
    )
    if options.under:
        token_rule += "; inputs taken in the merged model (the merge's LoRA, this task's projector)"
    named = {min(totals.members[key]): key for key in totals.sums}  # an input is named after its first module
    write_stats(
        out,
        covariances={name: totals.sums[key].cpu() for name, key in named.items()},
        tokens={name: totals.rows[key] for name, key in named.items()},
        modules={name: totals.members[key] for name, key in named.items()},
        prototype=totals.prototype(),
        exemplars=totals.exemplars,
        images=totals.images,
        adapter_fingerprint=adapter_fingerprint,
        base_fingerprint=fingerprint,
        token_rule=token_rule,
        extra={
            "records": str(report.records),
            "skipped": str(report.skipped),
            "answer_weight": repr(options.answer_weight),
            "tokens": str(report.tokens),  # text tokens; media layers count rows
            **({"modules_pattern": pattern} if pattern else {}),
            **({"under_merge": file_fingerprint(options.under / ADAPTER_WEIGHTS)} if options.under else {}),
            **({"module_names": json.dumps(renames, sort_keys=True)} if renames else {}),
        },
    )


def forward(model: nn.Module, encoded, device: torch.device) -> None:
    """One forward pass for statistics: positions follow the attention mask, so left and right
    padding see the same activations, and only the last position's logits are computed, unless
    the output layer is adapted (its input covariance then needs every position)."""
    from peft.tuners.lora import LoraLayer

    mask = encoded["attention_mask"]
    keep = 0 if isinstance(model.get_output_embeddings(), LoraLayer) else 1  # 0: every position
    with torch.inference_mode():
        # Positions follow the mask, unless the model derives its own from it (Qwen-VL's 3-D rope).
        positions = (
            {}
            if computes_own_positions(model)
            else {"position_ids": (mask.long().cumsum(-1) - 1).clamp(min=0).to(device)}
        )
        model(**encoded.to(device), **positions, use_cache=False, logits_to_keep=keep)


def _adapter_fingerprint(adapter: Path) -> str:
    check_supported_config(adapter)  # IA3, DoRA ... refused before the base model loads
    weights = adapter / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise InputError(weights, "file not found (many reads adapters saved as safetensors)")
    return adapter_fingerprint(adapter)


def _good_records(records: Iterable[Record | BadRecord], skip_bad: bool, report: StatsReport) -> Iterator[Record]:
    for record in records:
        if isinstance(record, BadRecord):
            if not skip_bad:
                raise InputError(record.source, f"{record.fault} (--skip-bad skips such records)")
            report.skipped += 1
            continue
        yield record


def _batches(records: Iterable[Record], size: int) -> Iterator[list[Record]]:
    iterator = iter(records)
    while batch := list(islice(iterator, size)):
        yield batch


def _encode(processor, batch: list[Record], skip_bad: bool, report: StatsReport) -> tuple[list[Record], dict | None]:
    kept, media = [], []
    for record in batch:
        try:
            media.append(load_inputs(processor, record))
        except InputError:
            if not skip_bad:
                raise
            report.skipped += 1
            continue
        kept.append(record)
    return kept, encode_loaded(processor, kept, media) if kept else None


def _fingerprint(flat: torch.Tensor) -> tuple:
    """Three moments of an activation: equal for modules that read the same tensor, and for
    distinct real activations never all equal."""
    values = flat.double()
    weights = torch.arange(1, values.shape[0] + 1, dtype=torch.float64, device=values.device)
    return (
        tuple(flat.shape),
        float(values.sum()),
        float(values.square().sum()),
        float((values.sum(dim=1) * weights).sum()),
    )


def tensor_core_products(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether Σ x xᵀ can multiply x in its own half precision with float32 accumulation (the
    tensor cores, an order of magnitude above the float32 units) and give what float32 gives:
    the product of two bfloat16 or two float16 values is exact in float32, so only the order of
    the float32 sums differs. Needs CUDA with tensor cores for the dtype (float16 from compute
    capability 7.0, bfloat16 from 8.0) and torch's matrix product with a float32 `out_dtype`."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16) or not hasattr(torch.ops.aten.mm, "dtype"):
        return False
    return torch.cuda.get_device_capability(device) >= ((8, 0) if dtype == torch.bfloat16 else (7, 0))


class UpperTriangle:
    """Σ x xᵀ kept as its upper triangle, in row blocks: half the memory and about half the
    multiply-adds of a full d×d accumulation, and already in the stats file's packed order.
    Sums are float32; x is multiplied in its own dtype where `tensor_core_products` allows."""

    def __init__(self, dim: int, device: torch.device):
        self.dim = dim
        self.device = device
        self.rows_added = 0  # the tokens counted
        self.rows = [
            torch.zeros(min(BLOCK, dim - start), dim - start, dtype=torch.float32, device=device)
            for start in range(0, dim, BLOCK)
        ]

    def add(self, x: torch.Tensor) -> None:
        """Add xᵀ x for x of shape (tokens, dim)."""
        self.rows_added += x.shape[0]
        half = tensor_core_products(x.dtype, self.device)
        x = x if half else x.float()
        for index, rows in enumerate(self.rows):
            start = index * BLOCK
            if half:
                rows.add_(torch.mm(x[:, start : start + rows.shape[0]].T, x[:, start:], out_dtype=torch.float32))
            else:
                rows.addmm_(x[:, start : start + rows.shape[0]].T, x[:, start:])

    def packed(self) -> torch.Tensor:
        """The upper triangle row by row, as `state.pack_symmetric` lays it out."""
        return torch.cat([rows[row, row:] for rows in self.rows for row in range(rows.shape[0])])


class InputCovariances:
    """Forward pre-hooks on the adapted layers. During the first batch, layers whose input has
    the fingerprint of an earlier layer's (q/k/v, gate/up, whatever their names) join its
    group and lose their hook; afterwards one float32 Σ x xᵀ per distinct input accumulates
    on the compute device: over the positions whose attention mask is 1 for `text_layers`
    (which read the token sequence), over every row for the others (a vision tower's layers
    read image patches: every one counts)."""

    def __init__(self, layers: dict[str, nn.Module], device: torch.device, text_layers: set[str]):
        self._device = device
        self._text_layers = text_layers
        self._mask: torch.Tensor | None = None
        self._scale: torch.Tensor | None = None  # √weight of each unmasked position
        self._discovering = True
        self._seen: dict[tuple, str] = {}
        self.sums: dict[str, UpperTriangle] = {}
        self.members: dict[str, list[str]] = {}
        self._hooks = {
            name: layer.register_forward_pre_hook(partial(self._hook, name)) for name, layer in layers.items()
        }

    def begin_batch(self, mask: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        self._mask = mask.reshape(-1)
        self._scale = None if weights is None else weights.reshape(-1)[self._mask].sqrt()[:, None]

    def end_batch(self) -> None:
        if self._discovering:
            self._discovering = False
            self._seen.clear()
            for name in list(self._hooks):
                if name not in self.members:
                    self._hooks.pop(name).remove()

    def _hook(self, name: str, _module: nn.Module, args: tuple) -> None:
        x = args[0]
        flat = x.reshape(-1, x.shape[-1]).to(self._device)  # under a device map, layers sit on other devices
        if name in self._text_layers:
            flat = flat[self._mask]
            if self._scale is not None:  # Σ w x xᵀ = Σ (√w x)(√w x)ᵀ
                flat = flat * self._scale.to(flat.dtype)
        if self._discovering and name not in self.sums:  # a layer called again keeps all its inputs
            fingerprint = _fingerprint(flat)
            if fingerprint in self._seen:
                self.members[self._seen[fingerprint]].append(name)
                return
            self._seen[fingerprint] = name
            self.members[name] = [name]
            self.sums[name] = UpperTriangle(flat.shape[1], self._device)
        self.sums[name].add(flat)

    def remove_hooks(self) -> None:
        for hook in self._hooks.values():
            hook.remove()
        self._hooks.clear()


class Exemplars:
    """Keeps the L2-normalised, mean-pooled projector input of every image, in order: the exemplars
    that `infer --routing nearest` routes by, whose mean is the CPM prototype."""

    def __init__(self, projector: nn.Module | None):
        self.directions: list[torch.Tensor] = []
        self.batches: list[int] = []
        self.image_shares: list[int] | None = None  # set before each forward (families.ImageTracker)
        self._hook = projector.register_forward_pre_hook(self._add) if projector is not None else None

    def _add(self, _module: nn.Module, args: tuple) -> None:
        self.directions.append(pooled_direction(args[0], self.image_shares).float().cpu())
        self.batches.append(self.directions[-1].shape[0])

    def result(self) -> torch.Tensor | None:
        return torch.cat(self.directions) if self.directions else None

    def remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()


def _all_reduce(totals: _Totals, report: StatsReport, device: torch.device) -> _Totals:
    """Every rank's statistics summed, as one process would have them: inputs in the order the
    first rank's forward met them, exemplars in record order (the ranks hold consecutive shards).
    Ranks agree on the grouping of layers by input (it is structural); a rank whose shard was
    empty adopts it from the others. Ranks exchange tensors only (their layout as JSON bytes)."""
    lengths = {key: packed.numel() for key, packed in totals.sums.items()}
    width = None if totals.exemplars is None else totals.exemplars.shape[1]
    layouts = all_gather_json(
        {"members": totals.members, "lengths": lengths, "width": width, "batches": totals.batches}
        if totals.members
        else None
    )
    known = [layout for layout in layouts if layout is not None]
    if not known:
        return totals
    members, lengths = known[0]["members"], known[0]["lengths"]
    if any(layout["members"] != members for layout in known):
        raise RuntimeError("ranks disagree on which layers share an input")
    sums, rows = {}, {}
    for key in members:
        packed = totals.sums.get(key)
        if packed is None:
            packed = torch.zeros(lengths[key], dtype=torch.float32, device=device)
        torch.distributed.all_reduce(packed)
        sums[key] = packed
        count = torch.tensor([totals.rows.get(key, 0)], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(count)
        rows[key] = int(count.item())
    counts = torch.tensor([report.records, report.skipped, report.tokens], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(counts)
    report.records, report.skipped, report.tokens = (int(value) for value in counts.tolist())
    width = next((layout["width"] for layout in known if layout["width"] is not None), None)
    exemplars = None
    if width is not None:
        mine = totals.exemplars if totals.exemplars is not None else torch.zeros(0, width)
        exemplars = all_gather_rows(mine)
    return _Totals(sums, rows, members, exemplars, [batch for layout in known for batch in layout["batches"]])
