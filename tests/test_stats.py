"""reference_agent.experiments.stats against independent references: hand-worked values, SciPy's trim_mean,
brute-force enumeration (of P(X > Y) and of the whole bootstrap distribution), the closed-form
variance of a resampled mean, and coverage on synthetic normal data."""

from __future__ import annotations

import itertools
from fractions import Fraction

import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from reference_agent.experiments import stats

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)


def values(min_size: int = 1, max_size: int = 12) -> st.SearchStrategy[np.ndarray]:
    return arrays(np.float64, st.integers(min_size, max_size), elements=finite)


# ---------------------------------------------------------------- IQM --------------------------


def test_iqm_hand_worked() -> None:
    # Wikipedia, "Interquartile mean": {1, 3, 5, …, 17} (n = 9) → (0.75·5 + 7 + 9 + 11 + 0.75·13) / 4.5 = 9
    assert stats.iqm([1, 3, 5, 7, 9, 11, 13, 15, 17]) == pytest.approx(9.0)
    assert stats.iqm([5, 13, 1, 9, 17, 3, 11, 7, 15]) == pytest.approx(9.0)
    # n = 5: masses 0.2 each; [0.25, 0.75] holds 0.15 of x(2), all of x(3), 0.15 of x(4) → /0.5
    assert stats.iqm([1, 2, 3, 4, 100]) == pytest.approx(0.3 * 2 + 0.4 * 3 + 0.3 * 4)
    # n = 6, skewed: weights (0, 1/6, 1/3, 1/3, 1/6, 0) → 2/6 + 4/3 + 8/3 + 16/6 = 7
    assert stats.iqm([1, 2, 4, 8, 16, 32]) == pytest.approx(7.0)
    assert stats.iqm([42.0]) == 42.0 and stats.iqm([1.0, 3.0]) == pytest.approx(2.0)
    np.testing.assert_allclose(stats.iqm_weights(3), [1 / 6, 2 / 3, 1 / 6])
    with pytest.raises(ValueError, match="at least one"):
        stats.iqm([])


@given(st.integers(1, 8).flatmap(lambda k: arrays(np.float64, 4 * k, elements=finite)))
def test_iqm_is_scipy_trim_mean_when_four_divides_n(x: np.ndarray) -> None:
    assert stats.iqm(x) == pytest.approx(scipy.stats.trim_mean(x, 0.25), rel=1e-9, abs=1e-6)


@given(values())
def test_iqm_properties(x: np.ndarray) -> None:
    m = stats.iqm(x)
    assert x.min() - 1e-6 <= m <= x.max() + 1e-6
    assert stats.iqm(np.random.default_rng(0).permutation(x)) == pytest.approx(m, abs=1e-6)
    assert stats.iqm(3 * x + 7) == pytest.approx(3 * m + 7, rel=1e-9, abs=1e-5)
    w = stats.iqm_weights(x.size)
    assert w.min() >= 0 and w.sum() == pytest.approx(1.0)
    if x.size >= 4:  # the largest value holds no mass inside the quartiles: an outlier cannot move the IQM
        y = x.copy()
        y[np.argmax(y)] = 1e12
        assert stats.iqm(y) == pytest.approx(m, abs=1e-6)


def test_iqm_vectorizes_over_leading_axes() -> None:
    x = np.random.default_rng(1).normal(size=(3, 4, 7))
    np.testing.assert_allclose(stats.iqm(x, axis=-1), [[stats.iqm(row) for row in block] for block in x])
    np.testing.assert_allclose(stats.iqm(x, axis=1), [[stats.iqm(x[i, :, j]) for j in range(7)] for i in range(3)])


# ---------------------------------------------------------------- P(X > Y) ---------------------


def brute_poi(x: list[float], y: list[float]) -> Fraction:
    total = Fraction(0)
    for a in x:
        for b in y:
            total += 1 if a > b else Fraction(1, 2) if a == b else 0
    return total / (len(x) * len(y))


def test_probability_of_improvement_by_enumeration() -> None:
    assert stats.probability_of_improvement([1, 2, 3], [0, 0, 0]) == 1.0
    assert stats.probability_of_improvement([0, 2, 4, 6, 8], [1, 3, 5, 7, 9]) == pytest.approx(10 / 25)
    assert stats.probability_of_improvement([1, 1], [1, 1]) == 0.5
    x, y = [3.0, 1.0, 2.0, 2.0], [2.0, 0.0, 5.0]
    assert stats.probability_of_improvement(x, y) == pytest.approx(float(brute_poi(x, y)))


