"""SuccessiveRegularizer against the formula computed by hand."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import plasticity_probe as pp


class Scrambled(nn.Module):
    """Registered c, a, b; runs a → b → c with functional activations."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Linear(5, 2)
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.tanh(self.b(F.relu(self.a(x)))))


def order(m: Scrambled) -> list[nn.Linear]:
    return [m.a, m.b, m.c]


def sq(module: nn.Module, init: list[torch.Tensor] | None = None) -> float:
    ps = [p.detach().double() for p in module.parameters()]
    if init is None:
        return sum(float((p**2).sum()) for p in ps)
    return sum(float(((p - p0.double()) ** 2).sum()) for p, p0 in zip(ps, init, strict=True))


@pytest.fixture
def model() -> Scrambled:
    torch.manual_seed(0)
    return Scrambled()


def test_l2_is_lambda_sum_delta_l_norm_squared(model: Scrambled) -> None:
    x = torch.randn(7, 3)
    reg = pp.SuccessiveRegularizer(model, "l2", lam=0.1, delta=1.5)
    model(x)
    expected = sum(0.1 * 1.5**l * sq(m) for l, m in enumerate(order(model), start=1))
    assert float(reg(0)) == pytest.approx(expected, rel=1e-6)
    assert list(reg.last_terms) == ["a", "b", "c"]
    assert float(reg.last_terms["c"]) == pytest.approx(0.1 * 1.5**3 * sq(model.c), rel=1e-6)
    assert reg.weights() == {"a": 1.5, "b": 2.25, "c": 3.375}


def test_l1(model: Scrambled) -> None:
    x = torch.randn(7, 3)
    l1 = pp.SuccessiveRegularizer(model, "l1", lam=1.0, delta=2.0, example_input=x)
    expected = sum(2.0**l * sum(float(p.abs().sum()) for p in m.parameters()) for l, m in enumerate(order(model), 1))
    assert float(l1(0)) == pytest.approx(expected, rel=1e-6)


class AuthorsCritic(nn.Module):
    """The authors' MLP critic, with their ``predict`` returning the hidden activations."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[3](self.net[2](self.net[1](self.net[0](x))))


def authors_loss(
    critic: AuthorsCritic, obs: torch.Tensor, penalty: str, lam: float, delta: float, t0: list
) -> torch.Tensor:
    """The three terms of the authors' dqn_agent.py, written out as their loops do."""
    loss = torch.zeros(())
    if penalty == "l2":  # weight_mag: enumerate over every named parameter, add the weights' norms
        for i, (name, param) in enumerate(critic.named_parameters()):
            if "weight" in name:
                loss = loss + lam * (delta**i) * torch.norm(param, p=2)
    elif penalty == "l2init":  # regenerative_reg: enumerate over the weights only
        weights = [param for name, param in critic.named_parameters() if "weight" in name]
        for i, param in enumerate(weights):
            loss = loss + lam * (delta**i) * torch.norm(param - t0[i], p=2)
    else:  # singular_loss: penultimate activations, no δ
        s = torch.linalg.svdvals(critic.hidden(obs))
        loss = loss + lam * (torch.max(s) ** 2 - torch.min(s) ** 2)
    return loss


@pytest.mark.parametrize("penalty", ["l2", "l2init", "singular"])
def test_authors_variant_reproduces_their_terms_value_and_gradient(penalty: str) -> None:
    torch.manual_seed(0)
    critic, obs = AuthorsCritic().double(), torch.randn(64, 4, dtype=torch.float64)
    t0 = [p.detach().clone() for n, p in critic.named_parameters() if "weight" in n]
    reg = pp.SuccessiveRegularizer(critic, penalty, lam=0.1, delta=1.5, variant="authors", example_input=obs)
    with torch.no_grad():  # move away from θ_0 so l2init is not zero
        for p in critic.parameters():
            p.add_(0.05 * torch.randn_like(p))
    critic(obs)
    ours = reg(0)
    g_ours = torch.autograd.grad(ours, list(critic.parameters()), allow_unused=True)
    theirs = authors_loss(critic, obs, penalty, 0.1, 1.5, t0)
    g_theirs = torch.autograd.grad(theirs, list(critic.parameters()), allow_unused=True)
    assert float(ours) == pytest.approx(float(theirs), rel=1e-9)
    for (name, _), a, b in zip(critic.named_parameters(), g_ours, g_theirs, strict=True):
        if "bias" in name and penalty != "singular":  # their parameter penalties skip biases
            assert a is None or not bool(a.any()), name
            assert b is None or not bool(b.any()), name
        else:
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)
    if penalty == "l2":  # layer l's weight gets δ^(2l−2)
        assert reg.weights() == {"net.0.weight": 1.0, "net.2.weight": 1.5**2, "net.4.weight": 1.5**4}
    if penalty == "singular":
        assert list(reg.weights()) == ["net.2"]


