"""Trainability probe: how well a private copy of the network fits fresh random targets.

Protocol (target-fitting capacity, Lyle, Rowland & Dabney 2022, "Understanding and preventing
capacity loss in reinforcement learning", ICLR: a network that has lost capacity fits new random
target functions worse than a fresh one; see docs/gradients-and-trainability.md):

1. the targets are the outputs, on ``batch``, of a randomly re-initialized copy of the same
   architecture (every submodule's ``reset_parameters()``, seeded), standardized per output
   unit to mean 0 and variance 1 over the batch, so that a constant output cannot fit them and
   the losses of different networks are on one scale;
2. a deep copy of ``model`` (same weights, same train/eval mode) regresses its own output on
   them with the mean squared error and Adam for ``steps`` full-batch steps;
3. the record gives the loss before the first step, after the last, their ratio and the curve.

Nothing of the caller's is touched: the model, its ``.grad``, its mode, its buffers (BatchNorm
statistics), any optimizer (never seen) and the global RNG (forked, then seeded) stay as they
were. Deterministic for a seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from plasticity_probe.layers import private_copy

__all__ = ["TrainabilityResult", "trainability"]


@dataclass
class TrainabilityResult:
    """Losses of the target-fitting run: ``ratio = final_loss / initial_loss`` (lower: more trainable)."""

    initial_loss: float
    final_loss: float
    ratio: float
    curve: list[float] = field(default_factory=list)
    steps: int = 0
    lr: float = 0.0
    seed: int = 0

    def as_metrics(self, prefix: str = "trainability_") -> dict[str, float]:
        return {
            f"{prefix}initial_loss": self.initial_loss,
            f"{prefix}final_loss": self.final_loss,
            f"{prefix}ratio": self.ratio,
        }


def _call(model: nn.Module, batch: Any, forward: Callable[[nn.Module, Any], torch.Tensor] | None) -> torch.Tensor:
    out = forward(model, batch) if forward is not None else model(batch)
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"trainability: the model returned {type(out).__name__}, not a tensor; "
            "pass forward=lambda model, batch: ... to select the output to fit"
        )
    return out


def _fusable(params: Sequence[torch.Tensor]) -> bool:
    """Whether torch's fused Adam kernel takes ``params`` (floating point, all on the CPU or all
    on CUDA): one kernel per step instead of about ten small ops per tensor, the same formula
    (docs/performance.md)."""
    return all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params) and (
        len({p.device.type for p in params}) == 1
    )


def _random_targets(
    model: nn.Module, batch: Any, forward: Callable[[nn.Module, Any], torch.Tensor] | None
) -> torch.Tensor:
    """Outputs of a re-initialized copy of ``model``, standardized per output unit (uses the global RNG)."""
    fresh = private_copy(model)
    for module in fresh.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
    with torch.no_grad():
        y = _call(fresh, batch, forward).detach().to(torch.float32)
    flat = y.reshape(y.shape[0], -1) if y.ndim > 1 else y.reshape(-1, 1)
    std = flat.std(dim=0, correction=0)
    flat = (flat - flat.mean(dim=0)) / torch.where(std > 0, std, torch.ones_like(std))
    return flat.reshape(y.shape)


def trainability(
    model: nn.Module,
    batch: Any,
    *,
    steps: int = 100,
    lr: float = 1e-3,
    seed: int = 0,
    forward: Callable[[nn.Module, Any], torch.Tensor] | None = None,
) -> TrainabilityResult:
    """Fit random targets on a private copy of ``model``; see the module docstring for the protocol.

    Args:
        model: any module whose output (or ``forward(model, batch)``) is a tensor with the
            samples on dim 0.
        batch: the inputs, passed as ``model(batch)``.
        steps: Adam steps (full batch). 100 at lr 1e-3 take about 0.1 s on the paper's Q-network
            (4 → 64 → 64 → 2, batch 512, one CPU thread); see docs/performance.md.
        lr: Adam learning rate (PyTorch defaults otherwise).
        seed: seeds the target network and anything random in the copy's forward (dropout).
        forward: ``forward(model, batch) -> Tensor`` when the output to fit is not ``model(batch)``.

    Returns a :class:`TrainabilityResult`; ``curve[t]`` is the loss before step t, ``curve[steps]``
    the final loss. A non-finite loss propagates as ``nan``; nothing raises for it.
    """
    if steps < 1:
        raise ValueError(f"trainability: steps must be >= 1, got {steps}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("trainability: the model has no parameters that require grad")
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda), torch.enable_grad():
        torch.manual_seed(seed)
        targets = _random_targets(model, batch, forward)
        learner = private_copy(model)
        trainable = [p for p in learner.parameters() if p.requires_grad]
        for p in learner.parameters():
            p.grad = None
        opt = torch.optim.Adam(trainable, lr=lr, fused=_fusable(trainable))
        curve: list[float] = []
        for _ in range(steps):
            loss = (_call(learner, batch, forward).to(torch.float32) - targets).square().mean()
            curve.append(float(loss.detach()))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            curve.append(float((_call(learner, batch, forward).to(torch.float32) - targets).square().mean()))
    initial, final = curve[0], curve[-1]
    ratio = final / initial if initial > 0 else math.nan
    return TrainabilityResult(
        initial_loss=initial, final_loss=final, ratio=ratio, curve=curve, steps=steps, lr=lr, seed=seed
    )
