"""K Q-networks with stacked parameters: one batched forward, backward and Adam step for all.

The parameters of run k are slice ``k`` of each stacked tensor, in ``nn.Linear``'s layout:
``weights[l]`` is ``(K, out, in)``, ``biases[l]`` is ``(K, out)``. The forward pass is one
``baddbmm`` per layer for all runs (``mlp_forward``); the backward pass is written out
(``mlp_backward``: the gradients of an MLP given ``dL/dQ`` and extra feature gradients), which is
faster than autograd on these sizes (docs/performance.md has the comparison) and is checked
against autograd on per-run ``nn.Module``s in tests/test_engine.py.

``module(k)`` returns an ordinary ``QNetwork`` whose parameters *are* run k's slices (views that
share storage): probes, hooks and interventions work on it as on any network, and in-place
changes reach the stack.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from reference_agent.network import QNetwork


def layer_names(n_layers: int) -> list[str]:
    """Module paths of the linear layers of a ``QNetwork``: ``net.0``, ``net.2``, …"""
    return [f"net.{2 * i}" for i in range(n_layers)]


def param_names(n_layers: int) -> list[str]:
    """``named_parameters()`` order of a ``QNetwork``: weight, bias of each layer in turn."""
    return [f"{name}.{kind}" for name in layer_names(n_layers) for kind in ("weight", "bias")]


def mlp_forward(params: Sequence[torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
    """The features of every layer (post-ReLU hidden features, then the Q-values) of the stacked
    MLP ``params`` (weight, bias of each layer) on ``x`` ``(K, B, obs_dim)``."""
    features = []
    h = x
    n_layers = len(params) // 2
    for i in range(n_layers):
        w, b = params[2 * i], params[2 * i + 1]
        if w.shape[1] < w.shape[2]:  # fewer outputs than inputs: MKL is faster on (W hᵀ)ᵀ
            h = torch.baddbmm(b.unsqueeze(2), w, h.transpose(1, 2)).transpose(1, 2)
        else:
            h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
        if i < n_layers - 1:
            h = h.relu()
        features.append(h)
    return features


RowGrad = tuple[tuple[int, ...], torch.Tensor]
"""An extra gradient for the runs ``rows`` only: ``(rows, values)``, values ``(len(rows), …)``."""


def add_rows(g: torch.Tensor, extra: RowGrad) -> torch.Tensor:
    """``g`` with ``extra``'s values added to its runs (dim 0) ``rows``."""
    rows, values = extra
    if len(rows) == g.shape[0]:
        return g + values
    return g.index_add(0, torch.tensor(rows, device=g.device), values)


def mlp_backward(
    params: Sequence[torch.Tensor],
    inputs: torch.Tensor,
    features: Sequence[torch.Tensor],
    grad_q: torch.Tensor,
    feature_grads: Sequence[RowGrad | None],
) -> list[torch.Tensor]:
    """Gradients of every parameter (``params`` order) given ``dL/dQ`` (``(K, B, n_actions)``)
    and extra gradients on layer i's features in some runs (``feature_grads[i]``, None where there
    are none: the singular penalty), which are added where autograd would add them: on the
    features, before the ReLU's mask."""
    n_layers = len(params) // 2
    grads: list[torch.Tensor] = [grad_q] * (2 * n_layers)
    extra = feature_grads[n_layers - 1]
    g = grad_q if extra is None else add_rows(grad_q, extra)
    for i in range(n_layers - 1, -1, -1):
        below = features[i - 1] if i > 0 else inputs
        if below.shape[2] < g.shape[2]:  # fewer inputs than outputs: MKL is faster on (belowᵀ g)ᵀ
            # (contiguous, in the parameter's layout: torch's fused Adam kernel needs it)
            grads[2 * i] = torch.bmm(below.transpose(1, 2), g).transpose(1, 2).contiguous()
        else:
            grads[2 * i] = torch.bmm(g.transpose(1, 2), below)
        grads[2 * i + 1] = g.sum(dim=1)
        if i == 0:
            break
        dh = torch.bmm(g, params[2 * i])
        extra = feature_grads[i - 1]
        if extra is not None:
            dh = add_rows(dh, extra)
        g = torch.ops.aten.threshold_backward(dh, below, 0.0)  # ReLU: pass where the feature > 0
    return grads


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
        # numpy views of the CPU parameters for ``q_values`` (the stacked tensors are only ever
        # changed in place, so the views stay current): Wᵀ per layer, biases broadcast over rows
        self._numpy = (
            [
                (w.numpy().transpose(0, 2, 1), b.numpy()[:, None, :])
                for w, b in zip(self.weights, self.biases, strict=True)
            ]
            if self.weights[0].device.type == "cpu"
            else None
        )

    @property
    def k(self) -> int:
        return int(self.weights[0].shape[0])

    def params(self) -> list[torch.Tensor]:
        """Weight, bias of each layer in turn (``QNetwork.parameters()`` order)."""
        return [t for w, b in zip(self.weights, self.biases, strict=True) for t in (w, b)]

    def q_values(self, x: np.ndarray) -> np.ndarray:
        """Q-values ``(K, B, n_actions)`` (float32) of every run on observations ``x``
        ``(K, B, obs_dim)``: acting, evaluation and the new transition's next-state value, a few
        rows per run at a time. On the CPU the products run in numpy on zero-copy views of the
        parameters (torch's per-op dispatch costs tens of µs at these sizes, numpy's a few:
        docs/performance.md); elsewhere through ``mlp_forward``."""
        if self._numpy is None:
            with torch.inference_mode():
                x_t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.weights[0].device)
                return mlp_forward(self.params(), x_t)[-1].cpu().numpy()
        h = np.asarray(x, dtype=np.float32)
        with np.errstate(over="ignore", invalid="ignore"):  # a diverging run: inf/NaN, as torch gives them
            for i, (w_t, b) in enumerate(self._numpy):
                h = np.matmul(h, w_t) + b
                if i < self.n_layers - 1:
                    np.maximum(h, 0.0, out=h)
        return h

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
