"""``Probe``: capture each layer's features with hooks and report plasticity metrics.

::

    probe = Probe(model, probe_batch=fixed_obs)     # any nn.Module
    report = probe.measure()                        # one no-grad forward pass on the fixed batch
    # or, on your own forward pass:
    with probe.capture():
        model(obs)
    report = probe.report()

Hooks and the data-flow mode exist only inside ``capture()`` and are removed on exit, also on
error; everything called inside the block is one pass (see :mod:`plasticity_probe.layers` for
how layers, features and units are found). Captured tensors are detached copies; capturing
changes no output, gradient, train/eval mode, BatchNorm statistic or RNG state.
A ``torch.compile``d model is captured by running it eagerly inside the block.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge

from plasticity_probe import gradients as G
from plasticity_probe import metrics as M
from plasticity_probe.hessian import frozen_closure_state, hessian_spectrum
from plasticity_probe.layers import Args, DataFlowTracer, LayerInfo, ParamGroup, Trace, call_model, stack_calls
from plasticity_probe.report import GroupRecord, LayerRecord, Report
from plasticity_probe.trainability import trainability as fit_random_targets

__all__ = ["DEFAULT_METRICS", "FEATURE_METRICS", "GRADIENT_METRICS", "WEIGHT_METRICS", "Probe"]

WEIGHT_METRICS = ("weight_magnitude", "mean_abs_weight", "weight_stable_rank", "distance_from_init")
GRADIENT_METRICS = ("grad_norm", "grad_to_weight_ratio", "grad_dormant_fraction")
FEATURE_METRICS = (
    "effective_rank",
    "srank",
    "feature_rank",
    "dead_fraction",
    "dormant_fraction",
    "zero_fraction",
    "feature_norm",
)
DEFAULT_METRICS = (
    "weight_magnitude",
    "distance_from_init",
    "mean_abs_weight",
    "effective_rank",
    "srank",
    "dead_fraction",
    "dormant_fraction",
    "zero_fraction",
    "feature_norm",
)


def _weight_matrix(module: nn.Module) -> torch.Tensor | None:
    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor) and w.ndim >= 2:
        return w.detach().reshape(w.shape[0], -1)
    return None


@dataclass
class _Gradients:
    """∂L/∂θ by parameter name (``None``: the loss does not reach it) and ∂L/∂(layer output) by
    layer, one tensor per call."""

    params: Mapping[str, torch.Tensor | None]
    outputs: dict[str, list[torch.Tensor]]

    def unit_grads(self, name: str, kind: str) -> torch.Tensor | None:
        """The layer's output gradients, calls stacked: ``(N, C, …)`` for conv, ``(samples, d)`` else."""
        calls = self.outputs.get(name)
        return stack_calls(calls, conv=kind == "conv")[0] if calls else None

    def layer_metrics(self, info: LayerInfo, params: Sequence[torch.Tensor], tau: float) -> dict[str, float]:
        grads = [self.params.get(n) for n in info.params]
        values = {
            "grad_norm": G.grad_norm(grads),
            "grad_to_weight_ratio": G.grad_to_weight_ratio(grads, params),
        }
        unit = self.unit_grads(info.name, info.kind)
        if unit is not None:
            unit_dim = 1 if info.kind == "conv" else -1
            values["grad_dormant_fraction"] = G.grad_dormant_fraction(unit, tau, unit_dim=unit_dim)
        return values

    def network_metrics(self, named: dict[str, nn.Parameter], trace: Trace, tau: float) -> dict[str, float]:
        grads = [self.params.get(n) for n in named]
        values = {
            "grad_norm": G.grad_norm(grads),
            "grad_to_weight_ratio": G.grad_to_weight_ratio(grads, list(named.values())),
        }
        kinds = {info.name: info.kind for info in trace.layers}
        hidden = [
            (u, kinds[n]) for n in self.outputs
            if trace.consumers.get(n) and (u := self.unit_grads(n, kinds[n])) is not None
        ]  # fmt: skip
        if hidden:
            widths = [u.shape[1] for u, _ in hidden]
            fractions = [G.grad_dormant_fraction(u, tau, unit_dim=1 if k == "conv" else -1) for u, k in hidden]
            values["grad_dormant_fraction"] = sum(f * w for f, w in zip(fractions, widths, strict=True)) / sum(widths)
        return values


def _uncompiled(model: nn.Module) -> nn.Module:
    """The eager module behind a ``torch.compile``d one (its hooks and names are the model's)."""
    orig = getattr(model, "_orig_mod", None)
    return orig if isinstance(orig, nn.Module) else model


