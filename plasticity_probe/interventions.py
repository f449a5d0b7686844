"""Interventions against plasticity loss on any ``nn.Module``, with the optimizer state:
ReDo (Sokar et al. 2023), Shrink & Perturb (Ash & Adams 2020) and layer resets (Nikishin et
al. 2022).

::

    redo = pp.ReDo(model, optimizer, tau=0.025)
    record = redo.reset(batch)                  # dormant units re-initialized, see ResetRecord
    pp.shrink_perturb(model, shrink=0.8, perturb=0.01, optimizer=optimizer)
    pp.reset_layers(model, ["head"], optimizer)
    maybe = pp.InterventionSchedule(redo, every=1000)
    maybe(step, batch)                          # inside any training loop

ReDo finds each layer's features and the layers that read them by following the data flow
(:class:`~plasticity_probe.layers.DataFlowTracer`): no layer pairing by hand, by order or by
shape. Fresh values always come from the layer's own initializer (``reset_parameters()`` on a
copy, drawn on the CPU from a private seed inside ``torch.random.fork_rng``): the global RNG is
never touched, and the same seed gives the same reset on any machine. See docs/interventions.md.
"""

from __future__ import annotations

import copy
import itertools
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.nn.utils import parametrize

from plasticity_probe.layers import DataFlowTracer, LayerInfo, SkippedModule, Trace, call_model, display_name
from plasticity_probe.metrics import NonFiniteWarning

__all__ = [
    "Intervention",
    "InterventionSchedule",
    "LayerReset",
    "ReDo",
    "ResetRecord",
    "reset_layers",
    "shrink_perturb",
    "unit_scores",
]

