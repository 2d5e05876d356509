"""`many merge --one-pass`'s statistics: RegMean++ in one walk. Every task's calibration records
go through the model once, one decoder layer at a time, on the hidden states kept from the layer
below; inside a layer, one stage at a time (the modules that read one input: q/k/v, o, gate/up,
down), each stage's Σ x xᵀ is taken on the inputs that the already merged stages below it give,
handed to the merge, and the stage's merged LoRA switched on before the walk goes on. Each task's
records see its own projector (CPM routes its calibration images to it), as `stats --under` does.

The hidden states of one layer's input, for every task's records, are what the walk keeps:
in memory up to a budget, the rest spilled to files in a scratch folder."""

from __future__ import annotations

import shutil
from contextlib import ExitStack
from dataclasses import dataclass, replace
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Callable, Iterator, Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from many_cli.errors import InputError
from many_cli.formats import read_records
from many_cli.models import apply_adapters, load_base_model, load_processor, lora_layers, resolve_device
from many_cli.options import MergeOptions, StatsOptions
from many_cli.prompting import Asking, prompting_for, recorded_prompting
from many_cli.state import StatsHeader
from many_cli.stats.accumulate import UpperTriangle, forward
from many_cli.stats.collect import StatsReport, encoded_batches

Taken = list[tuple[torch.Tensor, int]]  # per task: the packed Σ x xᵀ of a stage's input, its rows


class Stage(Protocol):
    """What the walk needs of a merge's input group: the modules that read its input."""

    key: str
    modules: tuple[str, ...]


@dataclass(frozen=True)
class TakenStage:
    """A stage and every task's statistics of its input, taken in the merged model below it."""

    group: Stage
    taken: Taken

    @property
    def key(self) -> str:
        return self.group.key


class _Stages:
    """The walk's stages as a sized sequence (for a progress bar), taken as they are iterated."""

    def __init__(self, walk: "StageWalk", groups: list[Stage], scratch: Path):
        self._walk, self._groups, self._scratch = walk, groups, scratch

    def __len__(self) -> int:
        return len(self._groups)

    def __iter__(self) -> Iterator[TakenStage]:
        return self._walk._walk(self._groups, self._scratch)


@dataclass(frozen=True)
class WalkedTask:
    """One task as the walk runs it: its PEFT adapter folder, its calibration data and its stats
    file (how its records were asked and counted)."""

    adapter: Path
    data: Path
    stats: StatsHeader


class _Stop(Exception):
    """Raised by a hook once what a forward was run for is taken: the rest is not computed."""


@dataclass
class _Batch:
    task: int
    mask: torch.Tensor  # (positions,) bool: which rows of the flattened hidden states count
    scale: torch.Tensor | None  # √weight of each counted position
    arguments: list[dict]  # per decoder layer: the keyword arguments the model called it with


class HiddenStates:
    """One tensor per batch; past `limit` bytes, the rest in files under `folder`."""

    def __init__(self, folder: Path, limit: int):
        self._folder, self._limit, self._held = folder, limit, 0
        self._memory: dict[int, torch.Tensor] = {}
        self._on_disk: set[int] = set()

    @property
    def spilled(self) -> int:
        """The batches whose hidden states went to disk at some layer."""
        return len(self._on_disk)

    def put(self, key: int, tensor: torch.Tensor) -> None:
        self._drop(key)
        size = tensor.numel() * tensor.element_size()
        if self._held + size <= self._limit:
            self._memory[key] = tensor
            self._held += size
            return
        self._folder.mkdir(exist_ok=True)
        save_file({"hidden": tensor.contiguous().cpu()}, self._folder / f"{key}.safetensors")
        self._on_disk.add(key)

    def get(self, key: int, device: torch.device) -> torch.Tensor:
        if key in self._memory:
            return self._memory[key]
        return load_file(self._folder / f"{key}.safetensors", device=str(device))["hidden"]

    def _drop(self, key: int) -> None:
        if key in self._memory:
            held = self._memory.pop(key)
            self._held -= held.numel() * held.element_size()
        (self._folder / f"{key}.safetensors").unlink(missing_ok=True)


def walker(options: MergeOptions, data: list[Path]) -> Callable[[list[tuple[Path, StatsHeader]]], "StageWalk"]:
    """What `merge` opens the walk with under --one-pass: its tasks (adapter folder, stats file)
    paired with `data` in task order, on the --model base and --device, holding --walk-memory GiB."""

    def open_walk(tasks: list[tuple[Path, StatsHeader]]) -> StageWalk:
        if len(data) != len(tasks):
            raise InputError(
                None,
                f"--one-pass takes one --data per adapter, in task order: {len(tasks)} adapters, {len(data)} --data",
            )
        walked = [WalkedTask(adapter, source, stats) for (adapter, stats), source in zip(tasks, data)]
        stats_options = StatsOptions(device=options.device, qlora=options.qlora)
        return StageWalk(str(options.model), walked, stats_options, int(options.walk_memory * 2**30))

    return open_walk


