"""Model families: where each family keeps the projector CPM routes, how its input rows divide
into images, and the plumbing that finds, replaces and tracks the projector by that table.

Adding a family: one `Family` entry in FAMILIES (keyed by the config's `model_type`), with a rule
for its rows when one image is more than one row, and a builder in tests/families.py."""

from __future__ import annotations

import functools
import inspect
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn


@dataclass(frozen=True)
class Family:
    """Where a model family keeps the projector CPM routes, and how its input rows belong to
    images. `projector` is the module's path inside the module that encodes images (the one
    with `get_image_features`); `shares` gives each image's share of the projector's input rows
    (its crops, tiles or patches) from that encoding call's arguments, or None for one row
    (along the first dimension) per image. An image's rows are pooled into one direction.
    `companions`, a ModuleList's path next to the projector, holds projectors the encoding runs
    before the projector decides (Qwen3-VL's DeepStack mergers, on inner vision blocks): each
    task's versions run, and their outputs are weighted like the projector's once the module
    holding the list returns."""

    projector: str
    shares: Callable[[nn.Module, dict[str, Any]], list[int] | None] | None = None
    companions: str | None = None


def _grid_crops(owner: nn.Module, arguments: dict[str, Any]) -> list[int] | None:
    """LLaVA-NeXT, LLaVA-OneVision: crops per image by the model's own grid rule (5-D pixels);
    a video's frames are one clip each."""
    videos = arguments.get("pixel_values_videos")
    if videos is not None:  # (videos, frames, channels, height, width)
        return [videos.shape[1]] * videos.shape[0]
    pixel_values, sizes = arguments.get("pixel_values"), arguments.get("image_sizes")
    if pixel_values is None or pixel_values.dim() != 5 or sizes is None:
        return None
    rule = sys.modules[type(owner).__module__].image_size_to_num_patches
    return [
        rule(
            image_size=size,
            grid_pinpoints=owner.config.image_grid_pinpoints,
            patch_size=owner.config.vision_config.image_size,
        )
        for size in sizes
    ]


def _patch_grid(_owner: nn.Module, arguments: dict[str, Any]) -> list[int] | None:
    """Qwen-VL: a flat list of patches, t·h·w of them per image or video."""
    grid = next(
        (arguments[key] for key in ("image_grid_thw", "video_grid_thw") if arguments.get(key) is not None), None
    )
    return None if grid is None else grid.prod(dim=-1).tolist()