small = st.lists(st.integers(-3, 3).map(float), min_size=1, max_size=6)


@given(small, small)
def test_probability_of_improvement_properties(x: list[float], y: list[float]) -> None:
    p = stats.probability_of_improvement(x, y)
    assert p == pytest.approx(float(brute_poi(x, y)))
    assert 0.0 <= p <= 1.0
    assert p + stats.probability_of_improvement(y, x) == pytest.approx(1.0)
    assert stats.probability_of_improvement(x[::-1], sorted(y)) == pytest.approx(p)
    # the Mann–Whitney U statistic over n·m (SciPy counts ties as 1/2, as we do)
    assert p == pytest.approx(scipy.stats.mannwhitneyu(x, y).statistic / (len(x) * len(y)))


# ---------------------------------------------------------------- bootstrap -------------------


def test_intervals_are_deterministic_for_a_seed() -> None:
    x, y = [1.0, 4.0, 2.0, 8.0, 5.0], [0.0, 3.0, 1.0, 2.0, 6.0]
    a = stats.improvement([x, y], [(0, 1)], seed=3)
    assert a == stats.improvement([x, y], [(0, 1)], seed=3)
    assert stats.aggregate([x], "iqm", seed=3) == stats.aggregate([x], "iqm", seed=3)
    z = np.random.default_rng(0).normal(size=(2, 9))
    others = {stats.aggregate(list(z), "mean", seed=s).low for s in range(5)}
    assert len(others) > 1  # the seed does drive the resampling


def test_interval_contains_the_estimate_and_is_degenerate_for_constant_scores() -> None:
    iv = stats.aggregate([[-200.0] * 5], "iqm")
    assert (iv.estimate, iv.low, iv.high) == (-200.0, -200.0, -200.0)
    assert iv.excludes(-200.0) == 0 and iv.excludes(-201.0) == 1 and iv.excludes(0.0) == -1
    tie = stats.improvement([[-200.0] * 5, [-200.0] * 5], [(0, 1)])
    assert (tie.estimate, tie.low, tie.high) == (0.5, 0.5, 0.5)


def test_refuses_what_cannot_be_bootstrapped() -> None:
    with pytest.raises(ValueError, match="at least 2 runs"):
        stats.aggregate([[1.0, 2.0], [3.0]], "mean")
    with pytest.raises(ValueError, match="not finite"):
        stats.aggregate([[1.0, float("nan")]], "mean")
    with pytest.raises(ValueError, match="two different strata"):
        stats.improvement([[1.0, 2.0], [3.0, 4.0]], [(0, 0)])
    with pytest.raises(ValueError, match="no pairs"):
        stats.difference([[1.0, 2.0]], [])


def exact_bootstrap(samples: list[list[float]], statistic: object) -> np.ndarray:
    """The statistic on every resample of every stratum (each stratum: all n^n ordered index
    tuples, equally likely), i.e. the exact bootstrap distribution."""
    per_stratum = [list(itertools.product(s, repeat=len(s))) for s in samples]
    return np.array([statistic(*(np.array(r) for r in combo)) for combo in itertools.product(*per_stratum)])  # type: ignore[operator]


def test_stratified_percentile_interval_matches_the_exact_bootstrap_distribution() -> None:
    x, y = [1.0, 5.0, 2.0], [0.0, 3.0, 4.0]
    exact = exact_bootstrap([x, y], stats.probability_of_improvement)  # 27 × 27 equally likely resamples
    iv = stats.improvement([x, y], [(0, 1)], seed=7)
    assert iv.estimate == pytest.approx(float(brute_poi(x, y)))
    # the Monte Carlo quantiles sit on atoms of the exact distribution, at the right cumulative levels
    for q, level in ((iv.low, 0.025), (iv.high, 0.975)):
        assert np.isclose(exact, q).any()
        assert np.mean(exact < q - 1e-12) <= level + 0.01 and np.mean(exact <= q + 1e-12) >= level - 0.01
    assert iv.se == pytest.approx(exact.std(), rel=0.03)

    def diff_iqm(a: np.ndarray, b: np.ndarray) -> float:
        return float(stats.iqm(a) - stats.iqm(b))

    exact_d = exact_bootstrap([x, y], diff_iqm)
    d = stats.difference([x, y], [(0, 1)], "iqm", seed=7)
    assert d.estimate == pytest.approx(diff_iqm(np.array(x), np.array(y)))
    assert d.se == pytest.approx(exact_d.std(), rel=0.03)
    assert np.mean(exact_d < d.low - 1e-12) <= 0.035 and np.mean(exact_d > d.high + 1e-12) <= 0.035