class Probe:
    """Layer-wise plasticity diagnostics for any ``nn.Module``.

    Args:
        model: the network to probe.
        layers: module paths of the layers to probe (default: every module owning a parameter
            with ≥ 2 dimensions), numbered in forward order.
        metrics: which per-layer metrics to compute (default :data:`DEFAULT_METRICS`; any of
            :data:`WEIGHT_METRICS` and :data:`FEATURE_METRICS`).
        probe_batch: a fixed input batch for :meth:`measure`, reused across training so that data
            drift is not mistaken for network change (a tensor, a dict or tuple observation, or
            :class:`~plasticity_probe.layers.Args` for several arguments).
        dormant_tau: τ of :func:`~plasticity_probe.metrics.dormant_fraction`.
        srank_delta: δ of :func:`~plasticity_probe.metrics.srank`.
        grad_tau: τ of :func:`~plasticity_probe.gradients.grad_dormant_fraction` (GraMa).
        init_state: θ_0 for ``distance_from_init`` as a ``named_parameters``/``state_dict``
            mapping (default: the parameters when the ``Probe`` is built).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str] | None = None,
        metrics: Sequence[str] | None = None,
        probe_batch: Any = None,
        dormant_tau: float = 0.025,
        srank_delta: float = 0.01,
        grad_tau: float = 0.01,
        init_state: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        chosen = tuple(metrics) if metrics is not None else DEFAULT_METRICS
        unknown = [m for m in chosen if m not in WEIGHT_METRICS + FEATURE_METRICS]
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; known: {list(WEIGHT_METRICS + FEATURE_METRICS)}")
        self.model = model
        self.metrics = chosen
        self.probe_batch = probe_batch
        self.dormant_tau = dormant_tau
        self.srank_delta = srank_delta
        self.grad_tau = grad_tau
        self._layer_names = layers
        self._tracer = DataFlowTracer(_uncompiled(model), layers)
        self._trace: Trace | None = None
        named = dict(self._tracer.model.named_parameters())
        source = init_state if init_state is not None else named
        missing = [n for n in named if n not in source]
        if missing:
            raise ValueError(f"Probe: init_state lacks parameter(s) {missing[:5]}")
        self.init: dict[str, torch.Tensor] = {n: source[n].detach().clone() for n in named}

    @contextmanager
    def capture(self) -> Iterator[Probe]:
        """Record the features of everything the model computes inside the block (one pass)."""
        compiled = self.model is not _uncompiled(self.model)
        with torch.compiler.set_stance("force_eager") if compiled else nullcontext(), self._tracer.record():
            yield self
        self._trace = self._tracer.trace()
        if not self._trace.layers:
            raise RuntimeError(
                "Probe.capture: no layer of the model was called inside the block; call the model "
                "(any method) inside `with probe.capture():`"
            )

    @property
    def layers(self) -> list[LayerInfo]:
        """Layers seen in the last capture, in forward order."""
        return self._trace.layers if self._trace is not None else []

    @property
    def features(self) -> dict[str, torch.Tensor]:
        """Captured features of each layer (detached copies), keyed by layer name."""
        return self._trace.features if self._trace is not None else {}

    @property
    def groups(self) -> list[ParamGroup]:
        """Parameters of the last capture that belong to no layer (see ``layers``)."""
        return self._trace.groups if self._trace is not None else []

    def measure(
        self,
        batch: Any = None,
        *,
        loss_fn: Callable[[], torch.Tensor] | None = None,
        gradients: bool = False,
        hessian: bool = False,
        per_layer_hessian: bool = False,
        hessian_kwargs: dict[str, Any] | None = None,
        trainability: bool = False,
        trainability_kwargs: dict[str, Any] | None = None,
    ) -> Report:
        """Run one ``torch.no_grad()`` forward pass on ``batch`` (default: the fixed probe batch)
        inside :meth:`capture` and return :meth:`report`. The model is left as found: BatchNorm
        statistics and the RNG are restored after the pass; ``trainability=True`` adds
        :func:`~plasticity_probe.trainability.trainability` on the same batch (network rows
        ``trainability_initial_loss``, ``trainability_final_loss``, ``trainability_ratio``)."""
        batch = self.probe_batch if batch is None else batch
        if batch is None:
            raise ValueError("Probe.measure: no batch given and no probe_batch set")
        with warnings.catch_warnings():  # dropout in train mode is the caller's choice here
            warnings.filterwarnings("ignore", message="the model is in train mode and has dropout")
            with frozen_closure_state(self._tracer.model), self.capture(), torch.no_grad():
                call_model(_uncompiled(self.model), batch)
        report = self.report(
            loss_fn=loss_fn,
            gradients=gradients,
            hessian=hessian,
            per_layer_hessian=per_layer_hessian,
            hessian_kwargs=hessian_kwargs,
        )
        if trainability:
            kwargs: dict[str, Any] = {"forward": call_model if isinstance(batch, Args) else None}
            result = fit_random_targets(_uncompiled(self.model), batch, **{**kwargs, **(trainability_kwargs or {})})
            report.network.update(result.as_metrics())
        return report

    def report(
        self,
        *,
        loss_fn: Callable[[], torch.Tensor] | None = None,
        gradients: bool = False,
        hessian: bool = False,
        per_layer_hessian: bool = False,
        hessian_kwargs: dict[str, Any] | None = None,
    ) -> Report:
        """Per-layer metrics of the last capture and whole-network aggregates. With ``loss_fn``
        (a closure that recomputes a scalar loss through the model): ``gradients=True`` adds
        :data:`GRADIENT_METRICS` (from ``torch.autograd.grad``: ``.grad`` is never touched);
        ``hessian=True`` the curvature of the loss w.r.t. all parameters, ``per_layer_hessian``
        per layer. Every evaluation of the closure sees the same state: BatchNorm statistics and
        the RNG are frozen for the whole report (:func:`~plasticity_probe.hessian.frozen_closure_state`)."""
        trace = self._trace
        if trace is None:
            raise RuntimeError("Probe.report: nothing captured; call the model inside probe.capture()")
        notes: list[str] = list(trace.notes)
        if (gradients or hessian or per_layer_hessian) and loss_fn is None:
            raise ValueError("Probe.report: gradients and Hessians need loss_fn=, a closure returning the loss")
        kw = hessian_kwargs or {}
        eager = self._tracer.model
        named = dict(eager.named_parameters())
        with frozen_closure_state(eager) if loss_fn is not None else nullcontext():
            grads = self._gradients(loss_fn, named) if gradients and loss_fn is not None else None
            records = [self._layer_record(info, trace, named, grads, notes) for info in trace.layers]
            if loss_fn is not None and per_layer_hessian:
                for info, record in zip(trace.layers, records, strict=True):
                    spec = hessian_spectrum(loss_fn, [named[p] for p in info.params], **kw)
                    record.metrics.update(spec.as_metrics())
                    if spec.condition_number is None:
                        notes.append(f"{info.name}: {spec.condition_note}")
            network = self._network_metrics(trace, named, grads)
            if loss_fn is not None and (hessian or per_layer_hessian):
                spec = hessian_spectrum(loss_fn, eager, **kw)
                network.update(spec.as_metrics())
                if spec.condition_number is None:
                    notes.append(f"network: {spec.condition_note}")
        groups = [self._group_record(g, named) for g in trace.groups]
        return Report(records, network, trace.skipped, notes, groups)

    def _layer_record(
        self,
        info: LayerInfo,
        trace: Trace,
        named: dict[str, nn.Parameter],
        grads: _Gradients | None,
        notes: list[str],
    ) -> LayerRecord:
        params = [named[p] for p in info.params]
        feats = trace.features.get(info.name)
        values = self._weight_metrics(info.module, info.params, named)
        if feats is not None:
            values.update(self._feature_metrics(feats))
        if grads is not None:
            values.update(grads.layer_metrics(info, params, self.grad_tau))
        n_units = feats.shape[1] if feats is not None and feats.ndim >= 2 else None
        n_params = sum(p.numel() for p in params)
        return LayerRecord(info.name, info.index, info.kind, n_params, n_units, values, list(info.params))

    def _gradients(self, loss_fn: Callable[[], torch.Tensor], named: dict[str, nn.Parameter]) -> _Gradients:
        """∂L/∂θ for every parameter and ∂L/∂(layer output) for every layer, in one
        ``autograd.grad`` call on a differentiable capture of the closure."""
        tracer = DataFlowTracer(self._tracer.model, self._layer_names, detach=False)
        with tracer.record(), torch.enable_grad():
            loss = loss_fn()
        outputs = tracer.outputs()
        trainable = [n for n, p in named.items() if p.requires_grad]
        taps = [edge for ts in outputs.values() for _, edge in ts]
        if not bool(torch.isfinite(loss.detach()).all()):
            nan = {n: torch.full_like(named[n], math.nan) for n in trainable}
            return _Gradients(nan, {n: [torch.full_like(t, math.nan) for t, _ in ts] for n, ts in outputs.items()})
        params = [get_gradient_edge(named[n]) for n in trainable]  # edges throughout, as autograd.grad takes them
        found = torch.autograd.grad(loss, params + taps, allow_unused=True)
        by_param = dict(zip(trainable, found[: len(trainable)], strict=True))
        by_output: dict[str, list[torch.Tensor]] = {}
        k = len(trainable)
        for n, ts in outputs.items():
            mine = zip(ts, found[k : k + len(ts)], strict=True)
            by_output[n] = [g if g is not None else torch.zeros_like(t) for (t, _), g in mine]
            k += len(ts)
        return _Gradients(by_param, by_output)

    def _group_record(self, group: ParamGroup, named: dict[str, nn.Parameter]) -> GroupRecord:
        params = [named[p] for p in group.params]
        return GroupRecord(
            group.name, group.index, sum(p.numel() for p in params), list(group.params), group.reason,
            {"weight_magnitude": M.weight_magnitude(params)},
        )  # fmt: skip

    def _weight_metrics(
        self, module: nn.Module, names: Sequence[str], named: dict[str, nn.Parameter]
    ) -> dict[str, float]:
        params = [named[n] for n in names]
        values: dict[str, float] = {}
        if "distance_from_init" in self.metrics:
            values["distance_from_init"] = G.distance_from_init(params, [self.init[n] for n in names])
        if "weight_magnitude" in self.metrics:
            values["weight_magnitude"] = M.weight_magnitude(params)
        if "mean_abs_weight" in self.metrics:
            values["mean_abs_weight"] = M.mean_abs_weight(params)
        w = _weight_matrix(module)
        if "weight_stable_rank" in self.metrics and w is not None:
            values["weight_stable_rank"] = M.stable_rank(w)
        return values

    def _feature_metrics(self, feats: torch.Tensor) -> dict[str, float]:
        functions: dict[str, Callable[[torch.Tensor], float]] = {
            "effective_rank": M.effective_rank,
            "srank": lambda f: float(M.srank(f, self.srank_delta)),
            "feature_rank": lambda f: float(M.feature_rank(f)),
            "dead_fraction": M.dead_unit_fraction,
            "dormant_fraction": lambda f: M.dormant_fraction(f, self.dormant_tau),
            "zero_fraction": M.zero_fraction,
            "feature_norm": M.feature_norm,
        }
        return {name: fn(feats) for name, fn in functions.items() if name in self.metrics}

    def _network_metrics(
        self, trace: Trace, named: dict[str, nn.Parameter], grads: _Gradients | None
    ) -> dict[str, float]:
        """Weight magnitude, distance from θ_0 and gradient norms over all parameters; dead,
        dormant, zero and gradient-dormant fractions pooled over the units of the hidden layers:
        those whose features another layer reads (output layers, whose features nothing reads,
        such as both heads of a dueling network, are left out)."""
        network: dict[str, float] = {}
        if "weight_magnitude" in self.metrics:
            network["weight_magnitude"] = M.weight_magnitude(self.model)
        if "mean_abs_weight" in self.metrics:
            network["mean_abs_weight"] = M.mean_abs_weight(self.model)
        if "distance_from_init" in self.metrics:
            network["distance_from_init"] = G.distance_from_init(list(named.values()), [self.init[n] for n in named])
        if grads is not None:
            network.update(grads.network_metrics(named, trace, self.grad_tau))
        hidden = [trace.features[n] for n in trace.features if trace.consumers.get(n)]
        if not hidden:
            return network
        widths = [M.as_unit_matrix(h).shape[1] for h in hidden]
        pooled: dict[str, Callable[[torch.Tensor], float]] = {
            "dead_fraction": M.dead_unit_fraction,
            "dormant_fraction": lambda h: M.dormant_fraction(h, self.dormant_tau),
            "zero_fraction": M.zero_fraction,
        }
        for name, fn in pooled.items():
            if name in self.metrics:  # unit-weighted mean over the hidden layers
                network[name] = sum(fn(h) * w for h, w in zip(hidden, widths, strict=True)) / sum(widths)
        return network

    def close(self) -> None:
        """Drop the captured features (hooks never outlive ``capture()``)."""
        self._trace = None

    def __enter__(self) -> Probe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
