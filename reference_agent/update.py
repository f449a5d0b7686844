"""One gradient step of K stacked runs: TD losses, penalties, hand-derived backward, fused Adam.

    y      = r + γ (1 − terminated) max_a' Q_target(s', a')        (no gradient through y)
    L_k    = mean_b (Q_k(s_b, a_b) − y_b)²                          (MSE TD loss of run k)
    θ_k   ← Adam(θ_k, ∂/∂θ_k [L_k + Σ_i λ δ^i R(θ_k,i)])             (Teo et al. 2023, eq. 3)

The step has three parts: ``td_forward`` (both networks, the TD error and ``dL/dQ``), the singular
penalty's eigendecompositions (``StackedPenalty.feature_terms``, which stay eager: LAPACK), and
``td_backward`` (the gradients and the parameter penalties), followed by the Adam kernel
``torch.optim.Adam(fused=True)`` runs; a batch without a singular penalty runs the first and the
last as one function (``td_gradients``). ``td_forward`` and ``td_backward`` are pure tensor code; with
``compile=True`` they run through ``torch.compile`` (inductor fuses their element-wise work into a
few C++ loops around the matrix products and calls them from a C++ wrapper), which costs a one-off
compilation of 10–30 s (cached on disk) and makes an update faster on the CPU
(docs/performance.md); results agree with the eager step to float32 rounding
(tests/test_engine.py).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from reference_agent.penalties import StackedPenalty, param_penalties
from reference_agent.replay import Batch
from reference_agent.stacked import StackedQ, mlp_backward, mlp_forward

COMPILE_OPTIONS: dict[str, str | int | bool | Callable[..., Any]] = {"cpp_wrapper": True}
"""Inductor options: the compiled graph's wrapper in C++ instead of Python (measured: the update
at K = 1 in about 0.65× the time of the Python wrapper's, docs/performance.md)."""


