"""Cost of the gradient metrics, distance from initialization and the trainability probe,
against one DQN update at the paper's sizes (8 → 64 → 64 → 4, batch 512: TD loss, backward,
fused Adam step), measured in the same run, one torch thread.

    python -m bench.bench_probes

The gradient metrics are timed through the library, as a user calls them:
``Probe.measure(loss_fn=td_loss, gradients=True)`` against ``Probe.measure()`` on the same batch
(one differentiable capture of the closure and one ``torch.autograd.grad`` for every parameter
and every layer's pre-activation output, plus the per-layer reductions).
"""

from __future__ import annotations

import copy
import time

import torch

import plasticity_probe as pp
from bench.common import BATCH, N_ACTIONS, OBS_DIM, one_thread, time_per_call
from reference_agent.engine import td_loss
from reference_agent.network import QNetwork
from reference_agent.replay import Batch


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
    q = QNetwork(OBS_DIM, N_ACTIONS)
    target = copy.deepcopy(q)
    optimizer = torch.optim.Adam(q.parameters(), lr=1e-3, fused=True)
    probe = pp.Probe(q, probe_batch=batch.obs)  # θ_0 for distance_from_init: now

    def update() -> None:
        loss = td_loss(q, target, batch, 0.99)[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def closure() -> torch.Tensor:
        return td_loss(q, target, batch, 0.99)[0]

    update_s = time_per_call(update, repeats=200)
    features = time_per_call(lambda: probe.measure(), repeats=50)
    with_gradients = time_per_call(lambda: probe.measure(loss_fn=closure, gradients=True), repeats=50)
    rows = {
        "one DQN update (reference)": update_s,
        "Probe.measure(): weight and feature metrics incl. distance_from_init, 3 layers": features,
        "Probe.measure(loss_fn, gradients=True): the same + gradient metrics": with_gradients,
        "gradient metrics alone (the difference)": with_gradients - features,
        "distance_from_init, whole network": time_per_call(
            lambda: pp.distance_from_init(q, list(probe.init.values())), repeats=200
        ),
    }
    pp.trainability(q, batch.obs, steps=2)  # warm-up
    times = []
    for seed in range(5):
        start = time.perf_counter()
        result = pp.trainability(q, batch.obs, seed=seed)
        times.append(time.perf_counter() - start)
    rows[f"trainability (defaults: {result.steps} Adam steps, lr {result.lr})"] = sorted(times)[2]
    print("| measurement | µs per call | ratio to one update |")
    print("|---|---|---|")
    for name, seconds in rows.items():
        print(f"| {name} | {seconds * 1e6:,.0f} | {seconds / update_s:.2f} |")


if __name__ == "__main__":
    main()
