"""Hessian spectrum against dense Hessians and known closed forms."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

import plasticity_probe as pp


def dense_eigs(loss_fn: object, model: nn.Module) -> np.ndarray:
    """Reference: torch.autograd.functional.hessian over the flat parameter vector + eigvalsh."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()

    def f(flat: torch.Tensor) -> torch.Tensor:
        params, offset = {}, 0
        for n, s in zip(names, shapes, strict=True):
            k = int(np.prod(s))
            params[n] = flat[offset : offset + k].reshape(s)
            offset += k
        return loss_fn(params)  # type: ignore[operator]

    h = torch.autograd.functional.hessian(f, flat0)
    return np.linalg.eigvalsh(h.numpy())


def dqn_setup(seed: int = 0, hidden: int = 8, n: int = 32) -> tuple[nn.Module, object, object]:
    torch.manual_seed(seed)
    q = nn.Sequential(
        nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 3)
    ).double()
    target = copy.deepcopy(q)
    with torch.no_grad():
        for p in target.parameters():
            p.add_(0.1 * torch.randn_like(p))
    obs, nxt = torch.randn(n, 4, dtype=torch.float64), torch.randn(n, 4, dtype=torch.float64)
    act, rew = torch.randint(0, 3, (n,)), torch.randn(n, dtype=torch.float64)
    done = (torch.rand(n) < 0.2).double()

    def td(params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        with torch.no_grad():
            y = rew + 0.99 * (1 - done) * target(nxt).max(1).values
        out = q(obs) if params is None else functional_call(q, params, (obs,))
        return ((out.gather(1, act[:, None]).squeeze(1) - y) ** 2).mean()

    return q, (lambda: td()), td


@pytest.mark.parametrize("seed", [0, 1])
def test_dqn_td_loss_matches_dense_hessian(seed: int) -> None:
    q, loss_fn, td = dqn_setup(seed)
    ref = dense_eigs(td, q)
    spec = pp.hessian_spectrum(loss_fn, q, dense_threshold=0, tol=1e-10)  # force Lanczos
    assert spec.lambda_max == pytest.approx(ref[-1], rel=1e-6)
    assert spec.lambda_min == pytest.approx(ref[0], rel=1e-6, abs=1e-9)
    assert spec.n_params == sum(p.numel() for p in q.parameters())
    assert spec.n_hvp > 0
    dense = pp.hessian_spectrum(loss_fn, q, dense_threshold=10_000)
    assert dense.lambda_max == pytest.approx(ref[-1], rel=1e-9)
    assert dense.trace == pytest.approx(ref.sum(), rel=1e-9)


def test_least_squares_hessian_is_2_over_n_xtx() -> None:
    torch.manual_seed(0)
    n, d = 50, 6
    x, y = torch.randn(n, d, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    w = torch.zeros(d, dtype=torch.float64, requires_grad=True)
    ref = np.linalg.eigvalsh((2 / n) * (x.T @ x).numpy())
    spec = pp.hessian_spectrum(lambda: ((x @ w - y) ** 2).mean(), [w], trace_samples=0)
    assert spec.lambda_max == pytest.approx(ref[-1], rel=1e-10)
    assert spec.lambda_min == pytest.approx(ref[0], rel=1e-10)
    assert spec.condition_number == pytest.approx(ref[-1] / ref[0], rel=1e-9)
    assert spec.definiteness == "positive definite"


def test_indefinite_quadratic_condition_number_undefined() -> None:
    a = torch.tensor([3.0, 1.0, -2.0, -5.0], dtype=torch.float64)
    x = torch.ones(4, dtype=torch.float64, requires_grad=True)
    spec = pp.hessian_spectrum(lambda: 0.5 * (a * x * x).sum(), [x])
    assert spec.lambda_max == pytest.approx(3.0)
    assert spec.lambda_min == pytest.approx(-5.0)
    assert spec.condition_number is None
    assert spec.definiteness == "indefinite"
    assert "undefined" in spec.condition_note and "λ_min < 0" in spec.condition_note


def test_large_quadratic_via_lanczos_and_hutchinson() -> None:
    rng = np.random.default_rng(0)
    d = 400
    eig = np.concatenate([[-5.0], rng.uniform(0.1, 2.0, d - 2), [3.0]])
    qmat, _ = np.linalg.qr(rng.standard_normal((d, d)))
    a = torch.tensor(qmat @ np.diag(eig) @ qmat.T)
    x = torch.zeros(d, dtype=torch.float64, requires_grad=True)
    spec = pp.hessian_spectrum(lambda: 0.5 * x @ a @ x, [x], trace_samples=200, top_k=2)
    assert spec.lambda_max == pytest.approx(3.0, rel=1e-6)
    assert spec.lambda_min == pytest.approx(-5.0, rel=1e-6)
    assert spec.top_eigenvalues[0] == pytest.approx(3.0, rel=1e-6)
    assert abs(spec.trace - eig.sum()) < 5 * spec.trace_stderr
    again = pp.hessian_spectrum(lambda: 0.5 * x @ a @ x, [x], trace_samples=200, top_k=2)
    assert again.trace == spec.trace  # seeded: reproducible


def test_unused_parameters_are_zero_curvature_and_grads_untouched() -> None:
    torch.manual_seed(0)
    used, unused = nn.Linear(3, 1), nn.Linear(3, 1)
    model = nn.ModuleList([used, unused])
    x = torch.randn(10, 3)
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    model.eval()
    spec = pp.hessian_spectrum(lambda: used(x).square().mean(), model)
    assert spec.n_params == 8
    assert spec.lambda_min == pytest.approx(0.0, abs=1e-7)  # unused block is zero
    assert all(torch.all(p.grad == 7.0) for p in model.parameters())  # type: ignore[arg-type]
    assert not model.training


def test_linear_loss_has_zero_hessian() -> None:
    w = torch.ones(3, requires_grad=True)
    spec = pp.hessian_spectrum(lambda: w.sum(), [w])
    assert spec.lambda_max == 0.0 and spec.lambda_min == 0.0
    assert spec.definiteness == "zero" and spec.condition_number is None


def test_bad_input() -> None:
    w = torch.ones(3, requires_grad=True)
    with pytest.raises(ValueError, match="scalar"):
        pp.hessian_spectrum(lambda: w * 2, [w])
    with pytest.raises(ValueError, match="require grad"):
        pp.hessian_spectrum(lambda: w.sum(), [torch.ones(2)])


def test_converged_is_a_report_row_zero_where_lanczos_stops_at_max_iter() -> None:
    """``hessian_converged``: 1 for the dense path and for Lanczos within ``tol`` (the quadratic
    above), 0 where Lanczos stops at ``max_iter`` (5 products for a spread spectrum of 400), with
    the library's ``ConvergenceWarning`` (a ``RuntimeWarning``)."""
    rng = np.random.default_rng(1)
    d = 400
    qmat, _ = np.linalg.qr(rng.standard_normal((d, d)))
    a = torch.tensor(qmat @ np.diag(np.linspace(-1.0, 1.0, d)) @ qmat.T)
    x = torch.zeros(d, dtype=torch.float64, requires_grad=True)
    with pytest.warns(pp.ConvergenceWarning, match="Lanczos did not reach"):
        short = pp.hessian_spectrum(lambda: 0.5 * x @ a @ x, [x], max_iter=5, basis_size=5, trace_samples=0)
    assert not short.converged and short.as_metrics()["hessian_converged"] == 0.0
    full = pp.hessian_spectrum(lambda: 0.5 * x @ a @ x, [x], trace_samples=0)
    assert full.converged and full.as_metrics()["hessian_converged"] == 1.0
    q, loss_fn, _ = dqn_setup(0)
    report = pp.Probe(q, probe_batch=torch.randn(16, 4, dtype=torch.float64)).measure(loss_fn=loss_fn, hessian=True)  # type: ignore[arg-type]
    assert report.network["hessian_converged"] == 1.0  # dense: n ≤ dense_threshold


def test_probe_adds_network_and_layer_curvature() -> None:
    q, loss_fn, _ = dqn_setup(0)
    probe = pp.Probe(q, probe_batch=torch.randn(16, 4, dtype=torch.float64))
    report = probe.measure(loss_fn=loss_fn, hessian=True, per_layer_hessian=True)  # type: ignore[arg-type]
    ref = pp.hessian_spectrum(loss_fn, q)  # type: ignore[arg-type]
    assert report.network["hessian_lambda_max"] == pytest.approx(ref.lambda_max, rel=1e-6)
    last = list(q.parameters())[-2:]
    ref_last = pp.hessian_spectrum(loss_fn, last)  # type: ignore[arg-type]
    assert report["4"].metrics["hessian_lambda_max"] == pytest.approx(ref_last.lambda_max, rel=1e-6)
