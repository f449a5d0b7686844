"""A preallocated circular replay buffer: NumPy arrays shared with torch views, no per-step
Python objects."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Batch:
    """A minibatch of transitions; ``terminated`` is 1.0 only for true terminal states (a time-limit
    truncation is not terminal, so its next state is bootstrapped)."""

    obs: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    next_obs: torch.Tensor
    terminated: torch.Tensor

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in ("obs", "actions", "rewards", "next_obs", "terminated")}


class ReplayBuffer:
    """Circular buffer of ``capacity`` transitions with observations of ``obs_dim`` floats."""

    def __init__(self, capacity: int, obs_dim: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self.obs = np.zeros((capacity, obs_dim), dtype=np.float32)
        self.next_obs = np.zeros((capacity, obs_dim), dtype=np.float32)
        self.actions = np.zeros(capacity, dtype=np.int64)
        self.rewards = np.zeros(capacity, dtype=np.float32)
        self.terminated = np.zeros(capacity, dtype=np.float32)
        self._t = {k: torch.from_numpy(getattr(self, k)) for k in Batch.__dataclass_fields__}
        self.pos = 0
        self.size = 0

    def add(self, obs: np.ndarray, action: int, reward: float, next_obs: np.ndarray, terminated: bool) -> None:
        i = self.pos
        self.obs[i] = obs
        self.next_obs[i] = next_obs
        self.actions[i] = action
        self.rewards[i] = reward
        self.terminated[i] = terminated
        self.pos = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, rng: np.random.Generator, batch_size: int) -> Batch:
        """Uniform sample with replacement from the stored transitions."""
        if self.size == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        return self.gather(rng.integers(0, self.size, size=batch_size))

    def gather(self, indices: np.ndarray) -> Batch:
        idx = torch.from_numpy(np.asarray(indices, dtype=np.int64))
        return Batch(**{k: t.index_select(0, idx) for k, t in self._t.items()})

    def state_dict(self) -> dict[str, object]:
        n = self.size
        return {
            "pos": self.pos,
            "size": n,
            **{k: t[:n].clone() for k, t in self._t.items()},
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        n = int(state["size"])  # type: ignore[call-overload]
        if n > self.capacity:
            raise ValueError(f"buffer state holds {n} transitions, capacity is {self.capacity}")
        for k, t in self._t.items():
            src = state[k]
            assert isinstance(src, torch.Tensor)
            t[:n] = src
        self.pos, self.size = int(state["pos"]), n  # type: ignore[call-overload]
