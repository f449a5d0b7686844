"""The paper's claims (DESIGN.md's list), decided from interval estimates over seeds.

Scores (one number per run): the *final return*, the mean evaluation return over the run's last
k evaluations (:func:`reference_agent.experiments.results.final_return`, k = 3 by default); a plasticity
metric at the end of training (its last probe); the change of a metric over training (last probe
minus first); or a metric averaged over every probe of the run ("over training").

Statistics (:mod:`reference_agent.experiments.stats`; Agarwal et al. 2021): configurations are *strata*;
every interval is a 95 % percentile bootstrap confidence interval that resamples seeds within
each configuration (10,000 resamples, seeded).

Verdict rule, per claim:

* "A beats B" (δ, frequency, a method against the baseline): X = the claimed winner, Y = the
  other, in matched pairs of configurations that differ only in the compared setting. The
  statistic is the probability of improvement P(X > Y) averaged over the pairs (default;
  ``--statistic iqm|mean``: the mean over pairs of IQM(X) − IQM(Y), or of the means). **supported**
  when the interval lies entirely above 0.5 (above 0 for a difference), **not supported** when
  entirely below (the data favour the other side), **inconclusive** when it contains 0.5 (0).
* "A gives the highest …": the best configuration of each penalty (highest IQM of final return,
  the paper's selection rule, made on the same runs), then A's best against each rival's best,
  each with its own interval. **supported** when A beats every rival (an intersection–union
  test: each at 95 %), **not supported** when some rival beats A (no multiplicity correction),
  otherwise **inconclusive**.
* "X grows / rises during training": the IQM (or mean) of the per-run change over every run,
  pooled across configurations, with the stratified interval; **supported** above 0, **not
  supported** below 0, otherwise **inconclusive**.
* **no data**, with the reason, when the runs hold no configuration or pair that the claim
  compares with at least ``min_seeds`` seeds (default 5: percentile intervals of fewer seeds are
  far too narrow), after leaving out runs that took fewer than ``min_updates`` gradient steps
  (default 80,000, a run of the paper; 0 would keep runs that never learned).

Runs with an intervention (ReDo, Shrink & Perturb, reset; the ``intervention`` config field)
are shown in the tables but enter no claim: the paper's claims are about the penalties.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from reference_agent.config import DQNConfig, Reg
from reference_agent.experiments import stats
from reference_agent.experiments.claims import (
    INCONCLUSIVE,
    NO_DATA,
    NOT_SUPPORTED,
    PAPER_UPDATES,
    SUPPORTED,
    Claim,
    caveat,
    gradient_steps,
    init_vs_final,
)
from reference_agent.experiments.results import (
    FINAL_EVALS,
    Run,
    final_metric,
    final_return,
    metric_change,
    metric_values,
)

MIN_SEEDS = 5
"""Seeds a configuration needs before its interval takes part in a verdict."""
STATISTICS = ("poi", "iqm", "mean")
"""Decision statistics of the comparisons: probability of improvement, IQM or mean difference."""


@dataclass(frozen=True)
class Rules:
    """What a run and a configuration need, and the statistic a comparison is decided on."""

    min_seeds: int = MIN_SEEDS
    min_updates: int = PAPER_UPDATES
    last: int = FINAL_EVALS
    """k: the final return is the mean over the last k evaluations."""
    statistic: str = "poi"
    seed: int = stats.SEED

    def __post_init__(self) -> None:
        if self.statistic not in STATISTICS:
            raise ValueError(f"statistic must be one of {', '.join(STATISTICS)}, got {self.statistic!r}")
        if self.min_seeds < 2:
            raise ValueError("min_seeds must be >= 2 (a bootstrap interval needs two runs per configuration)")
        if self.last < 1:
            raise ValueError("last must be >= 1")


def intervention(cfg: DQNConfig) -> str:
    """The run's intervention (``none`` where the config has no such field)."""
    value = getattr(cfg, "intervention", "none")
    return str(getattr(value, "value", value))


def refuse(runs: list[Run], rules: Rules) -> tuple[list[Run], list[str]]:
    """The runs the claims can use (at least ``max(1, min_updates)`` gradient steps) and a line
    for each run left out: one per run that never took a gradient step, one for all the short
    ones."""
    kept, lines, short = [], [], []
    for r in runs:
        steps = gradient_steps(r)
        if steps == 0:
            lines.append(
                f"{r.path}: left out, it never took a gradient step (stopped at step {r.step:,}, learning "
                f"starts at {r.config.learning_starts:,})"
            )
        elif steps < rules.min_updates:
            short.append(r)
        else:
            kept.append(r)
    if short:
        fewest = min(gradient_steps(r) for r in short)
        names = ", ".join(r.path.name for r in short[:3]) + (f", … ({len(short) - 3} more)" if len(short) > 3 else "")
        lines.append(
            f"{len(short)} runs left out, shorter than the claims need: as few as {fewest:,} gradient steps, "
            f"fewer than {rules.min_updates:,} (--min-updates; a run of the paper takes {PAPER_UPDATES:,}): {names}"
        )
    return kept, lines


