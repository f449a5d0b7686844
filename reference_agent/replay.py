"""Preallocated circular replay buffers of K runs in lockstep, one stacked tensor of rows.

The runs of a batch add one transition each per environment step, so they share the write
position and the fill level; each run samples its own indices from its own generator. Sampling
all runs is one ``index_select`` on the flattened storage.

Each transition also holds its *next-state value* ``max_a' Q_target(s', a')`` under the run's
current target network, which the engine keeps up to date (``set_next_values``: all rows after
every target-network update, each new row as it is added): the TD target of a sampled transition
then needs no forward pass of the target network, whose parameters change only every τ steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

FIELDS = ("obs", "actions", "rewards", "next_obs", "terminated")


def _same(x: torch.Tensor) -> torch.Tensor:
    return x


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
    next_value: torch.Tensor | None = None
    """``max_a' Q_target(s', a')`` of each transition (sampled from a buffer), or None."""

    def as_dict(self) -> dict[str, torch.Tensor]:
        """The transitions' fields (``FIELDS``; not ``next_value``, which depends on the target)."""
        return {k: getattr(self, k) for k in FIELDS}

    def run(self, k: int) -> Batch:
        """Run k's minibatch of a stacked batch."""
        value = None if self.next_value is None else self.next_value[k]
        return Batch(**{name: t[k] for name, t in self.as_dict().items()}, next_value=value)