class StageWalk:
    """The walk over `tasks` on `base`: `ordered` loads the model and puts the merge's groups in
    the order its forward reaches them, `stages` yields each with every task's statistics of its
    input, and `install` switches a solved stage's merged LoRA on before the next is taken."""

    def __init__(self, base: str, tasks: list[WalkedTask], options: StatsOptions, memory: int):
        self._base, self._tasks, self._options, self._memory = base, tasks, options, memory
        self._device = resolve_device(options.device)
        self._hooks: list = []
        self._model: nn.Module | None = None
        self.spilled = 0  # batches of hidden states the walk kept on disk

    def ordered(self, groups: list[Stage]) -> list[Stage]:
        """`groups` in the order the forward reaches them (one batch of the first task run)."""
        model = self._loaded()
        self._where = _place(groups, self._modules, _decoder_layers(model), self._tasks)
        met: list[str] = []
        group_of = {name: group.key for group in groups for name in group.modules}

        def seen(key: str, *_):
            if key not in met:
                met.append(key)

        handles = [self._modules[name].register_forward_pre_hook(partial(seen, key)) for name, key in group_of.items()]
        try:
            encoded, _ = next(self._batches(0, first_only=True))
            forward(model, encoded, self._device)
        finally:
            for handle in handles:
                handle.remove()
        missing = [group.key for group in groups if group.key not in met]
        if missing:
            raise RuntimeError(f"the model's forward never reached {', '.join(missing)}")
        return sorted(groups, key=lambda group: met.index(group.key))

    def stages(self, groups: list[Stage], scratch: Path) -> _Stages:
        """Every group of `ordered`, with its statistics; the walk runs as they are iterated, its
        hidden states spilled under `scratch` (removed after)."""
        return _Stages(self, groups, scratch)

    def _walk(self, groups: list[Stage], scratch: Path) -> Iterator[TakenStage]:
        with ExitStack() as cleanup:
            cleanup.callback(self._remove_hooks)
            model = self._loaded()
            layers = _decoder_layers(model)
            hidden = HiddenStates(scratch / "hidden", self._memory)
            cleanup.callback(_remove_folder, scratch / "hidden")
            batches = self._first_inputs(model, layers, hidden)
            current = 0
            for group in groups:
                while current < self._where[group.key]:  # the layer below is merged: its output is the next input
                    _advance(layers[current], current, batches, hidden, self._device)
                    current += 1
                yield TakenStage(group, self._take(layers[current], current, group, batches, hidden))
            self.spilled = hidden.spilled

    def install(self, merged: list[tuple[str, torch.Tensor, torch.Tensor]]) -> None:
        """A solved stage's merged LoRA (module, A, B), added to its modules' outputs from now on."""
        for module, a, b in merged:
            layer = self._modules[module]
            weight = layer.base_layer.weight
            a, b = a.to(weight.device, torch.float32), b.to(weight.device, torch.float32)
            self._hooks.append(layer.register_forward_hook(partial(_add_lora, a, b)))

    def _loaded(self) -> nn.Module:
        """The base with every task's adapter loaded (named task0, task1, ...), their LoRA off."""
        if self._model is None:
            options = self._options
            self._processor = load_processor(self._base, options.padding_side)
            model = load_base_model(self._base, self._device, options.placement, options.qlora)
            names = [(task.adapter, f"task{index}") for index, task in enumerate(self._tasks)]
            self._model = apply_adapters(model, self._base, names).to(self._device).eval()
            self._modules = lora_layers(self._model)
        return self._model

    def _batches(self, index: int, first_only: bool = False) -> Iterator[tuple[dict, torch.Tensor | None]]:
        """Task `index`'s encoded batches, asked as its stats were taken, its projector active."""
        task = self._tasks[index]
        self._model.set_adapter(f"task{index}")  # the task's projector (modules_to_save)
        for layer in self._modules.values():
            layer.enable_adapters(False)  # the merged stages are added by hooks as they are solved
        options, prompting = _asked(task, self._options)
        if first_only:
            options = replace(options, max_samples=min(options.max_samples, options.batch_size))
        records = islice(read_records(task.data, options.reading), options.max_samples)
        return encoded_batches(prompting.wrap(self._processor), records, options, StatsReport(task.data))

    def _first_inputs(self, model: nn.Module, layers: nn.ModuleList, hidden: HiddenStates) -> list[_Batch]:
        """Each task's batches, run up to the first decoder layer (its own projector, no LoRA):
        the first layer's input kept, and the arguments the model gives every layer."""
        batches: list[_Batch] = []
        for index in range(len(self._tasks)):
            for encoded, weights in self._batches(index):
                mask = encoded["attention_mask"].bool()
                arguments: list[dict] = []
                captured = _capture_arguments(layers, arguments)
                try:
                    forward(model, encoded, self._device)
                except _Stop:
                    pass
                finally:
                    for handle in captured:
                        handle.remove()
                flat = mask.reshape(-1).to(self._device)
                scale = None if weights is None else weights.reshape(-1).to(self._device)[flat].sqrt()[:, None]
                hidden.put(len(batches), arguments[0].pop("hidden"))
                batches.append(_Batch(index, flat, scale, arguments))
        return batches

    def _take(self, layer: nn.Module, number: int, group: Stage, batches: list[_Batch], hidden: HiddenStates) -> Taken:
        """Every task's Σ x xᵀ of `group`'s input: the layer run on each batch up to the group."""
        sums = [None] * len(self._tasks)
        for key, batch in enumerate(batches):
            taken: list[torch.Tensor] = []
            handles = [
                self._modules[name].register_forward_pre_hook(partial(_take_input, taken)) for name in group.modules
            ]
            try:
                _run_layer(layer, hidden.get(key, self._device), batch.arguments[number])
            except _Stop:
                pass
            finally:
                for handle in handles:
                    handle.remove()
            if not taken:
                raise RuntimeError(f"the forward of decoder layer {number} never reached {group.modules[0]}")
            flat = taken[0].reshape(-1, taken[0].shape[-1])[batch.mask]
            if batch.scale is not None:  # Σ w x xᵀ = Σ (√w x)(√w x)ᵀ
                flat = flat * batch.scale.to(flat.dtype)
            if sums[batch.task] is None:
                sums[batch.task] = UpperTriangle(flat.shape[1], self._device)
            sums[batch.task].add(flat)
        return [(triangle.packed(), triangle.rows_added) for triangle in sums]

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()