# ---------------------------------------------------------------- configurations -------------


@dataclass(eq=False)
class Stratum:
    """One configuration: its runs and one score per run (compared by identity)."""

    group: str
    config: DQNConfig
    runs: list[Run]
    scores: np.ndarray

    @property
    def name(self) -> str:
        return self.group.split("__", 1)[1] if "__" in self.group else self.group

    @property
    def n(self) -> int:
        return int(self.scores.size)


def strata(runs: list[Run], score: Callable[[Run], float | None]) -> list[Stratum]:
    """The runs grouped by configuration, each run scored (runs without a score are dropped)."""
    by_group: dict[str, list[tuple[Run, float]]] = defaultdict(list)
    for r in runs:
        value = score(r)
        if value is not None and math.isfinite(value):
            by_group[r.group].append((r, value))
    return [
        Stratum(g, members[0][0].config, [r for r, _ in members], np.array([v for _, v in members]))
        for g, members in sorted(by_group.items())
    ]


def _key(cfg: DQNConfig, without: str) -> str:
    d = cfg.to_dict()
    return json.dumps({k: v for k, v in d.items() if k not in ("seed", "extra", without)}, sort_keys=True)


def matched_pairs(items: list[Stratum], field_name: str, better: Any, worse: Any) -> list[tuple[Stratum, Stratum]]:
    """Pairs of configurations that differ only in ``field_name``: (the one with ``better``, the
    one with ``worse``)."""
    groups: dict[str, dict[Any, Stratum]] = defaultdict(dict)
    for s in items:
        groups[_key(s.config, field_name)][s.config.to_dict()[field_name]] = s
    return [(g[better], g[worse]) for g in groups.values() if better in g and worse in g]


def _decide(iv: stats.Interval, threshold: float) -> str:
    side = iv.excludes(threshold)
    return SUPPORTED if side > 0 else NOT_SUPPORTED if side < 0 else INCONCLUSIVE


def _few(items: list[Stratum], rules: Rules) -> str:
    few = sorted({f"{s.name} ({s.n})" for s in items if s.n < rules.min_seeds})
    return f"fewer than {rules.min_seeds} seeds (--min-seeds): " + ", ".join(few[:4]) + (" …" if len(few) > 4 else "")


def _caveat(items: list[Stratum], rules: Rules) -> str:
    unique = {s.group: s for s in items}  # a baseline in several pairs counts once
    marks = [c] if (c := caveat([r for s in unique.values() for r in s.runs])) else []
    if rules.min_seeds < MIN_SEEDS:
        marks.append(f"as few as {min(s.n for s in items)} seeds per configuration: intervals too narrow")
    return "; ".join(marks)


@dataclass
class _Comparison:
    """How a comparison is scored and worded."""

    score: str
    """The per-run score, in words (e.g. "final return (mean of the last 3 evaluations)")."""
    x: str = "X"
    y: str = "Y"
    digits: int = 4
    extra: list[str] = field(default_factory=list)


def _pair_statistic(
    pairs: list[tuple[Stratum, Stratum]], rules: Rules, what: _Comparison
) -> tuple[stats.Interval, float, str]:
    """The decisive interval of matched pairs, its threshold, and the statistic in words."""
    unique: dict[str, Stratum] = {}
    for a, b in pairs:
        unique.setdefault(a.group, a)
        unique.setdefault(b.group, b)
    order = list(unique)
    data = [unique[g].scores for g in order]
    index = [(order.index(a.group), order.index(b.group)) for a, b in pairs]
    over = f"averaged over {len(pairs)} matched pairs of configurations" if len(pairs) > 1 else "one pair"
    rule = "95 % stratified percentile bootstrap CI (seeds resampled within each configuration)"
    if rules.statistic == "poi":
        iv = stats.improvement(data, index, f"P({what.x} > {what.y})", seed=rules.seed)
        text = f"P({what.x} > {what.y}) of the {what.score}, {over}; {rule}; supported if the CI lies above 0.5"
        return iv, 0.5, text
    iv = stats.difference(data, index, rules.statistic, f"{rules.statistic.upper()} difference", seed=rules.seed)
    text = (
        f"{rules.statistic.upper()}({what.x}) − {rules.statistic.upper()}({what.y}) of the {what.score}, {over}; "
        f"{rule}; supported if the CI lies above 0"
    )
    return iv, 0.0, text


