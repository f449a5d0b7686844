"""The paper's figures from run or sweep directories (matplotlib, the ``plot`` extra).

Per environment:
* ``eval_<env>``: evaluation return, simple moving average per seed, mean line and min–max band
  over seeds;
* ``delta_frequency_<env>``: Figure 2 style, one panel per penalty with its δ × frequency
  settings and the baseline, and a last panel with the best setting of each penalty;
* ``plasticity_<env>``: Figure 1 style, per-layer weight magnitude, effective rank and dead-unit
  fraction over training;
* ``qvalues_<env>``: mean Q-values and TD targets over training;
* ``hessian_<env>``: TD-loss λ_max and λ_min over training, when recorded.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from reference_agent.config import DQNConfig, Reg
from reference_agent.results import GroupCurve, Run, group_curves, plasticity_series

FORMATS = ("png", "svg")
MAX_LINES = 8


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install 'plasticity-probe[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def label(cfg: DQNConfig) -> str:
    if cfg.intervention.value != "none":
        base = (
            "" if cfg.reg is Reg.none else f"{label(type(cfg).from_dict({**cfg.to_dict(), 'intervention': 'none'}))}, "
        )
        tau = f" τ={cfg.redo_tau:g}" if cfg.intervention.value == "redo" else ""
        return f"{base}{cfg.intervention.value}{tau} every {cfg.intervention_every}"
    if cfg.reg is Reg.none:
        return "no regularization"
    every = "every update" if cfg.reg_every.value == "update" else "target updates only"
    layers = f", layers {'+'.join(cfg.reg_layers)} only" if cfg.reg_layers else ""
    return f"{cfg.reg.value} λ={cfg.lam:g} δ={cfg.delta:g}, {every}{layers}"


def best_per_penalty(curves: list[GroupCurve]) -> list[GroupCurve]:
    """The baseline and, per penalty (and penalized-layer subset), the setting with the highest
    smoothed mean return."""
    best: dict[tuple[Reg, tuple[str, ...], str], GroupCurve] = {}
    for c in curves:
        key = (c.config.reg, c.config.reg_layers, c.config.intervention.value)
        if key not in best or c.mean.max() > best[key].mean.max():
            best[key] = c
    order = list(Reg)
    return sorted(
        best.values(), key=lambda c: (order.index(c.config.reg), c.config.reg_layers, c.config.intervention.value)
    )


def _selected(curves: list[GroupCurve]) -> list[GroupCurve]:
    return curves if len(curves) <= MAX_LINES else best_per_penalty(curves)


def _save(fig: Any, out: Path, name: str) -> list[Path]:
    paths = []
    for fmt in FORMATS:
        path = out / f"{name}.{fmt}"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        paths.append(path)
    return paths


def _curve(ax: Any, c: GroupCurve, **kw: Any) -> None:
    line = ax.plot(c.steps, c.mean, label=f"{label(c.config)} (n={c.returns.shape[0]})", **kw)[0]
    if c.returns.shape[0] > 1:
        ax.fill_between(c.steps, c.returns.min(axis=0), c.returns.max(axis=0), color=line.get_color(), alpha=0.15)


def _eval_axes(ax: Any, title: str, window: int) -> None:
    ax.set_title(title)
    ax.set_xlabel("environment steps")
    ax.set_ylabel(f"eval return (SMA {window})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot_runs(runs: list[Run], out: Path, window: int = 3) -> list[Path]:
    """Write every figure that the runs have data for; returns the files written."""
    plt = _pyplot()
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    by_env: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_env[run.config.env_id].append(run)
    for env, env_runs in sorted(by_env.items()):
        curves = group_curves(env_runs, window)
        chosen = _selected(curves)
        names = {c.group for c in chosen}
        if curves:
            fig, ax = plt.subplots(figsize=(7, 4.5))
            for c in chosen:
                _curve(ax, c)
            _eval_axes(ax, f"{env}: evaluation return (mean, band = min–max over seeds)", window)
            written += _save(fig, out, f"eval_{env}")
            plt.close(fig)
        penalties = [r for r in Reg if r is not Reg.none and sum(c.config.reg is r for c in curves) > 1]
        if penalties:
            fig, axes = plt.subplots(1, len(penalties) + 1, figsize=(5 * (len(penalties) + 1), 4.2), sharey=True)
            baseline = [c for c in curves if c.config.reg is Reg.none]
            for ax, reg in zip(axes, penalties, strict=False):
                for c in [*baseline, *(c for c in curves if c.config.reg is reg)]:
                    style = "-" if c.config.reg_every.value == "update" else "--"
                    _curve(ax, c, linestyle=style if c.config.reg is not Reg.none else ":")
                _eval_axes(ax, f"{reg.value}: δ × frequency", window)
            for c in best_per_penalty(curves):
                _curve(axes[-1], c)
            _eval_axes(axes[-1], "best of each penalty", window)
            fig.suptitle(f"{env}: δ and regularization frequency (solid: every update, dashed: target updates)")
            written += _save(fig, out, f"delta_frequency_{env}")
            plt.close(fig)
        groups = [r for r in env_runs if r.group in names]
        written += _plasticity_figure(plt, groups, env, out)
        written += _qvalue_figure(plt, groups, env, out)
        written += _hessian_figure(plt, groups, env, out)
    return written


def _labels(runs: list[Run]) -> dict[str, str]:
    return {r.group: label(r.config) for r in runs}


def _plasticity_figure(plt: Any, runs: list[Run], env: str, out: Path) -> list[Path]:
    layers = sorted(
        {row["layer"] for r in runs for row in r.plasticity if row["layer"] != "network"},
        key=lambda name: next(row["index"] for r in runs for row in r.plasticity if row["layer"] == name),
    )
    metrics = [
        ("weight_magnitude", "weight magnitude ‖θ‖₂"),
        ("effective_rank", "effective rank"),
        ("dead_fraction", "dead-unit fraction"),
    ]
    if not layers:
        return []
    names = _labels(runs)
    fig, axes = plt.subplots(len(metrics), len(layers), figsize=(4.2 * len(layers), 3.2 * len(metrics)), squeeze=False)
    for i, (metric, title) in enumerate(metrics):
        for j, layer in enumerate(layers):
            ax = axes[i][j]
            before = plasticity_series(runs, metric, layer, before=True)
            for group, (steps, values) in sorted(plasticity_series(runs, metric, layer).items()):
                line = ax.plot(steps, values, label=names[group])[0]
                if group in before:  # interventions: ▼ right before, the line right after
                    ax.plot(*before[group], "v", ms=3, color=line.get_color(), label=f"{names[group]}, before")
            ax.set_title(f"{title}, layer {j + 1} ({layer})", fontsize=9)
            ax.set_xlabel("environment steps")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{env}: plasticity metrics on the fixed probe batch (mean over seeds)")
    fig.tight_layout()
    paths = _save(fig, out, f"plasticity_{env}")
    plt.close(fig)
    return paths


def _pair_figure(
    plt: Any,
    pairs: dict[str, tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray] | None]],
    names: dict[str, str],
    titles: tuple[str, str],
    suptitle: str,
    path: tuple[Path, str],
    log_left: bool = False,
) -> list[Path]:
    """Two panels sharing one colour per configuration: ``pairs[group] = (left, right)`` curves."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for group, (left, right) in sorted(pairs.items()):
        line = axes[0].plot(*left, label=names[group])[0]
        if right is not None:
            axes[1].plot(*right, color=line.get_color())
    if log_left:
        axes[0].set_yscale("log")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title)
        ax.set_xlabel("environment steps")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(suptitle)
    paths = _save(fig, *path)
    plt.close(fig)
    return paths


