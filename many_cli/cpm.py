"""Cross-modal Projection Merging: a drop-in projector (LLaVA's `multi_modal_projector`,
Qwen-VL's `visual.merger`, ...) that routes each image to the task projectors by the cosine
similarity of its pooled projector input to each task's prototype. Pure torch, no I/O.

Use from Python (after `model` has its merged LoRA applied):

    routed = RoutedProjector(projectors, prototypes, tasks=["ocr", "vqa"], eta=0.05)
    model.model.multi_modal_projector = routed
    model.generate(...)
    routed.last_weights  # (images, tasks) routing since it was last set to None
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

ROUTINGS = ("soft", "hard")


def image_rows(total: int, image_shares: Sequence[int] | None) -> list[int] | None:
    """How many of `total` rows (along the first dimension) belong to each image, when each
    image's share of them is known (crops, tiles, patches, frames); None: one row per image."""
    if image_shares is None:
        return None
    whole = sum(image_shares)
    if whole == 0 or any(total * share % whole for share in image_shares):
        raise ValueError(f"{total} projector rows do not split into images by shares {list(image_shares)}")
    return [total * share // whole for share in image_shares]


def pooled_direction(features: torch.Tensor, image_shares: Sequence[int] | None = None) -> torch.Tensor:
    """One unit vector per image: the projector input mean-pooled over all of the image's rows,
    then L2-normalised. Rows along the first dimension are images, unless `image_shares` says
    how they divide into images (crops of LLaVA-NeXT, tiles of InternVL, a flat list of patches
    in Qwen-VL): an image is then one direction however it was cut. A 2-D input without shares
    is one image."""
    features = features.float()
    if image_shares is None and features.dim() == 2:
        image_shares = [1]
    rows = image_rows(features.shape[0], image_shares)
    if rows is None:
        pooled = features.mean(dim=-2)
    else:
        pooled = torch.stack([part.reshape(-1, part.shape[-1]).mean(dim=0) for part in features.split(rows)])
    return F.normalize(pooled, dim=-1)


def routing_weights(
    directions: torch.Tensor,
    prototypes: torch.Tensor,
    eta: float,
    routing: str,
    confidence: float | None = None,
    owners: torch.Tensor | None = None,
) -> torch.Tensor:
    """(images, tasks) weights: softmax(cos(f, µ_i) / η), or one-hot on the closest prototype.
    With `owners` (the task of each prototype row), a task has several rows and its similarity
    is that of its closest one (routing to the nearest calibration image's task). With
    `confidence`, soft weights whose largest entry reaches it become one-hot too (the image is
    routed to that task alone; the others keep the soft mixture)."""
    similarity = directions @ F.normalize(prototypes.float(), dim=-1).T
    if owners is not None:
        per_task = similarity.new_full((similarity.shape[0], int(owners.max()) + 1), -torch.inf)
        similarity = per_task.scatter_reduce(1, owners.expand_as(similarity), similarity, "amax")
    hard = F.one_hot(similarity.argmax(dim=-1), similarity.shape[-1]).to(similarity.dtype)
    if routing == "hard":
        return hard
    soft = torch.softmax(similarity / eta, dim=-1)
    if confidence is None:
        return soft
    return torch.where(soft.max(dim=-1, keepdim=True).values >= confidence, hard, soft)


class RoutedProjector(nn.Module):
    """Σ_i w_i P_i(x) per image, with w from `routing_weights`; a projector whose weight is
    exactly 0 (hard routing) is not run for that image."""

    def __init__(
        self,
        projectors: Sequence[nn.Module],
        prototypes: torch.Tensor,
        tasks: Sequence[str],
        eta: float,
        routing: str = "soft",
        confidence: float | None = None,
        owners: torch.Tensor | None = None,
    ):
        super().__init__()
        if len(projectors) != len(tasks):
            raise ValueError("one projector per task")
        if owners is None and prototypes.shape[0] != len(tasks):
            raise ValueError("one prototype per task, or the owner task of each")
        if owners is not None and (
            owners.shape != prototypes.shape[:1] or set(owners.tolist()) != set(range(len(tasks)))
        ):
            raise ValueError("every prototype row needs its owner task, and every task a row")
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}")
        self.projectors = nn.ModuleList(projectors)
        self.register_buffer("prototypes", F.normalize(prototypes.float(), dim=-1))
        self.register_buffer("owners", None if owners is None else owners.long())
        self.tasks = list(tasks)
        self.eta = eta
        self.routing = routing
        self.confidence = confidence
        self.last_weights: torch.Tensor | None = None
        self.weights: torch.Tensor | None = None  # the latest forward's
        self.image_shares: Sequence[int] | None = None  # set before each forward (families.ImageTracker)

    def forward(self, image_features: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        image_features = image_features.to(self.prototypes.device)  # under a device map, the tower may sit elsewhere
        weights = routing_weights(
            pooled_direction(image_features, self.image_shares),
            self.prototypes,
            self.eta,
            self.routing,
            self.confidence,
            self.owners,
        )
        self.weights = weights  # Images then videos when a forward encodes both; `last_weights = None` starts afresh.
        self.last_weights = (
            weights.detach() if self.last_weights is None else torch.cat([self.last_weights, weights.detach()])
        )
        # Rows along the first dimension are whole images, crops or tiles (then a projector runs
        # on the rows of the images routed to it); a flat list of patches (Qwen-VL, Mistral3)
        # is merged across neighbours, so each projector runs on all of it.
        per_row = image_features.dim() == 3
        output = None
        for index, projector in enumerate(self.projectors):
            weight = weights[:, index]
            if not bool((weight > 0).any()):
                continue
            if per_row:
                chosen = self._spread(weight, image_features.shape[0]) > 0
                projected = projector(image_features[chosen], *args, **kwargs)
                scale = self._spread(weight, image_features.shape[0])[chosen]
            else:
                projected = projector(image_features, *args, **kwargs)
                scale = self._spread(weight, projected.shape[0])
            term = _scaled(projected, scale)
            if output is None:
                output = torch.zeros(
                    (image_features.shape[0], *projected.shape[1:]) if per_row else projected.shape,
                    dtype=projected.dtype,
                    device=projected.device,
                )
            if per_row:
                output[chosen] += term
            else:
                output += term
        return output

    def mix(self, outputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Σ_i w_i outputs_i, one output per task, with the latest forward's weights spread over
        each image's rows: the mixture for projectors that ran before this one decided."""
        return sum(
            _scaled(output, self._spread(weight, output.shape[0]))
            for weight, output in zip(self.weights.T, outputs, strict=True)
        )

    def _spread(self, weight: torch.Tensor, rows: int) -> torch.Tensor:
        """Each image's weight repeated over its share of `rows` rows."""
        counts = image_rows(rows, self.image_shares or [1] * weight.numel())
        return weight.repeat_interleave(torch.tensor(counts, device=weight.device))


def _scaled(rows: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Each row (along the first dimension) times its scale."""
    return rows * scale.to(rows.dtype).view(-1, *([1] * (rows.dim() - 1)))


class DeferredProjector(nn.Module):
    """Each task's version of a projector that runs before the routed one has decided (Qwen3-VL's
    DeepStack mergers run on inner vision blocks): every version runs, the first one's output
    stands in, and `settle` later swaps the stand-in for the mixture with the routed projector's
    weights for the same images."""

    def __init__(self, projectors: Sequence[nn.Module]):
        super().__init__()
        self.projectors = nn.ModuleList(projectors)
        self._pending: dict[int, list[torch.Tensor]] = {}  # id(stand-in) -> every task's output

    def forward(self, *args, **kwargs) -> torch.Tensor:
        outputs = [projector(*args, **kwargs) for projector in self.projectors]
        self._pending[id(outputs[0])] = outputs
        return outputs[0]

    def settle(self, values: list, router: RoutedProjector) -> None:
        """Replace, in place, the stand-ins found in `values` by their routed mixtures."""
        for index, value in enumerate(values):
            outputs = self._pending.pop(id(value), None)
            if outputs is not None:
                values[index] = router.mix(outputs)

    def check_settled(self) -> None:
        """A stand-in left unsettled would silently answer with the first task's projector."""
        if self._pending:
            self._pending.clear()
            raise RuntimeError("a deferred projector's output did not reach the encoder's output unchanged")
