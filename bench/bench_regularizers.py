"""Time of one DQN update at the paper's sizes (8 → 64 → 64 → 4, batch 512, Adam) without a
regularizer and with each penalty, measured in the same run.

    python bench/bench_regularizers.py
"""

from __future__ import annotations

import copy

import torch

import plasticity_probe as pp
from bench.common import BATCH, N_ACTIONS, OBS_DIM, one_thread, time_per_call
from reference_agent.engine import td_loss
from reference_agent.network import QNetwork
from reference_agent.replay import Batch


def update_time(penalty: str, batch: Batch) -> float:
    """Seconds per DQN update (TD loss + penalty, backward, fused Adam step)."""
    torch.manual_seed(0)
    q = QNetwork(OBS_DIM, N_ACTIONS)
    target = copy.deepcopy(q)
    optimizer = torch.optim.Adam(q.parameters(), lr=1e-3, fused=True)
    reg = None
    if penalty != "none":
        reg = pp.SuccessiveRegularizer(q, penalty, lam=0.01, delta=1.25, example_input=batch.obs[:1])

    def update() -> None:
        loss = td_loss(q, target, batch, 0.99)[0]
        if reg is not None:
            loss = loss + reg(1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return time_per_call(update, repeats=200)


def main() -> None:
    one_thread()
    torch.manual_seed(0)
    batch = Batch(
        obs=torch.randn(BATCH, OBS_DIM),
        actions=torch.randint(0, N_ACTIONS, (BATCH,)),
        rewards=torch.randn(BATCH),
        next_obs=torch.randn(BATCH, OBS_DIM),
        terminated=torch.zeros(BATCH),
    )
    results = {penalty: update_time(penalty, batch) for penalty in ("none", "l2", "l2init", "l1", "singular")}
    base = results["none"]
    print(f"{'penalty':10s} {'µs/update':>10s} {'ratio':>6s}")
    for name, seconds in results.items():
        print(f"{name:10s} {seconds * 1e6:10.0f} {seconds / base:6.2f}")


if __name__ == "__main__":
    main()