def test_authors_variant_has_no_l1() -> None:
    with pytest.raises(ValueError, match="no l1"):
        pp.SuccessiveRegularizer(AuthorsCritic(), "l1", variant="authors")


def test_l2init_zero_at_construction_then_distance_to_theta0(model: Scrambled) -> None:
    x = torch.randn(7, 3)
    reg = pp.SuccessiveRegularizer(model, "l2init", lam=0.5, delta=1.25, example_input=x)
    init = {n: [p.detach().clone() for p in m.parameters()] for n, m in zip("abc", order(model), strict=True)}
    assert float(reg(0)) == 0.0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    expected = sum(0.5 * 1.25**l * sq(m, init[n]) for l, (n, m) in enumerate(zip("abc", order(model), strict=True), 1))
    assert float(reg(0)) == pytest.approx(expected, rel=1e-6)


def test_l2init_survives_save_and_load(model: Scrambled) -> None:
    x = torch.randn(4, 3)
    reg = pp.SuccessiveRegularizer(model, "l2init", lam=1.0, delta=1.0, example_input=x)
    buf = io.BytesIO()
    torch.save(reg.state_dict(), buf)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    value = float(reg(0))
    fresh = pp.SuccessiveRegularizer(model, "l2init", lam=1.0, delta=1.0, example_input=x)
    assert float(fresh(0)) == 0.0  # a new θ_0 snapshot…
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert float(fresh(0)) == pytest.approx(value)  # …replaced by the saved one
    with pytest.raises(ValueError, match="do not match"):
        fresh.load_state_dict({"init": {"zz": []}})


def test_singular_penalty_matches_numpy_svd(model: Scrambled) -> None:
    x = torch.randn(9, 3)
    reg = pp.SuccessiveRegularizer(model, "singular", lam=0.01, delta=1.25)
    model(x)
    total = float(reg(0))
    h1 = F.relu(model.a(x)).detach().numpy()
    h2 = torch.tanh(model.b(torch.tensor(h1))).detach().numpy()
    out = model(x).detach().numpy()
    expected = 0.0
    for l, phi in enumerate((h1, h2, out), start=1):
        s = np.linalg.svd(phi.astype(np.float64), compute_uv=False)
        expected += 0.01 * 1.25**l * (s[0] ** 2 - s[-1] ** 2)
    assert total == pytest.approx(expected, rel=1e-4)


def test_singular_penalty_wide_matrix_uses_smaller_gram() -> None:
    phi = torch.randn(3, 10, dtype=torch.float64)
    s = np.linalg.svd(phi.numpy(), compute_uv=False)
    assert float(pp.singular_penalty(phi)) == pytest.approx(s[0] ** 2 - s[-1] ** 2, rel=1e-9)


