"""Shared test helpers."""

from __future__ import annotations

from typing import Any

from reference_agent.config import DQNConfig

TINY_RUN: dict[str, Any] = dict(
    total_steps=1500,
    learning_starts=300,
    batch_size=32,
    eval_every=500,
    eval_episodes=2,
    probe_every=300,
    probe_batch_size=64,
    checkpoint_every=400,
    log_every=100,
    target_update_period=100,
)
"""A CartPole run of a few seconds: small batches, frequent logging, probing and checkpoints."""


def tiny_config(**overrides: Any) -> DQNConfig:
    return DQNConfig(**{**TINY_RUN, **overrides})
