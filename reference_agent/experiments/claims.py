"""The paper's claims against our runs: shared pieces (the verdicts, which runs can be used).

The rule that decides each claim from interval estimates is in
:mod:`reference_agent.experiments.claims_intervals` (``check_claims``); docs/reproduction.md states it.

Runs that never took a gradient step (they stopped at or before ``learning_starts``) are left
out (``usable_runs``). A verdict that rests on runs with fewer gradient steps than the paper's
runs (``PAPER_UPDATES``) carries a ``caveat``: such runs can exercise the code, not test the claim.
"""

from __future__ import annotations

from dataclasses import dataclass

import plasticity_probe as pp
from reference_agent import rundir
from reference_agent.checkpoint import load_checkpoint
from reference_agent.experiments.results import Run
from reference_agent.network import QNetwork

SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE, NO_DATA = "supported", "not supported", "inconclusive", "no data"


PAPER_STEPS = 100_000
PAPER_UPDATES = 80_000
"""Gradient steps of one of the paper's runs: 100,000 environment steps, learning from 20,000 on."""


@dataclass
class Claim:
    claim: str
    verdict: str
    evidence: str
    """The numbers behind the verdict; for ``no data``, the reason."""
    caveat: str = ""
    """Non-empty when the verdict rests on runs too short (or too few) to test the claim."""
    statistic: str = ""
    """The statistic the verdict was decided on, and the rule, in words."""
    estimate: float | None = None
    low: float | None = None
    high: float | None = None
    """The decisive statistic and its 95 % confidence interval."""
    threshold: float | None = None
    """The value the interval must exclude: 0.5 for P(X > Y), 0 for a difference or a change."""
    seeds: list[int] | None = None
    """Runs in each configuration (stratum) of the decisive interval."""
    source: str = "paper"
    """Whose claim: the paper's, or a question of issue 14 (``issue 14``)."""


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
    """The mark of a verdict resting on ``runs``: empty unless one of them took fewer gradient
    steps than a run of the paper (possible only when ``--min-updates`` was lowered)."""
    short = [r for r in runs if gradient_steps(r) < PAPER_UPDATES]
    if not short:
        return ""
    fewest = min(gradient_steps(r) for r in short)
    return (
        f"too short to test: {len(short)}/{len(runs)} runs with as few as {fewest:,} gradient steps "
        f"(the paper: {PAPER_UPDATES:,})"
    )


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
