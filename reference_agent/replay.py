"""Preallocated circular replay buffers of K runs in lockstep, one stacked tensor per field.

The runs of a batch add one transition each per environment step, so they share the write
position and the fill level; each run samples its own indices from its own generator. Sampling
all runs is one ``index_select`` on the flattened storage.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

FIELDS = ("obs", "actions", "rewards", "next_obs", "terminated")


@dataclass
class Batch:
    """A minibatch of transitions (one run: leading dim B; K runs: ``(K, B, …)``); ``terminated``
    is 1.0 only for true terminal states (a time-limit truncation is not terminal, so its next
    state is bootstrapped)."""

    obs: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    next_obs: torch.Tensor
    terminated: torch.Tensor

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in FIELDS}

    def run(self, k: int) -> Batch:
        """Run k's minibatch of a stacked batch."""
        return Batch(**{name: t[k] for name, t in self.as_dict().items()})


class StackedReplay:
    """``k`` circular buffers of ``capacity`` transitions with ``obs_dim``-float observations."""

    def __init__(self, k: int, capacity: int, obs_dim: int, device: torch.device | str = "cpu") -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.k, self.capacity = k, capacity
        self.obs = torch.zeros((k, capacity, obs_dim), device=device)
        self.next_obs = torch.zeros((k, capacity, obs_dim), device=device)
        self.actions = torch.zeros((k, capacity), dtype=torch.int64, device=device)
        self.rewards = torch.zeros((k, capacity), device=device)
        self.terminated = torch.zeros((k, capacity), device=device)
        self._offsets = (torch.arange(k, device=device) * capacity).unsqueeze(1)
        self.pos = 0
        self.size = 0

    def add(
        self, obs: np.ndarray, actions: np.ndarray, rewards: np.ndarray, next_obs: np.ndarray, terminated: np.ndarray
    ) -> None:
        """One transition per run: arrays with a leading dimension of ``k``."""
        i = self.pos
        device = self.obs.device
        self.obs[:, i] = torch.as_tensor(obs, dtype=torch.float32, device=device)
        self.next_obs[:, i] = torch.as_tensor(next_obs, dtype=torch.float32, device=device)
        self.actions[:, i] = torch.as_tensor(actions, dtype=torch.int64, device=device)
        self.rewards[:, i] = torch.as_tensor(rewards, dtype=torch.float32, device=device)
        self.terminated[:, i] = torch.as_tensor(terminated, dtype=torch.float32, device=device)
        self.pos = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, rngs: list[np.random.Generator], batch_size: int) -> Batch:
        """Uniform samples with replacement, run k's indices from ``rngs[k]``."""
        if self.size == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        idx = np.stack([rng.integers(0, self.size, size=batch_size) for rng in rngs])
        return self.gather(idx)

    def gather(self, indices: np.ndarray) -> Batch:
        """``indices``: ``(k, B)`` positions per run."""
        idx = torch.from_numpy(np.asarray(indices, dtype=np.int64)).to(self.obs.device)
        flat = (idx + self._offsets).reshape(-1)
        out = {}
        for name in FIELDS:
            t: torch.Tensor = getattr(self, name)
            rows = t.reshape(self.k * self.capacity, *t.shape[2:]).index_select(0, flat)
            out[name] = rows.reshape(*idx.shape, *t.shape[2:])
        return Batch(**out)

    def state_dict(self, k: int) -> dict[str, object]:
        """Run k's buffer in the checkpoint format: ``pos``, ``size`` and the filled rows."""
        n = self.size
        return {"pos": self.pos, "size": n, **{f: getattr(self, f)[k, :n].to("cpu", copy=True) for f in FIELDS}}

    def load_state_dict(self, k: int, state: dict[str, object]) -> None:
        n = int(state["size"])  # type: ignore[call-overload]
        if n > self.capacity:
            raise ValueError(f"buffer state holds {n} transitions, capacity is {self.capacity}")
        for f in FIELDS:
            src = state[f]
            assert isinstance(src, torch.Tensor)
            getattr(self, f)[k, :n] = src.to(self.obs.device)
        self.pos, self.size = int(state["pos"]), n  # type: ignore[call-overload]
