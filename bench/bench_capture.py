"""Cost of capturing features (hooks, the data-flow mode and the feature copies) against the same
forward pass without capture, measured in the same run, on the paper's Q-network and CleanRL's
Nature-CNN Q-network.

    python -m bench.bench_capture
"""

from __future__ import annotations

import torch
from torch import nn

from bench.common import BATCH, N_ACTIONS, OBS_DIM, nature_cnn, one_thread, time_per_call
from plasticity_probe.layers import DataFlowTracer
from reference_agent.network import QNetwork


def ratio(model: nn.Module, batch: torch.Tensor, repeats: int) -> tuple[float, float]:
    """(seconds per plain no-grad forward, seconds per captured forward incl. building the trace)."""
    tracer = DataFlowTracer(model)

    def plain() -> None:
        with torch.no_grad():
            model(batch)

    def captured() -> None:
        with tracer.record(), torch.no_grad():
            model(batch)
        tracer.trace()

    return time_per_call(plain, repeats), time_per_call(captured, repeats)


def main() -> None:
    one_thread()
    torch.manual_seed(0)
    qnet = f"paper Q-net {OBS_DIM}-64-64-{N_ACTIONS}"
    cases = [
        (f"{qnet}, batch {BATCH}", QNetwork(OBS_DIM, N_ACTIONS), torch.randn(BATCH, OBS_DIM), 2000),
        (f"{qnet}, batch 4096", QNetwork(OBS_DIM, N_ACTIONS), torch.randn(4096, OBS_DIM), 500),
        ("Nature CNN, batch 32", nature_cnn(), torch.rand(32, 4, 84, 84), 20),
    ]
    print("| network | forward (µs) | captured (µs) | ratio |")
    print("|---|---|---|---|")
    for name, model, batch, repeats in cases:
        plain, captured = ratio(model, batch, repeats)
        print(f"| {name} | {plain * 1e6:.0f} | {captured * 1e6:.0f} | {captured / plain:.2f}× |")


if __name__ == "__main__":
    main()
