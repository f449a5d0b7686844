"""Steps per second of the reference DQN and of Stable-Baselines3's DQN at equal settings, each on
one thread, measured in the same run.

Equal settings: MLP 64-64 ReLU, batch 512, Adam lr 1e-3, γ 0.99, target update every 1000 steps,
learning starts at step LEARNING_STARTS, ε 1 → 0.02 over the first 10% of steps, one gradient step
per environment step, replay holding every transition. SB3 keeps its Huber loss and gradient
clipping (same cost as MSE); our agent's periodic evaluation and probing are pushed past the end
(one final evaluation of 1 episode remains).

    python -m bench.bench_dqn [--steps 30000] [--learning-starts 5000] [--env CartPole-v1]

Ours twice: with the eager update and compiled by inductor (``EngineOptions.compile``; its
one-off compilation counts in the time, as it does in a user's run).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch


def ours(env_id: str, steps: int, learning_starts: int, compile: bool) -> float:
    from reference_agent.config import DQNConfig
    from reference_agent.engine import EngineOptions, train

    cfg = DQNConfig(
        env_id=env_id,
        total_steps=steps,
        learning_starts=learning_starts,
        eval_every=steps,
        eval_episodes=1,
        probe_every=0,
        checkpoint_every=steps,
        log_every=1000,
        threads=1,
    )
    out = Path(tempfile.mkdtemp())
    try:
        start = time.perf_counter()
        train(cfg, out / "run", options=EngineOptions(compile=compile))
        return steps / (time.perf_counter() - start)
    finally:
        shutil.rmtree(out)


def sb3(env_id: str, steps: int, learning_starts: int) -> float:
    from stable_baselines3 import DQN

    torch.set_num_threads(1)
    model = DQN(
        "MlpPolicy",
        env_id,
        learning_rate=1e-3,
        buffer_size=steps,
        learning_starts=learning_starts,
        batch_size=512,
        gamma=0.99,
        train_freq=1,
        gradient_steps=1,
        target_update_interval=1000,
        exploration_fraction=0.1,
        exploration_initial_eps=1.0,
        exploration_final_eps=0.02,
        policy_kwargs={"net_arch": [64, 64]},
        seed=0,
        verbose=0,
        device="cpu",
    )
    start = time.perf_counter()
    model.learn(steps)
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--env", default="CartPole-v1")
    parser.add_argument("--steps", type=int, default=30_000)
    parser.add_argument("--learning-starts", type=int, default=5_000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    theirs = sb3(args.env, args.steps, args.learning_starts)
    eager = ours(args.env, args.steps, args.learning_starts, compile=False)
    compiled = ours(args.env, args.steps, args.learning_starts, compile=True)
    print(f"{args.env}, {args.steps} steps, learning starts {args.learning_starts}, batch 512, 1 thread")
    print("| agent | steps/s | ratio to SB3 |")
    print("|---|---|---|")
    print(f"| Stable-Baselines3 DQN | {theirs:,.0f} | 1.00× |")
    print(f"| reference DQN, eager update | {eager:,.0f} | {eager / theirs:.2f}× |")
    print(f"| reference DQN, compiled update (compilation included) | {compiled:,.0f} | {compiled / theirs:.2f}× |")


if __name__ == "__main__":
    main()
