"""The paper's claims, checked against our runs (DESIGN.md lists them).

Rules (stated in docs/reproduction.md): configurations are compared on the best smoothed
evaluation return, mean over seeds (the paper selects on maximum evaluation return). "A beats B"
holds for a pair when A's mean is higher; the difference is *clear* when it exceeds the sum of
both half-ranges over seeds. A claim is **supported** when A wins every pair and at least half of
the wins are clear, **not supported** when A loses at least half of the pairs, otherwise
**inconclusive**; **no data** when the runs hold no pair (or configuration) that the claim compares.

Runs that never took a gradient step (they stopped at or before ``learning_starts``) are left
out (``usable_runs``). A verdict that rests on runs with fewer than ``SHORT_UPDATES`` gradient
steps (a quarter of the paper's 80,000) carries a ``caveat``: such runs can exercise the code,
not test the claim.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

import plasticity_probe as pp
from reference_agent import rundir
from reference_agent.checkpoint import load_checkpoint
from reference_agent.config import DQNConfig, Reg
from reference_agent.experiments.results import GroupCurve, Run, group_curves
from reference_agent.network import QNetwork

SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE, NO_DATA = "supported", "not supported", "inconclusive", "no data"


PAPER_STEPS = 100_000
SHORT_UPDATES = 20_000
"""Gradient steps below which a verdict is marked: a quarter of the paper's 100,000 − 20,000."""


@dataclass
class Claim:
    claim: str
    verdict: str
    evidence: str
    caveat: str = ""
    """Non-empty when the verdict rests on runs too short to test the claim."""


def gradient_steps(run: Run) -> int:
    """Gradient steps a run took: one per environment step from ``learning_starts`` on."""
    return max(0, run.step - max(run.config.learning_starts, 1) + 1)


def usable_runs(runs: list[Run]) -> tuple[list[Run], list[str]]:
    """The runs that took at least one gradient step, and a line for each run left out."""
    kept, left_out = [], []
    for r in runs:
        if gradient_steps(r) > 0:
            kept.append(r)
        else:
            left_out.append(
                f"{r.path}: left out, it never took a gradient step (stopped at step {r.step:,}, learning "
                f"starts at {r.config.learning_starts:,})"
            )
    return kept, left_out


def caveat(runs: list[Run]) -> str:
    """The mark of a verdict resting on ``runs``: empty unless one of them is short."""
    short = [r for r in runs if gradient_steps(r) < SHORT_UPDATES]
    if not short:
        return ""
    fewest = min(gradient_steps(r) for r in short)
    return (
        f"too short to test: {len(short)}/{len(runs)} runs with as few as {fewest:,} gradient steps "
        f"(the paper: {PAPER_STEPS - 20_000:,})"
    )


@dataclass
class Score:
    mean: float
    spread: float

    @classmethod
    def of(cls, c: GroupCurve) -> Score:
        i = int(np.argmax(c.mean))
        values = c.returns[:, i]
        return cls(float(c.mean[i]), float((values.max() - values.min()) / 2))


def _pairs_verdict(wins: list[bool], clear: list[bool]) -> str:
    if not wins:
        return NO_DATA
    if all(wins) and sum(clear) * 2 >= len(wins):
        return SUPPORTED
    if sum(not w for w in wins) * 2 >= len(wins):
        return NOT_SUPPORTED
    return INCONCLUSIVE


def _compare(
    curves: list[GroupCurve], field: str, better: Any, worse: Any, describe: Callable[[DQNConfig], str]
) -> tuple[str, str]:
    """Pair configurations that differ only in ``field`` (``better`` vs ``worse``)."""
    groups: dict[str, dict[Any, GroupCurve]] = {}
    for c in curves:
        d = c.config.to_dict()
        rest = json.dumps({k: v for k, v in d.items() if k not in ("seed", "extra", field)}, sort_keys=True)
        groups.setdefault(rest, {})[d[field]] = c
    wins, clear, lines = [], [], []
    for group in groups.values():
        if better in group and worse in group:
            a, b = Score.of(group[better]), Score.of(group[worse])
            wins.append(a.mean > b.mean)
            clear.append(abs(a.mean - b.mean) > a.spread + b.spread)
            lines.append(
                f"{describe(group[better].config)}: {a.mean:.1f}±{a.spread:.1f} vs {b.mean:.1f}±{b.spread:.1f}"
            )
    n_clear = sum(c and w for c, w in zip(clear, wins, strict=True))
    return _pairs_verdict(wins, clear), f"wins {sum(wins)}/{len(wins)} ({n_clear} clear); " + "; ".join(lines)


