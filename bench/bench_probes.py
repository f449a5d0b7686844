"""Cost of the gradient metrics, distance from initialization and the trainability probe,
against one DQN update at the paper's sizes (8 → 64 → 64 → 4, batch 512: TD loss, backward,
fused Adam step), measured in the same run, one torch thread.

    python -m bench.bench_probes

The gradient metrics are timed from the TD-loss closure, as ``Probe.measure(gradients=True)``
will call them: one ``torch.autograd.grad`` of the TD loss (pre-activation gradients for GraMa
via ``retain_grad``) plus the per-layer reductions.
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
    init = [p.detach().clone() for p in q.parameters()]
    optimizer = torch.optim.Adam(q.parameters(), lr=1e-3, fused=True)
    linears = [m for m in q.modules() if isinstance(m, torch.nn.Linear)]

    def update() -> None:
        loss = td_loss(q, target, batch, 0.99)[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def grad_metrics() -> None:
        pre: list[torch.Tensor] = []
        hooks = [m.register_forward_hook(lambda _m, _i, out: (out.retain_grad(), pre.append(out))[1]) for m in linears]
        loss = td_loss(q, target, batch, 0.99)[0]
        for h in hooks:
            h.remove()
        params = [list(m.parameters()) for m in linears]
        grads = torch.autograd.grad(loss, [p for ps in params for p in ps] + pre)
        offset = 0
        for i, ps in enumerate(params):
            g = grads[offset : offset + len(ps)]
            offset += len(ps)
            pp.grad_norm(g)
            pp.grad_to_weight_ratio(g, ps)
            pp.grad_dormant_fraction(grads[-len(pre) + i])

    def distance() -> None:
        for m, (w0, b0) in zip(linears, zip(init[::2], init[1::2], strict=True), strict=True):
            pp.distance_from_init(m, [w0, b0])

    update_s = time_per_call(update, repeats=200)
    rows = {
        "one DQN update (reference)": update_s,
        "grad_norm + grad_to_weight_ratio + grad_dormant_fraction, 3 layers": time_per_call(grad_metrics, repeats=100),
        "distance_from_init, 3 layers": time_per_call(distance, repeats=200),
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
