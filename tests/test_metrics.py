"""Metrics against independent references: NumPy SVD, hand-worked values, properties."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.stats import ortho_group

import plasticity_probe as pp
from plasticity_probe.metrics import NonFiniteWarning


def np_effective_rank(m: np.ndarray) -> float:
    s = np.linalg.svd(m.astype(np.float64), compute_uv=False)
    if s.sum() == 0:
        return 0.0
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def np_srank(m: np.ndarray, delta: float = 0.01) -> int:
    s = np.linalg.svd(m.astype(np.float64), compute_uv=False)
    cum = np.cumsum(s) / s.sum()
    return int(np.argmax(cum >= 1 - delta)) + 1


def with_singular_values(values: list[float], n: int, d: int, seed: int = 0) -> np.ndarray:
    """An n×d matrix with the given singular values, in random orientation."""
    rng = np.random.default_rng(seed)
    u = ortho_group.rvs(n, random_state=rng)[:, : len(values)]
    v = ortho_group.rvs(d, random_state=rng)[:, : len(values)]
    return u @ np.diag(values) @ v.T


# ---- hand-worked values ----------------------------------------------------------------------
def test_hand_worked_singular_values_321() -> None:
    m = torch.tensor(with_singular_values([3.0, 2.0, 1.0], 5, 4))
    # p = (1/2, 1/3, 1/6): H = ½ln2 + ⅓ln3 + ⅙ln6; exp(H) = 2.749459...
    h = 0.5 * math.log(2) + math.log(3) / 3 + math.log(6) / 6
    assert pp.effective_rank(m) == pytest.approx(math.exp(h), abs=1e-9)
    assert pp.effective_rank(m) == pytest.approx(2.749459, abs=1e-6)
    assert pp.srank(m) == 3  # cumulative shares 1/2, 5/6, 1
    assert pp.srank(m, delta=0.2) == 2  # 5/6 >= 0.8
    assert pp.stable_rank(m) == pytest.approx(14 / 9, abs=1e-12)


def test_dead_and_dormant_hand_worked_4x3() -> None:
    # unit 0: always 0 (dead); unit 1: mean |h| = 0.01; unit 2: mean |h| = 2.99
    h = torch.tensor(
        [
            [0.0, 0.04, 3.0],
            [0.0, 0.00, 2.0],
            [0.0, 0.00, 4.0],
            [0.0, 0.00, 2.96],
        ]
    )
    assert pp.dead_unit_fraction(h) == pytest.approx(1 / 3)
    # layer mean score = (0 + 0.01 + 2.99) / 3 = 1; scores 0, 0.01, 2.99
    assert pp.dormant_fraction(h, tau=0.025) == pytest.approx(2 / 3)
    assert pp.dormant_fraction(h, tau=0.005) == pytest.approx(1 / 3)
    assert pp.dormant_fraction(h, tau=0.0) == pp.dead_unit_fraction(h)
    assert pp.zero_fraction(h) == pytest.approx(7 / 12)  # 4 zeros in unit 0, 3 in unit 1


def test_dead_units_of_conv_features_count_channels() -> None:
    h = torch.zeros(2, 3, 4, 4)
    h[1, 0, 3, 3] = 1.0  # channel 0 alive at one position of one sample
    h[:, 2] = 0.5
    assert pp.dead_unit_fraction(h) == pytest.approx(1 / 3)


def test_weight_magnitude_and_mean_abs() -> None:
    lin = torch.nn.Linear(2, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -2.0], [2.0, 0.0]]))
        lin.bias.copy_(torch.tensor([0.0, -4.0]))
    assert pp.weight_magnitude(lin) == pytest.approx(5.0)
    assert pp.weight_magnitude([lin.weight, lin.bias]) == pytest.approx(5.0)
    assert pp.mean_abs_weight(lin) == pytest.approx(9 / 6)
    assert pp.weight_magnitude([]) == 0.0


def test_feature_norm_and_feature_rank() -> None:
    phi = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    assert pp.feature_norm(phi) == pytest.approx(3.0)
    assert pp.feature_rank(torch.diag(torch.tensor([1.0, 1e-3]))) == 1  # σ/√2 = 0.707, 7e-4


@given(
    n=st.integers(1, 40),
    d=st.integers(1, 12),
    seed=st.integers(0, 2**32 - 1),
    delta=st.sampled_from([0.0, 1e-12, 0.01, 0.5]),
)
@settings(max_examples=200, deadline=None)
def test_srank_never_exceeds_the_number_of_singular_values(n: int, d: int, seed: int, delta: float) -> None:
    """A Gaussian matrix has full rank (almost surely, and well away from rounding at these
    sizes): the shares of its σ reach 1 − δ = 1 only with the last one, so srank₀ = min(n, d)."""
    m = torch.from_numpy(np.random.default_rng(seed).standard_normal((n, d)))
    value = pp.srank(m, delta)
    assert 1 <= value <= min(n, d)
    if delta == 0.0:
        assert value == min(n, d) == np.linalg.matrix_rank(m.numpy())


# ---- NumPy references on random matrices of several shapes and both dtypes --------------------
@pytest.mark.parametrize("shape", [(1, 5), (5, 1), (7, 3), (3, 7), (64, 64), (512, 64), (20, 200)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rank_metrics_match_numpy(shape: tuple[int, int], dtype: torch.dtype) -> None:
    rng = np.random.default_rng(sum(shape))
    m = rng.standard_normal(shape) * rng.uniform(0.1, 10, size=shape[1])
    t = torch.tensor(m, dtype=dtype)
    ref = t.to(torch.float64).numpy()  # what the metric sees after the cast
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    assert pp.effective_rank(t) == pytest.approx(np_effective_rank(ref), rel=tol)
    assert pp.srank(t) == np_srank(ref)
    s = np.linalg.svd(ref, compute_uv=False)
    assert pp.stable_rank(t) == pytest.approx((s**2).sum() / s[0] ** 2, rel=tol)


def test_rank_deficient_matrix() -> None:
    m = torch.tensor(with_singular_values([5.0, 1.0], 10, 6))
    assert pp.effective_rank(m) == pytest.approx(np_effective_rank(m.numpy()), rel=1e-9)
    assert pp.srank(m) == 2
    assert pp.feature_rank(m) == 2


def test_ill_conditioned_matrix_does_not_crash() -> None:
    m = torch.tensor(with_singular_values([1e12, 1.0, 1e-12], 30, 8))
    assert pp.effective_rank(m) == pytest.approx(1.0, abs=1e-9)
    assert pp.srank(m) == 1


# ---- edge cases -----------------------------------------------------------------------------
def test_zero_matrix() -> None:
    z = torch.zeros(8, 4)
    assert pp.effective_rank(z) == 0.0
    assert pp.srank(z) == 0
    assert pp.stable_rank(z) == 0.0
    assert pp.feature_rank(z) == 0
    assert pp.dead_unit_fraction(z) == 1.0
    assert pp.dormant_fraction(z) == 1.0


def test_single_sample_and_1d_inputs() -> None:
    x = torch.tensor([1.0, 0.0, 2.0])
    assert pp.effective_rank(x) == pytest.approx(1.0)
    assert pp.srank(x) == 1
    assert pp.dead_unit_fraction(x) == pytest.approx(1 / 3)
    assert pp.dead_unit_fraction(x.reshape(1, 3)) == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    "fn",
    [
        pp.effective_rank,
        pp.srank,
        pp.stable_rank,
        pp.feature_rank,
        pp.dead_unit_fraction,
        pp.dormant_fraction,
        pp.zero_fraction,
        pp.feature_norm,
    ],
)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_input_gives_nan_and_a_warning(fn: object, bad: float) -> None:
    x = torch.ones(4, 3)
    x[1, 2] = bad
    with pytest.warns(NonFiniteWarning):
        assert math.isnan(fn(x))  # type: ignore[operator]


def test_non_finite_weights_give_nan_and_a_warning() -> None:
    with pytest.warns(NonFiniteWarning):
        assert math.isnan(pp.weight_magnitude(torch.tensor([1.0, math.nan])))


def test_finite_input_gives_no_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pp.effective_rank(torch.randn(10, 4))


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="delta"):
        pp.srank(torch.ones(2, 2), delta=1.5)
    with pytest.raises(ValueError, match="tau"):
        pp.dormant_fraction(torch.ones(2, 2), tau=-1)


# ---- properties -----------------------------------------------------------------------------
matrices = st.integers(1, 12).flatmap(
    lambda n: st.integers(1, 12).flatmap(
        lambda d: arrays(np.float64, (n, d), elements=st.floats(-100, 100, allow_subnormal=False))
    )
)


@settings(max_examples=60, deadline=None)
@given(matrices)
def test_effective_rank_bounds(m: np.ndarray) -> None:
    t = torch.tensor(m)
    er = pp.effective_rank(t)
    if np.linalg.norm(m) < 1e-12:
        return
    assert 1.0 - 1e-9 <= er <= min(m.shape) + 1e-9
    assert 1 <= pp.srank(t) <= min(m.shape)


@settings(max_examples=40, deadline=None)
@given(matrices, st.integers(0, 2**31 - 1), st.floats(1e-3, 1e3))
def test_effective_rank_invariant_to_rotation_and_scale(m: np.ndarray, seed: int, c: float) -> None:
    if np.linalg.norm(m) < 1e-6:
        return
    n, d = m.shape
    rng = np.random.default_rng(seed)
    left = ortho_group.rvs(n, random_state=rng) if n > 1 else np.ones((1, 1))
    right = ortho_group.rvs(d, random_state=rng) if d > 1 else np.ones((1, 1))
    er = pp.effective_rank(torch.tensor(m))
    assert pp.effective_rank(torch.tensor(left @ m @ right)) == pytest.approx(er, rel=1e-6, abs=1e-9)
    assert pp.effective_rank(torch.tensor(c * m)) == pytest.approx(er, rel=1e-6, abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(
    arrays(
        np.float32,
        st.tuples(st.integers(1, 10), st.integers(1, 10)),
        elements=st.sampled_from([0.0, 0.0, 0.001, 0.5, 3.0]),
    ),
    st.floats(0, 1),
)
def test_unit_fractions_in_unit_interval(h: np.ndarray, tau: float) -> None:
    t = torch.tensor(h)
    dead, dormant, zeros = pp.dead_unit_fraction(t), pp.dormant_fraction(t, tau), pp.zero_fraction(t)
    assert 0.0 <= dead <= zeros <= 1.0  # a dead unit is zero in every sample
    assert 0.0 <= dormant <= 1.0
    assert dormant >= dead  # a dead unit is dormant for every τ ≥ 0


@pytest.mark.parametrize(
    "fn",
    [
        pp.effective_rank,
        pp.srank,
        pp.stable_rank,
        pp.dead_unit_fraction,
        pp.dormant_fraction,
        pp.zero_fraction,
        pp.feature_norm,
        pp.feature_rank,
    ],
)
@pytest.mark.parametrize("shape", [(0, 5), (0, 3, 4, 4)])
def test_no_samples_give_nan(fn: Any, shape: tuple[int, ...]) -> None:
    assert math.isnan(fn(torch.zeros(shape)))
