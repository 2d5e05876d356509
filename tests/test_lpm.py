"""The pure pieces: packed storage, streaming writes, solves and merge rules, each checked
against an independent computation (numpy, explicit loops)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open

from many_cli import lpm
from many_cli.state import pack_symmetric, packed_length, unpack_symmetric
from many_cli.tensorfiles import StreamingSafetensorsWriter


@pytest.mark.parametrize("dim", [1, 7, 600])
def test_packed_symmetric_round_trip_is_lossless(dim):
    x = torch.randn(dim, dim, dtype=torch.float64)
    matrix = x + x.T  # exactly symmetric, unlike a rounded x @ x.T
    packed = pack_symmetric(matrix)
    assert packed.shape == (packed_length(dim),)
    assert np.array_equal(packed.numpy(), matrix.numpy()[np.triu_indices(dim)])
    assert torch.equal(unpack_symmetric(packed), matrix)


def test_streaming_writer_output_reads_back_with_safetensors(tmp_path):
    tensors = {
        "a": torch.randn(3, 4, dtype=torch.float64),
        "b/c": torch.arange(5),
        "d": torch.randn(2, dtype=torch.bfloat16),
        "e": torch.randn(0, 3),
    }
    path = tmp_path / "x.safetensors"
    writer = StreamingSafetensorsWriter(
        path, [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()], {"note": "hi"}
    )
    for key, value in tensors.items():
        writer.write(key, value)
    writer.close()
    with safe_open(str(path), "pt") as handle:
        assert handle.metadata() == {"note": "hi"}
        for key, value in tensors.items():
            assert torch.equal(handle.get_tensor(key), value)
    writer = StreamingSafetensorsWriter(tmp_path / "y.safetensors", [("a", torch.float32, (2,))], {})
    with pytest.raises(ValueError):
        writer.write("a", torch.zeros(3))


def test_a_writer_whose_block_fails_leaves_no_partial_file(tmp_path):
    """A stream writer used in a `with` block removes its file when the block fails, and checks
    it complete when the block ends; the merged-adapter writer over it does the same."""
    from many_cli.adapters import MergedAdapterWriter, MergedModule

    path = tmp_path / "partial.safetensors"
    with pytest.raises(RuntimeError):
        with StreamingSafetensorsWriter(path, [("a", torch.float32, (2,)), ("b", torch.float32, (2,))], {}) as writer:
            writer.write("a", torch.zeros(2))
            raise RuntimeError("the work failed midway")
    assert not path.exists()
    with pytest.raises(ValueError, match="never written"):
        with StreamingSafetensorsWriter(path, [("a", torch.float32, (2,))], {}):
            pass
    folder = tmp_path / "adapter"
    folder.mkdir()
    with pytest.raises(RuntimeError):
        with MergedAdapterWriter(folder, [MergedModule("model.layer", 1, 2, 2)], None):
            raise RuntimeError("the solve failed")
    assert not (folder / "adapter_model.safetensors").exists()


def test_cholesky_solve_matches_dense_solve():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(50, 20, dtype=torch.float64, generator=generator)
    gram, rhs = x.T @ x, torch.randn(4, 20, dtype=torch.float64, generator=generator)
    loaded = gram + 1e-3 * gram.diagonal().mean() * torch.eye(20, dtype=torch.float64)
    expected = np.linalg.solve(loaded.numpy().T, rhs.numpy().T).T
    solution = lpm.cholesky_solve_right_(gram.clone(), rhs, 1e-3)
    np.testing.assert_allclose(solution.rows.numpy(), expected, rtol=1e-9, atol=1e-12)
    # The rank budget's weighted space: X L with H + ridge = L Lᵀ, and back again.
    lower = torch.linalg.cholesky(loaded)
    np.testing.assert_allclose(solution.weighted.numpy(), (solution.rows @ lower).numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(solution.unweigh(solution.weighted).numpy(), expected, rtol=1e-9, atol=1e-12)


def test_singular_or_indefinite_gram_gets_minimum_norm_solution():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3, 20, dtype=torch.float64, generator=generator)  # rank 3 of 20
    eigenvalues, vectors = torch.linalg.eigh(x.T @ x)
    eigenvalues[:17] = -1e-9 * eigenvalues[-1]  # float32 rounding makes such noise
    gram = vectors @ torch.diag(eigenvalues) @ vectors.T
    rhs = torch.randn(2, 20, dtype=torch.float64, generator=generator) @ gram
    assert lpm.cholesky_solve_right_(gram.clone(), rhs, 0.0) is None
    solution = lpm.min_norm_solve_right(gram.clone(), rhs, 0.0)
    assert torch.isfinite(solution.rows).all()
    truncated = vectors[:, 17:] @ torch.diag(eigenvalues[17:]) @ vectors[:, 17:].T
    expected = rhs.numpy() @ np.linalg.pinv(truncated.numpy(), rcond=1e-10)
    np.testing.assert_allclose(solution.rows.numpy(), expected, rtol=1e-7, atol=1e-9)
    # X W with W Wᵀ the kept part of H: (X W)(X W)ᵀ = X H Xᵀ; and back again.
    weighted = solution.weighted
    np.testing.assert_allclose(
        (weighted @ weighted.T).numpy(), (solution.rows @ truncated @ solution.rows.T).numpy(), rtol=1e-7, atol=1e-9
    )
    np.testing.assert_allclose(solution.unweigh(weighted).numpy(), expected, rtol=1e-7, atol=1e-9)


def test_truncate_is_the_svd_of_the_product_and_reports_its_energy():
    generator = torch.Generator().manual_seed(5)
    b, a = (
        torch.randn(30, 6, dtype=torch.float64, generator=generator),
        torch.randn(6, 40, dtype=torch.float64, generator=generator),
    )
    u, s, vh = torch.linalg.svd(b @ a)
    a_r, b_r, kept = lpm.truncate(a, b, 2)
    assert b_r.shape == (30, 2) and a_r.shape == (2, 40)
    np.testing.assert_allclose((b_r @ a_r).numpy(), ((u[:, :2] * s[:2]) @ vh[:2]).numpy(), atol=1e-10)
    assert kept == pytest.approx(float(s[:2].square().sum()))
    assert lpm.squared_norm(a, b) == pytest.approx(float((b @ a).square().sum()))
    padded_a, padded_b = lpm.pad_rank(a, b, 9)
    assert padded_b.shape == (30, 9) and torch.equal(padded_b @ padded_a, b @ a)


def test_ties_matches_an_explicit_loop():
    generator = torch.Generator().manual_seed(2)
    vectors = [torch.randn(6, 5, dtype=torch.float64, generator=generator) for _ in range(3)]
    density = 0.4
    arrays = [v.numpy() for v in vectors]
    keep = round(density * 30)
    trimmed = []
    for array in arrays:
        order = np.argsort(-np.abs(array).ravel(), kind="stable")[:keep]
        kept = np.zeros(30)
        kept[order] = array.ravel()[order]
        trimmed.append(kept)
    expected = np.zeros(30)
    for j in range(30):
        sign = np.sign(sum(t[j] for t in trimmed))
        agreeing = [t[j] for t in trimmed if t[j] != 0 and np.sign(t[j]) == sign]
        expected[j] = np.mean(agreeing) if agreeing else 0.0
    np.testing.assert_allclose(lpm.ties(vectors, density).numpy().ravel(), expected, atol=1e-12)


def test_low_rank_factors_are_the_truncated_svd():
    delta = torch.randn(12, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    a, b, error = lpm.low_rank_factors(delta, 4)
    u, s, vh = np.linalg.svd(delta.numpy())
    best = (u[:, :4] * s[:4]) @ vh[:4]
    np.testing.assert_allclose((b @ a).numpy(), best, atol=1e-10)
    assert error == pytest.approx(np.linalg.norm(delta.numpy() - best) / np.linalg.norm(delta.numpy()))


@pytest.mark.parametrize("dim", [5, 600])
def test_product_from_upper_blocks_equals_dense_product(dim):
    from many_cli.state import packed_blocks

    generator = torch.Generator().manual_seed(4)
    x = torch.randn(dim, dim, dtype=torch.float64, generator=generator)
    symmetric = x + x.T
    a = torch.randn(3, dim, dtype=torch.float64, generator=generator)
    product = torch.zeros(3, dim, dtype=torch.float64)
    for start, rows in packed_blocks(pack_symmetric(symmetric)):
        lpm.add_symmetric_block_product_(product, a, start, rows)
    np.testing.assert_allclose(product.numpy(), a.numpy() @ symmetric.numpy(), rtol=1e-10, atol=1e-9)
