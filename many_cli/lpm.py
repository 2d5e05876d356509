"""Low-rank Parameter Merging and the baseline merge rules: pure functions on tensors.

Shapes follow torch's Linear: a task vector τ = s·B A is (d_out, d_in), A is (r, d_in),
B is (d_out, r), a covariance C = Σ x xᵀ is (d_in, d_in), a Gram matrix H = Σ_i C_i.
LPM's merged vector τ* = (Σ_i τ_i C_i) H⁻¹ = Σ_i (s_i B_i)(A_i C_i H⁻¹) is a LoRA of rank Σ r_i,
so every function here works on the factors; nothing forms a dense d_out × d_in delta except
TIES, whose rule is elementwise. Nothing here reads or writes files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch


def add_ridge_(gram: torch.Tensor, ridge: float) -> torch.Tensor:
    """H + ρ·mean(diag H)·I, in place: a load relative to the Gram matrix's own scale."""
    if ridge > 0:
        gram.diagonal().add_(ridge * gram.diagonal().mean())
    return gram


@dataclass(frozen=True)
class Solution:
    """X = R H⁻¹ and, for the rank budget, X W with H = W Wᵀ and the map back: Y ↦ Y W⁺."""

    rows: torch.Tensor
    weighted: torch.Tensor
    unweigh: Callable[[torch.Tensor], torch.Tensor]


