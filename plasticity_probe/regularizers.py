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
learned from the first forward pass the regularizer sees (or from ``example_input``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from enum import Enum
from typing import Any

import torch
from torch import nn

from plasticity_probe.layers import FeatureHooks, LayerInfo, call_model, layer_candidates

__all__ = [
    "Penalty",
    "SuccessiveRegularizer",
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


class SuccessiveRegularizer:
    """A drop-in loss term ``λ Σ_l δ^l R(θ^[l])`` added when ``step % every == 0``.

    Usage::

        reg = SuccessiveRegularizer(model, penalty="l2init", lam=0.01, delta=1.25)  # before training
        loss = td_loss + reg(step)       # after the forward pass that produced td_loss

    Args:
        model: any module; its layers are found by forward hooks (see ``plasticity_probe.layers``).
        penalty: ``l2``, ``l2init``, ``l1`` or ``singular``.
        lam: λ, the overall strength.
        delta: δ, the per-layer growth factor: layer l is weighted ``δ^l``.
        every: add the penalty only when ``step % every == 0`` (1 = every update).
        layers: module paths of the layers to penalize (default: all layers). Indices l stay
            those of the full forward order, so penalizing only the penultimate layer of a
            3-layer MLP weights it by δ².
        squared: ``False`` uses unsquared norms for ``l2``/``l2init`` (the authors' code).
        per_tensor_index: weight each parameter *tensor* by δ^k, k = 0, 1, … over weight and bias
            tensors in forward order (the authors' code: layer l's weight gets δ^(2l−2)).
        example_input: a batch to learn the forward order at construction; otherwise it is
            learned from the first forward pass of ``model``.

    ``l2init`` snapshots θ_0 at construction: build the regularizer before the first update.
    θ_0 is kept on the parameters' device and dtype and saved by ``state_dict()``.
    After each call, ``last_terms`` maps layer name to its detached weighted term
    ``λ δ^l R(θ^[l])`` (empty on skipped steps). Parameter penalties are computed for all
    layers at once (fused per-tensor norms); the singular penalty layer by layer.
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
        squared: bool = True,
        per_tensor_index: bool = False,
        example_input: Any = None,
    ) -> None:
        try:
            self.penalty = Penalty(penalty)
        except ValueError:
            raise ValueError(f"unknown penalty {penalty!r}; choose one of {[p.value for p in Penalty]}") from None
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        if not (0 <= lam < float("inf") and 0 < delta < float("inf")):  # NaN fails every comparison
            raise ValueError(f"need finite lam >= 0 and delta > 0, got lam={lam}, delta={delta}")
        if per_tensor_index and self.penalty is Penalty.singular:
            raise ValueError("per_tensor_index applies to parameter penalties, not 'singular'")
        self.model = model
        self.lam, self.delta, self.every = float(lam), float(delta), int(every)
        self.squared, self.per_tensor_index = squared, per_tensor_index
        self.selected = list(layers) if layers is not None else None
        candidates, _ = layer_candidates(model)
        self._hooks = FeatureHooks(model, candidates, detach=False, active=torch.is_grad_enabled).attach()
        self._layers: list[LayerInfo] | None = None
        self.init: dict[str, list[torch.Tensor]] = {
            name: [p.detach().clone() for p in m.parameters(recurse=False)] for name, m in candidates.items()
        }
        self._last: tuple[list[str], torch.Tensor] | None = None
        self._params: list[torch.Tensor] = []
        self._weights: tuple[torch.Tensor, torch.Tensor, list[str]] | None = None
        if example_input is not None:
            with torch.enable_grad():
                call_model(model, example_input)
            self._learn_order()

    @property
    def layers(self) -> list[LayerInfo]:
        """The penalized layers with their forward indices (after the first forward pass)."""
        if self._layers is None:
            self._learn_order()
        assert self._layers is not None
        return self._layers

    def _learn_order(self) -> None:
        order = self._hooks.layers()
        if not order:
            raise RuntimeError(
                "SuccessiveRegularizer: no forward pass seen yet; call the model (with autograd "
                "enabled) before reg(step), or pass example_input="
            )
        if self.selected is not None:
            known = {info.name for info in order}
            unknown = [n for n in self.selected if n not in known]
            if unknown:
                raise ValueError(f"layers {unknown} are not layers of the model; layers: {sorted(known)}")
            order = [info for info in order if info.name in self.selected]
        self._layers = order
        self._params = [p for info in order for p in info.module.parameters(recurse=False)]
        if self.penalty is not Penalty.singular:
            self._hooks.remove()  # the order is all parameter penalties need: no hot-path hooks

    def weights(self) -> dict[str, float]:
        """δ^l per penalized layer (the first tensor's weight under ``per_tensor_index``)."""
        return {info.name: self.delta**info.index for info in self.layers}

    def __call__(self, step: int) -> torch.Tensor:
        layers = self.layers
        if step % self.every != 0:
            self._last = None
            return self._params[0].new_zeros(())
        if self.penalty is Penalty.singular or not (self.squared or self.per_tensor_index):
            names, terms = self._layer_terms(layers)
        else:
            names, terms = self._fused_terms()
        self._last = (names, terms.detach())
        return terms.sum()

    @property
    def last_terms(self) -> dict[str, torch.Tensor]:
        """Detached weighted terms ``λ δ^l R(θ^[l])`` of the last call, by layer (or by tensor
        under ``per_tensor_index``); empty after a skipped step."""
        if self._last is None:
            return {}
        names, values = self._last
        return dict(zip(names, values.unbind(), strict=True))

    def _layer_terms(self, layers: list[LayerInfo]) -> tuple[list[str], torch.Tensor]:
        """One term per layer, computed layer by layer (singular, unsquared norms)."""
        features = self._hooks.features() if self.penalty is Penalty.singular else {}
        terms = []
        for info in layers:
            params = list(info.module.parameters(recurse=False))
            if self.penalty is Penalty.l2:
                r = l2_penalty(params, self.squared)
            elif self.penalty is Penalty.l2init:
                r = l2init_penalty(params, self._init_on(info.name, params), self.squared)
            elif self.penalty is Penalty.l1:
                r = l1_penalty(params)
            else:
                if info.name not in features:
                    raise RuntimeError(
                        f"singular penalty: no features of layer {info.name!r} captured; "
                        "call the model with autograd enabled before reg(step)"
                    )
                r = singular_penalty(features[info.name])
            terms.append((self.lam * self.delta**info.index) * r)
        return [info.name for info in layers], torch.stack(terms)

    def _fused_terms(self) -> tuple[list[str], torch.Tensor]:
        """Parameter penalties of all layers at once: per-tensor norms in one foreach kernel,
        summed per layer with ``index_add``, weighted by the precomputed ``λ δ^l``."""
        params: Sequence[torch.Tensor] = self._params
        if self.penalty is Penalty.l2init:
            init = [t for info in self.layers for t in self._init_on(info.name, info.module.parameters(recurse=False))]
            params = torch._foreach_sub(self._params, init)
        per_tensor = _norms(params, 1) if self.penalty is Penalty.l1 else _norms(params)
        if self.penalty is not Penalty.l1 and self.squared:
            per_tensor = per_tensor.square()
        weights, owner, names = self._weights_for(per_tensor)
        if self.per_tensor_index:
            return names, weights * per_tensor
        per_layer = per_tensor.new_zeros(len(self.layers)).index_add(0, owner, per_tensor)
        return names, weights * per_layer

    def _weights_for(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        if self._weights is None or self._weights[0].device != like.device or self._weights[0].dtype != like.dtype:
            layer_of, tensor_names = [], []
            for i, info in enumerate(self.layers):
                for pname, _ in info.module.named_parameters(recurse=False):
                    layer_of.append(i)
                    tensor_names.append(f"{info.name}.{pname}")
            if self.per_tensor_index:
                powers, names = list(range(len(layer_of))), tensor_names
            else:
                powers, names = [info.index for info in self.layers], [info.name for info in self.layers]
            weights = torch.tensor([self.lam * self.delta**k for k in powers], dtype=like.dtype, device=like.device)
            owner = torch.tensor(layer_of, dtype=torch.long, device=like.device)
            self._weights = (weights, owner, names)
        return self._weights

    def _init_on(self, name: str, params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
        params = list(params)
        init = self.init[name]
        if init and (init[0].device != params[0].device or init[0].dtype != params[0].dtype):
            init = [p0.to(device=p.device, dtype=p.dtype) for p0, p in zip(init, params, strict=True)]
            self.init[name] = init
        return init

    def state_dict(self) -> dict[str, Any]:
        """θ_0 and the settings; loadable with ``torch.load(weights_only=True)``."""
        return {
            "penalty": self.penalty.value,
            "lam": self.lam,
            "delta": self.delta,
            "every": self.every,
            "init": {name: list(tensors) for name, tensors in self.init.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore θ_0 (e.g. on resume, so the run regularizes toward the same θ_0)."""
        init = state["init"]
        if set(init) != set(self.init):
            raise ValueError(f"θ_0 layers {sorted(init)} do not match the model's {sorted(self.init)}")
        for name, tensors in init.items():
            mine = self.init[name]
            if [t.shape for t in tensors] != [t.shape for t in mine]:
                raise ValueError(f"θ_0 shapes of layer {name!r} do not match the model")
            self.init[name] = [t.to(device=m.device, dtype=m.dtype) for t, m in zip(tensors, mine, strict=True)]

    def close(self) -> None:
        """Remove the regularizer's hooks from the model."""
        self._hooks.remove()
