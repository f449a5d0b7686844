"""The layers of any ``nn.Module`` in forward order, and each layer's features, found by
following the data flow. One mechanism, used by ``Probe``, ``SuccessiveRegularizer``, the
interventions and the integrations.

*Layer*: a module that owns a parameter with ≥ 2 dimensions — a weight matrix or kernel, a
parametrized weight (``parametrizations.weight_norm``/``spectral_norm``, whose tensors live in
``module.parametrizations``) or a weight that a parent reads directly without calling the
module (``MultiheadAttention.out_proj``). Layers are numbered l = 1, 2, … in the order they are
first called (or first read) in a pass.

*Features* of a layer: its own output, followed through its own *chain* — element-wise
activations (module, functional or in-place), normalizations, casts, and element-wise
arithmetic with a number or a parameter/buffer (scalers, PReLU, norm affine). The chain ends at
anything that mixes or moves data: add or multiply with another data tensor, cat, pooling,
dropout, reshape/flatten/permute/indexing, another layer. The data flow is tracked with a
``TorchFunctionMode`` that sees every torch function on the tensors, so functional and in-place
activations count, and branches (dueling heads, actor-critic), residual adds and transformers
get the right tensor.

*Units*: channels (dim 1) for conv layers, the last dimension otherwise; every leading
dimension is a sample, so ``(N, T, d)`` features become ``(N·T, d)``. A layer called several
times in one pass (a shared encoder, a recurrent cell unrolled step by step) contributes all
its calls, stacked along the samples.

*Parameters* that belong to no layer (norm affine or scalers applied to a residual stream,
a policy's ``log_std``) are kept in groups, one per owning module, so that nothing is dropped
from reports, totals or penalties: a group's parameters are counted with the layer called next
after the group is first read (the last layer if none follows, or if never read).

Captured features are copies taken when the chain ends (before any in-place change that ends
it), detached unless the capture is differentiable (the ``singular`` penalty). Capturing never
changes the model's output, gradients, train/eval mode, BatchNorm statistics or the RNG.
"""

from __future__ import annotations

import copy
import sys
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

__all__ = [
    "Args",
    "Consumer",
    "DataFlowTracer",
    "LayerInfo",
    "ParamGroup",
    "SkippedModule",
    "Trace",
    "call_model",
    "discover_layers",
    "layer_candidates",
    "measuring",
    "private_copy",
    "stack_calls",
]

ROOT_NAME = "(root)"

# Chain ops, by torch function name (in-place variants lose their trailing "_").
_ACTIVATIONS = frozenset(
    {
        "relu", "relu6", "gelu", "silu", "sigmoid", "tanh", "elu", "selu", "celu", "leaky_relu", "rrelu",
        "prelu", "hardtanh", "hardswish", "hardsigmoid", "mish", "softplus", "softsign", "tanhshrink",
        "softshrink", "hardshrink", "threshold", "logsigmoid", "sin", "cos", "exp", "abs", "neg", "square",
        "clamp", "clip", "clamp_min", "clamp_max", "erf",
    }
)  # fmt: skip
_NORMS = frozenset(
    {"layer_norm", "batch_norm", "group_norm", "instance_norm", "rms_norm", "normalize", "local_response_norm"}
)
_CASTS = frozenset({"contiguous", "float", "double", "half", "bfloat16", "to", "type", "type_as"})
_ELEMENTWISE_BINARY = frozenset(
    {
        "add", "sub", "mul", "div", "true_divide", "pow", "__add__", "__radd__", "__sub__", "__rsub__",
        "__mul__", "__rmul__", "__truediv__", "__rtruediv__", "__iadd__", "__isub__", "__imul__",
        "__itruediv__", "__pow__",
    }
)  # fmt: skip
# Ops that neither extend nor end a chain: metadata queries and copies for side uses.
_NEUTRAL = frozenset(
    {
        "__get__", "size", "dim", "numel", "stride", "is_contiguous", "data_ptr", "element_size", "ndimension",
        "nelement", "__len__", "is_floating_point", "get_device", "__format__", "__repr__",
        "_set_grad_enabled", "requires_grad_", "retain_grad", "__bool__", "item", "tolist", "numpy", "cpu",
    }
)  # fmt: skip
# Copies for a side use: neither extend nor end a chain, but carry the data's provenance.
_COPIES = frozenset({"detach", "clone"})
# Ops that move data without mixing units (the route a consumer sees; see Consumer).
_RESHAPES = frozenset({"flatten", "view", "reshape", "unflatten"})
_DROPOUTS = frozenset({"dropout", "alpha_dropout", "feature_alpha_dropout", "dropout1d", "dropout2d", "dropout3d"})
_MOVES = frozenset({"transpose", "permute", "movedim", "swapaxes", "swapdims", "t", "squeeze", "unsqueeze"})


