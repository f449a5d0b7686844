"""Successive (layer-dependent) regularization, Teo, Rajaraman & Chithrananda (2023), §4.3–4.4.

``L = L_TD + λ Σ_{l=1..L} δ^l R(θ^[l])``, added on updates where ``t mod every = 0``
(``every = 1``: every update; ``every = τ``: only on target-network updates). ``δ > 1``
penalizes later layers more; ``δ = 1`` is the constant (global) scheme.

Penalties ``R`` (each usable on its own):

* ``l2``: ``‖θ^[l]‖²`` over the layer's own parameters (weight and bias);
* ``l2init``: ``‖θ^[l] − θ^[l]_0‖²``, regenerative regularization (Kumar, Marklund & Van Roy 2023);
* ``l1``: ``‖θ^[l]‖₁`` (the paper's proposed follow-up);
* ``singular``: ``σ_max²(Φ^[l]) − σ_min²(Φ^[l])`` of layer l's features on the current minibatch
  (Kumar et al. 2020), from the forward pass that produced the loss.

Layers are numbered l = 1..L in forward order (see :mod:`plasticity_probe.layers`), which is
learned from the first forward pass the regularizer sees (or from ``example_input``). A layer's
parameters include those applied in its feature chain (a LayerNorm's affine after it); the
parameters of no layer (a policy's ``log_std``) are penalized as groups with the index of the
layer they are counted with, so nothing escapes the parameter penalties.

``variant="authors"`` reproduces the terms of the authors' public code (``dqn_agent.py`` of
their CS285-based repository) instead of the equations, all over weight tensors (≥ 2-D) only and
unsquared: ``l2`` (their ``weight_mag``): ``λ Σ_W δ^k ‖W‖₂``, k the tensor's position in
``model.named_parameters()`` with biases counted (layer l's weight gets δ^(2l−2) in an MLP);
``l2init`` (their ``regenerative_reg``): ``λ Σ_W δ^k ‖W − W_0‖₂``, k the position among the
weight tensors (δ^(l−1)); ``singular`` (their ``singular_loss``): ``λ (σ_max² − σ_min²)`` of the
penultimate features only (those an output layer reads), without δ.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import nn

from plasticity_probe.layers import DataFlowTracer, LayerInfo, ParamGroup, Trace, call_model

__all__ = [
    "Penalty",
    "SuccessiveRegularizer",
    "Variant",
    "gram_eigenvalues",
    "l1_penalty",
    "l2_penalty",
    "l2init_penalty",
    "singular_penalty",
]


class Penalty(str, Enum):
    """The penalty R(θ^[l]) of a layer."""

    l2 = "l2"
    l2init = "l2init"
    l1 = "l1"
    singular = "singular"


class Variant(str, Enum):
    """Whose formula: the paper's equations, or the authors' public code (see module doc)."""

    paper = "paper"
    authors = "authors"


def _norms(tensors: Sequence[torch.Tensor], order: int = 2) -> torch.Tensor:
    """Per-tensor norms in one fused ``foreach`` kernel; the gradient at 0 is 0, not NaN."""
    return torch.stack(torch._foreach_norm(list(tensors), order))


def l2_penalty(params: Sequence[torch.Tensor], squared: bool = True) -> torch.Tensor:
    """``‖θ‖₂²`` over all tensors (``‖θ‖₂`` with ``squared=False``, as the authors' code did)."""
    norms = _norms(params)
    return norms.square().sum() if squared else torch.linalg.vector_norm(norms)


def l2init_penalty(params: Sequence[torch.Tensor], init: Sequence[torch.Tensor], squared: bool = True) -> torch.Tensor:
    """``‖θ − θ_0‖₂²`` (``‖θ − θ_0‖₂`` with ``squared=False``), Kumar, Marklund & Van Roy (2023)."""
    return l2_penalty(torch._foreach_sub(list(params), list(init)), squared)


def l1_penalty(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """``‖θ‖₁ = Σ |θ_i|``."""
    return _norms(params, 1).sum()


def singular_penalty(features: torch.Tensor) -> torch.Tensor:
    """``σ_max²(Φ) − σ_min²(Φ)`` of a feature matrix Φ (n × d; more dims are flattened),
    Kumar et al. (2020). σ² are the eigenvalues of the smaller Gram matrix (ΦᵀΦ when n ≥ d,
    else ΦΦᵀ), so the cost is one symmetric eigendecomposition of a min(n, d)-square matrix.
    Differentiable: the eigenvalue gradient ``v vᵀ`` involves no eigenvalue gaps. Half-precision
    features (float16, bfloat16) are upcast: the Gram matrix, its eigenvalues and the penalty are
    float32 (σ² overflows float16, and LAPACK has no half-precision eigensolver)."""
    phi = features.reshape(features.shape[0], -1) if features.ndim > 1 else features.reshape(1, -1)
    if phi.dtype in (torch.float16, torch.bfloat16):
        phi = phi.float()
    gram = phi.T @ phi if phi.shape[0] >= phi.shape[1] else phi @ phi.T
    eig = gram_eigenvalues(gram)
    return eig[-1] - eig[0].clamp_min(0.0) if eig.numel() > 1 else eig[-1] - eig[-1]


def gram_eigenvalues(gram: torch.Tensor) -> torch.Tensor:
    """Eigenvalues (ascending, differentiable) of a symmetric PSD Gram matrix ΦᵀΦ.

    LAPACK's divide-and-conquer ``syevd`` can fail to converge, or return NaN without an error,
    when many rows and columns are exactly zero (dead units: seen with MountainCar, 43 of 64 units
    dead right after learning starts). Those rows contribute exact zero eigenvalues, so then they
    are set aside and the rest is decomposed in float64; should that fail too, the singular values
    of the Gram matrix (equal to its eigenvalues, as it is PSD) are used. A non-finite Gram matrix
    (a diverged network) gives NaN eigenvalues, which the caller's loss check reports. A
    half-precision Gram matrix is decomposed in float32; the eigenvalues come back in its dtype."""
    if gram.dtype in (torch.float16, torch.bfloat16):
        return gram_eigenvalues(gram.float()).to(gram.dtype)
    if not bool(torch.isfinite(gram).all()):
        return torch.full(gram.shape[:1], float("nan"), dtype=gram.dtype, device=gram.device)
    try:
        eig = torch.linalg.eigvalsh(gram)
        if bool(torch.isfinite(eig).all()):
            return eig
    except torch.linalg.LinAlgError:
        pass
    live = (gram != 0).any(dim=0)
    reduced = gram[live][:, live].double()
    try:
        kept = torch.linalg.eigvalsh(reduced)
    except torch.linalg.LinAlgError:
        kept = torch.linalg.svdvals(reduced).flip(0)
    zeros = kept.new_zeros(int((~live).sum()))
    return torch.sort(torch.cat([zeros, kept])).values.to(gram.dtype)


@dataclass(frozen=True)
class _Term:
    """One penalized unit: a layer, a parameter group, or (authors' l2) one weight tensor."""

    name: str
    weight: float  # δ^k, without λ
    params: tuple[torch.Tensor, ...]
    names: tuple[str, ...]


def _uncompiled(model: nn.Module) -> nn.Module:
    orig = getattr(model, "_orig_mod", None)
    return orig if isinstance(orig, nn.Module) else model


class SuccessiveRegularizer:
    """A drop-in loss term ``λ Σ_l δ^l R(θ^[l])`` added when ``step % every == 0``.

    Usage::

        reg = SuccessiveRegularizer(model, penalty="l2init", lam=0.01, delta=1.25)  # before training
        loss = td_loss + reg(step)       # after the forward pass that produced td_loss

    Args:
        model: any module; layers and features are found by following the data flow.
        penalty: ``l2``, ``l2init``, ``l1`` or ``singular``.
        lam: λ, the overall strength.
        delta: δ, the per-layer growth factor: layer l is weighted ``δ^l``.
        every: add the penalty only when ``step % every == 0`` (1 = every update).
        layers: module paths of the layers to penalize (default: all layers and parameter
            groups). Indices l stay those of the full forward order, so penalizing only the
            penultimate layer of a 3-layer MLP weights it by δ².
        variant: ``paper`` (the equations) or ``authors`` (their code's terms; see module doc).
        example_input: a batch to learn the forward order at construction (required for a
            ``torch.compile``d model); otherwise it is learned from the first forward pass.

    The ``singular`` penalty uses the features of the first forward pass with autograd enabled
    since the previous call; ``with reg.capture(): ...`` picks the pass explicitly (everything
    in the block). ``l2init`` snapshots θ_0 at construction: build the regularizer before the
    first update; θ_0 follows the parameters' device and dtype and is saved by ``state_dict()``.
    After each call, ``last_terms`` maps each penalized unit to its detached weighted term
    ``λ δ^l R`` (empty on skipped steps). Parameter penalties are computed for all units at once
    (fused per-tensor norms) and need no hooks once the order is known.
    """

    def __init__(
        self,
        model: nn.Module,
        penalty: Penalty | str = Penalty.l2,
        lam: float = 0.01,
        delta: float = 1.0,
        every: int = 1,
        layers: Sequence[str] | None = None,
        *,
        variant: Variant | str = Variant.paper,
        example_input: Any = None,
    ) -> None:
        try:
            self.penalty = Penalty(penalty)
        except ValueError:
            raise ValueError(f"unknown penalty {penalty!r}; choose one of {[p.value for p in Penalty]}") from None
        try:
            self.variant = Variant(variant)
        except ValueError:
            raise ValueError(f"unknown variant {variant!r}; choose 'paper' or 'authors'") from None
        if self.variant is Variant.authors and self.penalty is Penalty.l1:
            raise ValueError("the authors' code has no l1 penalty; use variant='paper'")
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        if not (0 <= lam < float("inf") and 0 < delta < float("inf")):  # NaN fails every comparison
            raise ValueError(f"need finite lam >= 0 and delta > 0, got lam={lam}, delta={delta}")
        eager = _uncompiled(model)
        if eager is not model and (self.penalty is Penalty.singular or example_input is None):
            raise ValueError(
                "SuccessiveRegularizer on a torch.compile'd model: the singular penalty needs each forward "
                "pass's features, which compiled code does not expose; parameter penalties need example_input="
            )
        self.model = eager
        self.lam, self.delta, self.every = float(lam), float(delta), int(every)
        self.selected = list(layers) if layers is not None else None
        self.init: dict[str, torch.Tensor] = {n: p.detach().clone() for n, p in eager.named_parameters()}
        self._tracer = DataFlowTracer(eager, detach=False)
        self._trace: Trace | None = None
        self._terms: list[_Term] = []
        self._pending: Trace | None = None  # a pass taken but not yet penalized (first pass, or capture())
        self._last: tuple[list[str], torch.Tensor] | None = None
        self._weights: torch.Tensor | None = None
        if example_input is not None:
            with self._tracer.record(), torch.enable_grad():
                call_model(eager, example_input)
            self._learn(self._tracer.trace())
        if self.penalty is Penalty.singular or self._trace is None:
            self._tracer.attach_auto()

    # ----------------------------------------------------------------- structure
    @property
    def layers(self) -> list[LayerInfo]:
        """The penalized layers with their forward indices (after the first forward pass)."""
        return [info for info in self._structure().layers if self.selected is None or info.name in self.selected]

    @property
    def groups(self) -> list[ParamGroup]:
        """Parameters of no layer, penalized with the index of the layer they are counted with
        (empty when ``layers=`` selects a subset)."""
        return self._structure().groups if self.selected is None else []

    def _structure(self) -> Trace:
        if self._trace is None:
            trace = self._tracer.take()
            if trace is None:
                raise RuntimeError(
                    "SuccessiveRegularizer: no forward pass seen yet; call the model (with autograd "
                    "enabled) before reg(step), or pass example_input="
                )
            self._learn(trace)
            if self.penalty is Penalty.singular:  # the first pass's features are the next penalty's
                self._pending = trace
        assert self._trace is not None
        return self._trace

    def _learn(self, trace: Trace) -> None:
        if self.selected is not None:
            known = {info.name for info in trace.layers}
            unknown = [n for n in self.selected if n not in known]
            if unknown:
                raise ValueError(f"layers {unknown} are not layers of the model; layers: {sorted(known)}")
        self._trace = trace
        self._terms = self._build_terms(trace)
        if self.penalty is not Penalty.singular:
            self._tracer.detach_auto()  # the order is all parameter penalties need: no hot-path hooks

    def _build_terms(self, trace: Trace) -> list[_Term]:
        named = dict(self.model.named_parameters())
        layers = [info for info in trace.layers if self.selected is None or info.name in self.selected]
        if self.penalty is Penalty.singular:
            layers = [info for info in layers if info.name in trace.features]  # e.g. not MultiheadAttention
            if self.variant is Variant.authors:
                layers = [info for info in layers if info.name in self._penultimate(trace)]
                return [_Term(info.name, 1.0, (), ()) for info in layers]
            return [_Term(info.name, self.delta**info.index, (), ()) for info in layers]
        if self.variant is Variant.authors:  # their loops run over named_parameters(), not forward order
            mine = {n for info in layers for n in info.params if named[n].ndim >= 2}
            if self.penalty is Penalty.l2:
                position = {n: k for k, n in enumerate(named)}
            else:
                position = {n: k for k, n in enumerate(n for n, p in named.items() if p.ndim >= 2)}
            return [_Term(n, self.delta ** position[n], (named[n],), (n,)) for n in named if n in mine]
        units: list[tuple[str, int, tuple[str, ...]]] = [(i.name, i.index, i.params) for i in layers]
        if self.selected is None:
            units += [(f"group:{g.name}", g.index, g.params) for g in trace.groups]
        seen: set[str] = set()  # a tied parameter is penalized once, with the first unit using it
        terms = []
        for name, index, params in units:
            fresh = tuple(p for p in params if p not in seen)
            seen.update(fresh)
            if fresh:
                terms.append(_Term(name, self.delta**index, tuple(named[p] for p in fresh), fresh))
        return terms

    @staticmethod
    def _penultimate(trace: Trace) -> set[str]:
        """Layers whose features an output layer (one whose features nothing reads) reads."""
        outputs = {info.name for info in trace.layers if not trace.consumers.get(info.name)}
        return {src for src, consumers in trace.consumers.items() if any(c.layer in outputs for c in consumers)}

    def weights(self) -> dict[str, float]:
        """δ^k of each penalized unit (layer, ``group:<module>``, or weight tensor), without λ."""
        self._structure()
        return {t.name: t.weight for t in self._terms}

    # ----------------------------------------------------------------- the penalty
    @contextmanager
    def capture(self) -> Iterator[SuccessiveRegularizer]:
        """Use the features of everything inside the block for the next ``singular`` penalty."""
        scoped = DataFlowTracer(self.model, detach=False)
        self._tracer.detach_auto()
        try:
            with scoped.record(), torch.enable_grad():
                yield self
            trace = scoped.trace()
            if self._trace is None:
                self._learn(trace)
            if self.penalty is Penalty.singular:
                self._pending = trace
        finally:
            if self.penalty is Penalty.singular:
                self._tracer.attach_auto()

    def __call__(self, step: int) -> torch.Tensor:
        self._structure()
        features = self._features_of_pass()
        if step % self.every != 0:
            self._last = None
            return self._zero()
        if self.penalty is Penalty.singular:
            assert features is not None
            names, terms = self._singular_terms(features)
        else:
            names, terms = self._parameter_terms()
        self._last = (names, terms.detach())
        return terms.sum()

    def _zero(self) -> torch.Tensor:
        """A zero of the parameters' dtype and device (the value on skipped steps)."""
        p = next(self.model.parameters())
        return p.new_zeros(())

    def _features_of_pass(self) -> dict[str, torch.Tensor] | None:
        if self.penalty is not Penalty.singular:
            return None
        trace = self._pending or self._tracer.take()
        self._pending = None
        if trace is None:
            raise RuntimeError(
                "singular penalty: no forward pass with autograd enabled since the last call; call the "
                "model before reg(step), or wrap the pass in `with reg.capture():`"
            )
        return trace.features

    def _singular_terms(self, features: dict[str, torch.Tensor]) -> tuple[list[str], torch.Tensor]:
        terms = []
        for term in self._terms:
            if term.name not in features:
                raise RuntimeError(f"singular penalty: no features of layer {term.name!r} in the pass")
            terms.append((self.lam * term.weight) * singular_penalty(features[term.name]))
        return [t.name for t in self._terms], torch.stack(terms)

    def _parameter_terms(self) -> tuple[list[str], torch.Tensor]:
        """All units at once: per-tensor norms in one foreach kernel, summed per unit with
        ``index_add``, weighted by the precomputed ``λ δ^k``."""
        params = [p for t in self._terms for p in t.params]
        if self.penalty is Penalty.l2init:
            init = [self._init_like(n, p) for t in self._terms for n, p in zip(t.names, t.params, strict=True)]
            params = list(torch._foreach_sub(params, init))
        per_tensor = _norms(params, 1) if self.penalty is Penalty.l1 else _norms(params)
        weights, owner = self._weights_for(per_tensor)
        if self.variant is Variant.authors:  # unsquared ‖W‖ per weight tensor
            per_unit = per_tensor.new_zeros(len(self._terms)).index_add(0, owner, per_tensor)
            return [t.name for t in self._terms], weights * per_unit
        if self.penalty is not Penalty.l1:
            per_tensor = per_tensor.square()
        per_unit = per_tensor.new_zeros(len(self._terms)).index_add(0, owner, per_tensor)
        return [t.name for t in self._terms], weights * per_unit

    def _weights_for(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._weights is None or self._weights.device != like.device or self._weights.dtype != like.dtype:
            self._weights = torch.tensor(
                [self.lam * t.weight for t in self._terms], dtype=like.dtype, device=like.device
            )
            self._owner = torch.tensor(
                [i for i, t in enumerate(self._terms) for _ in t.params], dtype=torch.long, device=like.device
            )
        return self._weights, self._owner

    def _init_like(self, name: str, p: torch.Tensor) -> torch.Tensor:
        init = self.init[name]
        if init.device != p.device or init.dtype != p.dtype:
            init = self.init[name] = init.to(device=p.device, dtype=p.dtype)
        return init

    @property
    def last_terms(self) -> dict[str, torch.Tensor]:
        """Detached weighted terms ``λ δ^k R`` of the last call, by penalized unit; empty after a
        skipped step."""
        if self._last is None:
            return {}
        names, values = self._last
        return dict(zip(names, values.unbind(), strict=True))

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """θ_0 (by parameter name) and the settings; loadable with ``torch.load(weights_only=True)``."""
        return {
            "penalty": self.penalty.value,
            "variant": self.variant.value,
            "lam": self.lam,
            "delta": self.delta,
            "every": self.every,
            "init": dict(self.init),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore θ_0 (e.g. on resume, so the run regularizes toward the same θ_0)."""
        init = state["init"]
        if set(init) != set(self.init):
            raise ValueError(f"θ_0 parameters {sorted(init)} do not match the model's {sorted(self.init)}")
        for name, tensor in init.items():
            mine = self.init[name]
            if tensor.shape != mine.shape:
                raise ValueError(f"θ_0 shape of {name!r} is {tuple(tensor.shape)}, the model's {tuple(mine.shape)}")
            self.init[name] = tensor.to(device=mine.device, dtype=mine.dtype)

    def close(self) -> None:
        """Remove the regularizer's hooks from the model."""
        self._tracer.detach_auto()
