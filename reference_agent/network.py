"""The Q-network: an MLP with ReLU hidden layers (the paper: two hidden layers of width 64)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

from plasticity_probe.checkpoints import CheckpointError


class QNetwork(nn.Module):
    """``obs_dim → hidden_sizes… → n_actions``, ReLU between layers, linear output."""

    def __init__(self, obs_dim: int, n_actions: int, hidden_sizes: Sequence[int] = (64, 64)) -> None:
        super().__init__()
        sizes = [obs_dim, *hidden_sizes]
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(sizes):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], n_actions))
        self.net = nn.Sequential(*layers)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs)


def check_architecture(
    networks: dict[str, dict[str, torch.Tensor]], hidden_sizes: tuple[int, ...], what: str
) -> tuple[int, int]:
    """``(obs_dim, n_actions)`` of Q-networks whose weights are exactly the MLP that
    ``hidden_sizes`` declares; else ``CheckpointError`` (before any network is built: a config
    may declare layers far larger than the weights it carries)."""
    for name, sd in networks.items():
        widths = [sd[f"net.{2 * i}.weight"].shape for i in range(len(hidden_sizes) + 1) if f"net.{2 * i}.weight" in sd]
        if len(widths) != len(hidden_sizes) + 1 or any(len(s) != 2 for s in widths):
            raise CheckpointError(f"{what}: network {name!r} is not the MLP its config declares")
        found = tuple(s[0] for s in widths[:-1])
        chained = all(widths[i + 1][1] == widths[i][0] for i in range(len(hidden_sizes)))
        if found != tuple(hidden_sizes) or not chained:
            raise CheckpointError(
                f"{what}: config declares hidden_sizes {list(hidden_sizes)} but network {name!r} has "
                f"weights of shapes {[tuple(s) for s in widths]}"
            )
    online = networks["online"]
    return int(online["net.0.weight"].shape[1]), int(online[f"net.{2 * len(hidden_sizes)}.weight"].shape[0])
