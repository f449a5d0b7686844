"""The successive penalties of K runs at once, with their gradients written out.

Each run's terms and weights come from ``pp.SuccessiveRegularizer`` itself, built on that run's
``QNetwork`` (its ``weights()``: which layers, parameter tensors or features are penalized and
with which δ^k, for the ``paper`` and ``authors`` variants and any ``reg_layers``); this module
only evaluates them for the whole stack. Runs of one batch may use different penalties, λ, δ
and frequencies: each penalty kind is a ``(K, n_tensors)`` (parameters) or ``(K, n_layers)``
(features) table of coefficients ``λ δ^k``, zero where a run does not use it.

Parameter penalties ``R`` per tensor θ and their gradients:

* paper ``l2``: ``‖θ‖²`` → ``2θ``;  ``l2init``: ``‖θ − θ_0‖²`` → ``2(θ − θ_0)``;
* ``l1``: ``‖θ‖₁`` → ``sign(θ)``;
* authors ``l2``: ``‖W‖`` → ``W / ‖W‖`` (0 at 0);  authors ``l2init``: ``‖W − W_0‖`` likewise.

The singular penalty of features Φ (n × d): ``σ_max² − σ_min²``, the extreme eigenvalues of the
smaller Gram matrix; with G = ΦᵀΦ and its unit eigenvectors v, ``∂λ/∂Φ = 2 Φ v vᵀ`` (with
G = ΦΦᵀ and eigenvectors u, ``2 u uᵀ Φ``); the smallest eigenvalue enters clamped at 0, as in
``pp.singular_penalty``. Matrices whose batched eigendecomposition fails (or is not finite) are
done one by one by ``pp.singular_penalty`` and autograd, with the library's fallbacks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

import plasticity_probe as pp
from plasticity_probe.regularizers import Variant
from reference_agent.config import DQNConfig, Reg, RegEvery
from reference_agent.network import QNetwork
from reference_agent.stacked import layer_names, param_names

PARAM_KINDS = ("sq", "sqdiff", "abs", "norm", "normdiff")


def kind_of(cfg: DQNConfig) -> str | None:
    """The penalty kind of a run: one of ``PARAM_KINDS``, ``singular`` or None."""
    if cfg.reg is Reg.none:
        return None
    if cfg.reg is Reg.singular:
        return "singular"
    authors = cfg.reg_variant is Variant.authors
    return {
        Reg.l2: "norm" if authors else "sq",
        Reg.l2init: "normdiff" if authors else "sqdiff",
        Reg.l1: "abs",
    }[cfg.reg]


@dataclass
class Term:
    """One logged term of a run: its name (as ``SuccessiveRegularizer.last_terms`` names it) and
    the columns of the unit table it sums."""

    name: str
    columns: tuple[int, ...]


class StackedPenalty:
    """``λ Σ δ^k R`` of each run of a stack, the per-term values for logging, and the gradients."""

    def __init__(
        self, cfgs: Sequence[DQNConfig], nets: Sequence[QNetwork], init: Sequence[torch.Tensor], device: torch.device
    ) -> None:
        self.k = len(cfgs)
        n_layers = len(init) // 2
        self.n_params, self.n_layers = 2 * n_layers, n_layers
        self.init = list(init)  # θ_0 stacked, params() order
        pnames, lnames = param_names(n_layers), layer_names(n_layers)
        self.kinds = [kind_of(c) for c in cfgs]
        self.every = np.array(
            [c.target_update_period if c.reg_every is RegEvery.target else 1 for c in cfgs], dtype=np.int64
        )
        self.coef = {kind: np.zeros((self.k, self.n_params)) for kind in PARAM_KINDS}
        self.singular = np.zeros((self.k, n_layers))
        self.terms: list[list[Term]] = []
        obs_dim = int(init[0].shape[2])
        for r, (cfg, net, kind) in enumerate(zip(cfgs, nets, self.kinds, strict=True)):
            if kind is None:
                self.terms.append([])
                continue
            reg = pp.SuccessiveRegularizer(
                net,
                cfg.reg.value,
                cfg.lam,
                cfg.delta,
                every=int(self.every[r]),
                layers=list(cfg.reg_layers) or None,
                variant=cfg.reg_variant,
                example_input=torch.zeros(1, obs_dim),
            )
            weights = reg.weights()
            reg.close()
            terms = []
            for name, weight in weights.items():
                if kind == "singular":
                    col = lnames.index(name)
                    self.singular[r, col] = cfg.lam * weight
                    terms.append(Term(name, (self.n_params + col,)))
                    continue
                cols = (
                    (pnames.index(name),)
                    if name in pnames
                    else tuple(i for i, p in enumerate(pnames) if p.startswith(name + "."))
                )
                self.coef[kind][r, list(cols)] = cfg.lam * weight
                terms.append(Term(name, cols))
            self.terms.append(terms)
        self.present = [kind for kind in PARAM_KINDS if self.coef[kind].any()]
        self.device = device
        self._coef_t = {
            kind: torch.tensor(self.coef[kind], dtype=torch.float32, device=device) for kind in self.present
        }
        self.last_units = torch.zeros(self.k, self.n_params + n_layers, device=device)
        self.last_active = np.zeros(self.k, dtype=bool)
        self.any = any(kind is not None for kind in self.kinds)

    def retire(self, run: int) -> None:
        """No penalty for this run any more (it stopped: diverged)."""
        self.kinds[run] = None
        for kind in PARAM_KINDS:
            self.coef[kind][run] = 0.0
        self.singular[run] = 0.0
        self._coef_t = {
            kind: torch.tensor(self.coef[kind], dtype=torch.float32, device=self.device) for kind in self.present
        }

    def active(self, step: int) -> np.ndarray:
        """Runs whose penalty is added at ``step`` (``step % every == 0``)."""
        return np.array([kind is not None for kind in self.kinds]) & (step % self.every == 0)

    @property
    def has_feature_terms(self) -> bool:
        """Whether some run of the stack has a singular (feature) penalty."""
        return bool(self.singular.any())

    @property
    def param_coefs(self) -> dict[str, torch.Tensor]:
        """``λ δ^k`` per run and parameter tensor ``(K, n_params)`` of each parameter-penalty kind
        some run uses (the input of ``param_penalties``)."""
        return self._coef_t

    def feature_terms(
        self, active: np.ndarray, features: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
        """The singular penalties of the ``active`` runs: ``λ δ^k (σ_max² − σ_min²)`` per run and
        layer ``(K, n_layers)`` (None when no run has one at this step) and the gradient per
        feature layer (None where zero)."""
        grads: list[torch.Tensor | None] = [None] * self.n_layers
        units: torch.Tensor | None = None
        for i in range(self.n_layers):
            runs = np.flatnonzero((self.singular[:, i] != 0) & active)
            if runs.size == 0:
                continue
            coef = torch.tensor(self.singular[runs, i], dtype=torch.float32, device=self.device)
            index = torch.from_numpy(runs).to(self.device)
            value, grad = singular_terms(features[i].index_select(0, index))
            if units is None:
                units = torch.zeros(self.k, self.n_layers, device=self.device)
            units[:, i].index_add_(0, index, coef * value)
            full = torch.zeros_like(features[i])
            full.index_copy_(0, index, grad.mul_(coef.view(-1, 1, 1)))
            grads[i] = full
        return units, grads

    def record(self, active: np.ndarray, units: torch.Tensor) -> None:
        """Keep the step's per-unit values ``(K, n_params + n_layers)`` for ``last_terms``."""
        self.last_active, self.last_units = active, units

    def last_terms(self, run: int) -> dict[str, float]:
        """``SuccessiveRegularizer.last_terms`` of run ``run`` after the last call (empty when its
        penalty was skipped at that step)."""
        if not self.last_active[run]:
            return {}
        row = self.last_units[run].tolist()
        return {t.name: float(sum(row[c] for c in t.columns)) for t in self.terms[run]}


