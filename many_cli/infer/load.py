"""Loading for `many infer`: the base model with the merged LoRA (folded into its weights by
default) or its experts, or one task's own adapter, and the routed projector holding every
task's projector (CPM)."""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from many_cli import models, qlora
from many_cli.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_fingerprint, check_supported_config
from many_cli.cpm import DeferredProjector, RoutedProjector
from many_cli.errors import InputError
from many_cli.families import (
    ImageTracker,
    find_projector,
    module_at,
    no_projector_reason,
    projector_paths,
    replace_projectors,
)
from many_cli.files import file_fingerprint
from many_cli.llava_layout import peft_adapter_dir
from many_cli.models import (
    apply_adapters,
    base_fingerprint,
    load_base_model,
    lora_layers,
    refuse_other_base,
    resolve_device,
    text_layers,
)
from many_cli.options import DEFAULT_CONFIDENCE, FULL_PRECISION, NEAREST, InferOptions
from many_cli.prompting import Prompting, described, prompting_for, recorded_prompting
from many_cli.rows import ADAPTER, MERGE, MERGED
from many_cli.state import (
    BUNDLE_FILE,
    EXPERTS_DIR,
    STATS_FILE,
    BundleHeader,
    read_bundle_header,
    read_merge_output,
    read_stats_header,
    recorded_base,
)


@dataclass
class MergedModel:
    model: nn.Module
    processor: object
    router: RoutedProjector | None
    device: torch.device
    experts: bool = False
    tracker: ImageTracker | None = None
    notes: list[str] = field(default_factory=list)
    answered_by: Answerer | None = None  # None for a model `many` did not load from a merge or an adapter


@dataclass(frozen=True)
class Answerer:
    """What answers, as each prediction row names it: a merge (kind "merge": its tasks in order and a
    fingerprint of its output) or one task's own adapter (kind "adapter", from `infer --adapter`)."""

    kind: str
    tasks: tuple[str, ...]
    fingerprint: str

    def as_json(self) -> dict:
        return {"tasks": list(self.tasks), "fingerprint": self.fingerprint}


def merge_fingerprint(merged: Path) -> str:
    """sha256 over a merge output's adapter weights and bundle: which merge answered."""
    prints = " ".join(file_fingerprint(merged / name) for name in (ADAPTER_WEIGHTS, BUNDLE_FILE))
    return hashlib.sha256(prints.encode()).hexdigest()[:16]


def load_merged(base: str, merged: Path, options: InferOptions = InferOptions()) -> MergedModel:
    """base + the merged LoRA (folded unless options.fold is False) with the task projectors
    routed (CPM), ready for `answer` or `.model.generate`."""
    options.check()
    if not (merged / ADAPTER_CONFIG).is_file() or not (merged / BUNDLE_FILE).is_file():
        raise InputError(merged, f"is not a `many merge` output (it needs {ADAPTER_CONFIG} and {BUNDLE_FILE})")
    bundle = read_merge_output(merged)
    fingerprint = merge_fingerprint(merged)
    model, device = _base_model(base, options, recorded_base(merged))
    notes = []
    if bundle.projector_module and find_projector(model) is None:
        notes.append(
            f"{no_projector_reason(model)}: the task projectors are not routed, only the merged language model applies"
        )
    routed = _routed_projectors(model, bundle, options, notes) if bundle.projector_module and not notes else None
    experts = options.lm_routing == "experts"
    if experts:
        if routed is None:
            raise InputError(bundle.path, "holds no projectors to route by, so --lm-routing experts cannot choose")
        model = _apply_experts(model, base, merged, bundle.tasks)
    else:
        model = _apply_lora(model, base, merged, options.fold)
    router, tracker = install_router(model, routed, device) if routed else (None, None)
    if merge_fingerprint(merged) != fingerprint:  # the bundle records the rest (experts) by fingerprint
        raise InputError(
            merged,
            "was replaced while it was being read (a `many merge --force` onto it meanwhile?); "
            "nothing was answered: run again once the merge is written",
        )
    return MergedModel(
        model.eval(),
        _merge_prompting(bundle, options).wrap(load_processor(base)),
        router,
        device,
        experts,
        tracker,
        notes,
        Answerer(MERGE, bundle.tasks, fingerprint),
    )