def _patch_sizes(owner: nn.Module, arguments: dict[str, Any]) -> list[int] | None:
    """Mistral3 (Pixtral): a flat list of patches, (height / patch) · (width / patch) per image."""
    sizes = arguments.get("image_sizes")
    patch = owner.vision_tower.patch_size
    return None if sizes is None else [int(height // patch) * int(width // patch) for height, width in sizes.tolist()]


def _placeholders(owner: nn.Module, arguments: dict[str, Any]) -> list[int] | None:
    """InternVL: tiles in proportion to each image's tokens, an unbroken run of image tokens in the
    input ids that went with the pixels (a record may hold several images)."""
    input_ids = arguments.get("input_ids")
    if input_ids is None:
        return None
    runs = []
    for row in (input_ids == owner.config.image_token_id).tolist():
        runs += [len(run) for run in "".join("1" if is_image else " " for is_image in row).split()]
    return runs


def _real_tiles(_owner: nn.Module, arguments: dict[str, Any]) -> list[int] | None:
    """Idefics3, SmolVLM: the tiles of each record, less the all-zero padding ones (the rule the
    model itself uses to drop them)."""
    pixel_values = arguments.get("pixel_values")
    if pixel_values is None or pixel_values.dim() != 5:
        return None
    real = pixel_values.flatten(start_dim=2).ne(0).any(dim=-1).sum(dim=-1).tolist()
    return [count for count in real if count]


FAMILIES: dict[str, Family] = {
    "llava": Family("multi_modal_projector"),
    "llava_next": Family("multi_modal_projector", _grid_crops),
    "llava_onevision": Family("multi_modal_projector", _grid_crops),
    "gemma3": Family("multi_modal_projector"),
    "paligemma": Family("multi_modal_projector"),
    "qwen2_audio": Family("multi_modal_projector"),
    "internvl": Family("multi_modal_projector", _placeholders),
    "mistral3": Family("multi_modal_projector", _patch_sizes),
    "qwen2_vl": Family("visual.merger", _patch_grid),
    "qwen2_5_vl": Family("visual.merger", _patch_grid),
    "qwen3_vl": Family("visual.merger", _patch_grid, companions="visual.deepstack_merger_list"),
    "idefics3": Family("connector", _real_tiles),
    "smolvlm": Family("connector", _real_tiles),
}
_ENCODERS = ("get_image_features", "get_video_features")


def family_of(model: nn.Module) -> Family | None:
    return FAMILIES.get(getattr(getattr(model, "config", None), "model_type", None))


def module_name(model: nn.Module, path: str) -> str | None:
    """The name in `model` of the module at `path` inside the module that encodes images."""
    return next((name for name, _ in model.named_modules() if name == path or name.endswith("." + path)), None)


def _projector_name(model: nn.Module) -> str | None:
    family = family_of(model)
    return None if family is None else module_name(model, family.projector)


def projector_paths(model: nn.Module) -> list[str]:
    """Where the projector and each of its companions sit, as paths inside the module that
    encodes images (what a bundle's weights are matched by); empty without a known projector."""
    family = family_of(model)
    if family is None or _projector_name(model) is None:
        return []
    companions = module_name(model, family.companions) if family.companions else None
    count = 0 if companions is None else len(model.get_submodule(companions))
    return [family.projector, *(f"{family.companions}.{index}" for index in range(count))]


def module_at(model: nn.Module, path: str) -> nn.Module:
    """The module at `path` (from `projector_paths`) in `model`, wrapped by PEFT or not."""
    return model.get_submodule(module_name(model, path))


def routable_modules(saved: list[str]) -> bool:
    """Whether modules saved whole by an adapter (modules_to_save) are one family's projector,
    alone or with items of its companion list: the modules CPM can route."""
    for family in FAMILIES.values():
        kinds = [rf"(.*\.)?{re.escape(family.projector)}"]
        if family.companions:
            kinds.append(rf"(.*\.)?{re.escape(family.companions)}\.\d+")
        if any(re.fullmatch(kinds[0], name) for name in saved) and all(
            any(re.fullmatch(kind, name) for kind in kinds) for name in saved
        ):
            return True
    return False


def _owner_name(model: nn.Module) -> str | None:
    name = _projector_name(model)
    return None if name is None else name[: -len(family_of(model).projector)].rstrip(".")


def no_projector_reason(model: nn.Module) -> str:
    """Why `find_projector` found nothing, saying what was looked for."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = family_of(model)
    if family is None:
        return f"many knows no projector for model type {model_type!r} (known: {', '.join(sorted(FAMILIES))})"
    return f"the {model_type} model has no module {family.projector!r}"


def find_projector(model: nn.Module) -> nn.Module | None:
    """The multimodal projector, found through the family table, whatever the model class."""
    name = _projector_name(model)
    return None if name is None else model.get_submodule(name)


def replace_projectors(model: nn.Module, router: nn.Module, deferred: Mapping[str, nn.Module]) -> None:
    """Put `router` where the model's projector was and each of `deferred` where the companion
    at that path (from `projector_paths`) was; the module holding the companions settles their
    outputs each time it returns."""
    name = _projector_name(model)
    if name is None:
        raise ValueError(no_projector_reason(model))
    for path, replacement in {name: router, **deferred}.items():
        parent, _, attribute = module_name(model, path).rpartition(".")
        setattr(model.get_submodule(parent), attribute, replacement)
    if deferred:
        caller = model.get_submodule(module_name(model, next(iter(deferred))).rsplit(".", 2)[0])
        caller.register_forward_hook(lambda _module, _args, output: _settle(output, list(deferred.values()), router))


def _settle(output: Any, deferred: list[nn.Module], router: nn.Module) -> None:
    """Swap, in every list the encoder returned, the deferred projectors' stand-ins for their
    routed mixtures."""
    for value in output.values() if hasattr(output, "values") else output:
        if isinstance(value, list):
            for projector in deferred:
                projector.settle(value, router)
    for projector in deferred:
        projector.check_settled()


class ImageTracker:
    """Whenever the module that owns the projector encodes images or videos (forward and
    generate alike), tells `target` (a RoutedProjector or a prototype sum) each image's share of
    the projector's input rows, by the family's rule."""

    def __init__(self, model: nn.Module, target: object):
        self.target = target
        self.input_ids: torch.Tensor | None = None
        owner_name = _owner_name(model)
        self.owner = None if owner_name is None else model.get_submodule(owner_name)
        if self.owner is None:
            return
        self.family = family_of(model)
        # generate() encodes images before the first forward: the input ids come from either.
        self._wrap(model, "generate", self._remember_ids)
        self._wrap(self.owner, "forward", self._remember_ids)
        for encoder in _ENCODERS:
            self._wrap(self.owner, encoder, self._set_shares)

    @staticmethod
    def _wrap(module: nn.Module, method: str, before: Callable[[dict[str, Any]], None]) -> None:
        original = getattr(module, method, None)
        if original is None:
            return
        signature = inspect.signature(original)

        @functools.wraps(original)  # generate() inspects the signatures
        def wrapped(*args, **kwargs):
            before(signature.bind_partial(*args, **kwargs).arguments)
            return original(*args, **kwargs)

        setattr(module, method, wrapped)

    def _remember_ids(self, arguments: dict[str, Any]) -> None:
        self.input_ids = arguments.get("input_ids", arguments.get("kwargs", {}).get("input_ids"))

    def _set_shares(self, arguments: dict[str, Any]) -> None:
        rule = self.family.shares
        known = {"input_ids": self.input_ids, **arguments}
        self.input_ids = None  # used once: never another batch's
        self.target.image_shares = None if rule is None else rule(self.owner, known)

    def encode_images(self, encoded: Mapping[str, Any]) -> None:
        """Run the image encoder alone on a processor's output (routing before generation)."""
        encode = self.owner.get_image_features
        accepted = inspect.signature(encode).parameters
        self.input_ids = encoded.get("input_ids")
        encode(**{key: value for key, value in encoded.items() if key in accepted})