class StackedReplay:
    """``k`` circular buffers of ``capacity`` transitions with ``obs_dim``-float observations.

    A transition is one row of ``2 obs_dim + 4`` floats (observation, next observation, action,
    reward, terminated, next-state value: actions are small integers, exact in float32), so that
    sampling reads one contiguous row per transition instead of one cache line per field."""

    def __init__(self, k: int, capacity: int, obs_dim: int, device: torch.device | str = "cpu") -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.k, self.capacity, self.obs_dim = k, capacity, obs_dim
        self.rows = torch.zeros((k, capacity, 2 * obs_dim + 4), device=device)
        self._offsets = np.arange(k, dtype=np.int64)[:, None] * capacity
        # a zero-copy numpy view of the CPU buffer (``rows`` is only ever written in place), for
        # sampling: numpy's gather and field views cost less than torch's per-op dispatch here
        self._rows_np = self.rows.numpy() if self.rows.device.type == "cpu" else None
        self.pos = 0
        self.size = 0

    def add(
        self, obs: np.ndarray, actions: np.ndarray, rewards: np.ndarray, next_obs: np.ndarray, terminated: np.ndarray
    ) -> None:
        """One transition per run: arrays with a leading dimension of ``k``."""
        row = np.zeros((self.k, 2 * self.obs_dim + 4), dtype=np.float32)
        d = self.obs_dim
        row[:, :d], row[:, d : 2 * d] = obs, next_obs
        row[:, 2 * d], row[:, 2 * d + 1], row[:, 2 * d + 2] = actions, rewards, terminated
        self.rows[:, self.pos] = torch.from_numpy(row).to(self.rows.device)
        self.pos = (self.pos + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    @property
    def next_value_column(self) -> int:
        return 2 * self.obs_dim + 3

    def next_obs_rows(self, start: int, stop: int) -> torch.Tensor:
        """The next observations of rows ``start:stop`` of every run ``(k, stop − start, obs_dim)``."""
        return self.rows[:, start:stop, self.obs_dim : 2 * self.obs_dim]

    def set_next_values(self, start: int, values: torch.Tensor, runs: slice = slice(None)) -> None:
        """Next-state values ``(k', n)`` of rows ``start:start + n`` of the runs ``runs``."""
        self.rows[runs, start : start + values.shape[1], self.next_value_column] = values

    def sample(self, rngs: list[np.random.Generator], batch_size: int) -> Batch:
        """Uniform samples with replacement, run k's indices from ``rngs[k]``."""
        if self.size == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        idx = np.empty((self.k, batch_size), dtype=np.int64)
        for i, rng in enumerate(rngs):
            idx[i] = rng.integers(0, self.size, size=batch_size)
        return self.gather(idx)

    def gather(self, indices: np.ndarray) -> Batch:
        """``indices``: ``(k, B)`` positions per run."""
        idx = np.asarray(indices, dtype=np.int64)
        if self.k > 1:
            idx = idx + self._offsets
        if self._rows_np is not None:  # at K = 1, 27 µs against 54 through torch (docs/performance.md)
            return self._fields(np.take(self._rows_np.reshape(self.k * self.capacity, -1), idx, axis=0))
        flat = torch.from_numpy(idx).to(self.rows.device).view(-1)
        return self._fields(self.rows.view(self.k * self.capacity, -1).index_select(0, flat).view(*idx.shape, -1))

    def run_rows(self, k: int, positions: torch.Tensor) -> Batch:
        """Run k's transitions at ``positions`` (leading dim B), without next-state values (they
        change with the target network)."""
        return dataclasses.replace(self._fields(self.rows[k].index_select(0, positions)), next_value=None)

    def _fields(self, rows: torch.Tensor | np.ndarray) -> Batch:
        """The fields of ``rows`` (a tensor, or an array the tensors share memory with): ``obs``
        (the update's matrix-product input) and ``actions`` copied, the others views into
        ``rows``; the same layout either way."""
        d = self.obs_dim
        if isinstance(rows, np.ndarray):
            obs, actions = (
                torch.from_numpy(np.ascontiguousarray(rows[..., :d])),
                torch.from_numpy(rows[..., 2 * d].astype(np.int64)),
            )
            view: Callable[[Any], torch.Tensor] = torch.from_numpy
        else:
            obs, actions, view = rows[..., :d].contiguous(), rows[..., 2 * d].long(), _same
        return Batch(
            obs=obs,
            actions=actions,
            rewards=view(rows[..., 2 * d + 1]),
            next_obs=view(rows[..., d : 2 * d]),
            terminated=view(rows[..., 2 * d + 2]),
            next_value=view(rows[..., 2 * d + 3]),
        )

    def state_dict(self, k: int) -> dict[str, object]:
        """Run k's buffer in the checkpoint format: ``pos``, ``size`` and the filled rows of each
        field (``obs``, ``next_obs``: ``(n, obs_dim)`` float32; ``actions``: int64; ``rewards``,
        ``terminated``, ``next_value``: float32)."""
        n = self.size
        batch = self._fields(self.rows[k, :n])
        assert batch.next_value is not None
        fields = {**batch.as_dict(), "next_value": batch.next_value}
        return {"pos": self.pos, "size": n, **{f: v.to("cpu", copy=True) for f, v in fields.items()}}

    def load_state_dict(self, k: int, state: dict[str, object]) -> bool:
        """Restore run k's buffer; returns whether the state held next-state values (checkpoints
        written before they existed do not: the engine recomputes them)."""
        n = int(state["size"])  # type: ignore[call-overload]
        if n > self.capacity:
            raise ValueError(f"buffer state holds {n} transitions, capacity is {self.capacity}")
        fields: dict[str, torch.Tensor] = {}
        for f in FIELDS:
            value = state[f]
            assert isinstance(value, torch.Tensor)
            fields[f] = value
        d, device = self.obs_dim, self.rows.device
        target = self.rows[k, :n]
        target[:, :d] = fields["obs"].to(device)
        target[:, d : 2 * d] = fields["next_obs"].to(device)
        for column, f in ((2 * d, "actions"), (2 * d + 1, "rewards"), (2 * d + 2, "terminated")):
            target[:, column] = fields[f].to(device)
        value = state.get("next_value")
        if isinstance(value, torch.Tensor):
            target[:, self.next_value_column] = value.to(device)
        self.pos, self.size = int(state["pos"]), n  # type: ignore[call-overload]
        return isinstance(value, torch.Tensor)
