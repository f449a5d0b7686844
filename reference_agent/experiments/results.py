"""Reading run directories back: curves, grouping by configuration, smoothing, summaries."""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from reference_agent import rundir
from reference_agent.config import DQNConfig


@dataclass
class Run:
    """One run directory, read back."""

    path: Path
    config: DQNConfig
    state: str | None
    evals: list[tuple[int, float]]
    updates: list[dict[str, Any]]
    plasticity: list[dict[str, Any]] = field(repr=False)
    problems: list[str] = field(default_factory=list)
    """Malformed records skipped while reading (one line per file)."""
    step: int = 0
    """Environment steps taken (``status.json``; else the last record's step)."""
    interventions: list[dict[str, Any]] = field(default_factory=list, repr=False)
    """Records of interventions.jsonl (empty without one)."""
    plasticity_before: list[dict[str, Any]] = field(default_factory=list, repr=False)
    """Plasticity rows taken right before each intervention (``phase = "before"``); ``plasticity``
    holds the others, so it has one report per step (the one after an intervention)."""

    @property
    def group(self) -> str:
        """The configuration without the seed: runs of one group are seeds of one setting."""
        return self.config.run_name.rsplit("__s", 1)[0]


def load_run(path: Path) -> Run:
    """Read a run directory; malformed JSONL records are skipped and listed in ``problems``."""
    config = rundir.read_config(path)
    metrics = rundir.read_jsonl(path / rundir.METRICS)
    plasticity = rundir.read_jsonl(path / rundir.PLASTICITY)
    interventions = rundir.read_jsonl(path / rundir.INTERVENTIONS)
    status = rundir.read_json(path / rundir.STATUS) if (path / rundir.STATUS).exists() else {}
    status = status if isinstance(status, dict) else {}
    last = max((r["step"] for r in metrics), default=0)
    step = status.get("step")
    return Run(
        path=path,
        config=config,
        state=status.get("state"),
        evals=[(r["step"], r["return_mean"]) for r in metrics if r["kind"] == "eval"],
        updates=[r for r in metrics if r["kind"] == "update"],
        plasticity=[r for r in plasticity.records if r.get("phase") != "before"],
        plasticity_before=[r for r in plasticity.records if r.get("phase") == "before"],
        interventions=interventions.records,
        problems=[p for p in (metrics.problem(), plasticity.problem(), interventions.problem()) if p],
        step=step if isinstance(step, int) and not isinstance(step, bool) else last,
    )


def find_runs(paths: list[Path]) -> list[Run]:
    """Run directories given directly or found one level below (a sweep directory)."""
    runs = []
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such directory")
        if (p / rundir.CONFIG).exists():
            runs.append(load_run(p))
        else:
            runs += [load_run(d) for d in sorted(p.iterdir()) if (d / rundir.CONFIG).exists()]
    if not runs:
        raise FileNotFoundError(f"no run directories (with {rundir.CONFIG}) in {', '.join(map(str, paths))}")
    return runs


