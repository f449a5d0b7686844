"""Plasticity metrics as pure functions: a tensor in, a Python float out.

Conventions shared by every function here:

* A *feature matrix* Φ has one row per sample and one column per unit. A 1-D tensor is one
  sample; a tensor with more than two dimensions (conv features ``(N, C, H, W)``) is flattened to
  ``(N, C·H·W)`` for the rank metrics, while the unit metrics (dead, dormant) treat each channel
  as one unit over all samples and positions.
* Singular values are computed in float64 (``torch.linalg.svdvals``, falling back to LAPACK
  ``gesvd`` through SciPy when the divide-and-conquer driver fails to converge), so float32 and
  float64 inputs give the same answer to float64 precision.
* A matrix containing NaN or Inf gives ``nan`` and a :class:`NonFiniteWarning`; nothing raises.
* An all-zero matrix has effective rank, srank, stable rank and feature rank 0.
* No samples (a first dimension of 0, e.g. an empty batch) gives ``nan`` from every metric of
  features or activations, and from ``stable_rank``: there is nothing to measure. Nothing raises.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable

import numpy as np
import scipy.linalg
import torch
from torch import nn

__all__ = [
    "NonFiniteWarning",
    "as_unit_matrix",
    "dead_unit_fraction",
    "dormant_fraction",
    "effective_rank",
    "feature_norm",
    "feature_rank",
    "mean_abs_weight",
    "singular_values",
    "srank",
    "stable_rank",
    "weight_magnitude",
    "zero_fraction",
]


class NonFiniteWarning(RuntimeWarning):
    """A metric was asked about a tensor holding NaN or Inf; it returned NaN."""


def _is_finite(x: torch.Tensor, metric: str) -> bool:
    if bool(torch.isfinite(x).all()):
        return True
    warnings.warn(f"{metric}: input holds NaN or Inf; result is nan", NonFiniteWarning, stacklevel=3)
    return False


def _as_matrix(x: torch.Tensor) -> torch.Tensor:
    """(d,) -> (1, d); (N, d) as is; (N, C, ...) -> (N, C·...)."""
    x = x.detach()
    if x.ndim == 0:
        return x.reshape(1, 1)
    if x.ndim == 1:
        return x.reshape(1, -1)
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))


def _no_samples(x: torch.Tensor) -> bool:
    return x.ndim >= 1 and x.shape[0] == 0


def as_unit_matrix(x: torch.Tensor) -> torch.Tensor:
    """Activations as (observations, units): a conv channel is one unit seen at every position."""
    x = x.detach()
    if x.ndim == 0:
        return x.reshape(1, 1)
    if x.ndim == 1:
        return x.reshape(1, -1)
    if x.ndim == 2:
        return x
    # (N, C, *spatial) -> (N·positions, C)
    positions = math.prod(x.shape[2:])
    return x.reshape(x.shape[0], x.shape[1], positions).transpose(1, 2).reshape(x.shape[0] * positions, x.shape[1])


def singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """Singular values of ``matrix`` (as a feature matrix), descending, float64, on the CPU.

    Uses ``torch.linalg.svdvals`` in float64; if LAPACK's divide-and-conquer driver does not
    converge (ill-conditioned input), retries with SciPy's ``gesvd`` driver.
    The caller must check finiteness first.
    """
    m = _as_matrix(matrix).to(device="cpu", dtype=torch.float64)
    if m.numel() == 0:
        return torch.zeros(0, dtype=torch.float64)
    try:
        return torch.linalg.svdvals(m)
    except RuntimeError:
        s = scipy.linalg.svdvals(m.numpy(), lapack_driver="gesvd", check_finite=False)
        return torch.from_numpy(np.ascontiguousarray(s))


def effective_rank(features: torch.Tensor) -> float:
    """Effective rank of Roy & Vetterli (2007), "The effective rank: a measure of effective
    dimensionality", EUSIPCO.

    ``erank(Φ) = exp(H(p))``, ``H(p) = -Σ_k p_k log p_k``, ``p_k = σ_k / Σ_j σ_j``, with
    ``0·log 0 = 0``. It lies in ``[1, min(n, d)]`` for a non-zero Φ; 0 for an all-zero Φ.
    Example: σ = (3, 2, 1) gives 2.749459.
    """
    if _no_samples(features) or not _is_finite(features, "effective_rank"):
        return math.nan
    s = singular_values(features)
    total = float(s.sum())
    if total == 0.0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * torch.log(p)).sum()))


def srank(features: torch.Tensor, delta: float = 0.01) -> int | float:
    """Effective feature rank ``srank_δ`` of Kumar et al. (2020), "Implicit under-parameterization
    inhibits data-efficient deep RL", ICLR 2021.

    ``srank_δ(Φ) = min{k : Σ_{i≤k} σ_i / Σ_i σ_i ≥ 1 − δ}`` with σ sorted descending, i.e. the
    count of leading singular values whose cumulative share stays below 1 − δ, plus one (the
    convention of Dohare et al.'s loss-of-plasticity code). 0 for an all-zero Φ; nan (float) for a
    non-finite Φ. Example: σ = (3, 2, 1), δ = 0.01 gives 3.
    """
    if not 0.0 <= delta < 1.0:
        raise ValueError(f"srank: delta must be in [0, 1), got {delta}")
    if _no_samples(features) or not _is_finite(features, "srank"):
        return math.nan
    s = singular_values(features)
    total = float(s.sum())
    if total == 0.0:
        return 0
    cumulative = torch.cumsum(s, 0) / total
    # the exact share of all σ is 1 ≥ 1 − δ: at most len(σ), also where rounding leaves the
    # computed last share just below 1 (δ = 0)
    return min(int((cumulative < 1.0 - delta).sum()) + 1, s.numel())


def stable_rank(matrix: torch.Tensor) -> float:
    """Stable rank ``‖M‖_F² / ‖M‖_2² = Σ σ_i² / σ_max²`` (Rudelson & Vershynin 2007).

    Lies in ``[1, rank(M)]`` for non-zero M; 0 for M = 0. Example: σ = (3, 2, 1) gives 14/9.
    """
    if _no_samples(matrix) or not _is_finite(matrix, "stable_rank"):
        return math.nan
    s = singular_values(matrix)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0.0
    return float((s**2).sum() / s[0] ** 2)


def feature_rank(features: torch.Tensor, epsilon: float = 0.01) -> int | float:
    """Approximate feature rank of Lyle et al. (2022), "Understanding and preventing capacity loss
    in reinforcement learning", ICLR: ``#{i : σ_i(Φ / √n) > ε}`` for n samples."""
    if _no_samples(features) or not _is_finite(features, "feature_rank"):
        return math.nan
    m = _as_matrix(features)
    s = singular_values(m) / math.sqrt(m.shape[0])
    return int((s > epsilon).sum())


def dead_unit_fraction(activations: torch.Tensor) -> float:
    """Fraction of units that output exactly 0 for every sample of the batch.

    ``dead = #{j : h_ij = 0 ∀ i} / d`` over a batch ``h ∈ R^{N×d}``: the paper's definition
    (Teo et al. 2023, §4.1, after Nair & Hinton 2010). For conv features ``(N, C, H, W)`` a channel
    is dead when it is 0 at every sample and every position.
    """
    if _no_samples(activations) or not _is_finite(activations, "dead_unit_fraction"):
        return math.nan
    h = as_unit_matrix(activations)
    if h.shape[1] == 0:
        return math.nan
    return float((h == 0).all(dim=0).to(torch.float64).mean())


def zero_fraction(activations: torch.Tensor) -> float:
    """Fraction of activation entries that are exactly 0: ``(1/N) Σ_i #{j : h_ij = 0} / d``, the
    mean share of silent units per sample (activation sparsity). The authors' code plotted this
    quantity (times d) as "dead neurons"; :func:`dead_unit_fraction` is the paper's definition."""
    if _no_samples(activations) or not _is_finite(activations, "zero_fraction"):
        return math.nan
    h = as_unit_matrix(activations)
    if h.numel() == 0:
        return math.nan
    return float((h == 0).to(torch.float64).mean())


def dormant_fraction(activations: torch.Tensor, tau: float = 0.025) -> float:
    """Fraction of τ-dormant units, ReDo (Sokar et al. 2023, "The dormant neuron phenomenon in
    deep reinforcement learning", ICML).

    Score of unit j: ``s_j = E_i |h_ij| / ((1/d) Σ_k E_i |h_ik|)``; unit j is dormant when
    ``s_j ≤ τ``. For conv features the expectation runs over samples and positions. When every
    unit is exactly 0 the scores are undefined; all units are then counted dormant (1.0).
    ``tau = 0`` counts exactly-zero units, i.e. :func:`dead_unit_fraction`.
    """
    if tau < 0:
        raise ValueError(f"dormant_fraction: tau must be >= 0, got {tau}")
    if _no_samples(activations) or not _is_finite(activations, "dormant_fraction"):
        return math.nan
    h = as_unit_matrix(activations).to(torch.float64)
    if h.shape[1] == 0:
        return math.nan
    per_unit = h.abs().mean(dim=0)
    layer_mean = per_unit.mean()
    if float(layer_mean) == 0.0:
        return 1.0
    return float((per_unit / layer_mean <= tau).to(torch.float64).mean())


def feature_norm(features: torch.Tensor) -> float:
    """Mean L2 norm of a sample's feature vector, ``(1/n) Σ_i ‖φ(x_i)‖₂`` (Lyle et al. 2022)."""
    if _no_samples(features) or not _is_finite(features, "feature_norm"):
        return math.nan
    m = _as_matrix(features).to(torch.float64)
    return float(torch.linalg.vector_norm(m, dim=1).mean())


def _tensors(module_or_tensors: nn.Module | torch.Tensor | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(module_or_tensors, nn.Module):
        return [p.detach() for p in module_or_tensors.parameters()]
    if isinstance(module_or_tensors, torch.Tensor):
        return [module_or_tensors.detach()]
    return [t.detach() for t in module_or_tensors]


def weight_magnitude(module_or_tensors: nn.Module | torch.Tensor | Iterable[torch.Tensor]) -> float:
    """L2 norm of all parameters, ``‖θ‖₂ = sqrt(Σ_t Σ_i θ_{t,i}²)`` (the paper's "weight
    magnitude", §4.1, after Lyle et al. 2022). Accepts a module (all its parameters), a tensor,
    or an iterable of tensors. Empty input gives 0."""
    tensors = _tensors(module_or_tensors)
    total = sum(float((t.to(torch.float64) ** 2).sum()) for t in tensors)
    if not math.isfinite(total):
        warnings.warn("weight_magnitude: parameters hold NaN or Inf", NonFiniteWarning, stacklevel=2)
        return math.nan
    return math.sqrt(total)


def mean_abs_weight(module_or_tensors: nn.Module | torch.Tensor | Iterable[torch.Tensor]) -> float:
    """Mean absolute parameter value ``(1/P) Σ |θ_i|`` over all P entries (Dohare et al. 2023)."""
    tensors = _tensors(module_or_tensors)
    count = sum(t.numel() for t in tensors)
    if count == 0:
        return math.nan
    total = sum(float(t.to(torch.float64).abs().sum()) for t in tensors)
    if not math.isfinite(total):
        warnings.warn("mean_abs_weight: parameters hold NaN or Inf", NonFiniteWarning, stacklevel=2)
        return math.nan
    return total / count
