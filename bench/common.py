"""Shared helpers for the benchmarks: the paper's Q-network sizes and a timing loop."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

OBS_DIM, N_ACTIONS, BATCH = 8, 4, 512  # LunarLander sizes, the paper's batch


def time_per_call(fn: Callable[[], object], repeats: int, warmup: int = 20) -> float:
    """Median of 5 rounds of the mean time per call, in seconds."""
    for _ in range(warmup):
        fn()
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        rounds.append((time.perf_counter() - start) / repeats)
    return sorted(rounds)[2]


def one_thread() -> None:
    torch.set_num_threads(1)


def nature_cnn(n_actions: int = 6) -> nn.Module:
    """CleanRL's ``dqn_atari`` QNetwork (Mnih et al. 2015), for 4 × 84 × 84 frames scaled to [0, 1]."""
    return nn.Sequential(
        nn.Conv2d(4, 32, 8, stride=4), nn.ReLU(),
        nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),
        nn.Conv2d(64, 64, 3, stride=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(3136, 512), nn.ReLU(), nn.Linear(512, n_actions),
    )  # fmt: skip