def sma(values: np.ndarray, window: int) -> np.ndarray:
    """Simple moving average over the last ``window`` points (fewer at the start)."""
    if window <= 1:
        return values.astype(float)
    csum = np.cumsum(np.insert(values.astype(float), 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return (csum[idx] - csum[lo]) / (idx - lo)


@dataclass
class GroupCurve:
    """Evaluation returns of one configuration: steps × seeds, smoothed per seed."""

    group: str
    env_id: str
    config: DQNConfig
    steps: np.ndarray
    returns: np.ndarray  # (seeds, steps), smoothed

    @property
    def mean(self) -> np.ndarray:
        return self.returns.mean(axis=0)


def group_curves(runs: list[Run], window: int = 3) -> list[GroupCurve]:
    """One curve per configuration, over the eval steps all of its seeds share."""
    by_group: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        if run.evals:
            by_group[run.group].append(run)
    curves = []
    for group, members in sorted(by_group.items()):
        common = sorted(set.intersection(*(set(s for s, _ in r.evals) for r in members)))
        if not common:
            continue
        per_seed = np.array([[dict(r.evals)[s] for s in common] for r in members])
        smoothed = np.stack([sma(row, window) for row in per_seed])
        curves.append(GroupCurve(group, members[0].config.env_id, members[0].config, np.array(common), smoothed))
    return curves


def summarize(curves: list[GroupCurve], *, seed: int = 0) -> list[dict[str, Any]]:
    """Per configuration: seeds, final and best smoothed evaluation return.

    The *final return* of a run is the mean of its evaluation returns at its last ``window``
    evaluations (the smoothed curve's last point, :func:`final_return`). Over seeds: its IQM and
    mean, each with the 95 % percentile bootstrap confidence interval (``_low``, ``_high``;
    :mod:`reference_agent.experiments.stats`; empty with one seed), and the spread (half the range between
    seeds). *Best* is the maximum over steps of the mean smoothed curve (the paper's selection
    rule; optimistic, kept for comparison with it). Sorted by final IQM, best first."""
    from reference_agent.experiments import stats

    rows = []
    for c in curves:
        final = c.returns[:, -1]
        best_step = int(np.argmax(c.mean))
        best = c.returns[:, best_step]
        row: dict[str, Any] = {
            "env": c.env_id,
            "config": c.group.split("__", 1)[1],
            "seeds": int(c.returns.shape[0]),
            "last_step": int(c.steps[-1]),
        }
        for name in ("iqm", "mean"):
            point = float(stats.STATISTICS[name](final))
            low: float | None = None
            high: float | None = None
            if final.size >= 2 and np.all(np.isfinite(final)):
                ci = stats.aggregate([final], name, seed=seed)
                low, high = ci.low, ci.high
            row.update({f"final_{name}": point, f"final_{name}_low": low, f"final_{name}_high": high})
        row.update(
            {
                "final_spread": float((final.max() - final.min()) / 2),
                "best_mean": float(c.mean[best_step]),
                "best_spread": float((best.max() - best.min()) / 2),
                "best_step": int(c.steps[best_step]),
            }
        )
        rows.append(row)
    return sorted(rows, key=lambda r: (r["env"], -r["final_iqm"]))


FINAL_EVALS = 3
"""k of the final return: the mean evaluation return over a run's last 3 evaluations (with the
paper's evaluation every 5,000 steps: steps 90,000, 95,000 and 100,000). It equals the last point
of the curves smoothed with a 3-point simple moving average, the figures' default."""


def final_return(run: Run, last: int = FINAL_EVALS) -> float | None:
    """The run's final return: the mean of its evaluation returns (each the mean over that
    evaluation's episodes) at its last ``last`` evaluations; None with fewer evaluations."""
    if last < 1 or len(run.evals) < last:
        return None
    return float(np.mean([v for _, v in sorted(run.evals)[-last:]]))


def metric_values(run: Run, metric: str, layer: str = "network") -> list[tuple[int, float]]:
    """One plasticity metric of a run: (step, value) in step order, finite values only."""
    return sorted(
        (int(r["step"]), float(r["value"]))
        for r in run.plasticity
        if r["metric"] == metric and r["layer"] == layer and r["value"] is not None and math.isfinite(r["value"])
    )


def final_metric(run: Run, metric: str, layer: str = "network") -> float | None:
    """The metric at the run's last probe (the end of training for a finished run)."""
    values = metric_values(run, metric, layer)
    return values[-1][1] if values else None


def metric_change(run: Run, metric: str, layer: str = "network") -> float | None:
    """The metric at the last probe minus at the first (taken when learning starts, after one
    gradient step: about θ_0); None with fewer than two probes."""
    values = metric_values(run, metric, layer)
    return values[-1][1] - values[0][1] if len(values) >= 2 else None


def plasticity_series(
    runs: list[Run], metric: str, layer: str, before: bool = False
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per configuration: (steps, values averaged over seeds) of one plasticity metric (with
    ``before=True``: of the reports taken right before each intervention)."""
    acc: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        for row in run.plasticity_before if before else run.plasticity:
            if row["metric"] == metric and row["layer"] == layer and row["value"] is not None:
                acc[run.group][row["step"]].append(row["value"])
    return {g: (np.array(sorted(d)), np.array([float(np.mean(d[s])) for s in sorted(d)])) for g, d in acc.items()}


def plasticity_matrix(runs: list[Run], metric: str, layer: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per configuration: (steps, values (seeds, steps)) of one plasticity metric, over the probe
    steps where every seed has a finite value."""
    per_run: dict[str, list[dict[int, float]]] = defaultdict(list)
    for run in runs:
        values = dict(metric_values(run, metric, layer))
        if values:
            per_run[run.group].append(values)
    out = {}
    for group, seeds in per_run.items():
        common = sorted(set.intersection(*(set(v) for v in seeds)))
        if common:
            out[group] = (np.array(common), np.array([[v[s] for s in common] for v in seeds]))
    return out


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return

    def write(f: Any) -> None:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    rundir.atomic_write(path, write, mode="w")


def curve_rows(runs: list[Run]) -> list[dict[str, Any]]:
    """Raw (unsmoothed) evaluation returns, one row per (run, step)."""
    return [
        {
            "env": r.config.env_id,
            "config": r.group.split("__", 1)[1],
            "seed": r.config.seed,
            "step": s,
            "eval_return": v,
        }
        for r in runs
        for s, v in r.evals
    ]


def plasticity_rows(runs: list[Run]) -> list[dict[str, Any]]:
    """Plasticity metrics averaged over seeds, one row per (config, step, layer, metric)."""
    acc: dict[tuple[str, str, int, str, str], list[float]] = defaultdict(list)
    for r in runs:
        for row in r.plasticity:
            if row["value"] is not None and math.isfinite(row["value"]):
                acc[(r.config.env_id, r.group.split("__", 1)[1], row["step"], row["layer"], row["metric"])].append(
                    row["value"]
                )
    return [
        {
            "env": k[0],
            "config": k[1],
            "step": k[2],
            "layer": k[3],
            "metric": k[4],
            "mean": float(np.mean(v)),
            "seeds": len(v),
        }
        for k, v in sorted(acc.items())
    ]


RUN_METRICS = (
    ("weight_magnitude", "network"),
    ("dead_fraction", "network"),
    ("zero_fraction", "network"),
    ("grad_norm", "network"),
    ("grad_dormant_fraction", "network"),
    ("distance_from_init", "network"),
    ("trainability_ratio", "network"),
)
"""End-of-training metrics written per run in runs.csv (plus the penultimate layer's effective rank)."""


def run_rows(runs: list[Run], last: int = FINAL_EVALS) -> list[dict[str, Any]]:
    """One row per run: its configuration, seed, state, steps, final return (mean of its last
    ``last`` evaluations) and the metrics of its last probe: the scores the intervals are built on."""
    rows = []
    for r in sorted(runs, key=lambda r: (r.config.env_id, r.group, r.config.seed)):
        penultimate = f"net.{2 * (len(r.config.hidden_sizes) - 1)}"
        row: dict[str, Any] = {
            "env": r.config.env_id,
            "config": r.group.split("__", 1)[1],
            "seed": r.config.seed,
            "state": r.state,
            "step": r.step,
            "evaluations": len(r.evals),
            "final_return": final_return(r, last),
            "effective_rank_penultimate": final_metric(r, "effective_rank", penultimate),
        }
        for metric, layer in RUN_METRICS:
            row[metric if layer == "network" else f"{metric}_{layer}"] = final_metric(r, metric, layer)
        rows.append(row)
    return rows
