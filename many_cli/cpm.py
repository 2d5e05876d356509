"""Cross-modal Projection Merging: a drop-in `multi_modal_projector` that routes each image
to the task projectors by the cosine similarity of its pooled projector input to each task's
prototype. Pure torch, no I/O.

Use from Python (after `model` has its merged LoRA applied):

    routed = RoutedProjector(projectors, prototypes, tasks=["ocr", "vqa"], eta=0.05)
    model.model.multi_modal_projector = routed
    model.generate(...)
    routed.last_weights  # (images, tasks) routing of the last forward
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

ROUTINGS = ("soft", "hard")


def pooled_direction(features: torch.Tensor, rows_per_image: Sequence[int] | None = None) -> torch.Tensor:
    """One unit vector per image: the projector input mean-pooled over its tokens, then
    L2-normalised. When a model cuts an image into crops and feeds them as separate rows
    (LLaVA-NeXT), `rows_per_image` says how many rows each image has, and the pooling runs over
    every token of all its crops, so an image is one direction however it was cut."""
    features = features.float()
    if features.dim() != 3:
        pooled = features.mean(dim=0, keepdim=True)
    elif rows_per_image is None:
        pooled = features.mean(dim=-2)
    else:
        pooled = torch.stack([crops.mean(dim=(0, 1)) for crops in features.split(list(rows_per_image))])
    return F.normalize(pooled, dim=-1)


def routing_weights(directions: torch.Tensor, prototypes: torch.Tensor, eta: float, routing: str,
                    confidence: float | None = None) -> torch.Tensor:
    """(images, tasks) weights: softmax(cos(f, µ_i) / η), or one-hot on the closest prototype.
    With `confidence`, soft weights whose largest entry reaches it become one-hot too (the
    image is routed to that task alone; the others keep the soft mixture)."""
    similarity = directions @ F.normalize(prototypes.float(), dim=-1).T
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

    def __init__(self, projectors: Sequence[nn.Module], prototypes: torch.Tensor, tasks: Sequence[str],
                 eta: float, routing: str = "soft", confidence: float | None = None):
        super().__init__()
        if len(projectors) != len(tasks) or prototypes.shape[0] != len(tasks):
            raise ValueError("one projector and one prototype per task")
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}")
        self.projectors = nn.ModuleList(projectors)
        self.register_buffer("prototypes", F.normalize(prototypes.float(), dim=-1))
        self.tasks = list(tasks)
        self.eta = eta
        self.routing = routing
        self.confidence = confidence
        self.last_weights: torch.Tensor | None = None
        self.rows_per_image: Sequence[int] | None = None  # set before each forward for cropping models

    def forward(self, image_features: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        weights = routing_weights(pooled_direction(image_features, self.rows_per_image),
                                  self.prototypes.to(image_features.device), self.eta, self.routing, self.confidence)
        self.last_weights = weights.detach()
        if self.rows_per_image is not None:  # every crop of an image takes the image's weights
            counts = torch.tensor(list(self.rows_per_image), device=weights.device)
            weights = weights.repeat_interleave(counts, dim=0)
        per_image = image_features.dim() == 3
        output = None
        for index, projector in enumerate(self.projectors):
            chosen = weights[:, index] > 0
            if not bool(chosen.any()):
                continue
            inputs = image_features[chosen] if per_image else image_features
            projected = projector(inputs, *args, **kwargs)
            scale = weights[chosen, index].to(projected.dtype)
            term = projected * scale.view(-1, *([1] * (projected.dim() - 1)))
            if output is None:
                output = torch.zeros((image_features.shape[0], *projected.shape[1:]) if per_image
                                     else projected.shape, dtype=projected.dtype, device=projected.device)
            if per_image:
                output[chosen] += term
            else:
                output += term
        return output