def test_stratified_resampling_variance_is_the_closed_form() -> None:
    """Resampling seeds within strata: Var*(pooled mean) = Σ_k n_k σ̂_k² / N² (σ̂ with ddof 0).
    Pooling the strata first would add the between-strata variance: a different number."""
    rng = np.random.default_rng(0)
    strata = [rng.normal(0, 1, 6), rng.normal(100, 3, 10), rng.normal(-50, 2, 8)]
    n = np.array([s.size for s in strata])
    expected = np.sqrt(sum(k * s.var() for k, s in zip(n, strata, strict=True)) / n.sum() ** 2)
    iv = stats.aggregate(strata, "mean", seed=1)
    assert iv.se == pytest.approx(expected, rel=0.03)
    unstratified = np.concatenate(strata).std() / np.sqrt(n.sum())
    assert unstratified > 5 * expected
    assert iv.seeds == (6, 10, 8)
    # PoI averaged over matched pairs: the pairs' strata are resampled independently
    both = stats.improvement(strata, [(0, 2), (1, 0)])
    assert both.estimate == pytest.approx(
        (
            stats.probability_of_improvement(strata[0], strata[2])
            + stats.probability_of_improvement(strata[1], strata[0])
        )
        / 2
    )


@pytest.mark.parametrize(
    ("n", "statistic", "low", "high"),
    [(40, "mean", 0.925, 0.975), (10, "iqm", 0.90, 0.97), (5, "mean", 0.79, 0.89)],
)
def test_coverage_on_normal_data(n: int, statistic: str, low: float, high: float) -> None:
    """95 % intervals of the mean (IQM) of normal samples cover the true value (0 for both)
    about 95 % of the time with 40 runs; with 5 seeds the percentile interval of the mean is too
    narrow (~84 %), as the module docstring states. 800 draws: binomial SE ≈ 0.8 %."""
    rng = np.random.default_rng(2024 + n)
    draws = 800
    hits = sum(stats.aggregate([rng.normal(size=n)], statistic, seed=i).excludes(0.0) == 0 for i in range(draws))
    assert low <= hits / draws <= high


def test_stratified_coverage_of_a_pooled_mean() -> None:
    """Two strata (different means and spreads, 20 runs each): the pooled-mean interval covers
    the true pooled mean (the average of the two means) about 93 % of the time: the percentile
    interval is z·σ̂ with σ̂² biased by (n−1)/n, where the exact pivot is Student's t with ≈ 19
    degrees of freedom (the wide stratum dominates): P(|t₁₉| < 1.96·√(19/20)) ≈ 0.93."""
    rng = np.random.default_rng(5)
    draws = 600
    hits = 0
    for i in range(draws):
        strata = [rng.normal(10, 1, 20), rng.normal(-4, 3, 20)]
        hits += stats.aggregate(strata, "mean", seed=i).excludes(3.0) == 0
    assert 0.895 <= hits / draws <= 0.96


def test_curve_band() -> None:
    v = np.array([[0.0, 1.0, 5.0], [2.0, 1.0, 7.0], [4.0, 1.0, 6.0], [3.0, 1.0, 9.0], [1.0, 1.0, 8.0]])
    point, low, high = stats.curve_band(v, "iqm")
    np.testing.assert_allclose(point, [stats.iqm(v[:, j]) for j in range(3)])
    assert np.all(low <= point) and np.all(point <= high)
    assert low[1] == high[1] == 1.0 and low[0] < high[0]
    one = stats.curve_band(v[:1])
    np.testing.assert_array_equal(one[1], v[0])
    np.testing.assert_array_equal(one[2], v[0])


@settings(max_examples=30, deadline=None)
@given(values(min_size=2, max_size=8), values(min_size=2, max_size=8))
def test_intervals_are_bounded_and_hold_the_estimate(x: np.ndarray, y: np.ndarray) -> None:
    poi = stats.improvement([x, y], [(0, 1)], seed=0)
    assert 0.0 <= poi.low <= poi.estimate <= poi.high <= 1.0
    agg = stats.aggregate([x, y], "iqm", seed=0)
    both = np.concatenate([x, y])
    assert both.min() - 1e-6 <= agg.low <= agg.estimate <= agg.high <= both.max() + 1e-6
    assert stats.aggregate([y, x], "iqm", seed=0).estimate == pytest.approx(agg.estimate)