def _one_pair_text(a: Stratum, b: Stratum, rules: Rules, digits: int) -> str:
    poi = stats.improvement([a.scores, b.scores], [(0, 1)], seed=rules.seed)
    ia = stats.aggregate([a.scores], "iqm", seed=rules.seed)
    ib = stats.aggregate([b.scores], "iqm", seed=rules.seed)
    return f"{a.name} (n={a.n}) IQM {ia.text(digits)} vs {b.name} (n={b.n}) IQM {ib.text(digits)}: P = {poi.text(2)}"


def pairs_claim(
    title: str,
    pairs: list[tuple[Stratum, Stratum]],
    rules: Rules,
    what: _Comparison,
    missing: str,
    source: str = "paper",
) -> Claim:
    """Decide "X beats Y" over matched pairs (X first in each pair)."""
    if not pairs:
        return Claim(title, NO_DATA, missing, source=source)
    ready = [(a, b) for a, b in pairs if min(a.n, b.n) >= rules.min_seeds]
    if not ready:
        items = [s for pair in pairs for s in pair]
        return Claim(title, NO_DATA, f"{len(pairs)} pair(s) found, all with {_few(items, rules)}", source=source)
    iv, threshold, text = _pair_statistic(ready, rules, what)
    lines = [_one_pair_text(a, b, rules, what.digits) for a, b in ready]
    skipped = len(pairs) - len(ready)
    head = f"{iv.statistic} = {iv.text(3)}"
    if skipped:
        head += f" ({skipped} pair(s) left out: {_few([s for p in pairs for s in p if p not in ready], rules)})"
    return Claim(
        title,
        _decide(iv, threshold),
        "; ".join([head, *lines, *what.extra]),
        _caveat([s for p in ready for s in p], rules),
        text,
        iv.estimate,
        iv.low,
        iv.high,
        threshold,
        list(iv.seeds),
        source,
    )


def highest_claim(
    title: str,
    candidate: Stratum | None,
    rivals: list[Stratum],
    rules: Rules,
    what: _Comparison,
    missing: str,
) -> Claim:
    """Decide "the candidate gives the highest score" against each rival (an intersection–union
    rule: supported only if it beats every rival)."""
    if candidate is None or not rivals:
        return Claim(title, NO_DATA, missing)
    ready = [r for r in rivals if r.n >= rules.min_seeds]
    if candidate.n < rules.min_seeds or not ready:
        return Claim(title, NO_DATA, _few([candidate, *rivals], rules))
    results = []
    for rival in ready:
        iv, threshold, text = _pair_statistic([(candidate, rival)], rules, what)
        results.append((rival, iv))
    sides = [iv.excludes(threshold) for _, iv in results]
    verdict = SUPPORTED if all(s > 0 for s in sides) else NOT_SUPPORTED if any(s < 0 for s in sides) else INCONCLUSIVE
    weakest = min(results, key=lambda ri: ri[1].low)[1]
    lines = [f"vs {rival.name}: {iv.statistic.replace(what.y, rival.name)} = {iv.text(3)}" for rival, iv in results]
    levels = [
        f"{s.name} (n={s.n}) IQM {stats.aggregate([s.scores], 'iqm', seed=rules.seed).text(what.digits)}"
        for s in [candidate, *ready]
    ]
    text = (
        text.replace("one pair", f"against each of {len(ready)} rival(s)")
        + "; supported if above for every rival, not supported if below for some rival (the interval shown: "
        "the weakest comparison)"
    )
    return Claim(
        title,
        verdict,
        "; ".join([*lines, "levels: " + ", ".join(levels), *what.extra]),
        _caveat([candidate, *ready], rules),
        text,
        weakest.estimate,
        weakest.low,
        weakest.high,
        threshold,
        list(weakest.seeds),
    )