def param_penalties(
    params: Sequence[torch.Tensor],
    init: Sequence[torch.Tensor],
    coefs: dict[str, torch.Tensor],
    mask: torch.Tensor,
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """``λ δ^k R(θ)`` per run and parameter tensor ``(K, n_params)`` and ``∂/∂θ`` per tensor
    (all None when ``coefs`` is empty) of the kinds in ``coefs`` (``StackedPenalty.param_coefs``),
    for the runs where ``mask`` ``(K,)`` is 1. Pure tensor code: the engine compiles it."""
    units = params[0].new_zeros(mask.shape[0], len(params))
    grads: list[torch.Tensor | None] = [None] * len(params)
    for kind, table in coefs.items():
        coef = table * mask.unsqueeze(1)
        for j, (p, p0) in enumerate(zip(params, init, strict=True)):
            value, grad = _param_term(kind, p, p0)
            units[:, j] += coef[:, j] * value
            g = grad * coef[:, j].view((-1,) + (1,) * (p.ndim - 1))
            previous = grads[j]
            grads[j] = g if previous is None else previous + g
    return units, grads


def _param_term(kind: str, p: torch.Tensor, p0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``R`` per run ``(K,)`` of one stacked tensor and ``∂R/∂θ`` (a fresh tensor)."""
    dims = tuple(range(1, p.ndim))
    x = p - p0 if kind in ("sqdiff", "normdiff") else p
    if kind in ("sq", "sqdiff"):
        return x.square().sum(dim=dims), x * 2.0
    if kind == "abs":
        return x.abs().sum(dim=dims), x.sign()
    norm = torch.linalg.vector_norm(x, dim=dims)
    scale = torch.where(norm > 0, 1.0 / norm, torch.zeros_like(norm)).view((-1,) + (1,) * len(dims))
    return norm, x * scale


def singular_terms(phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``σ_max² − σ_min²`` of each feature matrix of ``phi`` ``(R, n, d)`` and its gradient with
    respect to ``phi``, as ``pp.singular_penalty`` and autograd give them."""
    n, d = phi.shape[1], phi.shape[2]
    tall = n >= d
    gram = phi.transpose(1, 2) @ phi if tall else phi @ phi.transpose(1, 2)
    if min(n, d) == 1:  # one eigenvalue: the library's penalty is 0
        return phi.new_zeros(phi.shape[0]), torch.zeros_like(phi)
    try:
        evals, evecs = torch.linalg.eigh(gram) if bool(torch.isfinite(gram).all()) else (None, None)
    except torch.linalg.LinAlgError:
        evals, evecs = None, None
    if evals is None or evecs is None or not bool(torch.isfinite(evals).all()):
        return _singular_one_by_one(phi)
    keep_min = (evals[:, 0] >= 0).to(phi.dtype)
    value = evals[:, -1] - evals[:, 0].clamp_min(0.0)
    top, bottom = evecs[:, :, -1:], evecs[:, :, :1]  # (R, m, 1)
    if tall:  # 2 Φ (v vᵀ)
        grad = torch.baddbmm(
            (phi @ top) @ top.transpose(1, 2),
            (phi @ bottom) * keep_min.view(-1, 1, 1),
            bottom.transpose(1, 2),
            alpha=-1.0,
        )
    else:  # 2 (u uᵀ) Φ
        grad = torch.baddbmm(
            top @ (top.transpose(1, 2) @ phi),
            bottom * keep_min.view(-1, 1, 1),
            bottom.transpose(1, 2) @ phi,
            alpha=-1.0,
        )
    return value, grad.mul_(2.0)


def _singular_one_by_one(phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    values, grads = [], []
    for one in phi:
        x = one.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            value = pp.singular_penalty(x)
        if bool(torch.isfinite(value)):
            (grad,) = torch.autograd.grad(value, x)
        else:  # a diverged run: its NaN loss is reported at the next log step
            grad = torch.zeros_like(x)
        values.append(value.detach())
        grads.append(grad)
    return torch.stack(values), torch.stack(grads)
