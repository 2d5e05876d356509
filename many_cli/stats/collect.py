"""`many stats`' run: read the calibration records, load base + adapter (or the merge `--under`
runs them through), drive the accumulation over this rank's shard, reduce, check and write the
stats file."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
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
from many_cli.data import BadRecord, Record, answer_token_counts, encode_loaded, load_inputs
from many_cli.distributed import World, join_world
from many_cli.errors import InputError
from many_cli.families import ImageTracker, find_projector
from many_cli.files import file_fingerprint, refuse_foreign_file, refuse_overlap
from many_cli.formats import count_records, read_records, refuse_output_over_data
from many_cli.llava_layout import peft_adapter_dir
from many_cli.models import (
    adapter_renames,
    apply_adapters,
    base_fingerprint,
    linear_layers,
    load_base_model,
    load_processor,
    lora_layers,
    refuse_other_base,
    text_layers,
)
from many_cli.options import StatsOptions
from many_cli.prompting import Prompting, prompting_for
from many_cli.rows import MERGED  # the PEFT name of the merge's LoRA, as infer names it
from many_cli.state import BUNDLE_FILE, STATS_FILE, is_stats_file, read_merge_output, recorded_base, write_stats
from many_cli.stats.accumulate import Exemplars, InputCovariances, accumulate
from many_cli.stats.reduce import Totals, gather_totals

TOKEN_RULE = (
    "chat template over every turn of the record (its images at their tags, else opening the "
    "first user turn), plus the assistant answer when there is one (else the generation "
    "prompt); every position whose attention mask is 1, image tokens included"
)


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
    An adapter in its maker's own layout (original LLaVA, InternVL's whole-model LoRA) is run
    through its PEFT conversion."""
    options.check()
    out = out or adapter / STATS_FILE
    refuse_overlap(
        out, [base, *(adapter / name for name in ADAPTER_FILES), *([options.under] if options.under else [])]
    )
    refuse_output_over_data(out, [data], options.reading, is_stats_file)
    refuse_foreign_file(out, options.force, is_stats_file, "many stats file")
    from many_cli import internlm2, internvl_layout, qlora

    layout = internvl_layout.internlm2_heads(base)
    prompting, asking_note = prompting_for(adapter, options.asking)  # the user's folder, unconverted
    notes = [note for note in [qlora.base_note(adapter, options.qlora), asking_note] if note]
    with peft_adapter_dir(adapter, base) as converted, internlm2.split_adapter(converted, layout) as loadable:
        split = layout if loadable != converted else None  # recorded: the merge splits the adapter as here
        return _collect(base, loadable, data, out, options, progress, split, notes, prompting)


def _collect(
    base: str,
    adapter: Path,
    data: Path,
    out: Path,
    options: StatsOptions,
    progress: Callable[[int | None], Progress],
    split: tuple[int, int] | None,
    notes: list[str],
    prompting: Prompting,
) -> StatsReport:
    world = join_world(options.device)
    device = world.device
    records = read_records(data, options.reading)  # raises on a missing or empty source at once
    adapter_fingerprint = _adapter_fingerprint(adapter)
    fingerprint = base_fingerprint(base, options.qlora)
    if options.under is not None:
        _check_merge(options.under, base, fingerprint)
    model, processor, layers, renames = _load(base, adapter, options, device)
    processor = prompting.wrap(processor)
    report = StatsReport(out, world.rank)
    report.notes += notes
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
    totals = gather_totals(covariances, exemplars, world, report)
    media_expected = find_projector(model) is not None and not options.text_only
    _check_totals(totals, report, data, adapter, media_expected, remedy=_overflow_remedy(model, options))
    if world.rank == 0:
        _write(out, totals, report, adapter_fingerprint, fingerprint, options, renames, split, prompting)
    world.leave()
    return report


def _load(base: str, adapter: Path, options: StatsOptions, device: torch.device):
    """base + adapter, its processor (padding as asked) and the layers PEFT adapted."""
    processor = load_processor(base, options.padding_side)  # a folder without one fails before the model loads
    model = load_base_model(base, device, options.placement, options.qlora)
    renames = {
        saved: loaded for saved, loaded in adapter_renames(model, read_adapter(adapter)).items() if saved != loaded
    }
    model = apply_adapters(model, base, [(adapter, "default"), *([(options.under, MERGED)] if options.under else [])])
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
            layer.set_adapter(MERGED)
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
    if not merged.is_dir():
        raise InputError(merged, "--under: merge directory not found")
    if not (merged / ADAPTER_WEIGHTS).is_file() or not (merged / BUNDLE_FILE).is_file():
        raise InputError(merged, f"--under is not a `many merge` output (it needs {ADAPTER_WEIGHTS} and {BUNDLE_FILE})")
    read_merge_output(merged)  # its files belong together
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


def _check_totals(
    totals: Totals, report: StatsReport, data: Path, adapter: Path, media_expected: bool, remedy: str
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
    totals: Totals,
    report: StatsReport,
    adapter_fingerprint: str,
    fingerprint: str,
    options: StatsOptions,
    renames: dict[str, str],
    split: tuple[int, int] | None,
    prompting: Prompting,
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
            "asked_as": json.dumps(prompting.record),
            **({"modules_pattern": pattern} if pattern else {}),
            **({"under_merge": file_fingerprint(options.under / ADAPTER_WEIGHTS)} if options.under else {}),
            **({"module_names": json.dumps(renames, sort_keys=True)} if renames else {}),
            **({"split_qkv": json.dumps(list(split))} if split else {}),
        },
    )


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
