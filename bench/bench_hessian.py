"""Time and Hessian-vector products for λ_max and λ_min of the paper's Q-network TD loss
(8 → 64 → 64 → 4, batch 512), against the dense Hessian measured in the same run.

    python bench/bench_hessian.py
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch

import plasticity_probe as pp
from bench.common import BATCH, N_ACTIONS, OBS_DIM, one_thread
from plasticity_probe.hessian import HessianOperator
from reference_agent.dqn import td_loss
from reference_agent.network import QNetwork
from reference_agent.replay import Batch


def main() -> None:
    one_thread()
    torch.manual_seed(0)
    q = QNetwork(OBS_DIM, N_ACTIONS)
    target = copy.deepcopy(q)
    with torch.no_grad():  # a target that differs from the online net, as during training
        for p in target.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = Batch(
        obs=torch.randn(BATCH, OBS_DIM),
        actions=torch.randint(0, N_ACTIONS, (BATCH,)),
        rewards=torch.randn(BATCH),
        next_obs=torch.randn(BATCH, OBS_DIM),
        terminated=(torch.rand(BATCH) < 0.05).float(),
    )

    def loss() -> torch.Tensor:
        return td_loss(q, target, batch, 0.99)[0]

    start = time.perf_counter()
    dense = torch.linalg.eigvalsh(HessianOperator(loss, list(q.parameters())).dense())
    dense_s = time.perf_counter() - start
    ref_max, ref_min = float(dense[-1]), float(dense[0])
    times, spec = [], None
    for _ in range(5):
        start = time.perf_counter()
        spec = pp.hessian_spectrum(loss, q)
        times.append(time.perf_counter() - start)
    assert spec is not None
    lanczos_s = float(np.median(times))
    print(f"parameters: {spec.n_params}")
    print(f"dense Hessian + eigvalsh: {dense_s:.2f} s ({spec.n_params} HVPs)")
    print(f"Lanczos λ_max and λ_min:  {lanczos_s:.3f} s ({spec.n_hvp} HVPs), {dense_s / lanczos_s:.0f}x faster")
    for name, got, ref in (("λ_max", spec.lambda_max, ref_max), ("λ_min", spec.lambda_min, ref_min)):
        print(f"{name} {got:.6g} vs dense {ref:.6g}: relative error {abs(got - ref) / abs(ref):.1e}")
    print(spec.condition_note)


if __name__ == "__main__":
    main()