@dataclass(frozen=True)
class LayerInfo:
    """One layer: module path, 1-based forward index, kind, module, and the qualified names of
    the parameters counted with it (its own, and those applied in its feature chain)."""

    name: str
    index: int
    kind: str
    module: nn.Module = field(repr=False, compare=False)
    params: tuple[str, ...] = ()
    chain: tuple[str, ...] = ()
    """The ops its features went through after its output (first call), e.g. ``("batch_norm", "relu")``."""


@dataclass(frozen=True)
class ParamGroup:
    """Parameters that belong to no layer, grouped by owning module, with the forward index of
    the layer they are counted with (for δ^l) and why they are not a layer's."""

    name: str
    index: int
    params: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class SkippedModule:
    """A module that is not a layer, or a layer without features, and why."""

    name: str
    reason: str


@dataclass(frozen=True)
class Consumer:
    """A layer that reads another layer's features. ``route`` says how they got there:
    ``direct`` (the features themselves, maybe through dropout), ``reshape`` (through
    flatten/view/reshape: conv channels become blocks of columns), or ``mixed`` (through an add,
    cat, permute or any other op that mixes or moves units: which inputs are whose is unknown)."""

    layer: str
    route: str


@dataclass
class Trace:
    """What one pass showed: layers in forward order, their features, the parameter groups,
    modules that are not layers (or layers without features), notes, and for each layer the
    layers that consume its features."""

    layers: list[LayerInfo]
    features: dict[str, torch.Tensor]
    groups: list[ParamGroup]
    skipped: list[SkippedModule]
    notes: list[str]
    consumers: dict[str, list[Consumer]]


