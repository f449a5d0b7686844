"""The Lanczos of ``plasticity_probe.hessian`` before issue 12, kept only as the benchmark's
baseline: full reorthogonalization against a float64 basis of ``max_iter × n`` allocated up front.
It runs on the library's own ``HessianOperator`` (unchanged in its products), so the comparison
is of the eigensolvers alone. Not part of the library; do not import it from anywhere but ``bench/``."""

from __future__ import annotations

from collections.abc import Callable

import torch


def lanczos_extremes(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    *,
    top_k: int = 1,
    tol: float = 1e-6,
    max_iter: int = 500,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Lanczos with full reorthogonalization (Golub & Van Loan, Matrix Computations, §10.1).

    Builds the Krylov basis Q_j and the tridiagonal T_j = Q_jᵀ H Q_j; stops when the residual
    bound ``β_j |s_{j,i}|`` of the ``top_k`` largest Ritz values and of the smallest one is at
    most ``tol · |θ_i|`` (the eigenvalue error is then ≲ residual² / gap), on an invariant
    subspace, or after ``max_iter`` products. Returns (the ``top_k`` largest Ritz values,
    descending; the smallest; whether it converged). float64 throughout, seeded start vector.
    """
    gen = torch.Generator().manual_seed(seed)
    m = min(n, max_iter)
    basis = torch.zeros(m, n, dtype=torch.float64)
    q = torch.randn(n, generator=gen, dtype=torch.float64)
    basis[0] = q / q.norm()
    t = torch.zeros(m, m, dtype=torch.float64)
    theta = torch.zeros(1, dtype=torch.float64)
    for j in range(m):
        w = matvec(basis[j])
        t[j, j] = basis[j] @ w
        for _ in range(2):  # full reorthogonalization, twice ("twice is enough")
            w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
        beta = float(w.norm())
        theta, s = torch.linalg.eigh(t[: j + 1, : j + 1])
        wanted = [*range(max(0, j + 1 - top_k), j + 1), 0]
        scale = max(float(theta.abs().max()), 1e-300)
        floor = torch.clamp(theta[wanted].abs(), min=1e-12 * scale)
        if beta <= 1e-12 * scale or bool((beta * s[-1, wanted].abs() <= tol * floor).all()):
            return theta.flip(0)[:top_k], theta[0], True
        if j + 1 < m:
            basis[j + 1] = w / beta
            t[j, j + 1] = t[j + 1, j] = beta
    return theta.flip(0)[:top_k], theta[0], m == n