def _asked(task: WalkedTask, options: StatsOptions):
    """The stats options and prompting that took `task`'s stats file: the same records, the same
    token rule."""
    stats = task.stats
    asked = replace(
        options,
        answer_weight=stats.answer_weight,
        max_samples=stats.records + stats.skipped,
        skip_bad=stats.skipped > 0,
        text_only=stats.images == 0,
    )
    recorded = recorded_prompting(stats.path, stats.asked_as) if stats.asked_as else None
    prompting, _ = prompting_for(task.adapter, Asking(), recorded)
    return asked, prompting


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    decoder = model.get_base_model().get_decoder() if hasattr(model.get_base_model(), "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise InputError(
            None, "--one-pass walks a language model's decoder layers, and this model has none it can find"
        )
    return layers


def _place(
    groups: list[Stage], modules: dict[str, nn.Module], layers: nn.ModuleList, tasks: list[WalkedTask]
) -> dict[str, int]:
    """Group -> the decoder layer its modules sit in; a module outside them cannot be walked."""
    layer_of = {id(module): number for number, layer in enumerate(layers) for module in layer.modules()}
    where = {}
    for group in groups:
        for name in group.modules:
            if id(modules.get(name)) not in layer_of:
                owner = next(task for task in tasks if task.stats.input_of(name) is not None)
                raise InputError(
                    owner.adapter,
                    f"--one-pass walks the language model's decoder layers, and {name} lies outside "
                    "them: merge without --one-pass (or refine with `many stats --under`)",
                )
        where[group.key] = layer_of[id(modules[group.modules[0]])]
    return where


def _capture_arguments(layers: nn.ModuleList, arguments: list[dict]) -> list:
    """Hooks keeping each layer's keyword arguments (and the first layer's hidden states); the
    last layer's stops the forward."""

    def keep(number: int, _module: nn.Module, args: tuple, kwargs: dict):
        arguments.append(dict(kwargs))
        if number == 0:
            arguments[0]["hidden"] = args[0] if args else kwargs["hidden_states"]
        if number == len(layers) - 1:
            raise _Stop

    return [
        layer.register_forward_pre_hook(partial(keep, number), with_kwargs=True) for number, layer in enumerate(layers)
    ]


def _run_layer(layer: nn.Module, hidden: torch.Tensor, arguments: dict) -> torch.Tensor:
    arguments = {name: value for name, value in arguments.items() if name != "hidden_states"}
    with torch.inference_mode():
        output = layer(hidden, **arguments)
    return output[0] if isinstance(output, tuple) else output


def _advance(layer: nn.Module, number: int, batches: list[_Batch], hidden: HiddenStates, device) -> None:
    """The next layer's input: this layer, with its stages merged, run on every batch."""
    for key, batch in enumerate(batches):
        hidden.put(key, _run_layer(layer, hidden.get(key, device), batch.arguments[number]))


def _take_input(taken: list[torch.Tensor], _module: nn.Module, args: tuple) -> None:
    taken.append(args[0])
    raise _Stop


def _add_lora(a: torch.Tensor, b: torch.Tensor, _module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """A merged LoRA of scale 1 (B A), as PEFT adds one: in float32, added in the output's dtype."""
    delta = (args[0].to(torch.float32) @ a.T) @ b.T
    return output + delta.to(output.dtype)


def _remove_folder(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
