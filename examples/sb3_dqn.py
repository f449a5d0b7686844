"""Stable-Baselines3's DQN with the successive penalty in its loss and plasticity in its logs.

python examples/sb3_dqn.py --timesteps 50000 --out runs/sb3

Quiet by default (SB3's logs go to OUT/progress.csv; ``--verbose`` also prints them). The DQN
settings are RL Zoo's tuned CartPole-v1 hyperparameters, with which it learns the task in 50,000
steps; at the end the greedy policy is evaluated and its mean return printed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.logger import configure

import plasticity_probe as pp
from plasticity_probe.integrations.sb3 import ProbeCallback, RegularizedDQN

CARTPOLE = dict(
    learning_rate=2.3e-3,
    batch_size=64,
    buffer_size=100_000,
    gamma=0.99,
    target_update_interval=10,
    train_freq=256,
    gradient_steps=128,
    exploration_fraction=0.16,
    exploration_final_eps=0.04,
)
"""RL Zoo's hyperparameters for DQN on CartPole-v1 (rl-baselines3-zoo, hyperparams/dqn.yml)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env-id", default="CartPole-v1")
    parser.add_argument("--timesteps", type=int, default=50_000)
    parser.add_argument("--penalty", default="l2init", choices=["l2", "l2init", "l1", "singular"])
    parser.add_argument("--lam", type=float, default=1e-4)
    parser.add_argument("--delta", type=float, default=1.25)
    parser.add_argument("--probe-every", type=int, default=1_000)
    parser.add_argument("--eval-episodes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/sb3"))
    parser.add_argument("--verbose", action="store_true", help="Also print SB3's logs on stdout.")
    args = parser.parse_args()
    torch.set_num_threads(1)  # small networks: one thread is fastest

    model = RegularizedDQN(
        "MlpPolicy",
        args.env_id,
        penalty=args.penalty,
        lam=args.lam,
        delta=args.delta,
        learning_starts=min(1_000, args.timesteps // 2),
        policy_kwargs={"net_arch": [256, 256]},
        seed=args.seed,
        **CARTPOLE,
    )
    outputs = ["stdout", "csv"] if args.verbose else ["csv"]
    model.set_logger(configure(str(args.out), outputs))  # plasticity/... columns in progress.csv
    with pp.JsonlSink(args.out / "plasticity.jsonl") as sink:
        model.learn(args.timesteps, callback=ProbeCallback(every=args.probe_every, sinks=[sink]))
    mean, std = evaluate_policy(model, model.get_env(), n_eval_episodes=args.eval_episodes, deterministic=True)
    print(f"greedy return over {args.eval_episodes} episodes: {mean:.1f} ± {std:.1f}")
    print(f"SB3 logs in {args.out / 'progress.csv'}, plasticity rows in {args.out / 'plasticity.jsonl'}")


if __name__ == "__main__":
    main()
