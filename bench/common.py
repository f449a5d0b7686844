"""Shared helpers for the benchmarks: the paper's Q-network sizes and a timing loop."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

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
