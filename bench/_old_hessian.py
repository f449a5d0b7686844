"""The Lanczos of ``plasticity_probe.hessian`` before issue 12, kept only as the benchmark's
baseline: full reorthogonalization against a float64 basis of ``max_iter × n`` allocated up front.
Not part of the library; do not import it from anywhere but ``bench/``."""

from __future__ import annotations

from collections.abc import Callable

import torch


class HessianOperator:
    """``v ↦ H v`` for ``H = ∇²_θ loss_fn()``, built from one gradient graph.

    Parameters that get no gradient, or whose gradient does not depend on θ, contribute zero
    rows and columns. ``.grad`` of the parameters is never touched. Vectors are flat float64
    CPU tensors of length ``n``; products are computed in the parameters' dtype and device.
    """

    def __init__(self, loss_fn: Callable[[], torch.Tensor], params: list[torch.Tensor]) -> None:
        self.params = params
        self.n = sum(p.numel() for p in params)
        self.n_hvp = 0
        with torch.enable_grad():
            loss = loss_fn()
            if loss.ndim != 0:
                raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        self._grads = [(i, g) for i, g in enumerate(grads) if g is not None and g.requires_grad]

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        self.n_hvp += 1
        out = torch.zeros(self.n, dtype=torch.float64)
        if not self._grads:
            return out
        chunks = [
            c.reshape(p.shape).to(device=p.device, dtype=p.dtype)
            for c, p in zip(v.split([p.numel() for p in self.params]), self.params, strict=True)
        ]
        with torch.enable_grad():
            dot = torch.stack([(g * chunks[i]).sum() for i, g in self._grads]).sum()
            hv = torch.autograd.grad(dot, self.params, retain_graph=True, allow_unused=True)
        offset = 0
        for p, h in zip(self.params, hv, strict=True):
            if h is not None:
                out[offset : offset + p.numel()] = h.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
            offset += p.numel()
        return out

    def dense(self) -> torch.Tensor:
        """The full symmetric Hessian from n products (for small n only)."""
        h = torch.stack([self.matvec(e) for e in torch.eye(self.n, dtype=torch.float64)], dim=1)
        return (h + h.T) / 2


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
