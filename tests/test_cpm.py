"""The routed projector against a brute-force weighted sum."""

import pytest
import torch
from torch import nn

from many_cli.cpm import DeferredProjector, RoutedProjector


def make_router(eta: float, routing: str = "soft"):
    torch.manual_seed(0)
    projectors = [nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 5)) for _ in range(3)]
    prototypes = torch.randn(3, 6)
    return RoutedProjector(projectors, prototypes, ["a", "b", "c"], eta, routing), projectors, prototypes


def test_soft_routing_is_the_softmax_weighted_sum_of_projectors():
    router, projectors, prototypes = make_router(eta=0.3)
    features = torch.randn(4, 7, 6)
    with torch.no_grad():
        output = router(features)
        for image in range(4):
            pooled = features[image].mean(dim=0)
            cosines = torch.stack([torch.cosine_similarity(pooled, p, dim=0) for p in prototypes])
            weights = torch.exp(cosines / 0.3) / torch.exp(cosines / 0.3).sum()
            expected = sum(w * projector(features[image]) for w, projector in zip(weights, projectors))
            assert torch.allclose(output[image], expected, atol=1e-5)
            assert torch.allclose(router.last_weights[image], weights, atol=1e-6)
    assert torch.allclose(router.last_weights.sum(dim=1), torch.ones(4))


def test_soft_routing_tends_to_hard_as_eta_goes_to_zero():
    features = torch.randn(5, 7, 6)
    hard, projectors, prototypes = make_router(eta=1.0, routing="hard")
    with torch.no_grad():
        hard_output = hard(features)
        # The closest prototype by cosine, computed here, not read from the router.
        pooled = features.mean(dim=1)
        choice = torch.stack([torch.cosine_similarity(pooled, p[None], dim=1) for p in prototypes], 1).argmax(1)
        assert len(set(choice.tolist())) > 1  # the images do not all pick one projector
        for image in range(5):
            assert torch.allclose(hard_output[image], projectors[choice[image]](features[image]), atol=1e-6)
        gaps = []
        for eta in (1.0, 0.1, 1e-3):
            soft, _, _ = make_router(eta)
            gaps.append(float((soft(features) - hard_output).abs().max()))
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-5


def test_a_deferred_projector_settles_to_each_images_own_mixture():
    """Qwen3-VL's order: a deferred projector runs on inner rows before the routed one decides on
    the final rows of the same images (a flat list: 3 rows of one image, 5 of the next)."""
    router, _, prototypes = make_router(eta=0.3)
    torch.manual_seed(1)
    inner = [nn.Linear(4, 2) for _ in range(3)]
    deferred = DeferredProjector(inner)
    early, late = torch.randn(8, 4), torch.randn(8, 6)
    router.image_shares = [3, 5]
    with torch.no_grad():
        stand_in = deferred(early)
        router(late)
        outputs = [stand_in]
        deferred.settle(outputs, router)
        deferred.check_settled()
        for rows in (slice(0, 3), slice(3, 8)):
            cosines = torch.stack([torch.cosine_similarity(late[rows].mean(dim=0), p, dim=0) for p in prototypes])
            weights = torch.softmax(cosines / 0.3, dim=0)
            expected = sum(w * projector(early[rows]) for w, projector in zip(weights, inner))
            assert torch.allclose(outputs[0][rows], expected, atol=1e-6)
        assert not torch.allclose(outputs[0][:3], inner[0](early[:3]))
        deferred(early)  # never settled: the first task's output would answer silently
        with pytest.raises(RuntimeError):
            deferred.check_settled()


def test_nearest_routing_follows_the_closest_calibration_image():
    """With several prototype rows per task (their owners given), a task's similarity is that of
    its closest row: hard routing picks the owner of the nearest row, soft routing the softmax
    of the per-task maxima. Brute force over the rows here."""
    torch.manual_seed(1)
    projectors = [nn.Linear(6, 5) for _ in range(3)]
    rows, owners = torch.randn(7, 6), torch.tensor([0, 0, 1, 2, 2, 2, 1])
    features = torch.randn(5, 4, 6)
    pooled = features.mean(dim=1)
    cosines = torch.stack([torch.cosine_similarity(pooled, row[None], dim=1) for row in rows], dim=1)
    per_task = torch.stack([cosines[:, owners == task].max(dim=1).values for task in range(3)], dim=1)
    hard = RoutedProjector(projectors, rows, ["a", "b", "c"], 0.2, "hard", owners=owners)
    soft = RoutedProjector(projectors, rows, ["a", "b", "c"], 0.2, "soft", owners=owners)
    with torch.no_grad():
        hard(features), soft(features)
    nearest = owners[cosines.argmax(dim=1)]
    assert len(set(nearest.tolist())) > 1
    assert torch.equal(hard.last_weights.argmax(dim=1), nearest)
    assert torch.allclose(soft.last_weights, torch.softmax(per_task / 0.2, dim=1), atol=1e-6)
    with pytest.raises(ValueError):
        RoutedProjector(projectors, rows, ["a", "b", "c"], 0.2, owners=torch.tensor([0, 0, 1, 1, 1, 1, 1]))
