"""K Q-networks with stacked parameters: one batched forward, backward and Adam step for all.

The parameters of run k are slice ``k`` of each stacked tensor, in ``nn.Linear``'s layout:
``weights[l]`` is ``(K, out, in)``, ``biases[l]`` is ``(K, out)``. The forward pass is one
``baddbmm`` per layer for all runs; the backward pass is written out (the gradients of an MLP
with a mean-squared TD loss, the parameter penalties and the singular penalty's feature term),
which is faster than autograd on these sizes (docs/performance.md has the comparison) and is
checked against autograd on per-run ``nn.Module``s in tests/test_engine.py.

``module(k)`` returns an ordinary ``QNetwork`` whose parameters *are* run k's slices (views that
share storage): probes, hooks and interventions work on it as on any network, and in-place
changes reach the stack.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from reference_agent.network import QNetwork


def layer_names(n_layers: int) -> list[str]:
    """Module paths of the linear layers of a ``QNetwork``: ``net.0``, ``net.2``, …"""
    return [f"net.{2 * i}" for i in range(n_layers)]


def param_names(n_layers: int) -> list[str]:
    """``named_parameters()`` order of a ``QNetwork``: weight, bias of each layer in turn."""
    return [f"{name}.{kind}" for name in layer_names(n_layers) for kind in ("weight", "bias")]


@dataclass
class Forward:
    """What one batched forward pass keeps for its backward pass."""

    inputs: torch.Tensor  # (K, B, obs_dim)
    features: list[torch.Tensor]  # post-ReLU hidden features, then the output Q-values: (K, B, width)

    @property
    def q(self) -> torch.Tensor:
        return self.features[-1]


class StackedQ:
    """The parameters of K Q-networks of one shape, stacked along a leading run dimension."""

    def __init__(self, networks: Sequence[QNetwork], device: torch.device | str = "cpu") -> None:
        linears = [[m for m in net.net if isinstance(m, nn.Linear)] for net in networks]
        self.n_layers = len(linears[0])
        self.weights = [
            torch.stack([ls[i].weight.detach() for ls in linears]).to(device).contiguous() for i in range(self.n_layers)
        ]
        self.biases = [
            torch.stack([ls[i].bias.detach() for ls in linears]).to(device).contiguous() for i in range(self.n_layers)
        ]
        self.sizes = (int(self.weights[0].shape[2]), *(int(w.shape[1]) for w in self.weights))

    @property
    def k(self) -> int:
        return int(self.weights[0].shape[0])

    def params(self) -> list[torch.Tensor]:
        """Weight, bias of each layer in turn (``QNetwork.parameters()`` order)."""
        return [t for w, b in zip(self.weights, self.biases, strict=True) for t in (w, b)]

    def forward(self, x: torch.Tensor) -> Forward:
        """``x``: ``(K, B, obs_dim)``; every layer of every run in one ``baddbmm``."""
        features = []
        h = x
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
            if i < self.n_layers - 1:
                h = h.relu_()
            features.append(h)
        return Forward(x, features)

    def q_values(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x).q

    def backward(
        self, fwd: Forward, grad_q: torch.Tensor, feature_grads: dict[int, torch.Tensor] | None = None
    ) -> list[torch.Tensor]:
        """Gradients of every parameter (``params()`` order) given ``dL/dQ`` (``(K, B, n_actions)``)
        and optional extra gradients on layer i's features (the singular penalty), which are added
        where autograd would add them: on the features, before the ReLU's mask."""
        extra = feature_grads or {}
        grads: list[torch.Tensor] = [torch.empty(0)] * (2 * self.n_layers)
        g = grad_q if self.n_layers - 1 not in extra else grad_q + extra[self.n_layers - 1]
        for i in range(self.n_layers - 1, -1, -1):
            below = fwd.features[i - 1] if i > 0 else fwd.inputs
            grads[2 * i] = torch.bmm(g.transpose(1, 2), below)
            grads[2 * i + 1] = g.sum(dim=1)
            if i == 0:
                break
            dh = torch.bmm(g, self.weights[i])
            if i - 1 in extra:
                dh = dh.add_(extra[i - 1])
            g = torch.ops.aten.threshold_backward(dh, below, 0.0)  # ReLU: pass where the feature > 0
        return grads

    def copy_from(self, other: StackedQ) -> None:
        with torch.no_grad():
            for mine, theirs in zip(self.params(), other.params(), strict=True):
                mine.copy_(theirs)

    def module(self, k: int) -> QNetwork:
        """Run k as a ``QNetwork`` whose parameters share storage with the stack."""
        obs_dim, *hidden, n_actions = self.sizes
        net = QNetwork(obs_dim, n_actions, hidden)
        linears = [m for m in net.net if isinstance(m, nn.Linear)]
        for lin, w, b in zip(linears, self.weights, self.biases, strict=True):
            lin.weight = nn.Parameter(w[k])
            lin.bias = nn.Parameter(b[k])
        return net

    def state_dict(self, k: int) -> dict[str, torch.Tensor]:
        """Run k's ``QNetwork.state_dict()`` (copies, on the CPU)."""
        names = param_names(self.n_layers)
        return {n: p[k].detach().to("cpu", copy=True) for n, p in zip(names, self.params(), strict=True)}

    def load_state_dict(self, k: int, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, p in zip(param_names(self.n_layers), self.params(), strict=True):
                p[k].copy_(state[n])