class Args:
    """Several arguments for one model call: ``probe.measure(pp.Args(obs, actions))`` calls
    ``model(obs, actions)``. Any other batch (a tensor, a dict, a tuple) is passed as the single
    positional argument."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs


def call_model(model: nn.Module, batch: Any) -> Any:
    """Call ``model`` on a batch: ``Args`` are spread, anything else is one positional argument."""
    if isinstance(batch, Args):
        return model(*batch.args, **batch.kwargs)
    return model(batch)


def display_name(path: str) -> str:
    """The module path used in reports; the root module itself is ``(root)``."""
    return path if path else ROOT_NAME


def layer_kind(module: nn.Module) -> str:
    """A short kind name: linear, conv, embedding, recurrent, attention or other."""
    if isinstance(module, nn.Linear | nn.Bilinear):
        return "linear"
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(module, nn.Embedding | nn.EmbeddingBag):
        return "embedding"
    if isinstance(module, nn.RNNBase | nn.RNNCellBase):
        return "recurrent"
    if isinstance(module, nn.MultiheadAttention):
        return "attention"
    return "other"


def own_parameters(module: nn.Module) -> list[nn.Parameter]:
    """A module's own parameters: direct ones and, for a parametrized module, the originals in
    ``module.parametrizations``."""
    params = list(module.parameters(recurse=False))
    if parametrize.is_parametrized(module):
        params += list(module.parametrizations.parameters())  # type: ignore[union-attr]
    return params


def _is_layer(module: nn.Module) -> bool:
    if isinstance(module, parametrize.ParametrizationList):
        return False  # its originals belong to the parametrized module
    return any(p.ndim >= 2 for p in own_parameters(module))


def layer_candidates(
    model: nn.Module, names: Sequence[str] | None = None
) -> tuple[dict[str, nn.Module], list[SkippedModule]]:
    """Modules that are layers (keyed by display name) and the leaf modules that are not.

    With ``names`` given, exactly those modules (display names or module paths) are layers; an
    unknown name raises ``ValueError``.
    """
    modules = {display_name(path): m for path, m in model.named_modules()}
    if names is not None:
        wanted = [display_name(n) for n in names]
        unknown = [n for n in wanted if n not in modules]
        if unknown:
            raise ValueError(f"unknown layer name(s) {unknown}; known: {sorted(modules)}")
        return {n: modules[n] for n in wanted}, []
    candidates: dict[str, nn.Module] = {}
    skipped: list[SkippedModule] = []
    for name, module in modules.items():
        if _is_layer(module):
            candidates[name] = module
        elif isinstance(module, parametrize.ParametrizationList) or ".parametrizations." in f".{name}.":
            continue
        elif not any(True for _ in module.children()):
            own = list(module.parameters(recurse=False))
            reason = (
                "not a layer (parameters of < 2 dimensions): its parameters are counted with the layer "
                "whose feature chain applies them, or in a group"
                if own
                else "no parameters of its own"
            )
            skipped.append(SkippedModule(name, reason))
    return candidates, skipped


def _first_tensor(obj: Any) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, tuple | list):  # includes PackedSequence (its data comes first)
        for item in obj:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def _tensors(args: Sequence[Any], kwargs: dict[str, Any] | None) -> list[torch.Tensor]:
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, tuple | list):
            out += [t for t in a if isinstance(t, torch.Tensor)]
    if kwargs:
        out += [v for v in kwargs.values() if isinstance(v, torch.Tensor)]
    return out


_STORAGE_USE_COUNT: Callable[[int], int] | None = getattr(torch._C, "_storage_Use_Count", None)


def _holders(t: torch.Tensor) -> tuple[int, int]:
    """(Python references, storage users) of ``t`` as read from here; call it with an attribute
    access (``_holders(obj.t)``) so every caller reads the same interpreter overhead."""
    return sys.getrefcount(t), _STORAGE_USE_COUNT(t.untyped_storage()._cdata) if _STORAGE_USE_COUNT else 1 << 30


class _Holder:
    __slots__ = ("t",)

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t


_held = _Holder(torch.empty(1))
_ONE_HOLDER = _holders(_held.t)  # what a tensor held by exactly one attribute reads
del _held
_SUSPENDED = [0]  # > 0 while measuring: automatic recorders (a regularizer's) ignore passes


@contextmanager
def measuring() -> Iterator[None]:
    """Passes run inside (a probe's forward, a loss closure evaluated for gradients or a
    Hessian) are not training passes: ``SuccessiveRegularizer``'s automatic recording ignores
    them, so its next penalty still uses the training pass."""
    _SUSPENDED[0] += 1
    try:
        yield
    finally:
        _SUSPENDED[0] -= 1


class _Chain:
    """The chain of one call of one layer: its current head (the only member an op can extend),
    the head's version counter when the chain ended (``None`` while open), and a copy taken
    only when an in-place op was about to change the ended head."""

    __slots__ = ("edge", "ended_at", "forks", "head", "layer", "ops", "origin", "read", "snapshot")

    def __init__(self, layer: str, head: torch.Tensor, keep_origin: bool) -> None:
        self.layer = layer
        self.origin = head if keep_origin else None  # the layer's own output, before its chain
        # its place in the autograd graph, taken now: an in-place activation (ReLU(inplace=True))
        # later rebinds the tensor's grad_fn, and a gradient w.r.t. the tensor would be the
        # post-activation one
        self.edge = get_gradient_edge(head) if keep_origin and head.requires_grad else None
        self.head = head
        self.ended_at: int | None = None
        self.snapshot: torch.Tensor | None = None
        self.ops: list[str] = []
        self.read = False  # a layer read its head
        # other branches of the same call: an element-wise op applied to an earlier head after the
        # chain moved on (h.abs() for a statistic, then relu(h) for the next layer)
        self.forks: list[_Chain] = []

    def fork(self, head: torch.Tensor, n_ops: int) -> _Chain:
        """A branch from an earlier head of this chain (reached after ``n_ops`` ops)."""
        branch = _Chain(self.layer, head, keep_origin=False)
        branch.origin, branch.edge, branch.ops = self.origin, self.edge, self.ops[:n_ops]
        self.forks.append(branch)
        return branch

    def chosen(self) -> _Chain:
        """The branch whose head a layer read (the first such), else the first branch."""
        return next((c for c in (self, *self.forks) if c.read), self)


_ROUTE_RANK = {"direct": 0, "reshape": 1, "mixed": 2}


def _mutates(name: str, kwargs: dict[str, Any] | None) -> bool:
    """Whether an op changes its first argument in place (``add_``, ``__iadd__``, ``x[i] = v``,
    ``inplace=True``, ``out=``)."""
    if name.endswith("_") and not name.startswith("__"):
        return True
    if name.startswith("__i") or name == "__setitem__":
        return True
    return kwargs is not None and (kwargs.get("inplace") is True or "out" in kwargs)


def _route_after(op: str, route: str) -> str:
    """The route of an op's output, given the route of its input (see ``Consumer``); ``moved``
    marks a transpose/permute, which mixes units for a consumer but not for ``_from_sublayer``."""
    if op in _DROPOUTS:
        return route
    if op in _RESHAPES and route in ("direct", "reshape"):
        return "reshape"
    if op in _MOVES and route != "mixed":
        return "moved"
    return "mixed"


class _Mode(TorchFunctionMode):
    def __init__(self, tracer: DataFlowTracer) -> None:
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        return self.tracer._on_op(func, args, kwargs)


class DataFlowTracer:
    """Follow the data flow of ``model`` to find its layers, their features and consumers.

    Two ways to record:

    * ``with tracer.record():`` — everything inside the block is one pass (``Probe.capture``,
      ``SuccessiveRegularizer.capture``);
    * ``tracer.attach_auto()`` — hooks stay on the model and each pass with autograd enabled is
      recorded; ``tracer.take()`` returns the first pass since the previous ``take()``
      (``SuccessiveRegularizer``). A pass starts at whichever layer is called first; a later call
      of a layer already in the pass belongs to it only while a module call of that pass is
      still running or when its input derives from the pass (a recurrent unroll), otherwise it
      starts a later pass, which is ignored.

    Args:
        model: the network.
        names: module paths of the layers (default: every module owning a ≥ 2-D parameter).
        detach: features are detached copies (``True``) or differentiable ones.
    """

    def __init__(self, model: nn.Module, names: Sequence[str] | None = None, *, detach: bool = True) -> None:
        self.model = model
        self.detach = detach
        self.candidates, self.skipped = layer_candidates(model, names)
        self._name_of_module = {id(m): n for n, m in self.candidates.items()}
        self._param_names = {id(p): n for n, p in model.named_parameters()}
        self._weight_owner = {
            id(p): name for name, m in self.candidates.items() for p in own_parameters(m) if p.ndim >= 2
        }
        self._own_names = {
            name: tuple(self._param_names[id(p)] for p in own_parameters(m) if id(p) in self._param_names)
            for name, m in self.candidates.items()
        }
        self._kinds = {name: layer_kind(m) for name, m in self.candidates.items()}
        self._modules = list(model.modules())
        self._handles: list[RemovableHandle] = []
        self._mode: _Mode | None = None
        self._auto = False
        self._reset()

    # ----------------------------------------------------------------- state of one pass
    def _reset(self) -> None:
        self._static = {  # refreshed per pass: frozen_closure_state rebinds buffers to clones
            id(t) for m in self._modules for d in (m._parameters, m._buffers) for t in d.values() if t is not None
        }
        self._order: list[str] = []
        self._calls: dict[str, list[_Chain]] = {}
        self._chain_of: dict[int, _Chain] = {}  # id(head) -> chain; heads are kept alive by their chain
        # id(earlier head) -> (chain, ops up to it, its version): a later element-wise op on it forks
        # the chain; weakly held, dropped when the tensor is freed (nobody can use it then)
        self._past: dict[int, tuple[_Chain, int, int, weakref.ref]] = {}
        self._called: set[str] = set()  # layers whose forward was called
        self._prov: dict[int, tuple[tuple[str, str], ...]] = {}  # id(tensor) -> ((layer, route), ...)
        self._refs: dict[int, weakref.ref] = {}  # drop a tensor's entry when it is freed
        self._stack: list[str] = []
        self._chain_params: dict[str, str] = {}  # parameter name -> layer whose chain applied it
        self._first_read: dict[str, int] = {}  # parameter name -> layers called before its first read
        self._consumers: dict[str, dict[str, str]] = {}
        self._internal: set[str] = set()  # layers whose output is a sublayer's
        self._depth = 0
        self._epoch = 0  # incremented whenever the outermost module call returns
        self._pass_epoch = 0
        self._closed = False  # auto mode: a later pass began; ignore until take()

    # ----------------------------------------------------------------- hooks
    def _attach_layer_hooks(self) -> None:
        for name, module in self.candidates.items():
            pre = self._pre_hook(name)  # first, before hooks that compute weights (old-style weight_norm)
            self._handles.append(module.register_forward_pre_hook(pre, with_kwargs=True, prepend=True))
            self._handles.append(module.register_forward_hook(self._post_hook(name), always_call=True))

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _pre_hook(self, name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if self._auto and not self._auto_accepts(name, args, kwargs):
                self._stack.append("")  # keep the stack balanced; "" records nothing
                return
            self._stack.append(name)
            self._note_inputs(name, _tensors(args, kwargs))

        return hook

    def _post_hook(self, name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: tuple[Any, ...], output: Any) -> None:
            if not self._stack:
                return
            top = self._stack.pop()
            if top != name:
                return
            out = _first_tensor(output)
            if out is None:
                return
            if self._from_sublayer(name, out):
                self._internal.add(name)
                return
            self._new_chain(name, out)

        return hook

    def _from_sublayer(self, name: str, out: torch.Tensor) -> bool:
        """Whether ``out`` is (a moved copy of) the output of a layer called inside ``name``'s
        call, e.g. MultiheadAttention returning its ``out_proj`` result."""
        inner = self._order[self._order.index(name) + 1 :]
        return any(layer in inner and route != "mixed" for layer, route in self._prov.get(id(out), ()))

    def _note_inputs(self, name: str, inputs: Sequence[torch.Tensor]) -> None:
        self._called.add(name)
        if name not in self._calls:
            self._order.append(name)
            self._calls[name] = []
        self._note_consumer(name, inputs)
        self._mark_read(inputs)
        for t in inputs:
            chain = self._chain_of.get(id(t))
            if chain is not None and chain.ended_at is None:
                chain.ended_at = t._version

    def _mark_read(self, inputs: Sequence[torch.Tensor]) -> None:
        """A layer reads these tensors: the chain branches whose heads they are hold the features
        (an earlier head read directly becomes a branch of its own)."""
        for t in inputs:
            chain = self._chain_of.get(id(t)) or self._fork(t)
            if chain is not None:
                chain.read = True

    def _remember_past(self, head: torch.Tensor, chain: _Chain) -> None:
        key = id(head)
        ref = weakref.ref(head, lambda _ref: self._past.pop(key, None))
        self._past[key] = (chain, len(chain.ops), head._version, ref)

    def _fork(self, t: torch.Tensor) -> _Chain | None:
        """A new branch of the chain ``t`` was an (unchanged) earlier head of, or None."""
        past = self._past.get(id(t))
        if past is None or past[2] != t._version:
            return None
        owner, n_ops = past[0], past[1]
        branch = owner.fork(t, n_ops)
        self._chain_of[id(t)] = branch
        del self._past[id(t)]
        return branch

    def _note_consumer(self, name: str, inputs: Sequence[torch.Tensor]) -> None:
        for t in inputs:
            for src, route in self._prov.get(id(t), ()):
                if src == name:
                    continue
                route = "mixed" if route == "moved" else route
                by = self._consumers.setdefault(src, {})
                if _ROUTE_RANK[route] >= _ROUTE_RANK.get(by.get(name, "direct"), 0):
                    by[name] = route

    def _new_chain(self, name: str, out: torch.Tensor) -> None:
        chain = _Chain(name, out, keep_origin=not self.detach)
        self._calls.setdefault(name, []).append(chain)
        if name not in self._order:
            self._order.append(name)
        self._chain_of[id(out)] = chain
        self._set_prov(out, ((name, "direct"),))

    def _set_prov(self, t: torch.Tensor, prov: tuple[tuple[str, str], ...]) -> None:
        key = id(t)
        if key not in self._refs:
            self._refs[key] = weakref.ref(t, lambda _ref: (self._prov.pop(key, None), self._refs.pop(key, None)))
        self._prov[key] = prov

    def _copy(self, t: torch.Tensor) -> torch.Tensor:
        return (t.detach() if self.detach else t).clone()

    def _private(self, chain: _Chain) -> bool:
        """Whether, after the block, only this tracer can reach the chain's head — no Python
        reference but the chain's, no view sharing its storage, no autograd graph — so nobody
        can change it and the copy can be skipped (detached captures only: this saves a copy of
        every hidden layer's features; the model's output, which the caller holds, is copied)."""
        head = chain.head
        if not self.detach or head._base is not None or head.requires_grad:
            return False
        del head
        refs, users = _holders(chain.head)
        return refs <= _ONE_HOLDER[0] and users <= _ONE_HOLDER[1]

    # ----------------------------------------------------------------- the torch-function mode
    def _on_op(self, func: Any, args: Sequence[Any], kwargs: Any) -> Any:
        name = getattr(func, "__name__", "")
        if name in _NEUTRAL:
            return func(*args, **(kwargs or {}))
        if name in _COPIES:
            result = func(*args, **(kwargs or {}))
            prov = self._prov.get(id(args[0])) if args else None
            if prov and isinstance(result, torch.Tensor):
                self._set_prov(result, prov)
            return result
        tensors = _tensors(args, kwargs)
        chain: _Chain | None = None
        sources: dict[tuple[str, str], None] = {}
        direct_read: str | None = None
        static: list[torch.Tensor] = []
        for t in tensors:
            key = id(t)
            if chain is None:
                chain = self._chain_of.get(key) or (self._fork(t) if t is tensors[0] else None)
            prov = self._prov.get(key)
            if prov:
                sources.update(dict.fromkeys(prov))
            if key in self._static:
                static.append(t)
                owner = self._weight_owner.get(key)
                if owner is not None and owner not in self._called and owner not in self._stack:
                    direct_read = owner
        if static:
            self._note_reads(static)
        extends = chain is not None and self._extends(name, args, tensors, chain)
        for t in tensors:  # every chain this op consumes without extending it ends here
            ended = self._chain_of.get(id(t))
            if ended is None or (extends and ended is chain):
                continue
            if ended.ended_at is None:
                ended.ended_at = t._version
            if t is args[0] and _mutates(name, kwargs):  # about to change in place: keep the value it ended with,
                if ended.snapshot is None:  # and the tensor no longer holds this chain (no later op resumes it)
                    ended.snapshot = self._copy(t)
                del self._chain_of[id(t)]
        if direct_read is not None:
            if direct_read not in self._order:
                self._order.append(direct_read)
            self._note_consumer(direct_read, tensors)
            self._mark_read(tensors)
        result = func(*args, **(kwargs or {}))
        out = _first_tensor(result)
        if out is None:
            return result
        if direct_read is not None:
            self._new_chain(direct_read, out)
        elif extends and chain is not None:
            if out is not chain.head:
                del self._chain_of[id(chain.head)]
                self._remember_past(chain.head, chain)
                chain.head = out
                self._chain_of[id(out)] = chain
            chain.ended_at = None
            chain.snapshot = None
            chain.ops.append(name[:-1] if name.endswith("_") and not name.startswith("__") else name)
            for p in static:
                pname = self._param_names.get(id(p))  # buffers (running statistics) have none
                if pname is not None:
                    self._chain_params.setdefault(pname, chain.layer)
            self._set_prov(out, ((chain.layer, "direct"),))
        elif sources:
            self._set_prov(out, tuple(dict.fromkeys((src, _route_after(name, r)) for src, r in sources)))
        return result

    def _extends(self, name: str, args: Sequence[Any], tensors: Sequence[torch.Tensor], chain: _Chain) -> bool:
        """Whether the op continues ``chain``: an element-wise activation, norm or cast of its
        head, or element-wise arithmetic of the head with numbers, parameters or buffers."""
        base = name[:-1] if name.endswith("_") and not name.startswith("__") else name
        if base in _ACTIVATIONS or base in _NORMS or base in _CASTS:
            first = args[0] if args else None
            return first is chain.head and all(id(t) in self._static for t in tensors if t is not first)
        if base in _ELEMENTWISE_BINARY:
            data = [t for t in tensors if id(t) not in self._static and t.ndim > 0]
            return len(data) == 1 and data[0] is chain.head
        return False

    def _note_reads(self, static: Sequence[torch.Tensor]) -> None:
        for t in static:
            pname = self._param_names.get(id(t))
            if pname is not None and pname not in self._first_read:
                self._first_read[pname] = len(self._order)

    # ----------------------------------------------------------------- block recording
    @contextmanager
    def record(self) -> Iterator[DataFlowTracer]:
        """Record everything inside the block as one pass."""
        self._reset()
        self._attach_layer_hooks()
        self._mode = _Mode(self)
        try:
            with self._mode:
                yield self
        finally:
            self._mode = None
            self._remove()

    # ----------------------------------------------------------------- automatic recording
    def attach_auto(self) -> DataFlowTracer:
        """Keep hooks on the model and record each pass with autograd enabled (see class doc)."""
        self._reset()
        self._auto = True
        try:
            self._attach_layer_hooks()
            for module in self.model.modules():
                self._handles.append(module.register_forward_pre_hook(self._enter))
                self._handles.append(module.register_forward_hook(self._leave, always_call=True))
        except BaseException:
            self.detach_auto()
            raise
        return self

    def detach_auto(self) -> None:
        self._remove()
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None
        self._auto = False

    def _enter(self, _module: nn.Module, _args: tuple[Any, ...]) -> None:
        if self._depth == 0 and torch.is_grad_enabled() and not self._closed and not _SUSPENDED[0]:
            self._mode = _Mode(self)
            self._mode.__enter__()
        self._depth += 1

    def _leave(self, _module: nn.Module, _args: tuple[Any, ...], _output: Any) -> None:
        self._depth = max(self._depth - 1, 0)
        if self._depth == 0:
            self._epoch += 1
            if self._mode is not None:
                self._mode.__exit__(None, None, None)
                self._mode = None

    def _auto_accepts(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        if not torch.is_grad_enabled() or self._closed or _SUSPENDED[0]:
            return False
        if not self._order:
            self._pass_epoch = self._epoch
            return True
        if name not in self._calls:
            return True
        inside = self._depth > 0 and self._epoch == self._pass_epoch  # inside a module call of this pass
        derived = any(id(t) in self._prov for t in _tensors(args, kwargs))
        if inside or derived:
            return True
        self._closed = True
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None
        return False

    def take(self) -> Trace | None:
        """The first pass since the last ``take()`` (``None`` if there was none); starts afresh."""
        trace = self.trace() if self._order else None
        depth, epoch = self._depth, self._epoch
        mode = self._mode
        self._reset()
        self._depth, self._epoch, self._mode = depth, epoch, mode
        return trace

    # ----------------------------------------------------------------- results
    def trace(self) -> Trace:
        """Layers, features, groups, skipped modules and consumers of the recorded pass."""
        applied: dict[str, list[str]] = {}
        for pname, owner in self._chain_params.items():
            applied.setdefault(owner, []).append(pname)
        layers = [
            LayerInfo(
                name, index, self._kinds[name], self.candidates[name],
                tuple(dict.fromkeys(self._own_names[name] + tuple(applied.get(name, ())))),
                tuple(self._calls[name][0].chosen().ops) if self._calls.get(name) else (),
            )
            for index, name in enumerate(self._order, start=1)
        ]  # fmt: skip
        features: dict[str, torch.Tensor] = {}
        skipped = list(self.skipped)
        notes: list[str] = []
        for info in layers:
            chains = self._calls.get(info.name, [])
            if not chains or info.name in self._internal:
                reason = (
                    "features internal to a fused op (its output is a sublayer's)"
                    if info.name in self._internal
                    else "no tensor output"
                )
                skipped.append(SkippedModule(info.name, f"layer without features: {reason}"))
                continue
            feats = self._stack_calls(info, chains, notes)
            if feats is not None:
                features[info.name] = feats
        for name in self.candidates:
            if name not in self._calls:
                skipped.append(SkippedModule(name, "layer not called in the pass"))
        return Trace(layers, features, self._groups(layers), skipped, notes, self._consumer_lists())

    def outputs(self) -> dict[str, list[tuple[torch.Tensor, GradientEdge]]]:
        """Each layer's own outputs (before its chain) that require grad, one per call, *not*
        copied, with their autograd edges taken when the layer returned (``detach=False``):
        ``torch.autograd.grad(loss, edges)`` gives ∂L/∂(layer output), the pre-activation
        gradients of GraMa's score, also where an in-place activation overwrote the output."""
        return {
            name: [(c.origin, c.edge) for c in self._calls[name] if c.origin is not None and c.edge is not None]
            for name in self._order
            if self._calls.get(name) and name not in self._internal
        }

    def _stack_calls(self, info: LayerInfo, chains: list[_Chain], notes: list[str]) -> torch.Tensor | None:
        values = []
        for call in chains:
            chain = call.chosen()
            x = chain.snapshot
            if x is None:
                if chain.ended_at is not None and chain.head._version != chain.ended_at:
                    notes.append(f"{info.name}: features changed in place through a view after their chain ended")
                x = chain.head.detach() if self._private(chain) else self._copy(chain.head)
            values.append(x)
        stacked, uniform = stack_calls(values, conv=info.kind == "conv")
        if not uniform:
            notes.append(f"{info.name}: calls with different feature shapes; features are (positions, channels)")
        return stacked

    def _groups(self, layers: list[LayerInfo]) -> list[ParamGroup]:
        assigned = {p for info in layers for p in info.params}
        if len(assigned) == len(self._param_names):
            return []
        by_owner: dict[str, list[str]] = {}
        for pname in self._param_names.values():
            if pname in assigned:
                continue
            owner = display_name(pname.rpartition(".")[0])
            by_owner.setdefault(owner, []).append(pname)
        groups = []
        last = len(layers)
        for owner, params in by_owner.items():
            reads = [self._first_read[p] for p in params if p in self._first_read]
            if not reads:
                index, reason = last, "not read in the pass; counted with the last layer"
            else:
                index = min(min(reads) + 1, last)
                reason = "applied outside any layer's feature chain; counted with the next layer called"
            if self._own_of_uncalled_layer(owner):
                reason = "layer not called in the pass; counted with the last layer"
            groups.append(ParamGroup(owner, max(index, 1), tuple(dict.fromkeys(params)), reason))
        return groups

    def _own_of_uncalled_layer(self, owner: str) -> bool:
        return owner in self.candidates and owner not in self._order

    def _consumer_lists(self) -> dict[str, list[Consumer]]:
        return {src: [Consumer(layer, route) for layer, route in by.items()] for src, by in self._consumers.items()}