_UNIT_MIXING_OPS = frozenset({"layer_norm", "group_norm", "rms_norm", "normalize", "local_response_norm"})
"""Chain ops (``LayerInfo.chain``) that normalize over the units of a sample, with or without
parameters (``F.layer_norm``, a LayerNorm without affine)."""
_UNIT_MIXING_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.RMSNorm)
"""Normalizations whose statistics run over the units of one sample: re-initializing one unit
changes every unit's features, so ReDo skips a layer with one of them in its feature chain."""
_STATE_ZERO_KEYS = frozenset(
    {"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "exp_inf", "momentum_buffer", "square_avg", "grad_avg", "mu_product"}
)
"""Per-entry optimizer state whose fresh value is 0 (Adam/AdamW/NAdam/RAdam/Adamax moments,
SGD and RMSprop buffers). Adagrad's ``sum`` restarts at ``initial_accumulator_value``."""
_default_calls = itertools.count()


# --------------------------------------------------------------------------- records
@dataclass(frozen=True)
class LayerReset:
    """What an intervention did to one layer: how many of its ``units`` were reset (their
    indices), and the layers whose outgoing weights were zeroed (ReDo)."""

    layer: str
    index: int
    units: int
    reset: int
    indices: tuple[int, ...] = ()
    consumers: tuple[str, ...] = ()


@dataclass
class ResetRecord:
    """The record of one intervention: the layers it acted on and those it skipped (with the
    reason). ``kind`` is ``redo``, ``shrink_perturb`` or ``reset_layers``."""

    kind: str
    layers: list[LayerReset] = field(default_factory=list)
    skipped: list[SkippedModule] = field(default_factory=list)
    params: tuple[str, ...] = ()
    """Qualified names of the parameters that changed (entries or whole tensors)."""
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def units_reset(self) -> int:
        return sum(layer.reset for layer in self.layers)

    @property
    def units(self) -> int:
        return sum(layer.units for layer in self.layers)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: kind, settings, totals, per-layer counts (no indices) and skipped layers."""
        return {
            "kind": self.kind,
            "settings": dict(self.settings),
            "units": self.units,
            "units_reset": self.units_reset,
            "layers": {
                r.layer: {"index": r.index, "units": r.units, "reset": r.reset, "consumers": list(r.consumers)}
                for r in self.layers
            },
            "skipped": {s.name: s.reason for s in self.skipped},
        }


class Intervention(Protocol):
    """Anything :class:`InterventionSchedule` can call: ``intervention(batch) -> ResetRecord``."""

    def __call__(self, batch: Any) -> ResetRecord: ...


# --------------------------------------------------------------------------- randomness
def _seed_from(generator: torch.Generator | None) -> int:
    """A seed for one intervention: drawn from ``generator`` (which advances), or, without one,
    from ``torch.initial_seed()`` and a per-process call counter (deterministic for a seeded
    program, different on every call; the global RNG is only read, never advanced)."""
    if generator is not None:
        return int(torch.randint(0, 2**62, (1,), generator=generator))
    return (torch.initial_seed() * 1_000_003 + next(_default_calls)) % 2**62


def _cuda_devices(model: nn.Module) -> list[int]:
    return sorted({t.device.index or 0 for t in itertools.chain(model.parameters(), model.buffers()) if t.is_cuda})


@contextmanager
def _private_rng(seed: int | None, model: nn.Module) -> Iterator[None]:
    """Run the block with the global RNGs (CPU and the model's CUDA devices) saved and restored;
    with ``seed``, the CPU generator is seeded with it inside."""
    with torch.random.fork_rng(devices=_cuda_devices(model)):
        if seed is not None:
            torch.manual_seed(seed)
        yield


def _initializer(module: nn.Module) -> Callable[[], None] | None:
    fn = getattr(module, "reset_parameters", None) or getattr(module, "_reset_parameters", None)
    return fn if callable(fn) else None


def _fresh_copy(module: nn.Module) -> nn.Module:
    """A CPU copy of ``module`` re-initialized by its own ``reset_parameters()`` (and those of
    its submodules); call it inside :func:`_private_rng`."""
    fresh = copy.deepcopy(module).to("cpu")
    for sub in fresh.modules():
        init = _initializer(sub)
        if init is not None:
            init()
    return fresh


def _owned(module: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Qualified name (relative to ``module``) -> (owning submodule, attribute) of every
    parameter and buffer, for copying fresh values across."""
    out: dict[str, tuple[nn.Module, str]] = {}
    for path, sub in module.named_modules():
        for attr, _ in itertools.chain(sub.named_parameters(recurse=False), sub.named_buffers(recurse=False)):
            out[f"{path}.{attr}" if path else attr] = (sub, attr)
    return out


# --------------------------------------------------------------------------- optimizer state
def _reset_state_entries(optimizer: torch.optim.Optimizer | None, param: torch.Tensor, mask: torch.Tensor) -> None:
    """Give the optimizer's per-entry state of ``param`` at ``mask`` its fresh value (0 for the
    moments and buffers; Adagrad's ``initial_accumulator_value``). Per-tensor state (Adam's
    ``step``) is kept: it cannot be reset per entry (see docs/interventions.md)."""
    if optimizer is None:
        return
    state = optimizer.state.get(param)
    if not state:
        return
    group = next((g for g in optimizer.param_groups if any(p is param for p in g["params"])), None)
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or value.shape != param.shape:
            continue
        if key in _STATE_ZERO_KEYS:
            value[mask] = 0
        elif key == "sum" and group is not None and "initial_accumulator_value" in group:
            value[mask] = group["initial_accumulator_value"]
        else:
            raise ValueError(
                f"{type(optimizer).__name__} state {key!r}: its fresh per-entry value is unknown; "
                "reset the whole parameter's state instead (reset_layers)"
            )


def _drop_state(optimizer: torch.optim.Optimizer | None, params: Iterable[torch.Tensor]) -> None:
    """Delete the optimizer state of whole parameters: it is re-created at the next step exactly
    as for a new parameter (Adam: zero moments and ``step`` 0, hence full bias correction)."""
    if optimizer is None:
        return
    for p in params:
        optimizer.state.pop(p, None)


# --------------------------------------------------------------------------- scores
def unit_scores(features: torch.Tensor) -> torch.Tensor:
    """Per-unit normalized score of ReDo (Sokar et al. 2023, "The dormant neuron phenomenon in
    deep reinforcement learning", ICML), in float64:

    ``s_i = E|h_i| / ((1/d) Σ_k E|h_k|)``, the expectation over the samples (and positions, for
    conv channels); a unit is τ-dormant when ``s_i ≤ τ``. Units are channels (dim 1) of
    ≥ 3-D features, the last dimension otherwise. If every unit is exactly 0 the scores are
    undefined and returned as 0 (all dormant), as :func:`~plasticity_probe.metrics.dormant_fraction`
    counts them. Features holding NaN or Inf give NaN scores (no unit is dormant).
    """
    return _normalize(_unit_abs_mean(features))


def _unit_abs_mean(x: torch.Tensor, conv: bool | None = None) -> torch.Tensor:
    x = x.detach().to(torch.float64)
    if conv is None:
        conv = x.ndim >= 3
    if conv and x.ndim >= 3:
        return x.abs().transpose(0, 1).reshape(x.shape[1], -1).mean(dim=1)
    return x.abs().reshape(-1, x.shape[-1]).mean(dim=0)


def _normalize(per_unit: torch.Tensor) -> torch.Tensor:
    mean = float(per_unit.mean())
    if not math.isfinite(mean):  # NaN or Inf features: no unit is dormant or not
        return torch.full_like(per_unit, math.nan)
    if mean == 0.0:
        return torch.zeros_like(per_unit)
    return per_unit / mean


@contextmanager
def _layer_outputs(layers: dict[str, nn.Module]) -> Iterator[dict[str, list[tuple[GradientEdge, bool]]]]:
    """Inside the block, the autograd edge of each call's output of each layer (taken when the
    layer returns, before any in-place activation changes it), and whether it is a conv output."""
    outputs: dict[str, list[tuple[GradientEdge, bool]]] = {}
    handles = []

    def hook(name: str, conv: bool) -> Callable[..., None]:
        def record(_m: nn.Module, _args: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor) and out.requires_grad:
                outputs.setdefault(name, []).append((get_gradient_edge(out), conv and out.ndim >= 3))

        return record

    for name, module in layers.items():
        conv = isinstance(module, nn.modules.conv._ConvNd)
        handles.append(module.register_forward_hook(hook(name, conv)))
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


def _gradient_scores(
    outputs: dict[str, list[tuple[GradientEdge, bool]]], loss: torch.Tensor
) -> dict[str, torch.Tensor]:
    """GraMa-style per-unit scores: ``E|∂L/∂z_i|`` normalized by its mean over the layer's units
    (as :func:`unit_scores`), z the layer's own output (pre-activation), the expectation over
    samples (and positions) of all calls."""
    flat = [(name, edge, conv) for name, calls in outputs.items() for edge, conv in calls]
    if not flat:
        return {}
    grads = torch.autograd.grad(loss, [edge for _, edge, _ in flat], allow_unused=True)
    sums: dict[str, tuple[torch.Tensor, int]] = {}
    for (name, _, conv), g in zip(flat, grads, strict=True):
        if g is None:
            continue
        g = g.detach().to(torch.float64).abs()
        per_unit = g.transpose(0, 1).reshape(g.shape[1], -1) if conv else g.reshape(-1, g.shape[-1]).T
        total, count = sums.get(name, (torch.zeros(per_unit.shape[0], dtype=torch.float64), 0))
        if total.shape[0] != per_unit.shape[0]:
            continue
        sums[name] = (total + per_unit.sum(dim=1).cpu(), count + per_unit.shape[1])
    return {name: _normalize(total / max(count, 1)) for name, (total, count) in sums.items()}


# --------------------------------------------------------------------------- ReDo
@dataclass
class _Plan:
    """Everything ReDo will change for one layer."""

    info: LayerInfo
    units: int
    dormant: torch.Tensor  # int64 indices
    chain: list[tuple[str, nn.Module]]  # (qualified module path, module) of per-unit chain modules
    outgoing: list[tuple[str, nn.Module, Callable[[torch.Tensor], torch.Tensor]]]  # consumer, module, columns(idx)


class ReDo:
    """Recycle dormant units (ReDo, Sokar et al. 2023, "The Dormant Neuron Phenomenon in Deep
    Reinforcement Learning", ICML) on any architecture.

    For each layer whose features other layers read, unit i is τ-dormant when its score
    ``s_i ≤ τ``:

    * ``score="activation"`` (the paper): ``s_i = E|h_i| / mean_k E|h_k|`` over the batch
      (:func:`unit_scores`), h the layer's features (after its activation/norm chain);
    * ``score="gradient"`` (GraMa, Liu et al. 2025, "Measure gradients, not activations!
      Enhancing neuronal activity in deep reinforcement learning"): the same normalization of
      ``E|∂L/∂z_i|``, L = ``loss_fn(model output)`` and z the layer's own output before its
      activation (the gradient its incoming weights learn from; ``∂L/∂h`` after a ReLU would not
      vanish for a dead unit).

    A dormant unit gets (1) its incoming weights (row i of the weight; output channel i of a
    conv kernel) and its bias entry drawn afresh from the layer's own initializer, and its
    per-unit chain parameters (BatchNorm/PReLU/scaler entries) and BatchNorm running statistics
    restored to their fresh values; (2) its outgoing weights set to 0 in **every** layer that
    reads its features: column i (``direct``), or columns ``i·S … (i+1)·S − 1`` when a conv
    layer's ``(N, C, *spatial)`` features reach a linear layer through a row-major flatten of
    ``S`` positions (checked: ``in_features == C·S``); (3) the optimizer's per-entry state at
    exactly the changed entries reset (Adam: ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq`` set
    to 0). Adam's ``step`` is one count per tensor and is kept (resetting it would re-apply bias
    correction to every other entry of the tensor; dopamine's ReDo keeps its count too). All
    rows are re-initialized before any column is zeroed, so a weight that is both a reset
    unit's incoming and another reset unit's outgoing weight ends at 0 (the reset unit's output
    starts out unseen by the next layer). Everything else stays bit for bit.

    Skipped, with the reason in the record: output layers (no layer reads their features),
    layers whose features reach any consumer through an op that mixes units (residual add,
    concat, permute, pooling, …), layers with a unit-mixing normalization (LayerNorm, GroupNorm,
    RMSNorm) in their chain, and layer types other than ``nn.Linear`` and non-transposed,
    ungrouped convolutions (as producer or consumer).

    Args:
        model: any module.
        optimizer: its optimizer (optional; without it only the parameters change).
        tau: the dormancy threshold τ (the paper: 0.025 by default; 0.1 at high replay ratio).
        score: ``"activation"`` or ``"gradient"``.
        layers: module paths of the layers that may be reset (default: all). Consumers are
            always found among all layers.
        seed: seeds the private generator from which each reset draws its initialization seed
            (default ``torch.initial_seed()``); ``reset(generator=...)`` overrides it per call.

    The scoring pass runs ``model(batch)`` as the model is (train or eval mode) under
    ``torch.no_grad()`` (``score="activation"``), with the global RNG and every buffer
    (BatchNorm statistics) restored afterwards.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        tau: float = 0.025,
        score: str = "activation",
        *,
        layers: Sequence[str] | None = None,
        seed: int | None = None,
    ) -> None:
        if tau < 0:
            raise ValueError(f"ReDo: tau must be >= 0, got {tau}")
        if score not in ("activation", "gradient"):
            raise ValueError(f"ReDo: score must be 'activation' or 'gradient', got {score!r}")
        self.model = model
        self._eager: nn.Module = getattr(model, "_orig_mod", model)  # a torch.compile'd model's module
        self.optimizer = optimizer
        self.tau = tau
        self.score = score
        modules = {display_name(p) for p, _ in self._eager.named_modules()}
        if layers is not None:
            unknown = [n for n in layers if display_name(n) not in modules]
            if unknown:
                raise ValueError(f"ReDo: unknown layer name(s) {unknown}")
        self.layers = None if layers is None else {display_name(n) for n in layers}
        self.generator = torch.Generator().manual_seed(torch.initial_seed() if seed is None else seed)
        self.last_record: ResetRecord | None = None

    def __call__(self, batch: Any) -> ResetRecord:
        return self.reset(batch)

    # ------------------------------------------------------------------ scoring
    def _trace(
        self, batch: Any, loss_fn: Callable[[Any], torch.Tensor] | None
    ) -> tuple[Trace, dict[str, torch.Tensor]]:
        model = self._eager
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        gradient = self.score == "gradient"
        if gradient and loss_fn is None:
            raise ValueError("ReDo(score='gradient').reset needs loss_fn(model_output) -> scalar loss")
        tracer = DataFlowTracer(model)
        scores: dict[str, torch.Tensor] = {}
        try:
            with _private_rng(None, model):
                if gradient:
                    assert loss_fn is not None
                    with torch.enable_grad(), _layer_outputs(tracer.candidates) as outputs:
                        with tracer.record():
                            out = call_model(model, batch)
                        trace = tracer.trace()
                        scores = _gradient_scores(outputs, loss_fn(out))
                else:
                    with torch.no_grad(), tracer.record():
                        call_model(model, batch)
                    trace = tracer.trace()
                    scores = {name: unit_scores_for(trace, name) for name in trace.features}
        finally:
            with torch.no_grad():
                for name, b in model.named_buffers():
                    if name in buffers:
                        b.copy_(buffers[name])
        return trace, scores

    # ------------------------------------------------------------------ planning
    def _plan(self, trace: Trace, scores: dict[str, torch.Tensor]) -> tuple[list[_Plan], list[SkippedModule]]:
        infos = {info.name: info for info in trace.layers}
        modules = dict(self._eager.named_modules())
        plans, skipped = [], []
        for info in trace.layers:
            if self.layers is not None and info.name not in self.layers:
                continue
            reason, plan = self._plan_layer(info, trace, scores.get(info.name), infos, modules)
            if reason is not None:
                skipped.append(SkippedModule(info.name, reason))
            elif plan is not None:
                plans.append(plan)
        return plans, skipped

    def _plan_layer(
        self,
        info: LayerInfo,
        trace: Trace,
        score: torch.Tensor | None,
        infos: dict[str, LayerInfo],
        modules: dict[str, nn.Module],
    ) -> tuple[str | None, _Plan | None]:
        module = info.module
        problem = _unit_layer_problem(module)
        if problem is not None:
            return problem, None
        feats = trace.features.get(info.name)
        if feats is None or score is None:
            return "no features (or no gradient) in the scoring pass", None
        weight = _weight(module)
        units = int(score.shape[0])
        if weight.shape[0] != units:
            return f"{units} feature units but {weight.shape[0]} weight rows", None
        consumers = trace.consumers.get(info.name, [])
        if not consumers:
            return "output layer: no layer reads its features (resetting it would change the output)", None
        if not bool(torch.isfinite(score).all()):
            reason = "NaN or Inf in its features (or gradients) on this batch: scores undefined, not reset"
            warnings.warn(f"ReDo: layer {info.name}: {reason}", NonFiniteWarning, stacklevel=5)  # the caller of reset
            return reason, None
        mixed = [c.layer for c in consumers if c.route == "mixed"]
        if mixed:
            return (
                f"its features reach {', '.join(mixed)} through an op that mixes units (residual add, concat, "
                "permute, pooling, …): which inputs are its units is unknown",
                None,
            )
        mixing = [op for op in info.chain if op in _UNIT_MIXING_OPS]
        if mixing:
            return f"{mixing[0]} in its feature chain normalizes over the units: one reset changes every unit", None
        chain, problem = self._chain_modules(info, units, modules)
        if problem is not None:
            return problem, None
        outgoing = []
        for c in consumers:
            consumer = infos[c.layer].module if c.layer in infos else modules.get(c.layer)
            if consumer is None:
                return f"consumer {c.layer} not found", None
            columns, problem = _outgoing_columns(module, feats, units, c.layer, c.route, consumer)
            if problem is not None:
                return problem, None
            assert columns is not None
            outgoing.append((c.layer, consumer, columns))
        dormant = torch.nonzero(score <= self.tau).flatten().to(device="cpu", dtype=torch.int64)
        return None, _Plan(info, units, dormant, chain, outgoing)

    def _chain_modules(
        self, info: LayerInfo, units: int, modules: dict[str, nn.Module]
    ) -> tuple[list[tuple[str, nn.Module]], str | None]:
        own = {id(p) for p in info.module.parameters(recurse=False)}
        named = dict(self._eager.named_parameters())
        chain: dict[str, nn.Module] = {}
        for pname in info.params:
            p = named.get(pname)
            if p is None or id(p) in own:
                continue
            path = pname.rpartition(".")[0]
            owner = modules.get(path)
            if owner is None:
                return [], f"chain parameter {pname} has no owning module"
            if isinstance(owner, _UNIT_MIXING_NORMS):
                return [], (
                    f"{type(owner).__name__} {display_name(path)} in its feature chain normalizes over the units: "
                    "resetting one unit would change every unit's features"
                )
            if p.numel() == 1:
                continue  # shared by all units (a scalar scale or PReLU slope): left as is
            if p.ndim != 1 or p.shape[0] != units:
                return [], f"chain parameter {pname} of shape {tuple(p.shape)} is not per unit ({units} units)"
            if _initializer(owner) is None:
                return [], f"chain module {display_name(path)} has no reset_parameters() for fresh values"
            chain[path] = owner
        return list(chain.items()), None

    # ------------------------------------------------------------------ reset
    @torch.no_grad()
    def reset(
        self,
        batch: Any,
        loss_fn: Callable[[Any], torch.Tensor] | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> ResetRecord:
        """Score the units on ``batch``, reset the τ-dormant ones (see the class doc) and return
        the record. ``loss_fn(model_output)`` is required with ``score="gradient"``."""
        trace, scores = self._trace(batch, loss_fn)
        plans, skipped = self._plan(trace, scores)
        seed = _seed_from(generator if generator is not None else self.generator)
        params = {id(p): n for n, p in self._eager.named_parameters()}
        changed: dict[str, None] = {}
        masks: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def mark(p: torch.Tensor, index: Any) -> None:
            entry = masks.setdefault(id(p), (p, torch.zeros(p.shape, dtype=torch.bool, device=p.device)))
            entry[1][index] = True
            changed[params.get(id(p), "?")] = None

        todo = [plan for plan in plans if plan.dormant.numel()]
        with _private_rng(seed, self.model):
            fresh = [(_fresh_copy(plan.info.module), [(m, _fresh_copy(m)) for _, m in plan.chain]) for plan in todo]
        for plan, (layer_fresh, chain_fresh) in zip(todo, fresh, strict=True):  # incoming: rows, bias, chain
            idx = plan.dormant.to(_weight(plan.info.module).device)
            for attr in ("weight", "bias"):
                p = getattr(plan.info.module, attr, None)
                if isinstance(p, torch.Tensor):
                    p[idx] = getattr(layer_fresh, attr)[idx.cpu()].to(p.device, p.dtype)
                    if isinstance(p, nn.Parameter):
                        mark(p, idx)
            for module, module_fresh in chain_fresh:  # per-unit affine, PReLU, BatchNorm statistics
                own = itertools.chain(module.named_parameters(recurse=False), module.named_buffers(recurse=False))
                for attr, t in list(own):
                    fresh_t = getattr(module_fresh, attr)
                    if t.ndim != 1 or t.shape[0] != plan.units:
                        continue
                    t[idx] = fresh_t[idx.cpu()].to(t.device, t.dtype)
                    if isinstance(t, nn.Parameter):
                        mark(t, idx)
        for plan in todo:  # outgoing: consumers' columns to 0
            for _, consumer, columns in plan.outgoing:
                w = _weight(consumer)
                cols = columns(plan.dormant).to(w.device)
                w[:, cols] = 0
                mask_index = (slice(None), cols)
                mark(w, mask_index)
        for p, mask in masks.values():
            _reset_state_entries(self.optimizer, p, mask)
        record = ResetRecord(
            "redo",
            [
                LayerReset(
                    plan.info.name,
                    plan.info.index,
                    plan.units,
                    int(plan.dormant.numel()),
                    tuple(int(i) for i in plan.dormant.tolist()),
                    tuple(name for name, _, _ in plan.outgoing),
                )
                for plan in plans
            ],
            skipped,
            tuple(changed),
            {"tau": self.tau, "score": self.score, "seed": seed},
        )
        self.last_record = record
        return record

    def state_dict(self) -> dict[str, Any]:
        """The private generator's state (for exact resumption)."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


def unit_scores_for(trace: Trace, name: str) -> torch.Tensor:
    """:func:`unit_scores` of one traced layer (conv layers: channels are the units)."""
    kind = next((info.kind for info in trace.layers if info.name == name), "other")
    feats = trace.features[name]
    return _normalize(_unit_abs_mean(feats, conv=kind == "conv"))


def _weight(module: nn.Module) -> torch.Tensor:
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return weight


def _unit_layer_problem(module: nn.Module) -> str | None:
    """Why ReDo cannot reset units of ``module`` (``None`` if it can)."""
    if parametrize.is_parametrized(module):
        return "parametrized weight (weight_norm/spectral_norm): rows cannot be re-initialized in place"
    if isinstance(module, nn.Linear):
        return None
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.transposed:
            return "transposed convolution: unit resets are not supported"
        if module.groups != 1:
            return "grouped convolution: unit resets are not supported"
        return None
    return f"{type(module).__name__}: unit resets are supported for nn.Linear and convolutions only"


def _outgoing_columns(
    producer: nn.Module, feats: torch.Tensor, units: int, name: str, route: str, consumer: nn.Module
) -> tuple[Callable[[torch.Tensor], torch.Tensor] | None, str | None]:
    """The consumer's weight columns (dim 1) that read the producer's units ``idx``."""
    problem = _unit_layer_problem(consumer)
    if problem is not None:
        return None, f"consumer {name}: {problem}"
    width = int(_weight(consumer).shape[1])
    conv_producer = isinstance(producer, nn.modules.conv._ConvNd)
    if route == "direct":
        if isinstance(consumer, nn.Linear) and conv_producer and feats.ndim >= 3:
            return None, f"consumer {name} is linear on conv features' last (spatial) dimension"
        if width != units:
            return None, f"consumer {name} reads {width} inputs, not the {units} units"
        return (lambda idx: idx), None
    if route == "reshape":
        if isinstance(consumer, nn.Linear) and conv_producer and feats.ndim >= 3:
            positions = math.prod(feats.shape[2:])
            if width != units * positions:
                return None, (
                    f"consumer {name} reads {width} inputs after a reshape, "
                    f"not {units} channels × {positions} positions"
                )
            return (lambda idx: (idx[:, None] * positions + torch.arange(positions)).flatten()), None
        if isinstance(consumer, nn.Linear) and not conv_producer and width == units:
            return (lambda idx: idx), None
        return None, f"its features reach {name} through a reshape whose unit layout is unknown"
    return None, f"route {route!r} to {name}"


# --------------------------------------------------------------------------- whole-parameter interventions
def _resettable(model: nn.Module, names: Sequence[str] | None) -> tuple[list[tuple[str, nn.Module]], list[str]]:
    """Modules (qualified path, module) under ``names`` (default: all) with an initializer, and
    the parameters under them that no initializer covers."""
    modules = dict(model.named_modules())
    roots = [""] if names is None else [n if n != "(root)" else "" for n in names]
    unknown = [display_name(n) for n in roots if n not in modules]
    if unknown:
        raise ValueError(f"unknown module name(s) {unknown}")
    chosen: dict[str, nn.Module] = {}
    covered: set[int] = set()
    for root in roots:
        for sub_path, sub in modules[root].named_modules():
            path = f"{root}.{sub_path}".strip(".") if sub_path else root
            if _initializer(sub) is not None and not parametrize.is_parametrized(sub):
                chosen[path] = sub
    for sub in chosen.values():
        covered |= {id(p) for p in sub.parameters()}
    uncovered = [
        pname for root in roots for pname, p in modules[root].named_parameters(prefix=root) if id(p) not in covered
    ]
    # a module inside another chosen one is re-initialized with its parent's copy
    top = {p: m for p, m in chosen.items() if not any(p.startswith(q + ".") for q in chosen if q != p)}
    return list(top.items()), uncovered


@torch.no_grad()
def shrink_perturb(
    model: nn.Module,
    shrink: float = 0.8,
    perturb: float = 0.01,
    optimizer: torch.optim.Optimizer | None = None,
    generator: torch.Generator | None = None,
) -> ResetRecord:
    """Shrink & Perturb (Ash & Adams 2020, "On Warm-Starting Neural Network Training",
    NeurIPS): ``θ ← λ·θ + σ·θ_fresh`` for every parameter, ``λ = shrink``, ``σ = perturb``.

    The paper perturbs with Gaussian noise; here the noise is a fresh draw of the parameter's own
    initializer (``reset_parameters()`` on a copy), so it has each layer's scale (biases and
    norm affine included: a LayerNorm weight moves toward ``λ + σ``). ``shrink=1 - α,
    perturb=α`` is the interpolation toward a fresh network used by later RL work. Parameters
    that no module initializer covers (e.g. a bare ``log_std``) are left unchanged and listed in
    ``skipped``; buffers are untouched. With ``optimizer``, the state of every changed parameter
    is dropped (re-created at the next step; Adam's ``step`` restarts). ``generator`` provides
    the seed (default: see ``ReDo``); the global RNG is never touched.
    """
    if shrink < 0 or perturb < 0:
        raise ValueError(f"shrink_perturb: need shrink >= 0 and perturb >= 0, got {shrink}, {perturb}")
    fresh, skipped, seed = _fresh_targets(model, None, generator)
    canonical = {id(p): n for n, p in model.named_parameters()}  # a tied parameter: its first name
    changed: dict[str, nn.Parameter] = {}
    for _, module, module_fresh in fresh:
        fresh_params = dict(module_fresh.named_parameters())
        for rel, p in module.named_parameters():
            if canonical[id(p)] in changed:  # tied: shrunk once, not once per module holding it
                continue
            p.mul_(shrink).add_(fresh_params[rel].to(p.device, p.dtype), alpha=perturb)
            changed[canonical[id(p)]] = p
    _drop_state(optimizer, changed.values())
    return ResetRecord(
        "shrink_perturb",
        [],
        skipped,
        tuple(changed),
        {"shrink": shrink, "perturb": perturb, "seed": seed},
    )


def _fresh_targets(
    model: nn.Module, names: Sequence[str] | None, generator: torch.Generator | None
) -> tuple[list[tuple[str, nn.Module, nn.Module]], list[SkippedModule], int]:
    """The modules to re-draw (all of ``model``'s, or ``names``) with a fresh copy of each drawn
    under the seed taken from ``generator``; the parameters no initializer covers, as skipped."""
    targets, uncovered = _resettable(model, names)
    seed = _seed_from(generator)
    with _private_rng(seed, model):
        fresh = [(path, module, _fresh_copy(module)) for path, module in targets]
    return fresh, [SkippedModule(n, "no module initializer covers it: left unchanged") for n in uncovered], seed


@torch.no_grad()
def reset_layers(
    model: nn.Module,
    names: Sequence[str],
    optimizer: torch.optim.Optimizer | None = None,
    generator: torch.Generator | None = None,
) -> ResetRecord:
    """Re-initialize whole modules (Nikishin et al. 2022, "The Primacy Bias in Deep
    Reinforcement Learning", ICML: reset the last layers periodically).

    Every parameter and buffer of each named module (and its submodules) gets a fresh draw of
    its own initializer (BatchNorm running statistics restart); with ``optimizer`` the state of
    those parameters is dropped, so it restarts as for a new parameter (Adam: zero moments and
    ``step`` 0). Parameters no initializer covers are left unchanged and listed in ``skipped``.
    The global RNG is never touched; ``generator`` provides the seed (default: see ``ReDo``).
    """
    if not names:
        raise ValueError("reset_layers: give at least one module name")
    fresh, skipped, seed = _fresh_targets(model, names, generator)
    canonical = {id(p): n for n, p in model.named_parameters()}  # a tied parameter: its first name
    changed: dict[str, nn.Parameter] = {}
    done: set[int] = set()
    for _, module, module_fresh in fresh:
        fresh_state = _owned(module_fresh)
        for rel, (sub, attr) in _owned(module).items():
            t = getattr(sub, attr)
            if not isinstance(t, torch.Tensor) or id(t) in done:  # tied: drawn once
                continue
            done.add(id(t))
            src_sub, src_attr = fresh_state[rel]
            t.copy_(getattr(src_sub, src_attr))
            if isinstance(t, nn.Parameter):
                changed[canonical[id(t)]] = t
    _drop_state(optimizer, changed.values())
    modules = dict(model.named_modules())
    layers = []
    for i, n in enumerate((n if n != "(root)" else "" for n in names), start=1):
        weight = getattr(modules[n], "weight", None)
        units = int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.ndim >= 1 else 0
        layers.append(LayerReset(display_name(n), i, units, units))
    return ResetRecord(
        "reset_layers",
        layers,
        skipped,
        tuple(changed),
        {"names": [display_name(n) for n in names], "seed": seed},
    )


# --------------------------------------------------------------------------- schedules
class InterventionSchedule:
    """Apply an intervention every ``every`` steps, from step ``start`` on, inside any loop::

        maybe = pp.InterventionSchedule(pp.ReDo(model, optimizer), every=1000, start=learning_starts)
        for step in ...:
            ...
            record = maybe(step, batch)      # None on other steps

    ``intervention(batch) -> ResetRecord``: a :class:`ReDo`, or e.g.
    ``lambda _: pp.shrink_perturb(model, optimizer=opt)``. Fires when ``step >= start`` and
    ``(step - start) % every == 0`` and ``step > start`` (never on the first step of learning).
    The records are kept in ``records`` as ``(step, record)``.
    """

    def __init__(self, intervention: Intervention, every: int, start: int = 0) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.intervention, self.every, self.start = intervention, every, start
        self.records: list[tuple[int, ResetRecord]] = []

    def due(self, step: int) -> bool:
        return step > self.start and (step - self.start) % self.every == 0

    def __call__(self, step: int, batch: Any = None) -> ResetRecord | None:
        if not self.due(step):
            return None
        record = self.intervention(batch)
        self.records.append((step, record))
        return record
