"""The Q-network: an MLP with ReLU hidden layers (the paper: two hidden layers of width 64)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn


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
