"""Curvature of any scalar loss: Hessian-vector products, the extremes of the spectrum, the
trace and the spectral density, in memory bounded by a fixed number of vectors.

``hessian_spectrum(loss_fn, params)`` works on any closure that recomputes a scalar loss (a
supervised criterion, or an RL TD loss whose target network is detached). Hessian-vector
products use double backward (Pearlmutter 1994) on one gradient graph built once, on the
parameters' device and dtype. Then:

* both extreme eigenvalues come from one seeded **thick-restart Lanczos** run (Wu & Simon 2000,
  "Thick-restart Lanczos method for large symmetric eigenvalue problems", SIAM J. Matrix Anal.
  Appl. 22(2)) with full reorthogonalization inside a basis of at most ``basis_size`` float64
  vectors: memory is ``basis_size × n × 8`` bytes whatever the number of iterations;
* the trace is Hutchinson's estimator (Hutchinson 1989) or Hutch++ (Meyer, Musco, Musco &
  Woodruff 2021, "Hutch++: optimal stochastic trace estimation", SOSA);
* the spectral density is stochastic Lanczos quadrature (Lin, Saad & Yang 2016, "Approximating
  spectral densities of large matrices", SIAM Review 58(1); Ghorbani, Krishnan & Xiao 2019, "An
  investigation into neural net optimization via Hessian eigenvalue density", ICML).

Small problems (``n ≤ dense_threshold``) are solved exactly from the dense Hessian. All vector
arithmetic is float64 torch on the CPU from seeded generators, so the same inputs give the same
bits in every process.

``λ_max`` / ``λ_min`` are the largest / smallest *algebraic* eigenvalues (not largest magnitude).
The condition number ``λ_max / λ_min`` (Gilmer et al. 2021) is defined only when ``λ_min > 0``;
otherwise it is ``None`` and ``definiteness`` says why. A non-finite loss, gradient or product
gives a spectrum of NaNs with a note, never an exception.

The closure is evaluated under :func:`frozen_closure_state`: buffers (BatchNorm running
statistics) and the global random number generators are restored bit for bit afterwards, so two
identical calls give identical results and the model is left as it was.
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn

from plasticity_probe.layers import measuring
from plasticity_probe.metrics import NonFiniteWarning

__all__ = [
    "HessianOperator",
    "HessianSpectrum",
    "SpectralDensity",
    "frozen_closure_state",
    "hessian_spectrum",
    "hutchinson_trace",
    "hutchpp_trace",
    "lanczos_extremes",
    "slq_density",
]

Matvec = Callable[[torch.Tensor], torch.Tensor]
_F64 = torch.float64


class ConvergenceWarning(RuntimeWarning):
    """Lanczos stopped at ``max_iter`` products before its extremes met ``tol``: they are the best
    Ritz values found (``HessianSpectrum.converged`` is False, the report row ``hessian_converged``
    0)."""


class _NonFinite(Exception):
    """A Hessian-vector product returned NaN or Inf (internal; turned into a NaN spectrum)."""


# --------------------------------------------------------------------------- closure state


class _ClosureState:
    """The global RNG states and the buffers of some modules, as they were when it was created.

    Nothing is ever written into a buffer tensor: :meth:`install` rebinds each buffer to a fresh
    clone of its saved values (a closure then updates the clone), :meth:`restore` rebinds the
    original tensors. So restoring is bit-exact, and a graph the caller built before (which may
    have saved the running statistics) stays valid.
    """

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        self.modules = list(modules)
        self.torch_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        self.numpy_rng = np.random.get_state()
        self.python_rng = random.getstate()
        seen: set[int] = set()
        self.buffers: list[tuple[nn.Module, str, torch.Tensor, torch.Tensor]] = []
        for root in self.modules:
            for module in root.modules():
                if id(module) in seen:
                    continue
                seen.add(id(module))
                for name, buf in module._buffers.items():
                    if buf is not None:
                        self.buffers.append((module, name, buf, buf.detach().clone()))
        self.covered = seen

    def _set_rng(self) -> None:
        torch.set_rng_state(self.torch_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        np.random.set_state(self.numpy_rng)
        random.setstate(self.python_rng)

    def install(self) -> None:
        """Make the current state this snapshot: RNGs set, buffers rebound to clones of it."""
        self._set_rng()
        for module, name, _, saved in self.buffers:
            module._buffers[name] = saved.clone()

    def restore(self) -> None:
        """Put back the RNG states and the original buffer tensors."""
        self._set_rng()
        for module, name, original, _ in self.buffers:
            module._buffers[name] = original


_ACTIVE: list[_ClosureState] = []


def _has_active_dropout(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0 for m in model.modules())


@contextmanager
def frozen_closure_state(model: nn.Module | None = None) -> Iterator[None]:
    """Evaluate loss closures in one frozen state; leave the model's buffers and the RNGs as found.

    On entry it snapshots the global random number generators (torch CPU, CUDA when initialized,
    NumPy's legacy global generator, Python's ``random``) and the values of every buffer of
    ``model`` (BatchNorm running statistics, ``num_batches_tracked``, …), and rebinds each buffer
    to a clone: whatever runs inside updates the clones. On exit, also on error, it rebinds the
    original tensors and restores the RNG states. No buffer tensor is written in place, so the
    restoration is bit-exact and an autograd graph built before the block stays valid.
    :func:`hessian_spectrum` evaluates its closure inside this context.

    Nested, it gives every Hessian of one report the same closure state: inside an outer
    ``with frozen_closure_state(model):``, each inner context (each ``hessian_spectrum`` call)
    starts from the *outer* snapshot (RNG states and fresh clones of the outer buffer values),
    and on exit puts back what it found. So per-layer and network Hessians computed in one block
    see the same dropout masks and the same BatchNorm statistics, whatever runs between them::

        with pp.frozen_closure_state(model):
            net = pp.hessian_spectrum(loss_fn, model)
            per_layer = [pp.hessian_spectrum(loss_fn, list(m.parameters()), model=model) for m in layers]

    Passes inside are measurements, not training passes: a ``SuccessiveRegularizer`` on the
    same model ignores them (:func:`~plasticity_probe.layers.measuring`).

    A ``RuntimeWarning`` is issued once, by the outermost context, when ``model`` is in train mode
    with an active dropout module: the loss is then random (its mask is fixed by the snapshot).
    """
    outer = _ACTIVE[-1] if _ACTIVE else None
    modules = [m for m in (model, outer.modules[0] if outer and outer.modules else None) if m is not None]
    state = _ClosureState(modules)
    if outer is None and model is not None and _has_active_dropout(model):
        warnings.warn(
            "the model is in train mode and has dropout: the loss closure is random (its dropout mask is "
            "fixed by the frozen RNG state); call model.eval() for the curvature of the deterministic loss",
            RuntimeWarning,
            stacklevel=3,
        )
    (outer or state).install()
    if outer is not None and model is not None and id(model) not in outer.covered:
        _ClosureState([model]).install()  # a model outside the outer snapshot: clone its buffers too
    _ACTIVE.append(state)
    try:
        with measuring():
            yield
    finally:
        _ACTIVE.pop()
        state.restore()


# --------------------------------------------------------------------------- results


@dataclass
class SpectralDensity:
    """Stochastic Lanczos quadrature of the Hessian's eigenvalue density.

    ``nodes`` / ``weights`` are the Gauss quadrature nodes (Ritz values) and weights of every
    probe, the weights divided by the number of probes so that they sum to 1: the density is
    approximated by ``φ(t) = Σ_i w_i δ(t − θ_i)`` (the eigenvalue counting measure divided by n),
    and ``Σ_i w_i θ_i^k`` estimates ``tr(H^k)/n`` without bias for ``k ≤ 2·steps − 1``.
    """

    nodes: list[float]
    weights: list[float]
    n_probes: int
    steps: int

    def evaluate(self, grid: np.ndarray | Sequence[float], sigma: float | None = None) -> np.ndarray:
        """Gaussian-smoothed density ``Σ_i w_i N(t; θ_i, σ²)`` at each ``t`` of ``grid``.

        ``sigma`` defaults to 1% of the range of the nodes (Ghorbani et al. 2019 smooth with a
        Gaussian of variance 1e-5 on a spectrum rescaled to [−1, 1]; pick yours to the grid).
        """
        return gaussian_density(self.nodes, self.weights, grid, sigma)

    def moment(self, k: int) -> float:
        """``Σ_i w_i θ_i^k``, the estimate of ``tr(H^k)/n``."""
        return float(sum(w * t**k for t, w in zip(self.nodes, self.weights, strict=True)))


def gaussian_density(
    nodes: Sequence[float], weights: Sequence[float], grid: np.ndarray | Sequence[float], sigma: float | None = None
) -> np.ndarray:
    """``ρ(t) = Σ_i w_i exp(−(t − θ_i)² / 2σ²) / (σ√(2π))`` on ``grid`` (see :class:`SpectralDensity`)."""
    theta, w, t = np.asarray(nodes, dtype=np.float64), np.asarray(weights, dtype=np.float64), np.asarray(grid)
    if sigma is None:
        span = float(theta.max() - theta.min()) if theta.size else 0.0
        sigma = 0.01 * span if span > 0 else 1e-3 * max(1.0, float(np.abs(theta).max(initial=0.0)))
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    z = (t[:, None] - theta[None, :]) / sigma
    return np.asarray((np.exp(-0.5 * z * z) @ w) / (sigma * math.sqrt(2 * math.pi)), dtype=np.float64)


@dataclass
class HessianSpectrum:
    """Extremes, condition number, trace, optional density and cost of one Hessian computation."""

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
    trace_method: str = "hutchinson"
    density: SpectralDensity | None = None
    note: str = ""

    @property
    def condition_note(self) -> str:
        """Why the condition number is, or is not, defined."""
        if self.condition_number is not None:
            return "positive definite: condition number = λ_max/λ_min"
        if self.definiteness.startswith("undefined"):
            return f"condition number undefined: {self.note}"
        return (
            f"condition number undefined: Hessian is {self.definiteness} "
            f"(λ_max {_sign(self.lambda_max)}, λ_min {_sign(self.lambda_min)})"
        )

    def as_metrics(self, prefix: str = "hessian_") -> dict[str, float]:
        """The report's Hessian rows; ``converged`` is 1.0 where the extremes met ``tol`` (always
        with the dense eigendecomposition), 0.0 where Lanczos stopped at ``max_iter``, and NaN
        like every other value where the Hessian is undefined."""
        return {
            f"{prefix}lambda_max": self.lambda_max,
            f"{prefix}lambda_min": self.lambda_min,
            f"{prefix}condition_number": math.nan if self.condition_number is None else self.condition_number,
            f"{prefix}trace": self.trace,
            f"{prefix}converged": math.nan if self.definiteness.startswith("undefined") else float(self.converged),
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


# --------------------------------------------------------------------------- operator


class HessianOperator:
    """``v ↦ H v`` for ``H = ∇²_θ loss_fn()``, built from one gradient graph.

    Parameters that get no gradient, or whose gradient does not depend on θ, contribute zero
    rows and columns. ``.grad`` of the parameters is never touched. Vectors are flat float64
    CPU tensors of length ``n``; products are computed in the parameters' dtype and device.
    ``finite`` is False (and ``why`` says which) when the loss or its gradient holds NaN or Inf.
    """

    def __init__(self, loss_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor]) -> None:
        self.params = list(params)
        self.n = sum(p.numel() for p in params)
        self.n_hvp = 0
        with torch.enable_grad():
            loss = loss_fn()
            if loss.ndim != 0:
                raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        self.why = ""
        if not bool(torch.isfinite(loss.detach())):
            self.why = "non-finite loss"
        elif not all(bool(torch.isfinite(g.detach()).all()) for g in grads if g is not None):
            self.why = "non-finite gradient"
        self.finite = not self.why
        self._grads = [(i, g) for i, g in enumerate(grads) if g is not None and g.requires_grad]

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        self.n_hvp += 1
        out = torch.zeros(self.n, dtype=_F64)
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
                out[offset : offset + p.numel()] = h.detach().reshape(-1).to(device="cpu", dtype=_F64)
            offset += p.numel()
        return out

    def dense(self) -> torch.Tensor:
        """The full symmetric Hessian from n products (for small n only)."""
        h = torch.stack([self.matvec(e) for e in torch.eye(self.n, dtype=_F64)], dim=1)
        return (h + h.T) / 2


# --------------------------------------------------------------------------- Lanczos


def _orthogonalize(w: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Classical Gram–Schmidt of ``w`` against the orthonormal rows of ``basis``, repeated once
    when the first pass removed more than 1 − 1/√2 of the norm (Daniel, Gragg, Kaufman & Stewart
    1976: "twice is enough")."""
    before = w.norm()
    w = w - basis.T @ (basis @ w)
    if w.norm() < before / math.sqrt(2):
        w = w - basis.T @ (basis @ w)
    return w