@pytest.mark.parametrize("lapack_fails", [False, True], ids=["as-lapack-does", "lapack-failing"])
def test_degenerate_gram_from_a_real_run(lapack_fails: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 64×64 Gram matrix of MountainCar features (43 dead units) on which float32 LAPACK failed
    to converge on the machine of the paper sweep (it stopped two of its runs before the fallback
    existed). Whether it fails depends on the CPU and LAPACK build (MKL's kernels on an AMD Zen 4
    converge on it), so the failure is also injected: float32 ``eigvalsh`` raising as LAPACK does,
    which makes the fallback (dead units set aside, the rest in float64) give the eigenvalues."""
    from pathlib import Path

    from plasticity_probe.regularizers import gram_eigenvalues

    gram = torch.load(Path(__file__).parent / "data" / "degenerate_gram.pt", weights_only=True)
    assert gram.dtype == torch.float32 and gram.shape == (64, 64)
    if lapack_fails:
        eigvalsh = torch.linalg.eigvalsh

        def failing_in_float32(a: torch.Tensor) -> torch.Tensor:
            if a.dtype == torch.float32:
                raise torch.linalg.LinAlgError("linalg.eigvalsh: The algorithm failed to converge")
            return eigvalsh(a)

        monkeypatch.setattr(torch.linalg, "eigvalsh", failing_in_float32)
    ref = np.linalg.eigvalsh(gram.double().numpy())
    g = gram.clone().requires_grad_()
    eig = gram_eigenvalues(g)
    assert eig.dtype == torch.float32
    assert eig.shape == (64,)
    assert float(eig[-1]) == pytest.approx(ref[-1], rel=1e-5)
    assert np.allclose(eig.detach().double().numpy(), ref, atol=1e-3)
    (eig[-1] - eig[0]).backward()
    assert g.grad is not None and bool(torch.isfinite(g.grad).all())


def test_non_finite_gram_gives_nan_not_an_exception() -> None:
    from plasticity_probe.regularizers import gram_eigenvalues

    gram = torch.eye(3)
    gram[0, 1] = float("nan")
    assert bool(torch.isnan(gram_eigenvalues(gram)).all())


def test_every_schedule_adds_nothing_off_schedule(model: Scrambled) -> None:
    x = torch.randn(4, 3)
    reg = pp.SuccessiveRegularizer(model, "l2", lam=1.0, delta=1.0, every=5, example_input=x)
    on = [s for s in range(12) if float(reg(s)) != 0.0]
    assert on == [0, 5, 10]
    out = reg(3)
    assert out.ndim == 0 and float(out) == 0.0 and reg.last_terms == {}


@pytest.mark.parametrize("penalty", ["l2", "l2init", "l1", "singular"])
def test_gradients_reach_every_penalized_layer(model: Scrambled, penalty: str) -> None:
    x = torch.randn(16, 3)
    reg = pp.SuccessiveRegularizer(model, penalty, lam=1.0, delta=1.25)
    if penalty == "l2init":
        model(x)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1)
    model(x)
    reg(0).backward()
    for m in order(model):
        assert m.weight.grad is not None and float(m.weight.grad.abs().sum()) > 0


def test_layer_subset_keeps_forward_indices(model: Scrambled) -> None:
    x = torch.randn(6, 3)
    reg = pp.SuccessiveRegularizer(model, "l2", lam=1.0, delta=2.0, layers=["b"], example_input=x)
    assert float(reg(0)) == pytest.approx(4.0 * sq(model.b), rel=1e-6)  # b is layer 2: δ²
    with pytest.raises(ValueError, match="not layers"):
        pp.SuccessiveRegularizer(model, "l2", layers=["zz"], example_input=x)


def test_errors(model: Scrambled) -> None:
    with pytest.raises(ValueError, match="unknown penalty"):
        pp.SuccessiveRegularizer(model, "l3")
    with pytest.raises(ValueError, match="every"):
        pp.SuccessiveRegularizer(model, "l2", every=0)
    reg = pp.SuccessiveRegularizer(model, "l2")
    with pytest.raises(RuntimeError, match="no forward pass"):
        reg(0)


def test_parameter_penalties_leave_no_hooks_and_no_grad_passes_are_ignored(model: Scrambled) -> None:
    x = torch.randn(5, 3)
    pp.SuccessiveRegularizer(model, "l2", example_input=x)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    reg = pp.SuccessiveRegularizer(model, "singular", lam=1.0, delta=1.0)
    model(x)
    with torch.no_grad():
        model(torch.zeros(5, 3))  # e.g. the target computation: not captured
    grad_value = float(reg(0))
    assert grad_value > 0
    reg.close()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_singular_penalty_on_half_precision(dtype: torch.dtype) -> None:
    from plasticity_probe.regularizers import singular_penalty

    torch.manual_seed(0)
    x = torch.randn(32, 8)
    half = x.to(dtype).requires_grad_()
    value = singular_penalty(half)
    value.backward()
    assert value.dtype == torch.float32 and half.grad is not None and bool(torch.isfinite(half.grad).all())
    assert float(value) == pytest.approx(float(singular_penalty(half.detach().float())), rel=1e-5)


def test_a_tied_parameter_is_penalized_once_with_its_first_layer() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    model[2].weight = model[0].weight
    reg = pp.SuccessiveRegularizer(model, penalty="l2", lam=1.0, delta=2.0)
    model(torch.randn(3, 4))
    assert reg.weights() == {"0": 2.0, "2": 4.0}
    w, b0, b2 = (t.detach().double() for t in (model[0].weight, model[0].bias, model[2].bias))
    expected = 2.0 * float((w**2).sum() + (b0**2).sum()) + 4.0 * float((b2**2).sum())
    assert float(reg(0)) == pytest.approx(expected, rel=1e-6)