def _values(run: Run, metric: str, layer: str) -> list[float | None]:
    """One plasticity metric of a run, in step order (None where it was not finite)."""
    return [
        v
        for _, v in sorted(
            (r["step"], r["value"]) for r in run.plasticity if r["metric"] == metric and r["layer"] == layer
        )
    ]


def _last_minus_first(run: Run, metric: str, layer: str) -> float | None:
    values = [v for v in _values(run, metric, layer) if v is not None]
    return float(values[-1] - values[0]) if len(values) >= 2 else None


def _final(run: Run, metric: str, layer: str) -> float | None:
    values = _values(run, metric, layer)
    return values[-1] if values else None


def init_vs_final(run: Run, metrics: tuple[str, ...] = ("zero_fraction",)) -> dict[str, tuple[float, float]]:
    """Whole-network metrics of θ_0 and of the final online network, both on the run's stored probe
    batch (from its checkpoint); empty when the run has no checkpoint with a probe batch."""
    path = run.path / rundir.CHECKPOINT
    if not path.exists():
        return {}
    ckpt = load_checkpoint(path)
    if ckpt["probe_batch"] is None:
        return {}
    obs = ckpt["probe_batch"]["obs"]
    values: dict[str, list[float]] = {m: [] for m in metrics}
    for state in (ckpt["init"], ckpt["online"]):
        net = QNetwork(
            obs.shape[1], state[f"net.{2 * len(run.config.hidden_sizes)}.weight"].shape[0], run.config.hidden_sizes
        )
        net.load_state_dict(state)
        report = pp.Probe(net, metrics=list(metrics), probe_batch=obs).measure()
        for m in metrics:
            values[m].append(report.network[m])
    return {m: (v[0], v[1]) for m, v in values.items()}


def _direction_verdict(changes: list[float]) -> str:
    up = sum(d > 0 for d in changes)
    if up * 4 >= 3 * len(changes):
        return SUPPORTED
    if up * 2 <= len(changes):
        return NOT_SUPPORTED
    return INCONCLUSIVE