def trend_claim(title: str, items: list[Stratum], rules: Rules, what: str, source: str = "paper") -> Claim:
    """Decide "the metric grows over training" from the pooled per-run changes."""
    if not items:
        return Claim(title, NO_DATA, f"no run with two probes of {what}", source=source)
    ready = [s for s in items if s.n >= rules.min_seeds]
    if not ready:
        return Claim(title, NO_DATA, f"{len(items)} configuration(s), all with {_few(items, rules)}", source=source)
    name = "mean" if rules.statistic == "mean" else "iqm"
    iv = stats.aggregate([s.scores for s in ready], name, f"{name.upper()} of the change", seed=rules.seed)
    changes = np.concatenate([s.scores for s in ready])
    evidence = (
        f"{iv.statistic} = {iv.text(3)} over {changes.size} runs in {len(ready)} configurations; up in "
        f"{int((changes > 0).sum())}/{changes.size} runs"
    )
    if len(ready) < len(items):
        evidence += f" ({len(items) - len(ready)} configuration(s) left out: {_few(items, rules)})"
    text = (
        f"{name.upper()} over all runs (pooled) of the change of {what}, last probe − first probe; 95 % stratified "
        "percentile bootstrap CI (seeds resampled within each configuration); supported if the CI lies above 0"
    )
    return Claim(
        title,
        _decide(iv, 0.0),
        evidence,
        _caveat(ready, rules),
        text,
        iv.estimate,
        iv.low,
        iv.high,
        0.0,
        list(iv.seeds),
        source,
    )


# ---------------------------------------------------------------- the claims -----------------


def _family(cfg: DQNConfig) -> tuple[str, str, tuple[str, ...]]:
    return (cfg.reg.value, cfg.reg_variant.value, cfg.reg_layers)


def _family_name(family: tuple[str, str, tuple[str, ...]]) -> str:
    reg, variant, layers = family
    if reg == "none":
        return "no regularization"
    return reg + (" (authors' code)" if variant == "authors" else "") + (f" on {'+'.join(layers)}" if layers else "")


def _is_method(cfg: DQNConfig) -> bool:
    """The paper's method on CartPole and MountainCar: a successive penalty (δ ≠ 1), or the
    authors' code's singular penalty (which has no δ). Constant penalties (δ = 1) are the
    alternatives the method is compared with, not the method."""
    if cfg.reg is Reg.none:
        return False
    return cfg.delta != 1 or (cfg.reg is Reg.singular and cfg.reg_variant.value == "authors")


def _penultimate(cfg: DQNConfig) -> str:
    return f"net.{2 * (len(cfg.hidden_sizes) - 1)}"


def _rank_stratum(s: Stratum) -> Stratum | None:
    """The configuration's runs scored by the effective rank of the penultimate layer's features
    at their last probe."""
    layer = _penultimate(s.config)
    found = strata(s.runs, lambda r: final_metric(r, "effective_rank", layer))
    return found[0] if found else None


def _mean_over_training(metric: str) -> Callable[[Run], float | None]:
    def score(run: Run) -> float | None:
        values = metric_values(run, metric)
        return float(np.mean([v for _, v in values])) if values else None

    return score


def _zero_fraction_change(run: Run) -> float | None:
    change = metric_change(run, "zero_fraction")
    if change is not None:
        return change
    found = init_vs_final(run)  # runs made before zero_fraction was probed: θ_0 vs the checkpoint
    return found["zero_fraction"][1] - found["zero_fraction"][0] if found else None


