"""Finding the layers of any ``nn.Module`` in forward order, and capturing their features.

A *layer* is a module that owns parameters directly (``Linear``, ``Conv*``, any custom module
with its own weights). Normalization modules (BatchNorm, LayerNorm, GroupNorm, RMSNorm) own
parameters too but are skipped by default, so that "the layer after a Linear" is the next
weight layer; name them explicitly to include them. Layers are numbered l = 1, 2, … in the order
their ``forward`` is entered during a traced pass, not in registration order.

The *features* of layer l are the input of layer l + 1 (so functional and in-place activations
are included), reshaped to layer l's output shape when the element counts match (conv features
stay ``(N, C, H, W)`` across a ``Flatten``); the features of the last layer are its output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = ["FeatureHooks", "LayerInfo", "SkippedModule", "discover_layers", "layer_candidates"]

ROOT_NAME = "(root)"

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
)


@dataclass(frozen=True)
class LayerInfo:
    """One layer: its module path, 1-based forward index, kind and module."""

    name: str
    index: int
    kind: str
    module: nn.Module = field(repr=False, compare=False)


@dataclass(frozen=True)
class SkippedModule:
    """A module that is not a layer, and why."""

    name: str
    reason: str


def display_name(path: str) -> str:
    """The module path used in reports; the root module itself is ``(root)``."""
    return path if path else ROOT_NAME


def layer_kind(module: nn.Module) -> str:
    """A short kind name: linear, conv, embedding, recurrent, norm or other."""
    if isinstance(module, nn.Linear | nn.Bilinear):
        return "linear"
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(module, nn.Embedding | nn.EmbeddingBag):
        return "embedding"
    if isinstance(module, nn.RNNBase):
        return "recurrent"
    if isinstance(module, _NORM_TYPES):
        return "norm"
    return "other"


def _owns_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def layer_candidates(
    model: nn.Module, names: Sequence[str] | None = None
) -> tuple[dict[str, nn.Module], list[SkippedModule]]:
    """Modules that may be layers (keyed by display name) and the leaf modules that are not.

    With ``names`` given, exactly those modules (display names or module paths) are candidates;
    an unknown name raises ``ValueError``.
    """
    modules = {display_name(path): m for path, m in model.named_modules()}
    if names is not None:
        wanted = [display_name(n) if n else ROOT_NAME for n in names]
        unknown = [n for n in wanted if n not in modules]
        if unknown:
            raise ValueError(f"unknown layer name(s) {unknown}; known: {sorted(modules)}")
        return {n: modules[n] for n in wanted}, []
    candidates: dict[str, nn.Module] = {}
    skipped: list[SkippedModule] = []
    for name, module in modules.items():
        if _owns_parameters(module):
            if isinstance(module, _NORM_TYPES):
                skipped.append(SkippedModule(name, "normalization layer (name it to include it)"))
            else:
                candidates[name] = module
        elif not any(True for _ in module.children()):
            skipped.append(SkippedModule(name, "no parameters of its own"))
    return candidates, skipped


def _first_tensor(args: tuple[Any, ...]) -> torch.Tensor | None:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
    return None


class FeatureHooks:
    """Forward hooks that record the forward order of candidate layers and their features.

    A pass starts when the root module's ``forward`` is entered; within a pass, the first call
    of each layer is recorded. With ``detach=True`` tensors are detached and cloned in the hook
    (so later in-place operations cannot change them); otherwise they are kept in the graph,
    for differentiable penalties. ``active()`` decides per call whether to record (e.g. only
    when autograd is enabled). Use as a context manager or call ``attach``/``remove``.
    """

    def __init__(
        self,
        model: nn.Module,
        candidates: dict[str, nn.Module],
        *,
        detach: bool,
        active: Callable[[], bool] = lambda: True,
    ) -> None:
        self.model = model
        self.candidates = candidates
        self.detach = detach
        self.active = active
        self.order: list[str] = []
        self._inputs: dict[str, torch.Tensor] = {}
        self._outputs: dict[str, torch.Tensor] = {}
        self._handles: list[RemovableHandle] = []

    def _keep(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().clone() if self.detach else t

    def _start_pass(self, _module: nn.Module, _args: tuple[Any, ...]) -> None:
        if self.active():
            self.order = []
            self._inputs = {}
            self._outputs = {}

    def _pre_hook(self, name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            if not self.active() or name in self._inputs:
                return
            x = _first_tensor(args)
            if x is not None:
                self.order.append(name)
                self._inputs[name] = self._keep(x)

        return hook

    def _post_hook(self, name: str) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def hook(_module: nn.Module, _args: tuple[Any, ...], output: Any) -> None:
            if not self.active() or name in self._outputs or name not in self._inputs:
                return
            out = output if isinstance(output, torch.Tensor) else _first_tensor(tuple(output))
            if out is not None:
                self._outputs[name] = self._keep(out)

        return hook

    def attach(self) -> FeatureHooks:
        try:
            self._handles.append(self.model.register_forward_pre_hook(self._start_pass))
            for name, module in self.candidates.items():
                self._handles.append(module.register_forward_pre_hook(self._pre_hook(name)))
                self._handles.append(module.register_forward_hook(self._post_hook(name)))
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> FeatureHooks:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def layers(self) -> list[LayerInfo]:
        """Layers of the last pass in forward order."""
        return [
            LayerInfo(name, i, layer_kind(self.candidates[name]), self.candidates[name])
            for i, name in enumerate(self.order, start=1)
        ]

    def not_called(self) -> list[SkippedModule]:
        return [
            SkippedModule(name, "not called in the forward pass")
            for name in self.candidates
            if name not in self._inputs
        ]

    def features(self) -> dict[str, torch.Tensor]:
        """Features of each layer of the last pass, keyed by name, in forward order."""
        result: dict[str, torch.Tensor] = {}
        for name, nxt in zip(self.order, self.order[1:], strict=False):
            x = self._inputs[nxt]
            out = self._outputs.get(name)
            if out is not None and out.shape != x.shape and out.numel() == x.numel():
                x = x.reshape(out.shape)
            result[name] = x
        if self.order and self.order[-1] in self._outputs:
            result[self.order[-1]] = self._outputs[self.order[-1]]
        return result

    def clear(self) -> None:
        self._inputs = {}
        self._outputs = {}


def call_model(model: nn.Module, batch: Any) -> Any:
    """Call ``model`` on a batch: a tensor, a tuple/list of positional args, or a dict of kwargs."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, tuple | list):
        return model(*batch)
    return model(batch)


def discover_layers(
    model: nn.Module, batch: Any, names: Sequence[str] | None = None
) -> tuple[list[LayerInfo], list[SkippedModule]]:
    """Layers of ``model`` in forward order, from one traced forward pass on ``batch`` under
    ``torch.no_grad()``, and the modules that are not layers (with the reason)."""
    candidates, skipped = layer_candidates(model, names)
    with FeatureHooks(model, candidates, detach=True) as hooks, torch.no_grad():
        call_model(model, batch)
    return hooks.layers(), skipped + hooks.not_called()