def td_forward(
    params: Sequence[torch.Tensor],
    target_params: Sequence[torch.Tensor],
    obs: torch.Tensor,
    actions: torch.Tensor,
    rewards: torch.Tensor,
    next_obs: torch.Tensor,
    terminated: torch.Tensor,
    gamma: float,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """The online network's features, ``dL/dQ`` ``(K, B, n_actions)`` and the statistics
    ``(K, 3)``: TD loss, mean Q(s, a), mean target y."""
    next_q = mlp_forward(target_params, next_obs)[-1].amax(dim=2)
    y = rewards + gamma * (1.0 - terminated) * next_q
    features = mlp_forward(params, obs)
    index = actions.unsqueeze(2)
    q_sa = features[-1].gather(2, index).squeeze(2)
    err = q_sa - y
    grad_q = torch.zeros_like(features[-1]).scatter(2, index, (err * (2.0 / err.shape[1])).unsqueeze(2))
    stats = torch.stack((err.square().mean(dim=1), q_sa.mean(dim=1), y.mean(dim=1)), dim=1)
    return features, grad_q, stats


def td_backward(
    params: Sequence[torch.Tensor],
    init: Sequence[torch.Tensor],
    obs: torch.Tensor,
    features: Sequence[torch.Tensor],
    grad_q: torch.Tensor,
    feature_grads: Sequence[torch.Tensor | None],
    coefs: dict[str, torch.Tensor],
    mask: torch.Tensor,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The gradient of TD loss + penalties per parameter tensor, and the parameter penalties
    per run and tensor ``(K, n_params)``."""
    grads = mlp_backward(params, obs, features, grad_q, feature_grads)
    units, penalty_grads = param_penalties(params, init, coefs, mask)
    return [g if extra is None else g + extra for g, extra in zip(grads, penalty_grads, strict=True)], units


def td_gradients(
    params: Sequence[torch.Tensor],
    target_params: Sequence[torch.Tensor],
    init: Sequence[torch.Tensor],
    obs: torch.Tensor,
    actions: torch.Tensor,
    rewards: torch.Tensor,
    next_obs: torch.Tensor,
    terminated: torch.Tensor,
    gamma: float,
    coefs: dict[str, torch.Tensor],
    mask: torch.Tensor,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """``td_forward`` then ``td_backward`` for a batch without feature penalties (one graph for
    ``torch.compile``): the gradients, the statistics ``(K, 3)`` and the parameter penalties."""
    features, grad_q, stats = td_forward(params, target_params, obs, actions, rewards, next_obs, terminated, gamma)
    no_feature_grads: list[torch.Tensor | None] = [None] * len(features)
    grads, units = td_backward(params, init, obs, features, grad_q, no_feature_grads, coefs, mask)
    return grads, stats, units


class BatchedUpdate:
    """``update(step, batch) -> (K, 4)`` statistics (TD loss, mean Q, mean target, penalty) after
    one gradient step of every run of ``online``.

    ``optimizer`` is a ``torch.optim.Adam`` over the stacked parameters that holds the state
    (created at once, so that interventions and checkpoints find it before the first step) in the
    format ``torch.optim.Adam`` saves; the step calls the fused Adam kernel on it directly."""

    def __init__(
        self,
        online: StackedQ,
        target: StackedQ,
        penalty: StackedPenalty,
        *,
        lr: float,
        gamma: float,
        compile: bool = False,
    ) -> None:
        self.online, self.target, self.penalty, self.gamma = online, target, penalty, gamma
        self.optimizer = torch.optim.Adam(online.params(), lr=lr, fused=True)
        for p in online.params():
            self.optimizer.state[p] = {
                "step": torch.zeros((), dtype=torch.float32, device=p.device),
                "exp_avg": torch.zeros_like(p),
                "exp_avg_sq": torch.zeros_like(p),
            }
        self._use(compile)

    def __call__(self, step: int, batch: Batch) -> torch.Tensor:
        params = self.online.params()
        active = self.penalty.active(step) if self.penalty.any else np.zeros(self.online.k, dtype=bool)
        mask = torch.from_numpy(active.astype(np.float32)).to(params[0].device)
        with torch.no_grad():
            try:
                grads, stats, units = self._gradients(params, batch, active, mask)
            except torch._dynamo.exc.BackendCompilerFailed as err:  # no working C++ compiler here
                warnings.warn(f"torch.compile failed ({err}); the engine continues without it", stacklevel=2)
                self._use(False)
                grads, stats, units = self._gradients(params, batch, active, mask)
            self.penalty.record(active, units)
            group = self.optimizer.param_groups[0]
            states = [self.optimizer.state[p] for p in params]
            steps = [s["step"] for s in states]
            torch._foreach_add_(steps, 1)
            beta1, beta2 = group["betas"]
            torch._fused_adam_(
                params,
                grads,
                [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states],
                [],
                steps,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                amsgrad=False,
                maximize=False,
            )
        return torch.cat((stats, units.sum(dim=1, keepdim=True)), dim=1)

    def _use(self, compile: bool) -> None:
        """The step's functions, compiled or not: one graph when no run has a feature penalty,
        else the forward and backward graphs around the eager eigendecompositions."""
        wrap: Callable[[Callable[..., Any]], Callable[..., Any]] = (
            (lambda fn: torch.compile(fn, dynamic=False, options=COMPILE_OPTIONS)) if compile else (lambda fn: fn)
        )
        self._whole: Callable[..., Any] | None = None if self.penalty.has_feature_terms else wrap(td_gradients)
        self._forward, self._backward = wrap(td_forward), wrap(td_backward)

    def _gradients(
        self, params: list[torch.Tensor], batch: Batch, active: np.ndarray, mask: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        if self._whole is not None:
            grads, stats, units = self._whole(
                params,
                self.target.params(),
                self.penalty.init,
                batch.obs,
                batch.actions,
                batch.rewards,
                batch.next_obs,
                batch.terminated,
                self.gamma,
                self.penalty.param_coefs,
                mask,
            )
            return grads, stats, torch.cat((units, units.new_zeros(units.shape[0], self.penalty.n_layers)), dim=1)
        features, grad_q, stats = self._forward(
            params,
            self.target.params(),
            batch.obs,
            batch.actions,
            batch.rewards,
            batch.next_obs,
            batch.terminated,
            self.gamma,
        )
        feature_units, feature_grads = self.penalty.feature_terms(active, features)
        grads, units = self._backward(
            params, self.penalty.init, batch.obs, features, grad_q, feature_grads, self.penalty.param_coefs, mask
        )
        if feature_units is None:
            feature_units = units.new_zeros(units.shape[0], self.penalty.n_layers)
        return grads, stats, torch.cat((units, feature_units), dim=1)