def check_claims(runs: list[Run], rules: Rules | None = None) -> list[Claim]:
    """A verdict for each of the paper's claims (DESIGN.md), and for issue 14's plasticity
    question, from ``runs`` (already filtered with :func:`refuse`). Every claim gets a row; one
    without the runs it compares says ``no data`` and why."""
    rules = rules or Rules()
    runs = [r for r in runs if intervention(r.config) == "none"]
    score = f"final return (mean evaluation return over the last {rules.last} evaluations)"

    def final(r: Run) -> float | None:
        return final_return(r, rules.last)

    ll = [r for r in runs if r.config.env_id.startswith("LunarLander")]
    ll_final = strata(ll, final)
    regs = [s for s in ll_final if s.config.reg is not Reg.none]
    no_ll = "no LunarLander run (after leaving out short runs)"
    claims = [
        pairs_claim(
            "LunarLander: δ = 1.25 beats δ = 0.75",
            matched_pairs(regs, "delta", 1.25, 0.75),
            rules,
            _Comparison(score, "δ=1.25", "δ=0.75"),
            no_ll if not ll else "no pair of penalized configurations differing only in δ (1.25 vs 0.75)",
        ),
        pairs_claim(
            "LunarLander: penalizing every update beats target updates only",
            matched_pairs(regs, "reg_every", "update", "target"),
            rules,
            _Comparison(score, "every update", "target only"),
            no_ll if not ll else "no pair of penalized configurations differing only in the frequency",
        ),
    ]

    # best configuration of each penalty family, by IQM of the final return
    best: dict[tuple[str, str, tuple[str, ...]], Stratum] = {}
    for s in ll_final:
        if s.n >= rules.min_seeds:
            fam = _family(s.config)
            if fam not in best or stats.iqm(s.scores) > stats.iqm(best[fam].scores):
                best[fam] = s
    singular_families = sorted(f for f in best if f[0] == Reg.singular.value)
    paper_singular = (Reg.singular.value, "paper", ())
    candidates = [paper_singular, *(f for f in singular_families if f != paper_singular)]
    any_singular = any(s.config.reg is Reg.singular for s in ll_final)
    for fam in candidates:
        if fam != paper_singular and fam not in best:
            continue
        rivals = [best[f] for f in sorted(best) if f[0] != Reg.singular.value]
        suffix = "" if fam == paper_singular else f" — {_family_name(fam)}"
        candidate = best.get(fam)
        if candidate is not None:
            missing = "no rival penalty (or baseline) with enough seeds"
        elif not ll:
            missing = no_ll
        elif not any_singular:
            missing = "no singular-penalty run on LunarLander"
        else:
            missing = _few([s for s in ll_final if _family(s.config) == fam], rules)
        selection = "best setting of each penalty by IQM of the final return, chosen on these runs"
        claims.append(
            highest_claim(
                f"LunarLander: the singular loss gives the highest evaluation return{suffix}",
                candidate,
                rivals,
                rules,
                _Comparison(score, "singular", "rival", extra=[selection]),
                missing,
            )
        )
        cand_rank = _rank_stratum(candidate) if candidate is not None else None
        rival_ranks = [r for s in rivals if (r := _rank_stratum(s)) is not None]
        claims.append(
            highest_claim(
                f"LunarLander: the singular loss gives the highest effective rank{suffix}",
                cand_rank,
                rival_ranks,
                rules,
                _Comparison(
                    "effective rank of the penultimate layer's features at the last probe",
                    "singular",
                    "rival",
                    digits=3,
                    extra=[selection],
                ),
                missing if candidate is None else "no effective-rank probes in these runs",
            )
        )

    for metric, title in (
        ("weight_magnitude", "During training, weight magnitudes grow (whole network ‖θ‖₂)"),
        ("dead_fraction", "During training, dead units rise (fraction of units dead on the whole probe batch)"),
    ):
        claims.append(
            trend_claim(title, strata(runs, lambda r, m=metric: metric_change(r, m)), rules, f"network {metric}")  # type: ignore[misc]
        )
    claims.append(
        trend_claim(
            "During training, activations become sparser (share of zero units per sample, what the authors' code "
            "plotted as dead neurons)",
            strata(runs, _zero_fraction_change),
            rules,
            "network zero_fraction",
        )
    )

    for env, wanted in (("CartPole-v1", True), ("MountainCar-v0", False)):
        env_final = strata([r for r in runs if r.config.env_id == env], final)
        base = next((s for s in env_final if s.config.reg is Reg.none), None)
        methods = [s for s in env_final if _is_method(s.config)]
        verb = "beats" if wanted else "does worse than"
        if base is None or not methods:
            missing = f"no {env} runs" if not env_final else f"{env}: no baseline and penalized runs side by side"
            claims.append(Claim(f"{env}: the method {verb} the baseline", NO_DATA, missing))
            continue
        for m in methods:
            pair = (m, base) if wanted else (base, m)
            x, y = ("method", "baseline") if wanted else ("baseline", "method")
            claims.append(
                pairs_claim(
                    f"{env}: the method {verb} the baseline ({m.name})",
                    [pair],
                    rules,
                    _Comparison(score, x, y),
                    "",
                )
            )

    for metric, words in (
        ("trainability_ratio", "the trainability ratio (final / initial loss fitting random targets)"),
        ("grad_dormant_fraction", "the gradient-dormant fraction (GraMa)"),
    ):
        title = f"Plasticity: the successive penalty (δ > 1) keeps {words} lower than the baseline over training"
        pairs: list[tuple[Stratum, Stratum]] = []
        for env in sorted({r.config.env_id for r in runs}):
            items = strata([r for r in runs if r.config.env_id == env], _mean_over_training(metric))
            base = next((s for s in items if s.config.reg is Reg.none), None)
            if base is not None:
                pairs += [(base, s) for s in items if s.config.reg is not Reg.none and s.config.delta > 1]
        claims.append(
            pairs_claim(
                title,
                pairs,
                rules,
                _Comparison(f"network {metric} averaged over the run's probes", "baseline", "successive", digits=3),
                f"no baseline and δ > 1 runs with {metric} probes in one environment",
                source="issue 14",
            )
        )
    return claims
