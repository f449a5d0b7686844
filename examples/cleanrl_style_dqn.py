"""A hand-written DQN loop (CleanRL style) with plasticity_probe attached in a few lines.

The lines marked ``# probe`` are all it takes: a regularizer added to the loss, a Probe on a
fixed batch every N steps, and a sink. Run:

    python examples/cleanrl_style_dqn.py --total-steps 30000 --out runs/example
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import plasticity_probe as pp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env-id", default="CartPole-v1")
    parser.add_argument("--total-steps", type=int, default=30_000)
    parser.add_argument("--learning-starts", type=int, default=1_000)
    parser.add_argument("--probe-every", type=int, default=1_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/example"))
    args = parser.parse_args()

    torch.set_num_threads(1)  # tiny networks: extra threads cost more than they give
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    env = gym.make(args.env_id)
    obs_dim, n_actions = env.observation_space.shape[0], env.action_space.n
    q = nn.Sequential(nn.Linear(obs_dim, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, n_actions))
    target = nn.Sequential(nn.Linear(obs_dim, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, n_actions))
    target.load_state_dict(q.state_dict())
    optimizer = torch.optim.Adam(q.parameters(), lr=1e-3)
    reg = pp.SuccessiveRegularizer(q, "l2init", lam=0.01, delta=1.25, example_input=torch.zeros(1, obs_dim))  # probe
    sink = pp.JsonlSink(args.out / "plasticity.jsonl")  # probe
    probe: pp.Probe | None = None  # probe

    buffer: list[tuple[np.ndarray, int, float, np.ndarray, bool]] = []
    obs, _ = env.reset(seed=args.seed)
    episode_return = 0.0
    for step in range(1, args.total_steps + 1):
        eps = max(0.02, 1.0 - step / (0.1 * args.total_steps))
        if random.random() < eps:
            action = env.action_space.sample()
        else:
            with torch.no_grad():
                action = int(q(torch.as_tensor(obs)).argmax())
        next_obs, reward, terminated, truncated, _ = env.step(action)
        buffer.append((obs, action, float(reward), next_obs, terminated))
        episode_return += float(reward)
        obs = next_obs
        if terminated or truncated:
            print(f"step {step}: episode return {episode_return:.0f}")
            obs, _ = env.reset()
            episode_return = 0.0
        if step < args.learning_starts:
            continue
        idx = np.random.randint(len(buffer), size=128)
        o, a, r, o2, d = (np.array(x) for x in zip(*(buffer[i] for i in idx), strict=True))
        o, o2 = torch.as_tensor(o, dtype=torch.float32), torch.as_tensor(o2, dtype=torch.float32)
        with torch.no_grad():
            y = (
                torch.as_tensor(r, dtype=torch.float32)
                + 0.99 * (1 - torch.as_tensor(d, dtype=torch.float32)) * target(o2).max(1).values
            )
        q_sa = q(o).gather(1, torch.as_tensor(a)[:, None]).squeeze(1)
        loss = F.mse_loss(q_sa, y) + reg(step)  # probe: the successive penalty
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 500 == 0:
            target.load_state_dict(q.state_dict())
        if probe is None:  # probe: a fixed batch, drawn once, so that data drift is not mistaken for change
            probe = pp.Probe(q, probe_batch=o.clone())
        if step % args.probe_every == 0:  # probe
            report = probe.measure()
            sink.write(step, report)
            print(
                f"step {step}: penultimate effective rank {report.value('2', 'effective_rank'):.1f}, "
                f"dead {report.value('network', 'dead_fraction'):.2f}"
            )
    sink.close()
    print(f"plasticity metrics in {args.out / 'plasticity.jsonl'}")


if __name__ == "__main__":
    main()
