"""Gradient metrics against torch.autograd.grad, hand values and a direct implementation of
GraMa; distance from initialization by hand; the trainability probe's protocol properties."""

from __future__ import annotations

import copy
import math
import random
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import nn

import plasticity_probe as pp
from plasticity_probe.metrics import NonFiniteWarning


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))


# ------------------------------------------------------------------ norms and distance


def test_grad_norm_and_ratio_against_autograd() -> None:
    net = mlp()
    x, y = torch.randn(32, 4), torch.randn(32, 2)
    grads = torch.autograd.grad(((net(x) - y) ** 2).mean(), list(net.parameters()))
    for layer, gs in ((net[0], grads[:2]), (net[4], grads[4:])):
        ref = torch.cat([g.reshape(-1) for g in gs]).double().norm().item()
        assert pp.grad_norm(gs) == pytest.approx(ref, rel=1e-12)
        w = torch.cat([p.detach().reshape(-1) for p in layer.parameters()]).double().norm().item()
        assert pp.grad_to_weight_ratio(gs, layer) == pytest.approx(ref / w, rel=1e-12)
    ref_all = math.sqrt(sum(float(g.double().square().sum()) for g in grads))
    assert pp.grad_norm(grads) == pytest.approx(ref_all, rel=1e-12)
    for p, g in zip(net.parameters(), grads, strict=True):
        p.grad = g
    assert pp.grad_norm(net) == pytest.approx(ref_all, rel=1e-12)  # a module gives its .grad


def test_grad_norm_hand_values_and_edge_cases() -> None:
    assert pp.grad_norm([torch.tensor([3.0, 0.0]), None, torch.tensor([[4.0]])]) == 5.0
    assert pp.grad_to_weight_ratio([torch.tensor([3.0, 4.0])], [torch.tensor([0.0, 10.0])]) == 0.5
    assert pp.grad_to_weight_ratio([torch.tensor([1.0])], [torch.zeros(2)]) == math.inf
    assert math.isnan(pp.grad_to_weight_ratio([torch.zeros(1)], [torch.zeros(2)]))
    with pytest.warns(NonFiniteWarning):
        assert math.isnan(pp.grad_norm([torch.tensor([float("nan")])]))


def test_distance_from_init_by_hand() -> None:
    layer = nn.Linear(2, 1)
    init = [p.detach().clone() for p in layer.parameters()]
    with torch.no_grad():
        layer.weight.add_(torch.tensor([[3.0, 0.0]]))
        layer.bias.sub_(4.0)
    assert pp.distance_from_init(layer, init) == pytest.approx(5.0, rel=1e-6)
    assert pp.distance_from_init(layer, layer) == 0.0
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    assert pp.distance_from_init(layer, state.values()) == 0.0
    with pytest.raises(ValueError, match="tensors against"):
        pp.distance_from_init(layer, init[:1])
    with pytest.raises(ValueError, match="shape"):
        pp.distance_from_init(layer, [torch.zeros(3), init[1]])


# ------------------------------------------------------------------ GraMa


def grama_direct(g: np.ndarray, tau: float, unit_dim: int) -> float:
    """The formula written out: per-unit mean |g| over every other axis, over the layer mean."""
    g = np.moveaxis(np.abs(g), unit_dim, -1)
    units = g.shape[-1]
    scores = []
    for i in range(units):
        scores.append(g[..., i].mean())
    layer_mean = sum(scores) / units
    if layer_mean == 0:
        return 1.0
    return sum(1 for s in scores if s / layer_mean <= tau) / units


def test_grama_hand_values() -> None:
    g = torch.tensor([[1.0, 0.0, 2.0], [-3.0, 0.0, 0.0]])  # per-unit mean |g| = 2, 0, 1; layer mean 1
    assert pp.grad_dormant_fraction(g) == pytest.approx(1 / 3)
    assert pp.grad_dormant_fraction(g, tau=1.0) == pytest.approx(2 / 3)  # scores 2, 0, 1 ≤ 1
    assert pp.grad_dormant_fraction(g, tau=0.0) == pytest.approx(1 / 3)
    assert pp.grad_dormant_fraction(torch.zeros(4, 3)) == 1.0
    conv = torch.zeros(2, 3, 2, 2)
    conv[:, 0] = 1.0  # channel 0 has gradient, channels 1, 2 none
    assert pp.grad_dormant_fraction(conv, unit_dim=1) == pytest.approx(2 / 3)
    with pytest.warns(NonFiniteWarning):
        assert math.isnan(pp.grad_dormant_fraction(torch.tensor([[float("inf"), 1.0]])))
    with pytest.raises(ValueError, match="tau"):
        pp.grad_dormant_fraction(g, tau=-1)


@settings(max_examples=60, deadline=None)
@given(
    g=arrays(
        np.float64,
        st.tuples(st.integers(1, 6), st.integers(1, 5), st.integers(1, 4)),
        elements=st.sampled_from([0.0, 0.001, -0.5, 1.0, 3.0]),
    ),
    tau=st.sampled_from([0.0, 0.01, 0.1, 0.5, 1.0]),
    unit_dim=st.integers(0, 2),
)
def test_grama_matches_direct_implementation(g: np.ndarray, tau: float, unit_dim: int) -> None:
    assert pp.grad_dormant_fraction(torch.from_numpy(g), tau, unit_dim=unit_dim) == pytest.approx(
        grama_direct(g, tau, unit_dim), abs=1e-12
    )