def load_task_adapter(base: str, adapter: Path, options: InferOptions = InferOptions()) -> MergedModel:
    """base + one task's own adapter (its LoRA, folded unless options.fold is False, and its
    projector), no merge and no routing: that task's upper bound, named by its folder."""
    options.check()
    routing_options = [
        flag
        for flag, changed in (
            ("--routing", options.routing != NEAREST),
            ("--eta", options.eta is not None),
            ("--lm-routing", options.lm_routing != "merged"),
            ("--confidence", options.confidence != DEFAULT_CONFIDENCE),
        )
        if changed
    ]
    if routing_options:
        raise InputError(
            None,
            f"{routing_options[0]} does not apply to --adapter (one task's own adapter answers, "
            f"nothing is routed); leave it out",
        )
    stats = adapter / STATS_FILE
    header = read_stats_header(stats) if stats.is_file() else None
    recorded = (  # what its stats recorded, unless the user says otherwise
        recorded_prompting(stats, header.asked_as) if header and options.template is None else None
    )
    prompting, note = prompting_for(adapter, options.asking, recorded)
    with peft_adapter_dir(adapter, base) as loadable:  # a maker's own layout read as PEFT's
        check_supported_config(loadable)
        model, device = _base_model(base, options, (stats, header.base_fingerprint) if header else None)
        model = apply_adapters(model, base, [(loadable, "default")])
        fingerprint = adapter_fingerprint(loadable)
    model = model.merge_and_unload() if options.fold else model
    return MergedModel(
        model.eval(),
        prompting.wrap(load_processor(base)),
        None,
        device,
        notes=[note for note in [qlora.base_note(adapter, options.qlora), note] if note],
        answered_by=Answerer(ADAPTER, (adapter.name,), fingerprint),
    )


def load_routed(path: Path, options: InferOptions = InferOptions()) -> MergedModel:
    """A model `many export --projector routed` wrote (the merged LoRA folded in), with its task
    projectors routed again from the bundle beside the weights."""
    options.check()
    if options.qlora != FULL_PRECISION:
        raise InputError(path, "is an export, served as written (--qlora applied at export): leave --qlora out")
    bundle = read_bundle_header(path / BUNDLE_FILE)
    model, device = _base_model(str(path), options)
    notes = []
    router, tracker = install_router(model, _routed_projectors(model, bundle, options, notes), device)
    processor = _merge_prompting(bundle, options).wrap(load_processor(str(path)))
    return MergedModel(model.eval(), processor, router, device, False, tracker, notes)


def _merge_prompting(bundle: BundleHeader, options: InferOptions) -> Prompting:
    """How the merged model is asked: as the user says, else as its tasks' statistics were, when
    they all were asked alike (a task of an older many's stats counts as the base's template)."""
    if options.template is not None:
        return prompting_for(None, options.asking)[0]
    askings = [recorded_prompting(bundle.path, record) for record in bundle.asked_as]
    if len({(asked.template, asked.chat_template, asked.system, asked.images) for asked in askings}) > 1:
        raise InputError(
            bundle.path,
            "its tasks' statistics were asked with different templates ("
            + "; ".join(f"{task}: {described(record)}" for task, record in zip(bundle.tasks, bundle.asked_as))
            + "): give --template to say how the merged model is asked",
        )
    return prompting_for(None, options.asking, askings[0])[0]


def _base_model(
    base: str, options: InferOptions, built_on: tuple[Path, str] | None = None
) -> tuple[nn.Module, torch.device]:
    """The base model (checked, and refused when it is not the base `built_on` = (file, fingerprint)
    records) where the options place it, and the device the router runs on."""
    fingerprint = base_fingerprint(base, options.qlora)
    if built_on:
        refuse_other_base(*built_on, base, fingerprint)
    device = resolve_device(options.device)
    return load_base_model(base, device, options.placement, options.qlora), device


def install_router(
    model: nn.Module, routed: tuple[RoutedProjector, dict[str, DeferredProjector]], device: torch.device
) -> tuple[RoutedProjector, ImageTracker]:
    """Put the routed projector (and deferred companions) into `model`, with the tracker that
    tells it each image's rows."""
    router, deferred = routed
    replace_projectors(model, router.to(device), {name: module.to(device) for name, module in deferred.items()})
    return router, ImageTracker(model, router)


def load_processor(base: str):
    return models.load_processor(base, padding_side="left")  # generation continues every row at its end


