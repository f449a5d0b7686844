"""Gradient metrics and distance from initialization as pure functions: tensors in, a float out.

Each function takes the tensors of one layer (or of the whole network): a module, or an iterable
of parameters / gradients. A gradient given as ``None`` (a parameter the loss does not reach)
counts as zero. Norms are accumulated in float64; NaN or Inf in the input gives ``nan`` and a
:class:`~plasticity_probe.metrics.NonFiniteWarning`, never an exception.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable

import torch
from torch import nn

from plasticity_probe.metrics import NonFiniteWarning

__all__ = ["distance_from_init", "grad_dormant_fraction", "grad_norm", "grad_to_weight_ratio"]

Tensors = nn.Module | torch.Tensor | Iterable[torch.Tensor | None]


def _list(tensors: Tensors) -> list[torch.Tensor | None]:
    if isinstance(tensors, nn.Module):
        return list(tensors.parameters())
    if isinstance(tensors, torch.Tensor):
        return [tensors]
    return list(tensors)


def _sq_norm(tensors: Iterable[torch.Tensor | None]) -> float:
    total = torch.zeros((), dtype=torch.float64)
    for t in tensors:
        if t is not None:
            total += t.detach().to(torch.float64).square().sum().cpu()
    return float(total)


def _finite(value: float, metric: str) -> float:
    if not math.isfinite(value):
        warnings.warn(f"{metric}: input holds NaN or Inf; result is nan", NonFiniteWarning, stacklevel=3)
        return math.nan
    return value


def distance_from_init(params: Tensors, init_params: Tensors) -> float:
    """``‖θ − θ_0‖₂`` over all the given tensors: the Euclidean distance travelled since
    initialization (Lyle et al. 2024, "Disentangling the causes of plasticity loss in neural
    networks"; Kumar, Marklund & Van Roy 2023 regularize its square).

    ``params`` and ``init_params`` are paired in order (a module gives its ``parameters()``), so
    pass ``Probe``'s snapshot or ``state_dict().values()`` of the same layers; counts and shapes
    must match.
    """
    now, init = _list(params), _list(init_params)
    if len(now) != len(init):
        raise ValueError(f"distance_from_init: {len(now)} tensors against {len(init)} initial ones")
    diffs = []
    for i, (p, p0) in enumerate(zip(now, init, strict=True)):
        if p is None or p0 is None or p.shape != p0.shape:
            shapes = (None if p is None else tuple(p.shape), None if p0 is None else tuple(p0.shape))
            raise ValueError(f"distance_from_init: tensor {i} has shape {shapes[0]}, initial {shapes[1]}")
        diffs.append(p.detach().to(torch.float64) - p0.detach().to(device=p.device, dtype=torch.float64))
    return _finite(math.sqrt(_sq_norm(diffs)), "distance_from_init")


def grad_norm(grads: Tensors) -> float:
    """``‖g‖₂ = sqrt(Σ_t ‖∂L/∂θ_t‖²)`` over the given gradient tensors (``None`` counts as 0).

    A module gives the ``.grad`` of its parameters.
    """
    tensors = [p.grad for p in grads.parameters()] if isinstance(grads, nn.Module) else _list(grads)
    return _finite(math.sqrt(_sq_norm(tensors)), "grad_norm")


def grad_to_weight_ratio(grads: Tensors, params: Tensors) -> float:
    """``‖g‖₂ / ‖θ‖₂``: the relative size of a gradient step, the "effective learning rate"
    signal (the update-to-weight ratio of Karpathy's training recipes; SimbaV2, Lee et al. 2025,
    tracks parameter and gradient norms for the same reason). ``inf`` when ‖θ‖ = 0 < ‖g‖, ``nan``
    when both are 0.
    """
    g = grad_norm(grads)
    w = _finite(math.sqrt(_sq_norm(_list(params))), "grad_to_weight_ratio")
    if math.isnan(g) or math.isnan(w):
        return math.nan
    if w == 0.0:
        return math.inf if g > 0 else math.nan
    return g / w


def grad_dormant_fraction(grads: torch.Tensor, tau: float = 0.01, *, unit_dim: int = -1) -> float:
    """Fraction of τ-inactive units by gradient magnitude: GraMa (Liu, Wu, Obando-Ceron, Castro,
    Courville & Pan 2025, "Measure gradients, not activations! Enhancing neuronal activity in
    deep reinforcement learning", arXiv:2505.24061).

    ``grads`` holds the gradient of the loss with respect to each unit's pre-activation for a
    batch, units along ``unit_dim`` (``(N, d)`` for a linear layer, ``(N, C, H, W)`` with
    ``unit_dim=1`` for a conv layer). GraMa's score mirrors ReDo's activation score
    (Sokar et al. 2023) with gradients in place of activations::

        G_i = E |∂L/∂h_i| / ((1/H) Σ_k E |∂L/∂h_k|),        unit i τ-inactive when G_i ≤ τ,

    the expectation over every other dimension (samples, positions), H the number of units.
    When every gradient is exactly 0 the scores are undefined; all units then count as inactive
    (1.0), as in :func:`~plasticity_probe.metrics.dormant_fraction`.

    Source note: we could not read the paper's text from this environment. The formula above is
    the one stated by two public re-implementations: AgileRL's release notes for its ReGraMa
    resets ("mean absolute gradient of the loss w.r.t. the pre-activation, normalised by that
    layer's mean", threshold ≤ 0.01) and a JAX continual-learning library's ``regrama`` (the same
    normalized mean |gradient|, ``score ≤ 0.01``, computed there from the incoming-weight
    gradients: pass a weight gradient ``(out, in)`` with ``unit_dim=0`` for that variant). Unlike
    those, we divide by the layer mean exactly (no ``+1e-8``). The default ``τ = 0.01`` is
    theirs.
    """
    if tau < 0:
        raise ValueError(f"grad_dormant_fraction: tau must be >= 0, got {tau}")
    g = grads.detach()
    if g.ndim == 0:
        raise ValueError("grad_dormant_fraction: needs at least one unit dimension")
    if not bool(torch.isfinite(g).all()):
        warnings.warn("grad_dormant_fraction: input holds NaN or Inf; result is nan", NonFiniteWarning, stacklevel=2)
        return math.nan
    if g.numel() == 0:  # no samples or no units (reshape cannot infer a dimension of 0 elements)
        return math.nan
    g = g.movedim(unit_dim, -1).reshape(-1, g.shape[unit_dim]).to(torch.float64)
    per_unit = g.abs().mean(dim=0)
    layer_mean = per_unit.mean()
    if float(layer_mean) == 0.0:
        return 1.0
    return float((per_unit / layer_mean <= tau).to(torch.float64).mean())