def test_grama_counts_dead_relu_units_from_preactivation_gradients() -> None:
    net = mlp()
    with torch.no_grad():
        net[0].bias[:16] = -1e3  # 16 of 64 first-layer units never fire
    x, y = torch.randn(128, 4), torch.randn(128, 2)
    pre = net[0](x)
    pre.retain_grad()
    ((net[4](net[3](net[2](net[1](pre)))) - y) ** 2).mean().backward()
    assert pre.grad is not None
    assert pp.grad_dormant_fraction(pre.grad, tau=0.0) == pytest.approx(16 / 64)
    # incoming-weight variant: the same units have zero weight-gradient rows
    assert net[0].weight.grad is not None
    assert pp.grad_dormant_fraction(net[0].weight.grad, tau=0.0, unit_dim=0) == pytest.approx(16 / 64)


# ------------------------------------------------------------------ trainability


def test_trainability_dead_network_far_from_fresh_and_fast() -> None:
    x = torch.randn(512, 4)
    fresh, dead = mlp(0), mlp(1)
    with torch.no_grad():
        dead[0].bias.fill_(-100.0)
        dead[2].bias.fill_(-100.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pp.trainability(fresh, x, steps=2)  # first-call warm-up (lazy imports, allocator)
        start = time.perf_counter()
        r_fresh = pp.trainability(fresh, x)
        elapsed = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    r_dead = pp.trainability(dead, x)
    assert r_fresh.ratio < 0.2 and r_dead.ratio > 0.9  # measured 0.06 and 0.994
    assert r_dead.ratio > 5 * r_fresh.ratio
    assert len(r_fresh.curve) == r_fresh.steps + 1 == 101
    assert r_fresh.initial_loss == r_fresh.curve[0] and r_fresh.final_loss == r_fresh.curve[-1]
    assert r_fresh.ratio == pytest.approx(r_fresh.final_loss / r_fresh.initial_loss)
    assert set(r_fresh.as_metrics()) == {"trainability_initial_loss", "trainability_final_loss", "trainability_ratio"}
    assert elapsed < 1.0  # about 0.1 s on this machine


def test_trainability_has_no_side_effects_and_is_deterministic() -> None:
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(4, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 2))
    net.train()
    x = torch.randn(64, 4)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(x).square().mean().backward()
    opt.step()
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    grads = {k: v.grad.clone() for k, v in net.named_parameters() if v.grad is not None}
    buffers = {k: v.clone() for k, v in net.named_buffers()}
    opt_state = copy.deepcopy(opt.state_dict())
    torch_rng, np_rng, py_rng = torch.get_rng_state(), np.random.get_state(), random.getstate()

    a = pp.trainability(net, x, steps=20, seed=7)
    b = pp.trainability(net, x, steps=20, seed=7)
    c = pp.trainability(net, x, steps=20, seed=8)
    assert a.curve == b.curve and a.ratio == b.ratio  # bit-identical for a seed
    assert a.curve != c.curve
    assert net.training
    for k, v in net.named_parameters():
        assert torch.equal(v, params[k])
        assert v.grad is not None and torch.equal(v.grad, grads[k])
    for k, v in net.named_buffers():
        assert torch.equal(v, buffers[k])
    new_state = opt.state_dict()
    assert new_state["param_groups"] == opt_state["param_groups"]
    for k, s in opt_state["state"].items():
        assert all(torch.equal(s[n], new_state["state"][k][n]) for n in s)
    assert torch.equal(torch.get_rng_state(), torch_rng)
    assert np.random.get_state()[2:] == np_rng[2:] and random.getstate() == py_rng


def test_trainability_custom_forward_and_errors() -> None:
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.pi, self.v = nn.Linear(3, 8), nn.Linear(8, 2), nn.Linear(8, 1)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = torch.tanh(self.body(x))
            return self.pi(h), self.v(h)

    model, x = TwoHeads(), torch.randn(16, 3)
    with pytest.raises(TypeError, match="forward="):
        pp.trainability(model, x, steps=2)
    r = pp.trainability(model, x, steps=5, forward=lambda m, b: m(b)[1])
    assert np.isfinite(r.ratio)
    with pytest.raises(ValueError, match="steps"):
        pp.trainability(model, x, steps=0)


@pytest.mark.filterwarnings("ignore::plasticity_probe.NonFiniteWarning")
def test_trainability_of_a_network_with_nan_weights_is_nan_and_raises_nothing() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        model[0].weight[0, 0] = math.nan
    before = copy.deepcopy(model.state_dict())
    result = pp.trainability(model, torch.randn(32, 4), steps=5)
    assert math.isnan(result.ratio) and math.isnan(result.final_loss) and len(result.curve) == 6
    for k, v in model.state_dict().items():  # the caller's model untouched
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, equal_nan=True)


def test_distance_from_init_of_nan_parameters_is_nan_with_a_warning() -> None:
    with pytest.warns(pp.NonFiniteWarning, match="distance_from_init"):
        value = pp.distance_from_init([torch.tensor([1.0, math.nan])], [torch.zeros(2)])
    assert math.isnan(value)


@pytest.mark.parametrize("shape", [(4, 0), (0, 3), (0, 0), (2, 0, 5, 5)])
def test_grad_dormant_fraction_of_no_units_or_no_samples_is_nan(shape: tuple[int, ...]) -> None:
    unit_dim = 1 if len(shape) > 2 else -1
    assert math.isnan(pp.grad_dormant_fraction(torch.zeros(shape), unit_dim=unit_dim))