def _routed_projectors(
    model: nn.Module, bundle: BundleHeader, options: InferOptions, notes: list[str]
) -> tuple[RoutedProjector, dict[str, DeferredProjector]]:
    """The routed projector, and a deferred one for each companion the bundle holds weights for
    (by its path from `projector_paths`). Nearest-image routing falls back to the paper's soft
    prototype routing, with a note, where the bundle keeps no calibration images."""
    prototypes = []
    for index, task in enumerate(bundle.tasks):
        prototype = bundle.prototype(index)
        if prototype is None:
            raise InputError(
                bundle.path,
                f"holds no prototype for task {task}, so images cannot be routed; merge adapters that have stats files",
            )
        prototypes.append(prototype)
    routing, owners = options.routing, None
    if routing == NEAREST:  # hard routing over every calibration image
        prototypes, owners = _exemplars(bundle, prototypes[0].numel())
        routing = "hard"
    versions = {}  # module name -> each task's copy, loaded
    for name in bundled_modules(model, bundle):
        versions[name] = [_task_copy(module_at(model, name)) for _ in bundle.tasks]
        for index, module in enumerate(versions[name]):
            load_task_module(module, bundle, index, name)
    eta = options.eta if options.eta is not None else bundle.eta
    confidence = options.confidence if options.lm_routing == "experts" else None
    projector, *companions = versions
    router = RoutedProjector(
        versions[projector],
        torch.stack(prototypes) if owners is None else prototypes,
        bundle.tasks,
        eta,
        routing,
        confidence,
        owners,
    )
    return router, {name: DeferredProjector(versions[name]) for name in companions}


def _exemplars(bundle: BundleHeader, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every task's calibration-image directions, stacked, and the task each row belongs to
    (the bundle holds them for every task with a prototype)."""
    rows = []
    for index, task in enumerate(bundle.tasks):
        exemplars = bundle.exemplars(index)
        if exemplars.dim() != 2 or exemplars.shape[0] == 0 or exemplars.shape[1] != width:
            raise InputError(
                bundle.path,
                f"task {task}'s exemplars have shape {tuple(exemplars.shape)}, expected "
                f"(images, {width}); re-create the merge",
            )
        rows.append(exemplars)
    owners = torch.cat([torch.full((len(part),), index) for index, part in enumerate(rows)])
    return torch.cat(rows), owners


def _task_copy(module: nn.Module) -> nn.Module:
    """A copy of the model's module to load one task's weights into, without accelerate's
    placement hooks (an offloading hook would swap the base weights back in at every call)."""
    from accelerate.hooks import remove_hook_from_module

    clone = remove_hook_from_module(copy.deepcopy(module), recurse=True)
    return clone.to_empty(device="cpu") if any(p.is_meta for p in clone.parameters()) else clone


def bundled_modules(model: nn.Module, bundle: BundleHeader) -> list[str]:
    """The projector and those of its companions the bundle's tasks hold weights for, by name in
    the base model; a bundle whose weights do not all fit there is an InputError."""
    paths = projector_paths(model)
    held = {path: len(bundle.module_state(0, path)) for path in paths}
    if not held.get(paths[0]) or sum(held.values()) != len(bundle.projector_shapes(0)):
        raise InputError(
            bundle.path,
            f"its projector weights (under {bundle.projector_module}) do not all "
            f"belong to the base model's {' and '.join(paths)}: merged for another model?",
        )
    return [path for path in paths if held[path]]


def load_task_module(module: nn.Module, bundle: BundleHeader, index: int, path: str) -> None:
    """Load task `index`'s weights for the module at `path` from the bundle into `module`."""
    state = bundle.module_state(index, path)
    try:
        module.load_state_dict(state)
    except RuntimeError as error:
        detail = " ".join(str(error).split())[:300]
        raise InputError(
            bundle.path, f"the projector of task {bundle.tasks[index]} does not fit the base model ({detail})"
        ) from None


def _apply_lora(model: nn.Module, base: str, merged: Path, fold: bool) -> nn.Module:
    adapted = apply_adapters(model, base, [(merged, "default")])
    return adapted.merge_and_unload() if fold else adapted


def _apply_experts(model: nn.Module, base: str, merged: Path, tasks: tuple[str, ...]) -> nn.Module:
    """The merged LoRA and every task's own, side by side as named PEFT adapters (unfolded)."""
    folder = merged / EXPERTS_DIR
    missing = [task for task in tasks if not (folder / task / ADAPTER_CONFIG).is_file()]
    if missing:
        raise InputError(
            folder,
            f"holds no expert for {', '.join(missing)} (a merge that included them ran with "
            f"--no-experts, or a resume carried none over); merge those tasks again without "
            f"--no-experts",
        )
    adapted = apply_adapters(model, base, [(merged, MERGED)] + [(folder / task, task) for task in tasks])
    layers = lora_layers(adapted)
    media = sorted(set(layers) - text_layers(adapted.get_base_model(), layers))
    if media:  # PEFT's mixed batches pick an adapter per text row; media layers see other rows
        raise InputError(
            folder,
            f"the experts adapt layers outside the language model ({media[0]}, ...); "
            f"--lm-routing experts routes language-model LoRA only: use --lm-routing merged",
        )
    return adapted
