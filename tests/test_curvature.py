"""hessian_spectrum at scale: bounded memory, ARPACK agreement, SLQ density, Hutch++, non-finite
losses, closure state (BatchNorm, RNG, dropout) and determinism across processes."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse.linalg as sla
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import plasticity_probe as pp
from plasticity_probe.hessian import (
    HessianOperator,
    frozen_closure_state,
    hutchinson_trace,
    hutchpp_trace,
    lanczos_extremes,
    slq_density,
)
from plasticity_probe.metrics import NonFiniteWarning

ROOT = Path(__file__).resolve().parents[1]


def symmetric(eigs: np.ndarray, seed: int) -> torch.Tensor:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((len(eigs), len(eigs))))
    return torch.tensor(q @ np.diag(eigs) @ q.T)


def test_tanh_mlp_70k_matches_arpack() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 1)).double()
    x, y = torch.randn(256, 16, dtype=torch.float64), torch.randn(256, 1, dtype=torch.float64)

    def loss() -> torch.Tensor:
        return ((net(x) - y) ** 2).mean()

    spec = pp.hessian_spectrum(loss, net)
    assert spec.n_params == 70_401 and spec.converged
    # reference: ARPACK on an independent operator of Hessian-vector products (torch.func)
    names = [k for k, _ in net.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    shapes = [p.shape for p in net.parameters()]

    def f(theta: torch.Tensor) -> torch.Tensor:
        params, offset = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            params[name] = theta[offset : offset + shape.numel()].reshape(shape)
            offset += shape.numel()
        return ((torch.func.functional_call(net, params, (x,)) - y) ** 2).mean()

    def hvp(v: np.ndarray) -> np.ndarray:
        return torch.func.jvp(torch.func.grad(f), (flat,), (torch.from_numpy(v.reshape(-1).copy()),))[1].numpy()

    op = sla.LinearOperator((flat.numel(), flat.numel()), matvec=hvp, dtype=np.float64)
    v0 = np.ones(flat.numel())
    ref_max = sla.eigsh(op, k=1, which="LA", tol=1e-10, v0=v0, return_eigenvectors=False)[0]
    ref_min = sla.eigsh(op, k=1, which="SA", tol=1e-10, v0=v0, return_eigenvectors=False)[0]
    assert ref_min < 0 < ref_max
    assert spec.lambda_max == pytest.approx(ref_max, rel=1e-6)
    assert spec.lambda_min == pytest.approx(ref_min, rel=1e-6)


NATURE_CNN = textwrap.dedent(
    """
    import json, resource, torch
    from torch import nn
    import plasticity_probe as pp
    torch.set_num_threads(1)
    torch.manual_seed(0)
    def qnet():  # CleanRL dqn_atari.py QNetwork
        return nn.Sequential(
            nn.Conv2d(4, 32, 8, stride=4), nn.ReLU(), nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=1), nn.ReLU(), nn.Flatten(), nn.Linear(3136, 512), nn.ReLU(),
            nn.Linear(512, 6))
    q, target = qnet(), qnet()
    obs, nxt = torch.rand(32, 4, 84, 84), torch.rand(32, 4, 84, 84)
    act, rew, done = torch.randint(0, 6, (32,)), torch.randn(32), (torch.rand(32) < 0.1).float()
    def td():
        with torch.no_grad():
            y = rew + 0.99 * (1 - done) * target(nxt).max(1).values
        return ((q(obs).gather(1, act[:, None]).squeeze(1) - y) ** 2).mean()
    spec = pp.hessian_spectrum(td, q)
    print(json.dumps({"n": spec.n_params, "max": spec.lambda_max, "min": spec.lambda_min,
                      "converged": spec.converged,
                      "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
    """
)


def run_python(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT)},
    )
    return out.stdout.strip().splitlines()[-1]


def test_nature_cnn_both_extremes_in_bounded_memory() -> None:
    res = json.loads(run_python(NATURE_CNN))
    assert res["n"] == 1_687_206
    assert res["converged"] and res["min"] < 0 < res["max"]
    assert res["rss_mb"] <= 1536  # the old Lanczos allocated 500 × n float64 = 6.7 GB up front


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(30, 120),
    basis=st.integers(5, 16),
    top_k=st.integers(1, 1),
    seed=st.integers(0, 10_000),
)
def test_restarted_lanczos_finds_extremes_of_random_spectra(n: int, basis: int, top_k: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    eigs = np.sort(np.concatenate([rng.uniform(-1, 1, n - 2), [-3.0, 2.5]]))
    a = symmetric(eigs, seed)
    top, lmin, converged = lanczos_extremes(
        lambda v: a @ v, n, top_k=top_k, tol=1e-8, basis_size=basis, max_iter=5000, seed=seed
    )
    assert converged
    assert float(top[0]) == pytest.approx(2.5, rel=1e-9)
    assert float(lmin) == pytest.approx(-3.0, rel=1e-9)


def test_small_basis_top_k_and_memory_bound() -> None:
    eigs = np.concatenate([[-5.0], np.linspace(0.1, 2.0, 396), [2.5, 2.8, 3.0]])
    a = symmetric(eigs, 0)
    top, lmin, converged = lanczos_extremes(lambda v: a @ v, 400, top_k=3, tol=1e-9, basis_size=12, max_iter=5000)
    assert converged
    np.testing.assert_allclose(top.numpy(), [3.0, 2.8, 2.5], rtol=1e-8)
    assert float(lmin) == pytest.approx(-5.0, rel=1e-9)
    with pytest.raises(ValueError, match="basis_size"):
        lanczos_extremes(lambda v: a @ v, 400, top_k=3, basis_size=6)


def test_slq_density_integrates_to_one_and_matches_eigenvalue_histogram() -> None:
    rng = np.random.default_rng(1)
    n = 80
    eigs = np.sort(np.concatenate([rng.normal(-1.0, 0.1, 30), rng.normal(2.0, 0.2, 50)]))
    a = symmetric(eigs, 1)
    dens = slq_density(lambda v: a @ v, n, probes=100, steps=25, seed=0)
    assert sum(dens.weights) == pytest.approx(1.0, abs=1e-12)
    grid = np.linspace(-3, 4, 3001)
    got = dens.evaluate(grid, sigma=0.15)
    assert np.trapezoid(got, grid) == pytest.approx(1.0, abs=1e-6)
    exact = pp.hessian.gaussian_density(eigs, np.full(n, 1 / n), grid, sigma=0.15)
    assert np.trapezoid(np.abs(got - exact), grid) < 0.1  # L1 distance of the smoothed densities
    # moments: tr(A^k)/n, estimated without bias (Gauss quadrature exact to degree 2·steps − 1)
    for k in (1, 2, 3):
        assert dens.moment(k) == pytest.approx(np.mean(eigs**k), rel=0.05, abs=0.02)
    # with as many steps as n, each probe's quadrature is exact: nodes are the eigenvalues
    full = slq_density(lambda v: a @ v, n, probes=1, steps=n, seed=3)
    heavy = [t for t, w in zip(full.nodes, full.weights, strict=True) if w > 1e-10]
    assert all(np.min(np.abs(eigs - t)) < 1e-8 for t in heavy)


def test_density_through_hessian_spectrum() -> None:
    eigs = np.linspace(-1.0, 3.0, 300)
    a = symmetric(eigs, 2)
    x = torch.zeros(300, dtype=torch.float64, requires_grad=True)
    spec = pp.hessian_spectrum(lambda: 0.5 * x @ a @ x, [x], density_probes=20, density_steps=30)
    assert spec.density is not None and spec.density.n_probes == 20
    assert spec.density.moment(1) == pytest.approx(eigs.mean(), abs=0.1)
    assert spec.density.moment(2) == pytest.approx(np.mean(eigs**2), rel=0.1)
    dense = pp.hessian_spectrum(lambda: 0.5 * x @ a @ x, [x], density_probes=1, dense_threshold=1000)
    assert dense.density is not None
    np.testing.assert_allclose(sorted(dense.density.nodes), eigs, atol=1e-10)


def test_hutchpp_unbiased_and_lower_variance_than_hutchinson() -> None:
    n, budget, seeds = 100, 30, 300
    eigs = 10.0 * 0.7 ** np.arange(n)  # decaying spectrum, where Hutch++ shines (Meyer et al. 2021)
    a = symmetric(eigs, 4)

    def mv(v: torch.Tensor) -> torch.Tensor:
        return a @ v

    hpp = np.array([hutchpp_trace(mv, n, budget, seed=s)[0] for s in range(seeds)])
    hut = np.array([hutchinson_trace(mv, n, budget, seed=s)[0] for s in range(seeds)])
    exact = eigs.sum()
    assert abs(hpp.mean() - exact) < 4 * hpp.std() / np.sqrt(seeds) + 1e-9
    assert abs(hut.mean() - exact) < 4 * hut.std() / np.sqrt(seeds)
    assert hpp.var() < 0.05 * hut.var()  # measured: about 0.01
    # and through hessian_spectrum, same product budget
    x = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    b = symmetric(1.0 + eigs, 4)  # λ_min = 1, so that Lanczos converges
    spec = pp.hessian_spectrum(
        lambda: 0.5 * x @ b @ x, [x], trace_samples=budget, trace_method="hutch++", dense_threshold=0
    )
    assert spec.trace_method == "hutch++" and spec.converged
    assert abs(spec.trace - (n + exact)) < 4 * spec.trace_stderr


def test_hutchpp_unbiased_on_indefinite_flat_spectrum() -> None:
    n = 60
    eigs = np.random.default_rng(5).uniform(-2, 3, n)
    a = symmetric(eigs, 5)
    vals = np.array([hutchpp_trace(lambda v: a @ v, n, 12, seed=s)[0] for s in range(400)])
    assert abs(vals.mean() - eigs.sum()) < 4 * vals.std() / np.sqrt(400)
    with pytest.raises(ValueError, match="at least 3"):
        hutchpp_trace(lambda v: a @ v, n, 2)


@pytest.mark.parametrize(
    ("make_loss", "why"),
    [
        (lambda w: w.sum() * float("nan"), "non-finite loss"),
        (lambda w: (w * float("inf")).square().sum(), "non-finite loss"),
        (lambda w: torch.sqrt(w - w.detach()).sum(), "non-finite gradient"),  # d√u/du at 0 = inf
        (lambda w: (w - w.detach()).abs().pow(1.5).sum(), "non-finite Hessian-vector product"),
    ],
)
@pytest.mark.parametrize("n", [5, 300])
def test_non_finite_loss_gives_nan_spectrum(make_loss: object, why: str, n: int) -> None:
    w = torch.ones(n, dtype=torch.float64, requires_grad=True)
    with pytest.warns(NonFiniteWarning, match="non-finite"):
        spec = pp.hessian_spectrum(lambda: make_loss(w), [w], trace_samples=4, density_probes=2)  # type: ignore[operator]
    assert np.isnan(spec.lambda_max) and np.isnan(spec.lambda_min) and np.isnan(spec.trace)
    assert spec.condition_number is None and not spec.converged
    assert spec.definiteness == f"undefined ({why})"
    assert why in spec.note and "undefined" in spec.condition_note
    assert all(np.isnan(v) for v in spec.as_metrics().values())


def bn_dropout_net() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 2)).double()
    return net, torch.randn(32, 6, dtype=torch.float64)


def rng_states() -> tuple[torch.Tensor, tuple[object, ...], object]:
    return torch.get_rng_state(), np.random.get_state(), random.getstate()


def test_closure_state_batchnorm_rng_and_dropout_restored() -> None:
    net, x = bn_dropout_net()
    net.train()

    def loss() -> torch.Tensor:
        np.random.rand()  # a closure that also draws from NumPy and Python
        random.random()
        return net(x).square().mean()

    buffers = {k: v.clone() for k, v in net.named_buffers()}
    torch_rng, np_rng, py_rng = rng_states()
    with pytest.warns(RuntimeWarning, match="dropout") as record:
        a = pp.hessian_spectrum(loss, net, trace_samples=3)
        b = pp.hessian_spectrum(loss, net, trace_samples=3)
    assert len([w for w in record if "dropout" in str(w.message)]) == 2  # once per call
    assert a.lambda_max == b.lambda_max and a.lambda_min == b.lambda_min and a.trace == b.trace
    for k, v in net.named_buffers():
        assert torch.equal(v, buffers[k]), k
    assert int(net[1].num_batches_tracked) == 0
    assert torch.equal(torch.get_rng_state(), torch_rng)
    np_now = np.random.get_state()
    assert np_now[0] == np_rng[0] and np.array_equal(np_now[1], np_rng[1]) and np_now[2:] == np_rng[2:]
    assert random.getstate() == py_rng
    assert net.training


def test_frozen_block_gives_every_hessian_the_same_closure_state() -> None:
    net, x = bn_dropout_net()
    net.train()
    layer = list(net[4].parameters())

    def loss() -> torch.Tensor:
        return net(x).square().mean()

    with pytest.warns(RuntimeWarning, match="dropout") as record, frozen_closure_state(net):
        first = pp.hessian_spectrum(loss, layer)
        net(torch.randn(32, 6, dtype=torch.float64))  # the probe's own forward: RNG and BN stats move
        torch.rand(10)
        second = pp.hessian_spectrum(loss, layer)
        whole = pp.hessian_spectrum(loss, net)
    assert len([w for w in record if "dropout" in str(w.message)]) == 1  # warned once per block
    assert first.lambda_max == second.lambda_max and first.lambda_min == second.lambda_min
    assert np.isfinite(whole.lambda_max)
    # without the block the two calls see different dropout masks and BN statistics
    with pytest.warns(RuntimeWarning, match="dropout"):
        outside = pp.hessian_spectrum(loss, layer, model=net)
        net(torch.randn(32, 6, dtype=torch.float64))
        again = pp.hessian_spectrum(loss, layer, model=net)
    assert outside.lambda_max != again.lambda_max


def test_eval_mode_batchnorm_closure_and_buffers_bit_exact() -> None:
    net, x = bn_dropout_net()
    net.train()
    net(x)  # running stats away from their defaults
    net.eval()
    before = {k: v.clone() for k, v in net.named_buffers()}
    with frozen_closure_state(net):
        net.train()
        net(torch.randn(32, 6, dtype=torch.float64))
        net.eval()
    for k, v in net.named_buffers():
        assert torch.equal(v, before[k])


DETERMINISM = textwrap.dedent(
    """
    import torch, sys
    sys.path.insert(0, "tests")
    from test_hessian import dqn_setup
    import plasticity_probe as pp
    q, loss_fn, _ = dqn_setup(0, hidden=32)
    s = pp.hessian_spectrum(loss_fn, q, basis_size=12, trace_samples=5, trace_method="hutch++", density_probes=2)
    print(" ".join(x.hex() for x in (s.lambda_max, s.lambda_min, s.trace, *s.density.nodes)))
    """
)


def test_same_bits_in_another_process() -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from test_hessian import dqn_setup

    q, loss_fn, _ = dqn_setup(0, hidden=32)
    s = pp.hessian_spectrum(loss_fn, q, basis_size=12, trace_samples=5, trace_method="hutch++", density_probes=2)
    assert s.n_hvp > 12  # restarted at least once
    assert s.density is not None
    here = " ".join(x.hex() for x in (s.lambda_max, s.lambda_min, s.trace, *s.density.nodes))
    assert run_python(DETERMINISM) == here


def test_operator_products_stay_on_parameter_dtype() -> None:
    w = torch.ones(4, dtype=torch.float32, requires_grad=True)
    op = HessianOperator(lambda: (w**3).sum(), [w])
    out = op.matvec(torch.ones(4, dtype=torch.float64))
    assert out.dtype == torch.float64 and torch.allclose(out, torch.full((4,), 6.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="trace_method"):
        pp.hessian_spectrum(lambda: (w**3).sum(), [w], trace_method="bogus")  # type: ignore[arg-type]
