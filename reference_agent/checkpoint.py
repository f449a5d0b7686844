"""The reference agent's checkpoint format (version 2; version 1 files are upgraded on load).

A ``torch.save`` dict that ``torch.load(path, weights_only=True)`` reads (tensors, numbers,
strings, lists and dicts only)::

    format        "plasticity-probe/dqn-checkpoint"
    version       2
    config        DQNConfig.to_dict()
    versions      {"torch", "gymnasium", "numpy", "plasticity_probe"}
    step          environment steps taken
    online        state_dict of the online Q-network ("net.0.weight", …)
    target        state_dict of the target network
    init          state_dict of the online network at initialization (θ_0)
    optimizer     Adam state_dict
    rng           {"numpy": bit_generator.state, "torch": torch RNG state}
    episode       {"index", "actions" (int64 tensor), "return", "length"}: the episode in progress,
                  replayed from its reset seed on resume
    buffer        {"pos", "size", "obs", "actions", "rewards", "next_obs", "terminated"}
    probe_batch   {"obs", "actions", "rewards", "next_obs", "terminated"} or None
    stats         {"sums": float64 tensor [td_loss, q, target, penalty], "count"}: the open log interval
                  (version 1 had no penalty sum, and logged TD loss + penalty as the loss)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from reference_agent.rundir import atomic_write

FORMAT = "plasticity-probe/dqn-checkpoint"
VERSION = 2


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically (temporary file, fsync, rename)."""
    data = {"format": FORMAT, "version": VERSION, **payload}
    atomic_write(path, lambda f: torch.save(data, f))


def is_agent_checkpoint(data: Any) -> bool:
    return isinstance(data, dict) and data.get("format") == FORMAT


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load with ``weights_only=True``; raises ``ValueError`` for anything but this format."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not is_agent_checkpoint(data):
        raise ValueError(f"{path} is not a reference-agent checkpoint")
    if data["version"] == 1:  # upgrade: add the penalty sum (its loss sum already included the penalty)
        sums = data["stats"]["sums"]
        data["stats"]["sums"] = torch.cat([sums, sums.new_zeros(1)])
        data["version"] = VERSION
    if data["version"] != VERSION:
        raise ValueError(f"{path}: checkpoint version {data['version']} is not supported (want {VERSION})")
    return data
