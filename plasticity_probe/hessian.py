"""Curvature of any scalar loss: Hessian-vector products and the extremes of the spectrum.

``hessian_spectrum(loss_fn, params)`` works on any closure that recomputes a scalar loss (a
supervised criterion, or an RL TD loss whose target network is detached). Hessian-vector
products use double backward (Pearlmutter 1994) on one gradient graph built once; both extreme
eigenvalues come from one seeded Lanczos run with full reorthogonalization (deterministic: the
same inputs give the same bits in every process); the trace is Hutchinson's estimator with
Rademacher probes (Hutchinson 1989). Small problems (``n ≤ dense_threshold``) are solved exactly
from the dense Hessian.

``λ_max`` / ``λ_min`` are the largest / smallest *algebraic* eigenvalues (not largest magnitude).
The condition number ``λ_max / λ_min`` (Gilmer et al. 2021) is defined only when ``λ_min > 0``;
otherwise it is ``None`` and ``definiteness`` says why.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["HessianOperator", "HessianSpectrum", "hessian_spectrum", "lanczos_extremes"]


@dataclass
class HessianSpectrum:
    """Extremes, condition number, trace and cost of one Hessian spectrum computation."""

    lambda_max: float
    lambda_min: float
    condition_number: float | None
    definiteness: str
    trace: float
    trace_stderr: float
    n_params: int
    n_hvp: int
    converged: bool
    top_eigenvalues: list[float] = field(default_factory=list)

    @property
    def condition_note(self) -> str:
        """Why the condition number is, or is not, defined."""
        if self.condition_number is not None:
            return "positive definite: condition number = λ_max/λ_min"
        return (
            f"condition number undefined: Hessian is {self.definiteness} "
            f"(λ_max {_sign(self.lambda_max)}, λ_min {_sign(self.lambda_min)})"
        )

    def as_metrics(self, prefix: str = "hessian_") -> dict[str, float]:
        return {
            f"{prefix}lambda_max": self.lambda_max,
            f"{prefix}lambda_min": self.lambda_min,
            f"{prefix}condition_number": math.nan if self.condition_number is None else self.condition_number,
            f"{prefix}trace": self.trace,
        }


def _sign(x: float) -> str:
    return "> 0" if x > 0 else "< 0" if x < 0 else "= 0"


def _definiteness(lmax: float, lmin: float, atol: float) -> str:
    if abs(lmax) <= atol and abs(lmin) <= atol:
        return "zero"
    if lmin > atol:
        return "positive definite"
    if lmin >= -atol:
        return "positive semidefinite (singular)"
    if lmax < -atol:
        return "negative definite"
    if lmax <= atol:
        return "negative semidefinite (singular)"
    return "indefinite"


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


def _params(params: nn.Module | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    tensors = list(params.parameters()) if isinstance(params, nn.Module) else list(params)
    tensors = [p for p in tensors if p.requires_grad]
    if not tensors:
        raise ValueError("hessian_spectrum: no parameters that require grad")
    return tensors


def hessian_spectrum(
    loss_fn: Callable[[], torch.Tensor],
    params: nn.Module | Iterable[torch.Tensor],
    *,
    tol: float = 1e-6,
    max_iter: int = 500,
    top_k: int = 1,
    trace_samples: int = 0,
    seed: int = 0,
    dense_threshold: int = 256,
) -> HessianSpectrum:
    """λ_max, λ_min, condition number and trace of ``H = ∇²_θ loss_fn()`` w.r.t. ``params``.

    Args:
        loss_fn: recomputes the scalar loss (called once; its graph is reused for every product).
        params: a module (all its parameters that require grad) or the tensors to differentiate.
        tol: relative residual tolerance of the Lanczos Ritz values (see :func:`lanczos_extremes`).
        max_iter: at most this many Lanczos iterations (Hessian-vector products); a warning says
            when it was not enough.
        top_k: how many of the largest eigenvalues to return in ``top_eigenvalues``.
        trace_samples: Rademacher probes for Hutchinson's trace; 0 gives ``nan`` (exact when dense).
        seed: seeds the Lanczos start vector and the probes.
        dense_threshold: at most this many parameters, the dense Hessian is formed and solved exactly.

    The model's mode and the parameters' ``.grad`` are left as they were.
    """
    tensors = _params(params)
    op = HessianOperator(loss_fn, tensors)
    n = op.n
    trace, stderr, converged = math.nan, math.nan, True
    if n <= dense_threshold:
        eig = torch.linalg.eigvalsh(op.dense())
        top, lmin = eig.flip(0)[:top_k], eig[0]
        trace, stderr = float(eig.sum()), 0.0
    else:
        top, lmin, converged = lanczos_extremes(op.matvec, n, top_k=top_k, tol=tol, max_iter=max_iter, seed=seed)
        if not converged:
            warnings.warn(
                f"hessian_spectrum: Lanczos did not reach tol={tol} in {max_iter} products; "
                "raise max_iter for tighter extremes",
                RuntimeWarning,
                stacklevel=2,
            )
        if trace_samples > 0:
            gen = torch.Generator().manual_seed(seed + 1)
            samples = torch.empty(trace_samples, dtype=torch.float64)
            for i in range(trace_samples):
                z = torch.randint(0, 2, (n,), generator=gen).to(torch.float64) * 2 - 1
                samples[i] = z @ op.matvec(z)
            trace = float(samples.mean())
            stderr = float(samples.std() / math.sqrt(trace_samples)) if trace_samples > 1 else math.nan
    lmax, lmin_f = float(top[0]), float(lmin)
    definiteness = _definiteness(lmax, lmin_f, atol=1e-7 * max(abs(lmax), abs(lmin_f)))
    return HessianSpectrum(
        lambda_max=lmax,
        lambda_min=lmin_f,
        condition_number=lmax / lmin_f if definiteness == "positive definite" else None,
        definiteness=definiteness,
        trace=trace,
        trace_stderr=stderr,
        n_params=n,
        n_hvp=op.n_hvp,
        converged=converged,
        top_eigenvalues=[float(x) for x in top],
    )
