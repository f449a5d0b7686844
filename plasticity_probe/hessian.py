"""Curvature of any scalar loss: Hessian-vector products and the extremes of the spectrum.

``hessian_spectrum(loss_fn, params)`` works on any closure that recomputes a scalar loss (a
supervised criterion, or an RL TD loss whose target network is detached). Hessian-vector
products use double backward (Pearlmutter 1994) on one gradient graph built once; the extreme
eigenvalues come from implicitly restarted Lanczos (ARPACK via ``scipy.sparse.linalg.eigsh``)
on a ``LinearOperator``, seeded so that results are reproducible; the trace is Hutchinson's
estimator with Rademacher probes (Hutchinson 1989). Small problems (``n ≤ dense_threshold``)
are solved exactly from the dense Hessian.

``λ_max`` / ``λ_min`` are the largest / smallest *algebraic* eigenvalues (not largest magnitude).
The condition number ``λ_max / λ_min`` (Gilmer et al. 2021) is defined only when ``λ_min > 0``;
otherwise it is ``None`` and ``definiteness`` says why.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh
from torch import nn

__all__ = ["HessianOperator", "HessianSpectrum", "hessian_spectrum"]


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
    rows and columns. ``.grad`` of the parameters is never touched. Vectors are float64 NumPy
    arrays of length ``n``; products are computed in the parameters' dtype.
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

    def matvec(self, v: np.ndarray) -> np.ndarray:
        self.n_hvp += 1
        out = np.zeros(self.n, dtype=np.float64)
        if not self._grads:
            return out
        chunks = self._split(np.asarray(v, dtype=np.float64).reshape(-1))
        with torch.enable_grad():
            dot = sum((g * chunks[i]).sum() for i, g in self._grads)
            assert isinstance(dot, torch.Tensor)
            hv = torch.autograd.grad(dot, self.params, retain_graph=True, allow_unused=True)
        offset = 0
        for p, h in zip(self.params, hv, strict=True):
            if h is not None:
                out[offset : offset + p.numel()] = h.detach().reshape(-1).to(torch.float64).cpu().numpy()
            offset += p.numel()
        return out

    def _split(self, v: np.ndarray) -> list[torch.Tensor]:
        chunks, offset = [], 0
        for p in self.params:
            chunk = torch.from_numpy(v[offset : offset + p.numel()]).to(device=p.device, dtype=p.dtype)
            chunks.append(chunk.reshape(p.shape))
            offset += p.numel()
        return chunks

    def dense(self) -> np.ndarray:
        """The full symmetric Hessian from n products (for small n only)."""
        h = np.empty((self.n, self.n))
        eye = np.eye(self.n)
        for i in range(self.n):
            h[:, i] = self.matvec(eye[i])
        return (h + h.T) / 2

    def as_linear_operator(self) -> LinearOperator:
        return LinearOperator((self.n, self.n), matvec=self.matvec, dtype=np.float64)


def _params(params: nn.Module | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    tensors = list(params.parameters()) if isinstance(params, nn.Module) else list(params)
    tensors = [p for p in tensors if p.requires_grad]
    if not tensors:
        raise ValueError("hessian_spectrum: no parameters that require grad")
    return tensors


def _extreme(op: LinearOperator, which: str, k: int, tol: float, max_iter: int | None, v0: np.ndarray) -> np.ndarray:
    n = op.shape[0]
    ncv = min(n - 1, max(2 * k + 1, 40))
    try:
        vals = eigsh(op, k=k, which=which, tol=tol, maxiter=max_iter, v0=v0, ncv=ncv, return_eigenvectors=False)
    except ArpackNoConvergence as err:
        if len(err.eigenvalues) == 0:
            raise RuntimeError(
                f"Lanczos did not converge for {which} within max_iter={max_iter}; raise max_iter or tol"
            ) from err
        vals = err.eigenvalues
    return np.sort(np.asarray(vals, dtype=np.float64))


def hessian_spectrum(
    loss_fn: Callable[[], torch.Tensor],
    params: nn.Module | Iterable[torch.Tensor],
    *,
    tol: float = 1e-5,
    max_iter: int | None = None,
    top_k: int = 1,
    trace_samples: int = 0,
    seed: int = 0,
    dense_threshold: int = 256,
) -> HessianSpectrum:
    """λ_max, λ_min, condition number and trace of ``H = ∇²_θ loss_fn()`` w.r.t. ``params``.

    Args:
        loss_fn: recomputes the scalar loss (called once; its graph is reused for every product).
        params: a module (all its parameters that require grad) or the tensors to differentiate.
        tol: relative tolerance of the Lanczos eigenvalues (ARPACK ``tol``).
        max_iter: Lanczos restart limit (ARPACK ``maxiter``); ``None`` = ARPACK's default.
        top_k: how many of the largest eigenvalues to return in ``top_eigenvalues``.
        trace_samples: Rademacher probes for Hutchinson's trace; 0 gives ``nan`` (exact when dense).
        seed: seeds the starting vectors and the probes.
        dense_threshold: at most this many parameters, the dense Hessian is formed and solved exactly.
    """
    tensors = _params(params)
    op = HessianOperator(loss_fn, tensors)
    n = op.n
    rng = np.random.default_rng(seed)
    trace, stderr = math.nan, math.nan
    if n <= dense_threshold:
        eig = np.linalg.eigvalsh(op.dense())
        top = eig[::-1][:top_k]
        lmax, lmin = float(eig[-1]), float(eig[0])
        trace, stderr = float(eig.sum()), 0.0
    else:
        linop = op.as_linear_operator()
        v0 = rng.standard_normal(n)
        top = _extreme(linop, "LA", max(1, top_k), tol, max_iter, v0)[::-1]
        lmax = float(top[0])
        lmin = float(_extreme(linop, "SA", 1, tol, max_iter, v0)[0])
        if trace_samples > 0:
            samples = np.empty(trace_samples)
            for i in range(trace_samples):
                z = rng.choice([-1.0, 1.0], size=n)
                samples[i] = z @ op.matvec(z)
            trace = float(samples.mean())
            stderr = float(samples.std(ddof=1) / math.sqrt(trace_samples)) if trace_samples > 1 else math.nan
    atol = 1e-7 * max(abs(lmax), abs(lmin), 1e-30) if (lmax or lmin) else 0.0
    definiteness = _definiteness(lmax, lmin, atol)
    condition = lmax / lmin if definiteness == "positive definite" else None
    return HessianSpectrum(
        lambda_max=lmax,
        lambda_min=lmin,
        condition_number=condition,
        definiteness=definiteness,
        trace=trace,
        trace_stderr=stderr,
        n_params=n,
        n_hvp=op.n_hvp,
        top_eigenvalues=[float(x) for x in top],
    )