def reduce_off_diagonal_(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """RegMean's reduction α H + (1 − α) diag(H), in place: the off-diagonal scaled by α."""
    if alpha < 1:
        diagonal = gram.diagonal().clone()
        gram.mul_(alpha)
        gram.diagonal().copy_(diagonal)
    return gram


def cholesky_solve_right_(gram: torch.Tensor, rhs: torch.Tensor, ridge: float) -> Solution | None:
    """X with X (H + ridge) = R, R of shape (k, d), k ≪ d, through a Cholesky factorization
    H + ridge = L Lᵀ in H's dtype (pass float64); H⁻¹ is never formed. Only the upper triangle
    of `gram` (a contiguous, row-major matrix) is read, and it is overwritten with the factor
    (W = L). Returns None when H is not numerically positive definite."""
    add_ridge_(gram, ridge)
    # gram.mT is column-major, as LAPACK wants, and its lower triangle is gram's upper one:
    # factoring it in place needs no second d×d buffer.
    lower = gram.mT
    info = torch.empty((), dtype=torch.int32, device=gram.device)
    torch.linalg.cholesky_ex(lower, out=(lower, info))
    if int(info) != 0:
        return None
    half = torch.linalg.solve_triangular(lower, rhs.to(gram.dtype).T, upper=False)  # L⁻¹ Rᵀ = (X L)ᵀ
    rows = torch.linalg.solve_triangular(lower.mT, half, upper=True).T
    if not bool(torch.isfinite(rows).all()):
        return None
    return Solution(rows, half.T, lambda weighted: torch.linalg.solve_triangular(lower.mT, weighted.T, upper=True).T)


def min_norm_solve_right(
    gram: torch.Tensor, rhs: torch.Tensor, ridge: float, input_eps: float = torch.finfo(torch.float32).eps
) -> Solution:
    """The minimum-norm least-squares X for X (H + ridge) = R when H is singular or indefinite.
    Only the upper triangle of `gram` is read.

    Statistics stored with machine epsilon `input_eps` perturb H by at most about
    input_eps·‖H‖_F, so eigen-directions below that cannot be told from rounding: they are
    dropped (no calibration input reached them), and X never holds NaN or Inf. W = V Λ^½ over
    the kept eigenpairs.
    """
    add_ridge_(gram, ridge)
    eigenvalues, eigenvectors = torch.linalg.eigh(gram, UPLO="U")
    frobenius = eigenvalues.square().sum().sqrt()
    kept = eigenvalues > input_eps * frobenius
    basis, root = eigenvectors[:, kept], eigenvalues[kept].sqrt()
    coordinates = (rhs.to(gram.dtype) @ basis) / eigenvalues[kept]
    return Solution(coordinates @ basis.T, coordinates * root, lambda weighted: (weighted / root) @ basis.T)


def add_symmetric_block_product_(out: torch.Tensor, a: torch.Tensor, start: int, rows: torch.Tensor) -> None:
    """Accumulate A C into `out` from one block of C's upper triangle: `rows` holds
    C[start:start+b, start:] with zeros below the diagonal. Over all blocks this sums
    A U + A Uᵀ − A diag(C) = A C, U the upper triangle, without ever forming C."""
    stop = start + rows.shape[0]
    out[:, start:] += a[:, start:stop] @ rows
    out[:, start:stop] += a[:, start:] @ rows.T
    out[:, start:stop] -= a[:, start:stop] * rows.diagonal()


def stack_factors(
    a_blocks: Sequence[torch.Tensor], b_blocks: Sequence[torch.Tensor], weights: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The LoRA factors (A, B) of Σ_i w_i B_i A_i: A stacks the A_i, B concatenates the w_i B_i."""
    a = torch.cat(list(a_blocks), dim=0)
    b = torch.cat([weight * block for weight, block in zip(weights, b_blocks)], dim=1)
    return a, b


def truncate(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The best rank-`rank` approximation of B A (A: k × m, B: d_out × k, k > rank;
    Eckart–Young) as factors (A_r, B_r), from QR factorizations and the SVD of a k × k core
    (B A = Q_B (R_B R_Aᵀ) Q_Aᵀ): never a d_out × m matrix. Also ‖B_r A_r‖², the energy kept."""
    q_b, r_b = torch.linalg.qr(b)
    q_a, r_a = torch.linalg.qr(a.T)
    u, singular, vh = torch.linalg.svd(r_b @ r_a.T)
    return vh[:rank] @ q_a.T, q_b @ (u[:, :rank] * singular[:rank]), float(singular[:rank].square().sum())


def squared_norm(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖B A‖² (Frobenius) = Σ (BᵀB) ∘ (A Aᵀ), from k × k products."""
    return float(((b.T @ b) * (a @ a.T)).sum())


def pad_rank(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A and B with zero rows and columns appended up to `rank` (the product B A unchanged)."""
    missing = rank - b.shape[1]
    return (
        torch.cat([a, a.new_zeros(missing, a.shape[1])], dim=0),
        torch.cat([b, b.new_zeros(b.shape[0], missing)], dim=1),
    )


def ties(task_vectors: Sequence[torch.Tensor], density: float) -> torch.Tensor:
    """TIES-Merging (Yadav et al., 2023) of dense task vectors: keep each vector's top
    `density` fraction of entries by magnitude, elect each entry's sign by the sum of what was
    kept, and average only the kept entries that agree with it (disjoint mean)."""
    trimmed = torch.stack([_keep_top_magnitude(vector, density) for vector in task_vectors])
    elected = torch.sign(trimmed.sum(dim=0))
    agrees = (torch.sign(trimmed) == elected) & (trimmed != 0)
    total = (trimmed * agrees).sum(dim=0)
    count = agrees.sum(dim=0).clamp(min=1)
    return total / count


def _keep_top_magnitude(vector: torch.Tensor, density: float) -> torch.Tensor:
    keep = max(1, round(density * vector.numel()))
    if keep >= vector.numel():
        return vector
    threshold = vector.abs().flatten().kthvalue(vector.numel() - keep + 1).values
    return vector * (vector.abs() >= threshold)


def low_rank_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The best rank-`rank` factors (A, B) of a dense delta (truncated SVD, Eckart–Young),
    with the relative Frobenius error of the approximation."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    rank = min(rank, s.numel())
    root = s[:rank].sqrt()
    a = root[:, None] * vh[:rank]
    b = u[:, :rank] * root[None, :]
    total = float(s.square().sum())
    error = (float(s[rank:].square().sum()) / total) ** 0.5 if total > 0 else 0.0
    return a, b, error