def stack_calls(calls: Sequence[torch.Tensor], *, conv: bool) -> tuple[torch.Tensor, bool]:
    """A layer's calls stacked along the samples: conv calls keep ``(N, C, …)``, others become
    ``(samples, units)`` with every leading dimension a sample. Calls whose shapes then differ
    are stacked as ``(positions, channels)``; the flag says whether the shapes agreed."""
    values = [x if conv else (x.reshape(-1, x.shape[-1]) if x.ndim >= 2 else x.reshape(1, -1)) for x in calls]
    if len(values) == 1:
        return values[0], True
    if all(v.shape[1:] == values[0].shape[1:] for v in values):
        return torch.cat(values), True
    return torch.cat([v.movedim(1, -1).reshape(-1, v.shape[1]) for v in values]), False


def _is_tracer_hook(hook: Any) -> bool:
    owner = getattr(hook, "__self__", None)
    return isinstance(owner, DataFlowTracer) or getattr(hook, "__qualname__", "").startswith("DataFlowTracer.")


def private_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` without the hooks this library keeps on it (a
    ``SuccessiveRegularizer``'s), so the copy neither records into nor drags along their state."""
    memo: dict[int, Any] = {}
    for module in model.modules():
        for attr, hooks in vars(module).items():
            if attr.endswith("hooks") and isinstance(hooks, dict) and any(_is_tracer_hook(h) for h in hooks.values()):
                memo[id(hooks)] = type(hooks)((k, h) for k, h in hooks.items() if not _is_tracer_hook(h))
    return copy.deepcopy(model, memo)


def discover_layers(
    model: nn.Module, batch: Any, names: Sequence[str] | None = None
) -> tuple[list[LayerInfo], list[SkippedModule]]:
    """Layers of ``model`` in forward order, from one traced forward pass on ``batch`` under
    ``torch.no_grad()``, and the modules that are not layers (with the reason)."""
    tracer = DataFlowTracer(model, names)
    with tracer.record(), torch.no_grad():
        call_model(model, batch)
    trace = tracer.trace()
    return trace.layers, trace.skipped
