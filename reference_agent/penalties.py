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
``pp.singular_penalty``. ``singular_terms`` and ``singular_grad`` are tensor code the engine
compiles with the rest of its step (the eigendecompositions inside are LAPACK calls); a step whose
plain ``eigh`` fails or is not finite is redone eagerly with ``gram_extremes``, which has the
library's fallbacks.
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
from reference_agent.stacked import RowGrad, layer_names, param_names

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


@dataclass(frozen=True)
class Schedule:
    """The runs whose penalty is added at a step: ``active`` ``(K,)``, the same as a float mask on
    the device, and per layer the runs whose singular penalty is added (the compiled step is
    specialized to these tuples)."""

    active: np.ndarray
    mask: torch.Tensor
    singular_runs: tuple[tuple[int, ...], ...]


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
        self._upload_tables()
        self.last_units = torch.zeros(self.k, self.n_params + n_layers, device=device)
        self.last_active = np.zeros(self.k, dtype=bool)

    def retire(self, run: int) -> None:
        """No penalty for this run any more (it stopped: diverged)."""
        self.kinds[run] = None
        for kind in PARAM_KINDS:
            self.coef[kind][run] = 0.0
        self.singular[run] = 0.0
        self._upload_tables()

    def _upload_tables(self) -> None:
        """The coefficient tables as tensors on the device (``param_coefs``, ``singular_coefs``),
        and the schedules anew (``schedule``)."""
        self._penalized = np.array([kind is not None for kind in self.kinds])
        self._periods = sorted(set(self.every[self._penalized].tolist()))
        self._schedules: dict[tuple[bool, ...], Schedule] = {}
        self._coef_t = {
            kind: torch.tensor(self.coef[kind], dtype=torch.float32, device=self.device) for kind in self.present
        }
        self._singular_t = torch.tensor(self.singular, dtype=torch.float32, device=self.device)

    def schedule(self, step: int) -> Schedule:
        """Which runs add their penalty at ``step`` (``step % every == 0``), as ``Schedule``. It
        depends on the step only through which periods divide it, so each pattern is built once
        (the update asks at every step: rebuilding it cost about 50 µs, a twentieth of a singular
        run's update at K = 1)."""
        phase = tuple(step % period == 0 for period in self._periods)
        found = self._schedules.get(phase)
        if found is None:
            active = self._penalized & (step % self.every == 0)
            mask = torch.from_numpy(active.astype(np.float32)).to(self.device)
            found = self._schedules[phase] = Schedule(active, mask, self._singular_runs(active))
        return found

    @property
    def param_coefs(self) -> dict[str, torch.Tensor]:
        """``λ δ^k`` per run and parameter tensor ``(K, n_params)`` of each parameter-penalty kind
        some run uses (the input of ``param_penalties``)."""
        return self._coef_t

    def _singular_runs(self, active: np.ndarray) -> tuple[tuple[int, ...], ...]:
        """Per layer, the runs whose singular penalty is added at this step (the ``active`` ones
        that penalize the layer)."""
        if not active.any() or not self.singular.any():
            return ((),) * self.n_layers
        on = (self.singular != 0) & active[:, None]
        return tuple(tuple(int(r) for r in np.flatnonzero(on[:, i])) for i in range(self.n_layers))

    @property
    def singular_coefs(self) -> torch.Tensor:
        """``λ δ^k`` of the singular penalty per run and layer ``(K, n_layers)``."""
        return self._singular_t

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


def singular_terms(
    features: Sequence[torch.Tensor], coefs: torch.Tensor, runs: tuple[tuple[int, ...], ...], robust: bool = False
) -> tuple[torch.Tensor, list[RowGrad | None]]:
    """The singular penalties ``λ δ^k (σ_max² − σ_min²)`` of layer i's features in the runs
    ``runs[i]`` (``coefs``: ``λ δ^k`` per run and layer): their values ``(K, n_layers)``, and per
    layer their gradient on those runs' features (``singular_grad``; None for a layer no run
    penalizes at this step). ``robust=False``: pure tensor code with one plain ``eigh`` per layer
    (the compiled step); ``robust=True``: ``gram_extremes``, with the library's fallbacks (eager)."""
    k = features[0].shape[0]
    units = features[0].new_zeros(k, len(features))
    grads: list[RowGrad | None] = [None] * len(features)
    for i, chosen in enumerate(runs):
        if not chosen:
            continue
        every = len(chosen) == k
        phi = features[i] if every else features[i][list(chosen)]
        value, extremes, keep_min = (gram_extremes if robust else _eigh_extremes)(phi)
        coef = coefs[:, i] if every else coefs[list(chosen), i]
        if every:
            units[:, i] = coef * value
        else:
            units[list(chosen), i] = coef * value
        grads[i] = (chosen, singular_grad(phi, extremes, torch.stack((coef, -coef * keep_min), dim=1)))
    return units, grads


def _gram(phi: torch.Tensor) -> torch.Tensor:
    """The smaller Gram matrix of each of ``phi`` ``(R, n, d)``: ΦᵀΦ when n ≥ d, else ΦΦᵀ."""
    return phi.transpose(1, 2) @ phi if phi.shape[1] >= phi.shape[2] else phi @ phi.transpose(1, 2)


