"""The reference agent's checkpoint format (version 3; versions 1 and 2 are upgraded on load).

A ``torch.save`` dict that ``torch.load(path, weights_only=True)`` reads (tensors, numbers,
strings, lists and dicts only)::

    format        "plasticity-probe/dqn-checkpoint"
    version       3
    checksum      SHA-256 of every other entry (``plasticity_probe.checkpoints.content_digest``),
                  verified on load (version 3 on)
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
    buffer        {"pos", "size", "obs", "actions", "rewards", "next_obs", "terminated", "next_value"}
    probe_batch   {"obs", "actions", "rewards", "next_obs", "terminated"} or None
    stats         {"sums": float64 tensor [td_loss, q, target, penalty], "count"}: the open log interval
                  (version 1 had no penalty sum, and logged TD loss + penalty as the loss)
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from plasticity_probe.checkpoints import content_digest, verify_digest
from reference_agent.config import DQNConfig
from reference_agent.network import check_architecture
from reference_agent.rundir import atomic_write

FORMAT = "plasticity-probe/dqn-checkpoint"
VERSION = 3


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Serialize in memory, then write atomically (temporary file, fsync, rename): a failed
    write (a full disk) raises ``OSError`` naming the file and keeps the previous checkpoint."""
    data = {"format": FORMAT, "version": VERSION, **payload}
    data["checksum"] = content_digest(data)
    buffer = io.BytesIO()
    torch.save(data, buffer)
    atomic_write(path, lambda f: f.write(buffer.getbuffer()))


def is_agent_checkpoint(data: Any) -> bool:
    return isinstance(data, dict) and data.get("format") == FORMAT


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load with ``weights_only=True`` and verify the checksum; raises ``ValueError`` for
    anything but this format, a corrupt file, or weights that are not the config's network."""
    try:
        with path.open("rb") as f:
            data = torch.load(f, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as err:  # torch raises many types on damaged files
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"{path} is truncated or corrupt ({first})") from None
    if not is_agent_checkpoint(data):
        raise ValueError(f"{path} is not a reference-agent checkpoint")
    if data["version"] == 1:  # upgrade: add the penalty sum (its loss sum already included the penalty)
        sums = data["stats"]["sums"]
        data["stats"]["sums"] = torch.cat([sums, sums.new_zeros(1)])
        data["version"] = 2
    if data["version"] == 2:  # version 2 had no checksum
        data["version"] = VERSION
    elif data["version"] == VERSION:
        verify_digest(data, str(path))
    else:
        raise ValueError(f"{path}: checkpoint version {data['version']} is not supported (want {VERSION})")
    hidden = DQNConfig.from_dict(data["config"]).hidden_sizes
    check_architecture({k: data[k] for k in ("online", "target", "init")}, hidden, str(path))
    return data