def _qvalue_figure(plt: Any, runs: list[Run], env: str, out: Path) -> list[Path]:
    series: dict[str, dict[int, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        for u in r.updates:
            series[r.group][u["step"]].append((u["q_mean"], u["target_mean"]))
    pairs: dict[str, Any] = {}
    for group, by_step in series.items():
        steps = np.array(sorted(by_step))
        vals = np.array([np.mean(by_step[s], axis=0) for s in steps])
        pairs[group] = ((steps, vals[:, 0]), (steps, vals[:, 1]))
    if not pairs:
        return []
    titles = ("mean Q(s, a) on training batches", "mean TD target y")
    suptitle = f"{env}: Q-values and target values (mean over seeds)"
    return _pair_figure(plt, pairs, _labels(runs), titles, suptitle, (out, f"qvalues_{env}"))


def _hessian_figure(plt: Any, runs: list[Run], env: str, out: Path) -> list[Path]:
    top = plasticity_series(runs, "hessian_lambda_max", "network")
    bottom = plasticity_series(runs, "hessian_lambda_min", "network")
    if not top:
        return []
    pairs = {group: (top[group], bottom.get(group)) for group in top}
    titles = ("TD-loss Hessian λ_max", "TD-loss Hessian λ_min")
    suptitle = f"{env}: curvature on the fixed probe batch (mean over seeds)"
    return _pair_figure(plt, pairs, _labels(runs), titles, suptitle, (out, f"hessian_{env}"), log_left=True)