def check_claims(runs: list[Run], window: int = 3, penultimate: str = "net.2") -> list[Claim]:
    """Verdicts for the paper's claims from the runs found (any subset of the paper's sweeps)."""
    claims: list[Claim] = []
    ll_runs = [r for r in runs if r.config.env_id.startswith("LunarLander")]
    ll = [c for c in group_curves(ll_runs, window)]
    regs = [c for c in ll if c.config.reg is not Reg.none and not c.config.reg_layers]

    verdict, evidence = _compare(regs, "delta", 1.25, 0.75, lambda c: f"{c.reg.value}, every {c.reg_every.value}")
    claims.append(Claim("LunarLander: δ = 1.25 beats δ = 0.75", verdict, evidence))

    verdict, evidence = _compare(regs, "reg_every", "update", "target", lambda c: f"{c.reg.value} δ={c.delta:g}")
    claims.append(Claim("LunarLander: penalizing every update beats target updates only", verdict, evidence))

    best: dict[Reg, GroupCurve] = {}
    for c in ll:
        if not c.config.reg_layers and (
            c.config.reg not in best or Score.of(c).mean > Score.of(best[c.config.reg]).mean
        ):
            best[c.config.reg] = c
    if best:
        ranking = sorted(best.values(), key=lambda c: -Score.of(c).mean)
        text = ", ".join(f"{c.group.split('__')[1]}: {Score.of(c).mean:.1f}±{Score.of(c).spread:.1f}" for c in ranking)
        top = ranking[0].config.reg
        if Reg.singular not in best:
            verdict = NO_DATA
        elif top is Reg.singular:
            runner_up = Score.of(ranking[1]) if len(ranking) > 1 else None
            s = Score.of(ranking[0])
            margin_clear = runner_up is None or s.mean - runner_up.mean > s.spread + runner_up.spread
            verdict = SUPPORTED if margin_clear else INCONCLUSIVE
        else:
            verdict = NOT_SUPPORTED
        claims.append(Claim("LunarLander: the singular loss gives the highest evaluation return", verdict, text))

        ranks = {}
        for reg, c in best.items():
            values = [
                v for r in runs if r.group == c.group and (v := _final(r, "effective_rank", penultimate)) is not None
            ]
            if values:
                ranks[reg] = float(np.mean(values))
        if Reg.singular in ranks:
            order = sorted(ranks.items(), key=lambda kv: -kv[1])
            verdict = SUPPORTED if order[0][0] is Reg.singular else NOT_SUPPORTED
            text = ", ".join(f"{reg.value}: {v:.1f}" for reg, v in order)
            claims.append(
                Claim(
                    f"LunarLander: the singular loss gives the highest effective rank ({penultimate}, end of training, "
                    "best setting of each penalty)",
                    verdict,
                    text,
                )
            )

    for metric, name in (("weight_magnitude", "weight magnitudes grow"), ("dead_fraction", "dead units rise")):
        deltas = [d for r in runs if (d := _last_minus_first(r, metric, "network")) is not None]
        if deltas:
            up = sum(d > 0 for d in deltas)
            claims.append(
                Claim(
                    f"During training, {name} (whole network, first vs last probe)",
                    _direction_verdict(deltas),
                    f"up in {up}/{len(deltas)} runs; median change {np.median(deltas):+.3g}",
                )
            )
    pairs = [found for r in runs if (found := init_vs_final(r))]
    changes = [p["zero_fraction"][1] - p["zero_fraction"][0] for p in pairs]
    if changes:
        start, end = np.mean([p["zero_fraction"][0] for p in pairs]), np.mean([p["zero_fraction"][1] for p in pairs])
        claims.append(
            Claim(
                "During training, activations become sparser (share of zero units per sample, what the authors' "
                "code plotted as dead neurons; θ_0 vs final network on the stored probe batch)",
                _direction_verdict(changes),
                f"up in {sum(d > 0 for d in changes)}/{len(changes)} runs; "
                f"mean {start:.3f} at θ_0 → {end:.3f} at the end",
            )
        )

    for claim in claims:
        claim.caveat = caveat(ll_runs if claim.claim.startswith("LunarLander") else runs)
    for env, wanted in (("CartPole-v1", True), ("MountainCar-v0", False)):
        env_runs = [r for r in runs if r.config.env_id == env]
        curves = group_curves(env_runs, window)
        base = next((c for c in curves if c.config.reg is Reg.none), None)
        methods = [c for c in curves if c.config.reg is not Reg.none and not c.config.reg_layers]
        if base is None or not methods:
            continue
        b = Score.of(base)
        wins = [Score.of(m).mean > b.mean for m in methods]
        clear = [abs(Score.of(m).mean - b.mean) > Score.of(m).spread + b.spread for m in methods]
        text = f"baseline {b.mean:.1f}±{b.spread:.1f}; " + ", ".join(
            f"{m.group.split('__')[1]}: {Score.of(m).mean:.1f}±{Score.of(m).spread:.1f}" for m in methods
        )
        verdict = _pairs_verdict(wins, clear) if wanted else _pairs_verdict([not w for w in wins], clear)
        claims.append(
            Claim(
                f"{env}: the method {'beats' if wanted else 'does worse than'} the baseline",
                verdict,
                text,
                caveat(env_runs),
            )
        )
    return claims