def _from_eigh(evals: torch.Tensor, evecs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``σ_max² − max(σ_min², 0)``, the extreme eigenvectors ``(R, m, 2)`` and whether the smallest
    enters (not clamped), from a batched ``eigh``."""
    value = evals[:, -1] - evals[:, 0].clamp_min(0.0)
    return value, torch.stack((evecs[:, :, -1], evecs[:, :, 0]), dim=2), (evals[:, 0] >= 0).to(evals.dtype)


def _eigh_extremes(phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``gram_extremes`` without checks or fallbacks (pure tensor code, for the compiled step)."""
    if min(phi.shape[1], phi.shape[2]) == 1:  # one eigenvalue: the library's penalty is 0
        r = phi.shape[0]
        return phi.new_zeros(r), phi.new_zeros(r, 1, 2), phi.new_zeros(r)
    return _from_eigh(*torch.linalg.eigh(_gram(phi)))


def gram_extremes(phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For feature matrices ``phi`` ``(R, n, d)``: ``σ_max² − max(σ_min², 0)`` per matrix ``(R,)``
    (``pp.singular_penalty``), the unit eigenvectors of the smaller Gram matrix (ΦᵀΦ when n ≥ d,
    else ΦΦᵀ) for its largest and smallest eigenvalue ``(R, m, 2)``, and whether the smallest
    enters the penalty ``(R,)`` (it is clamped at 0 as in ``pp.singular_penalty``). One batched
    ``eigh``; matrices where it fails or is not finite are done one by one (``_extremes_one``)."""
    if min(phi.shape[1], phi.shape[2]) == 1:
        return _eigh_extremes(phi)
    gram = _gram(phi)
    try:
        evals, evecs = torch.linalg.eigh(gram) if bool(torch.isfinite(gram).all()) else (None, None)
    except torch.linalg.LinAlgError:
        evals, evecs = None, None
    if evals is None or evecs is None or not bool(torch.isfinite(evals).all()):
        values, extremes, keep = zip(*(_extremes_one(g) for g in gram), strict=True)
        return torch.stack(values), torch.stack(extremes), torch.stack(keep)
    return _from_eigh(evals, evecs)


def _extremes_one(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``gram_extremes`` of one Gram matrix the batched ``eigh`` could not do, with the fallbacks of
    ``pp.gram_eigenvalues``: the rows and columns that are exactly zero (dead units: exact zero
    eigenvalues, eigenvectors on which Φ is 0) set aside, the rest in float64, and its singular
    value decomposition should that fail. A non-finite matrix (a diverged run) gives NaN and no
    gradient: the run's loss check reports it."""
    m = gram.shape[0]
    extremes = gram.new_zeros(m, 2)
    if not bool(torch.isfinite(gram).all()):
        return gram.new_tensor(float("nan")), extremes, gram.new_zeros(())
    live = (gram != 0).any(dim=0)
    if not bool(live.any()):
        return gram.new_zeros(()), extremes, gram.new_zeros(())
    reduced = gram[live][:, live].double()
    try:
        evals, evecs = torch.linalg.eigh(reduced)
    except torch.linalg.LinAlgError:
        u, s, _ = torch.linalg.svd(reduced)  # PSD: singular values are the eigenvalues
        evals, evecs = s.flip(0), u.flip(1)
    extremes[live, 0] = evecs[:, -1].to(gram.dtype)
    lam_min = evals.new_zeros(())
    if bool(live.all()):  # else λ_min = 0, from the dead units
        extremes[:, 1] = evecs[:, 0].to(gram.dtype)
        lam_min = evals[0]
    value = (evals[-1] - lam_min.clamp_min(0.0)).to(gram.dtype)
    return value, extremes, (lam_min >= 0).to(gram.dtype)


def singular_grad(phi: torch.Tensor, extremes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``∂/∂Φ Σ_j s_j λ_j`` for the Gram eigenpairs ``(λ_j, v_j)`` of ``gram_extremes``: with
    G = ΦᵀΦ, ``∂λ/∂Φ = 2 Φ v vᵀ``; with G = ΦΦᵀ, ``2 u uᵀ Φ``. ``phi`` ``(R, n, d)``, ``extremes``
    ``(R, m, 2)``, ``scales`` ``(R, 2)`` (λ δ^k, and −λ δ^k for the smallest: 0 where it is
    clamped). Pure tensor code: the engine compiles it with its step."""
    s = 2.0 * scales.unsqueeze(1)
    if phi.shape[1] >= phi.shape[2]:
        # Φv as (vᵀ Φᵀ)ᵀ: MKL's path for a product with two output columns is slow (512 × 64 by
        # 64 × 2: 42 µs per run as Φ v, 24 as (vᵀ Φᵀ)ᵀ; docs/performance.md)
        phi_v = torch.bmm(extremes.transpose(1, 2), phi.transpose(1, 2)).transpose(1, 2)
        return torch.bmm(phi_v * s, extremes.transpose(1, 2))
    return torch.bmm(extremes * s, torch.bmm(extremes.transpose(1, 2), phi))
