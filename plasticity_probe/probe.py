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

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

from plasticity_probe import metrics as M
from plasticity_probe.hessian import hessian_spectrum
from plasticity_probe.layers import DataFlowTracer, LayerInfo, ParamGroup, Trace, call_model
from plasticity_probe.report import GroupRecord, LayerRecord, Report

__all__ = ["DEFAULT_METRICS", "FEATURE_METRICS", "WEIGHT_METRICS", "Probe"]

WEIGHT_METRICS = ("weight_magnitude", "mean_abs_weight", "weight_stable_rank")
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
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str] | None = None,
        metrics: Sequence[str] | None = None,
        probe_batch: Any = None,
        dormant_tau: float = 0.025,
        srank_delta: float = 0.01,
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
        self._tracer = DataFlowTracer(_uncompiled(model), layers)
        self._trace: Trace | None = None

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
        hessian: bool = False,
        per_layer_hessian: bool = False,
        hessian_kwargs: dict[str, Any] | None = None,
    ) -> Report:
        """Run one ``torch.no_grad()`` forward pass on ``batch`` (default: the fixed probe batch)
        inside :meth:`capture` and return :meth:`report`."""
        batch = self.probe_batch if batch is None else batch
        if batch is None:
            raise ValueError("Probe.measure: no batch given and no probe_batch set")
        with self.capture(), torch.no_grad():
            call_model(_uncompiled(self.model), batch)
        return self.report(
            loss_fn=loss_fn, hessian=hessian, per_layer_hessian=per_layer_hessian, hessian_kwargs=hessian_kwargs
        )

    def report(
        self,
        *,
        loss_fn: Callable[[], torch.Tensor] | None = None,
        hessian: bool = False,
        per_layer_hessian: bool = False,
        hessian_kwargs: dict[str, Any] | None = None,
    ) -> Report:
        """Per-layer metrics of the last capture, whole-network aggregates and, when ``loss_fn``
        is given with ``hessian=True``, the curvature of that loss w.r.t. all parameters (and per
        layer with ``per_layer_hessian=True``)."""
        trace = self._trace
        if trace is None:
            raise RuntimeError("Probe.report: nothing captured; call the model inside probe.capture()")
        records: list[LayerRecord] = []
        notes: list[str] = list(trace.notes)
        kw = hessian_kwargs or {}
        named = dict(self._tracer.model.named_parameters())
        for info in trace.layers:
            params = [named[p] for p in info.params]
            feats = trace.features.get(info.name)
            values = self._weight_metrics(info.module, params)
            if feats is not None:
                values.update(self._feature_metrics(feats))
            if loss_fn is not None and per_layer_hessian:
                spec = hessian_spectrum(loss_fn, params, **kw)
                values.update(spec.as_metrics())
                if spec.condition_number is None:
                    notes.append(f"{info.name}: {spec.condition_note}")
            n_units = feats.shape[1] if feats is not None and feats.ndim >= 2 else None
            records.append(
                LayerRecord(
                    info.name, info.index, info.kind, sum(p.numel() for p in params), n_units, values, list(info.params)
                )
            )
        groups = [self._group_record(g, named) for g in trace.groups]
        network = self._network_metrics(trace)
        if loss_fn is not None and (hessian or per_layer_hessian):
            spec = hessian_spectrum(loss_fn, self.model, **kw)
            network.update(spec.as_metrics())
            if spec.condition_number is None:
                notes.append(f"network: {spec.condition_note}")
        return Report(records, network, trace.skipped, notes, groups)

    def _group_record(self, group: ParamGroup, named: dict[str, nn.Parameter]) -> GroupRecord:
        params = [named[p] for p in group.params]
        return GroupRecord(
            group.name, group.index, sum(p.numel() for p in params), list(group.params), group.reason,
            {"weight_magnitude": M.weight_magnitude(params)},
        )  # fmt: skip

    def _weight_metrics(self, module: nn.Module, params: Sequence[torch.Tensor]) -> dict[str, float]:
        values: dict[str, float] = {}
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

    def _network_metrics(self, trace: Trace) -> dict[str, float]:
        """Weight magnitude over all parameters; dead, dormant and zero fractions pooled over the
        units of the hidden layers: those whose features another layer reads (output layers,
        whose features nothing reads, such as both heads of a dueling network, are left out)."""
        network: dict[str, float] = {}
        if "weight_magnitude" in self.metrics:
            network["weight_magnitude"] = M.weight_magnitude(self.model)
        if "mean_abs_weight" in self.metrics:
            network["mean_abs_weight"] = M.mean_abs_weight(self.model)
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
