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

    @property
    def group(self) -> str:
        """The configuration without the seed: runs of one group are seeds of one setting."""
        return self.config.run_name.rsplit("__s", 1)[0]


def load_run(path: Path) -> Run:
    """Read a run directory; malformed JSONL records are skipped and listed in ``problems``."""
    data = rundir.read_json(path / rundir.CONFIG)
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
        raise ValueError(f"{path / rundir.CONFIG} holds no config")
    try:
        config = DQNConfig.from_dict(data["config"])
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path / rundir.CONFIG}: {err}") from None
    metrics = rundir.read_jsonl(path / rundir.METRICS)
    plasticity = rundir.read_jsonl(path / rundir.PLASTICITY)
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
        plasticity=plasticity.records,
        problems=[p for p in (metrics.problem(), plasticity.problem()) if p],
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


def summarize(curves: list[GroupCurve]) -> list[dict[str, Any]]:
    """Per configuration: seeds, final and best smoothed evaluation return (mean over seeds, and
    the spread: half the range between seeds)."""
    rows = []
    for c in curves:
        final = c.returns[:, -1]
        best_step = int(np.argmax(c.mean))
        best = c.returns[:, best_step]
        rows.append(
            {
                "env": c.env_id,
                "config": c.group.split("__", 1)[1],
                "seeds": int(c.returns.shape[0]),
                "last_step": int(c.steps[-1]),
                "final_mean": float(final.mean()),
                "final_spread": float((final.max() - final.min()) / 2),
                "best_mean": float(c.mean[best_step]),
                "best_spread": float((best.max() - best.min()) / 2),
                "best_step": int(c.steps[best_step]),
            }
        )
    return sorted(rows, key=lambda r: (r["env"], -r["best_mean"]))


def plasticity_series(runs: list[Run], metric: str, layer: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per configuration: (steps, values averaged over seeds) of one plasticity metric."""
    acc: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        for row in run.plasticity:
            if row["metric"] == metric and row["layer"] == layer and row["value"] is not None:
                acc[run.group][row["step"]].append(row["value"])
    return {g: (np.array(sorted(d)), np.array([float(np.mean(d[s])) for s in sorted(d)])) for g, d in acc.items()}


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