def _combine_rows(basis: torch.Tensor, coeffs: torch.Tensor, chunk: int = 1 << 16) -> None:
    """``basis[:k] ← coeffsᵀ @ basis[:m]`` in place, column block by column block (memory ~ k × chunk)."""
    k = coeffs.shape[1]
    m = coeffs.shape[0]
    for c in range(0, basis.shape[1], chunk):
        basis[:k, c : c + chunk] = coeffs.T @ basis[:m, c : c + chunk]


def lanczos_extremes(
    matvec: Matvec,
    n: int,
    *,
    top_k: int = 1,
    tol: float = 1e-6,
    max_iter: int = 500,
    basis_size: int = 40,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Largest and smallest eigenvalues of a symmetric operator by thick-restart Lanczos.

    Lanczos with full reorthogonalization (Golub & Van Loan, Matrix Computations, §10.1) builds an
    orthonormal basis Q_j and ``T_j = Q_jᵀ H Q_j``. When the basis holds ``basis_size`` vectors,
    it restarts thickly (Wu & Simon 2000): it keeps the Ritz vectors of about a quarter of the
    basis at each end of the spectrum (the ``top_k`` largest and the smallest among them), the
    last residual continues the Krylov sequence, and T becomes the arrowhead matrix of the kept
    Ritz values coupled to the residual. This is mathematically the implicitly restarted Lanczos
    of ARPACK with exact shifts; memory stays ``basis_size × n`` float64.

    Stops when the residual norm ``β_j |s_{j,i}|`` of each wanted Ritz pair is at most
    ``tol · |θ_i|`` (the eigenvalue error is then ≲ residual² / gap), on an invariant subspace,
    or after ``max_iter`` products. Returns (the ``top_k`` largest Ritz values, descending; the
    smallest; whether it converged). Raises ``_NonFinite`` on a NaN/Inf product.
    """
    m = min(n, basis_size)
    if m < min(n, top_k + 4):
        raise ValueError(f"basis_size must be at least top_k + 4 = {top_k + 4}, got {basis_size}")
    extra = max(0, (m // 2 - top_k - 1) // 2)
    n_hi, n_lo = top_k + extra, 1 + extra
    gen = torch.Generator().manual_seed(seed)
    basis = torch.empty(m, n, dtype=_F64)
    q = torch.randn(n, generator=gen, dtype=_F64)
    basis[0] = q / q.norm()
    t = torch.zeros(m, m, dtype=_F64)
    j = 0
    for it in range(1, max_iter + 1):
        w = matvec(basis[j])
        alpha = float(basis[j] @ w)
        w = _orthogonalize(w, basis[: j + 1])
        beta = float(w.norm())
        if not (math.isfinite(alpha) and math.isfinite(beta)):
            raise _NonFinite
        t[j, j] = alpha
        theta, s = torch.linalg.eigh(t[: j + 1, : j + 1])
        wanted = [*range(max(0, j + 1 - top_k), j + 1), 0]
        scale = max(float(theta.abs().max()), 1e-300)
        floor = torch.clamp(theta[wanted].abs(), min=1e-12 * scale)
        done = beta <= 1e-12 * scale or bool((beta * s[-1, wanted].abs() <= tol * floor).all())
        if done or j + 1 == n or it == max_iter:
            return theta.flip(0)[:top_k], theta[0], done or j + 1 == n
        if j + 1 < m:
            basis[j + 1] = w / beta
            t[j, j + 1] = t[j + 1, j] = beta
            j += 1
            continue
        keep = [*range(n_lo), *range(m - n_hi, m)]
        _combine_rows(basis, s[:, keep])
        k = len(keep)
        t.zero_()
        t[:k, :k] = torch.diag(theta[keep])
        t[:k, k] = t[k, :k] = beta * s[-1, keep]
        basis[k] = w / beta
        j = k
    raise ValueError(f"max_iter must be >= 1, got {max_iter}")


def _lanczos_tridiagonal(matvec: Matvec, v: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``steps`` Lanczos steps from ``v`` with full reorthogonalization; returns T's eigenpairs."""
    n = v.numel()
    m = min(n, steps)
    basis = torch.empty(m, n, dtype=_F64)
    basis[0] = v / v.norm()
    alphas, betas = torch.zeros(m, dtype=_F64), torch.zeros(m, dtype=_F64)
    size = m
    for j in range(m):
        w = matvec(basis[j])
        alphas[j] = basis[j] @ w
        w = _orthogonalize(w, basis[: j + 1])
        beta = float(w.norm())
        if not (math.isfinite(float(alphas[j])) and math.isfinite(beta)):
            raise _NonFinite
        scale = max(float(alphas[: j + 1].abs().max()), float(betas[:j].abs().max()) if j else 0.0, 1e-300)
        if j + 1 == m or beta <= 1e-12 * scale:  # last step, or an invariant subspace: T is exact
            size = j + 1
            break
        betas[j] = beta
        basis[j + 1] = w / beta
    t = torch.diag(alphas[:size]) + torch.diag(betas[: size - 1], 1) + torch.diag(betas[: size - 1], -1)
    return torch.linalg.eigh(t)


def slq_density(matvec: Matvec, n: int, *, probes: int = 1, steps: int = 64, seed: int = 0) -> SpectralDensity:
    """Stochastic Lanczos quadrature (Lin, Saad & Yang 2016; Ghorbani et al. 2019).

    For each of ``probes`` vectors v drawn uniformly on the unit sphere (a seeded Gaussian,
    normalized), ``steps`` Lanczos steps give ``T = Q S Θ Sᵀ``; the nodes are the Ritz values
    θ_i and the weights ``(S_{0i})² / probes``. Then ``Σ_i w_i f(θ_i)`` is the Gauss quadrature
    of ``vᵀ f(H) v``, exact for polynomials of degree ``≤ 2·steps − 1``, and its mean over the
    probes estimates ``tr f(H) / n`` (``E[v vᵀ] = I/n``). Memory: ``steps × n`` float64.
    """
    if probes < 1 or steps < 1:
        raise ValueError(f"slq_density: probes and steps must be >= 1, got {probes}, {steps}")
    gen = torch.Generator().manual_seed(seed)
    nodes: list[float] = []
    weights: list[float] = []
    for _ in range(probes):
        theta, s = _lanczos_tridiagonal(matvec, torch.randn(n, generator=gen, dtype=_F64), steps)
        nodes += theta.tolist()
        weights += (s[0] ** 2 / probes).tolist()
    return SpectralDensity(nodes=nodes, weights=weights, n_probes=probes, steps=steps)


# --------------------------------------------------------------------------- trace


def _rademacher(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, (n,), generator=gen).to(_F64) * 2 - 1


def hutchinson_trace(matvec: Matvec, n: int, samples: int, *, seed: int = 0) -> tuple[float, float]:
    """Hutchinson's estimator ``(1/m) Σ_j z_jᵀ H z_j`` with Rademacher z_j (Hutchinson 1989);
    returns (estimate, standard error; NaN for one sample). ``samples`` products."""
    if samples < 1:
        raise ValueError(f"hutchinson_trace: samples must be >= 1, got {samples}")
    gen = torch.Generator().manual_seed(seed)
    values = torch.empty(samples, dtype=_F64)
    for i in range(samples):
        z = _rademacher(n, gen)
        values[i] = z @ matvec(z)
    stderr = float(values.std() / math.sqrt(samples)) if samples > 1 else math.nan
    return float(values.mean()), stderr


def hutchpp_trace(matvec: Matvec, n: int, matvecs: int, *, seed: int = 0) -> tuple[float, float]:
    """Hutch++ (Meyer, Musco, Musco & Woodruff 2021, Algorithm 1) with ``matvecs`` products.

    With k = ⌊matvecs/3⌋ Rademacher sketch vectors S and g = matvecs − 2k Rademacher probes G:
    ``Q = orth(H S)``, ``tr ≈ tr(Qᵀ H Q) + (1/g) Σ_j g_jᵀ (I − QQᵀ) H (I − QQᵀ) g_j``. Unbiased;
    its variance is that of Hutchinson's on the deflated matrix, O(1/m²) instead of O(1/m) for
    a decaying spectrum. Returns (estimate, standard error of the second term given Q; NaN when
    g = 1). Memory: k vectors of n float64.
    """
    if matvecs < 3:
        raise ValueError(f"hutchpp_trace: needs at least 3 products, got {matvecs}")
    k = matvecs // 3
    g = matvecs - 2 * k
    gen = torch.Generator().manual_seed(seed)
    sketch = torch.stack([matvec(_rademacher(n, gen)) for _ in range(k)], dim=1)
    if not bool(torch.isfinite(sketch).all()):
        return math.nan, math.nan
    q = torch.linalg.qr(sketch).Q
    low_rank = sum(float(q[:, i] @ matvec(q[:, i].contiguous())) for i in range(k))
    values = torch.empty(g, dtype=_F64)
    for j in range(g):
        z = _rademacher(n, gen)
        r = z - q @ (q.T @ z)
        values[j] = r @ matvec(r)
    stderr = float(values.std() / math.sqrt(g)) if g > 1 else math.nan
    return low_rank + float(values.mean()), stderr


# --------------------------------------------------------------------------- entry point


def _params(params: nn.Module | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    tensors = list(params.parameters()) if isinstance(params, nn.Module) else list(params)
    tensors = [p for p in tensors if p.requires_grad]
    if not tensors:
        raise ValueError("hessian_spectrum: no parameters that require grad")
    return tensors


def _undefined(n: int, n_hvp: int, why: str, trace_method: str) -> HessianSpectrum:
    note = f"{why}: the Hessian is undefined, every value is nan"
    warnings.warn(f"hessian_spectrum: {note}", NonFiniteWarning, stacklevel=4)
    return HessianSpectrum(
        lambda_max=math.nan,
        lambda_min=math.nan,
        condition_number=None,
        definiteness=f"undefined ({why})",
        trace=math.nan,
        trace_stderr=math.nan,
        n_params=n,
        n_hvp=n_hvp,
        converged=False,
        top_eigenvalues=[],
        trace_method=trace_method,
        note=note,
    )


def hessian_spectrum(
    loss_fn: Callable[[], torch.Tensor],
    params: nn.Module | Iterable[torch.Tensor],
    *,
    tol: float = 1e-6,
    max_iter: int = 500,
    basis_size: int = 40,
    top_k: int = 1,
    trace_samples: int = 0,
    trace_method: Literal["hutchinson", "hutch++"] = "hutchinson",
    density_probes: int = 0,
    density_steps: int = 64,
    seed: int = 0,
    dense_threshold: int = 256,
    model: nn.Module | None = None,
) -> HessianSpectrum:
    """λ_max, λ_min, condition number, trace (and density) of ``H = ∇²_θ loss_fn()``.

    Args:
        loss_fn: recomputes the scalar loss (called once; its graph is reused for every product).
        params: a module (all its parameters that require grad) or the tensors to differentiate.
        tol: relative residual tolerance of the Lanczos Ritz values (see :func:`lanczos_extremes`).
        max_iter: at most this many Hessian-vector products for the extremes; a warning says
            when it was not enough.
        basis_size: Lanczos vectors kept in memory (float64, ``basis_size × n × 8`` bytes); the
            run restarts thickly when it is full. At least ``top_k + 4``.
        top_k: how many of the largest eigenvalues to return in ``top_eigenvalues``.
        trace_samples: Hessian-vector products spent on the trace; 0 gives ``nan`` (exact when
            dense).
        trace_method: ``"hutchinson"`` (Rademacher probes, with a standard error) or
            ``"hutch++"`` (:func:`hutchpp_trace`; at least 3 products).
        density_probes: probes of stochastic Lanczos quadrature (0: no density). Each costs
            ``density_steps`` products and ``density_steps × n × 8`` bytes while it runs.
        density_steps: Lanczos steps per density probe.
        seed: seeds the Lanczos start vector, the trace probes and the density probes.
        dense_threshold: at most this many parameters, the dense Hessian is formed and solved
            exactly (the density is then the exact eigenvalue measure, weight 1/n each).
        model: the module whose buffers the closure may change (BatchNorm statistics); default
            ``params`` when it is a module. They and the global RNGs are restored afterwards
            (:func:`frozen_closure_state`), and the closure sees the state of an enclosing
            ``frozen_closure_state`` block when there is one.

    The model's mode, buffers and the parameters' ``.grad`` are left as they were. A NaN/Inf
    loss, gradient or product gives NaNs, ``definiteness = "undefined (…)"`` and a
    :class:`~plasticity_probe.metrics.NonFiniteWarning`, not an exception.
    """
    if trace_method not in ("hutchinson", "hutch++"):
        raise ValueError(f"trace_method must be 'hutchinson' or 'hutch++', got {trace_method!r}")
    tensors = _params(params)
    owner = model if model is not None else params if isinstance(params, nn.Module) else None
    with frozen_closure_state(owner):
        return _spectrum(
            HessianOperator(loss_fn, tensors),
            tol=tol,
            max_iter=max_iter,
            basis_size=basis_size,
            top_k=top_k,
            trace_samples=trace_samples,
            trace_method=trace_method,
            density_probes=density_probes,
            density_steps=density_steps,
            seed=seed,
            dense_threshold=dense_threshold,
        )


def _spectrum(
    op: HessianOperator,
    *,
    tol: float,
    max_iter: int,
    basis_size: int,
    top_k: int,
    trace_samples: int,
    trace_method: str,
    density_probes: int,
    density_steps: int,
    seed: int,
    dense_threshold: int,
) -> HessianSpectrum:
    n = op.n
    if not op.finite:
        return _undefined(n, 0, op.why, trace_method)
    trace, stderr, converged = math.nan, math.nan, True
    density = None
    try:
        if n <= dense_threshold:
            dense = op.dense()
            if not bool(torch.isfinite(dense).all()):
                raise _NonFinite
            eig = torch.linalg.eigvalsh(dense)
            top, lmin = eig.flip(0)[:top_k], eig[0]
            trace, stderr = float(eig.sum()), 0.0
            if density_probes > 0:
                density = SpectralDensity(nodes=eig.tolist(), weights=[1.0 / n] * n, n_probes=0, steps=n)
        else:
            top, lmin, converged = lanczos_extremes(
                op.matvec, n, top_k=top_k, tol=tol, max_iter=max_iter, basis_size=basis_size, seed=seed
            )
            if not converged:
                warnings.warn(
                    f"hessian_spectrum: Lanczos did not reach tol={tol} in {max_iter} products; "
                    "raise max_iter for tighter extremes",
                    ConvergenceWarning,
                    stacklevel=4,
                )
            if trace_samples > 0 and trace_method == "hutchinson":
                trace, stderr = hutchinson_trace(op.matvec, n, trace_samples, seed=seed + 1)
            elif trace_samples > 0:
                trace, stderr = hutchpp_trace(op.matvec, n, trace_samples, seed=seed + 1)
            if density_probes > 0:
                density = slq_density(op.matvec, n, probes=density_probes, steps=density_steps, seed=seed + 2)
    except _NonFinite:
        return _undefined(n, op.n_hvp, "non-finite Hessian-vector product", trace_method)
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
        trace_method=trace_method,
        density=density,
    )
