"""Stable-Baselines3's DQN with the successive penalty in its loss and plasticity in its logs.

python examples/sb3_dqn.py --timesteps 50000 --out runs/sb3
"""

from __future__ import annotations

import argparse
from pathlib import Path

from stable_baselines3.common.logger import configure

import plasticity_probe as pp
from plasticity_probe.integrations.sb3 import ProbeCallback, RegularizedDQN


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env-id", default="CartPole-v1")
    parser.add_argument("--timesteps", type=int, default=50_000)
    parser.add_argument("--probe-every", type=int, default=1_000)
    parser.add_argument("--out", type=Path, default=Path("runs/sb3"))
    args = parser.parse_args()

    model = RegularizedDQN(
        "MlpPolicy",
        args.env_id,
        penalty="l2init",
        lam=0.01,
        delta=1.25,
        learning_starts=min(1_000, args.timesteps // 2),
        policy_kwargs={"net_arch": [64, 64]},
        seed=0,
    )
    model.set_logger(configure(str(args.out), ["stdout", "csv"]))  # plasticity/... columns in progress.csv
    with pp.JsonlSink(args.out / "plasticity.jsonl") as sink:
        model.learn(args.timesteps, callback=ProbeCallback(every=args.probe_every, sinks=[sink]))
    print(f"SB3 logs in {args.out / 'progress.csv'}, plasticity rows in {args.out / 'plasticity.jsonl'}")


if __name__ == "__main__":
    main()
