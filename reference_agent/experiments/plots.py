"""The paper's figures from run or sweep directories (matplotlib, the ``plot`` extra).

Per environment:
* ``eval_<env>``: evaluation return, simple moving average per seed; the IQM over seeds and its
  95 % bootstrap confidence band (seeds resampled, :func:`reference_agent.experiments.stats.curve_band`);
* ``final_<env>``: the final return of every configuration (mean of the last ``window``
  evaluations of each run): IQM over seeds with its 95 % stratified bootstrap interval, and each
  seed as a dot;
* ``delta_frequency_<env>``: Figure 2 style, one panel per penalty with its δ × frequency
  settings and the baseline, and a last panel with the best setting of each penalty;
* ``plasticity_<env>``: Figure 1 style, per layer over training: weight magnitude, distance from
  θ_0, effective rank, dead-unit fraction, gradient norm and gradient-dormant fraction, IQM over
  seeds with 95 % bands;
* ``trainability_<env>``: the trainability ratio and the gradient-to-weight ratio, with bands;
* ``qvalues_<env>``: mean Q-values and TD targets over training;
* ``hessian_<env>``: TD-loss λ_max and λ_min over training, when recorded.

Conventions shared by every figure: one colour per configuration across all figures of a call
(``Palette``); line style by frequency (solid: every update, dashed: target updates only,
dotted: no regularization), said in each legend; step axes with thousands separators; every
axis labelled; legends beside the panels, never over the data; confidence bands drawn light with
an outline, so that coinciding bands stay readable.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from reference_agent.config import DQNConfig, Reg
from reference_agent.experiments import stats
from reference_agent.experiments.results import GroupCurve, Run, group_curves, plasticity_matrix, plasticity_series

FORMATS = ("png", "svg")
MAX_LINES = 8
BAND_ALPHA = 0.08
"""Fill opacity of a confidence band: eight coinciding bands stay below 50% opacity."""
BAND_NOTE = "line: IQM over seeds, band: 95 % bootstrap CI"


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install 'plasticity-probe[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


class Palette:
    """One colour per configuration (group), the same in every figure: assigned in a fixed order
    (penalty, δ, λ, frequency) over all the configurations plotted."""

    def __init__(self, runs: list[Run]) -> None:
        order = list(Reg)
        configs = {r.group: r.config for r in runs}
        ranked = sorted(
            configs,
            key=lambda g: (
                order.index(configs[g].reg),
                configs[g].delta,
                configs[g].lam,
                configs[g].reg_every.value,
                g,
            ),
        )
        cycle = [f"C{i}" for i in range(10)] + ["#8c564b", "#17becf", "#bcbd22", "#393b79", "#637939", "#843c39"]
        self.colours = {g: cycle[i % len(cycle)] for i, g in enumerate(ranked)}

    def __call__(self, group: str) -> str:
        return self.colours[group]


def style(cfg: DQNConfig) -> str:
    """Line style: dotted for the baseline, solid for every update, dashed for target updates."""
    if cfg.reg is Reg.none:
        return ":"
    return "-" if cfg.reg_every.value == "update" else "--"


STYLE_NOTE = "solid: every update, dashed: target updates only, dotted: no regularization"


def _steps_axis(ax: Any) -> None:
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: f"{x:,.0f}"))
    ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
    ax.set_xlabel("environment steps")


def _legend_beside(fig: Any, ax: Any) -> None:
    """One legend for the figure, to the right of the panels (it never covers data)."""
    fig.tight_layout()
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(
            handles,
            labels,
            loc="center left",
            bbox_to_anchor=(1.0, 0.5),
            fontsize=7,
            title=STYLE_NOTE,
            title_fontsize=7,
        )


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
    authors = ", authors' code" if cfg.reg_variant.value == "authors" else ""
    return f"{cfg.reg.value} λ={cfg.lam:g} δ={cfg.delta:g}, {every}{layers}{authors}"


def best_per_penalty(curves: list[GroupCurve]) -> list[GroupCurve]:
    """The baseline and, per penalty (and penalized-layer subset), the setting with the highest
    IQM of the final return over seeds (the selection rule of ``probe claims``)."""
    best: dict[tuple[Reg, tuple[str, ...], str, str], GroupCurve] = {}
    for c in curves:
        key = (c.config.reg, c.config.reg_layers, c.config.reg_variant.value, c.config.intervention.value)
        if key not in best or stats.iqm(c.returns[:, -1]) > stats.iqm(best[key].returns[:, -1]):
            best[key] = c
    order = list(Reg)
    return sorted(
        best.values(),
        key=lambda c: (
            order.index(c.config.reg),
            c.config.reg_layers,
            c.config.reg_variant.value,
            c.config.intervention.value,
        ),
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


def _band(ax: Any, steps: np.ndarray, values: np.ndarray, colour: str, linestyle: str, label: str) -> None:
    """The IQM over seeds (rows of ``values``) and its 95 % bootstrap band, outlined."""
    point, low, high = stats.curve_band(values, "iqm")
    ax.plot(steps, point, label=label, color=colour, linestyle=linestyle)
    if values.shape[0] > 1:
        ax.fill_between(steps, low, high, color=colour, alpha=BAND_ALPHA, linewidth=0)
        for edge in (low, high):
            ax.plot(steps, edge, color=colour, alpha=0.35, linewidth=0.5, linestyle=linestyle)


def _curve(ax: Any, c: GroupCurve, colour: str) -> None:
    _band(ax, c.steps, c.returns, colour, style(c.config), f"{label(c.config)} (n={c.returns.shape[0]})")


def _eval_axes(ax: Any, title: str, window: int) -> None:
    ax.set_title(title, fontsize=10)
    _steps_axis(ax)
    ax.set_ylabel(f"eval return, SMA {window}\n(moving average of {window} evaluations)")
    ax.grid(alpha=0.3)


def plot_runs(runs: list[Run], out: Path, window: int = 3) -> list[Path]:
    """Write every figure that the runs have data for; returns the files written."""
    plt = _pyplot()
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    palette = Palette(runs)
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
                _curve(ax, c, palette(c.group))
            _eval_axes(ax, f"{env}: evaluation return ({BAND_NOTE})", window)
            _legend_beside(fig, ax)
            written += _save(fig, out, f"eval_{env}")
            plt.close(fig)
            written += _final_figure(plt, curves, env, out, palette, window)
        penalties = [r for r in Reg if r is not Reg.none and sum(c.config.reg is r for c in curves) > 1]
        if penalties:
            fig, axes = plt.subplots(1, len(penalties) + 1, figsize=(5 * (len(penalties) + 1), 4.2), sharey=True)
            baseline = [c for c in curves if c.config.reg is Reg.none]
            for ax, reg in zip(axes, penalties, strict=False):
                for c in [*baseline, *(c for c in curves if c.config.reg is reg)]:
                    _curve(ax, c, palette(c.group))
                _eval_axes(ax, f"{reg.value}: δ × frequency", window)
            for c in best_per_penalty(curves):
                _curve(axes[-1], c, palette(c.group))
            _eval_axes(axes[-1], "best of each penalty", window)
            fig.suptitle(f"{env}: δ and regularization frequency ({BAND_NOTE})")
            _legend_beside(fig, _AllLines(axes))
            written += _save(fig, out, f"delta_frequency_{env}")
            plt.close(fig)
        groups = [r for r in env_runs if r.group in names]
        written += _plasticity_figure(plt, groups, env, out, palette)
        written += _qvalue_figure(plt, groups, env, out, palette)
        written += _hessian_figure(plt, groups, env, out, palette)
        written += _trainability_figure(plt, groups, env, out, palette)
    return written


class _AllLines:
    """The labelled lines of several panels, once each (for one figure legend)."""

    def __init__(self, axes: Any) -> None:
        self.axes = list(np.ravel(axes))

    def get_legend_handles_labels(self) -> tuple[list[Any], list[str]]:
        handles, labels = [], []
        for ax in self.axes:
            for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
                if lab not in labels:
                    handles.append(h)
                    labels.append(lab)
        return handles, labels


def _labels(runs: list[Run]) -> dict[str, str]:
    return {r.group: label(r.config) for r in runs}


def _plasticity_figure(plt: Any, runs: list[Run], env: str, out: Path, palette: Palette) -> list[Path]:
    index = {row["layer"]: row["index"] for r in runs for row in r.plasticity if row["layer"] != "network"}
    layers = sorted(index, key=lambda name: index[name])
    logged = {row["metric"] for r in runs for row in r.plasticity}
    metrics = [
        (metric, title)
        for metric, title in (
            ("weight_magnitude", "weight magnitude ‖θ‖₂"),
            ("distance_from_init", "distance from θ₀ ‖θ − θ₀‖₂"),
            ("effective_rank", "effective rank"),
            ("dead_fraction", "dead-unit fraction"),
            ("grad_norm", "TD-loss gradient norm ‖g‖₂"),
            ("grad_dormant_fraction", "gradient-dormant fraction (GraMa)"),
        )
        if metric in logged
    ]
    if not layers:
        return []
    output_layer = layers[-1]  # linear, no activation: its units are never dead
    names = _labels(runs)
    configs = {r.group: r.config for r in runs}
    fig, axes = plt.subplots(len(metrics), len(layers), figsize=(4.2 * len(layers), 3.2 * len(metrics)), squeeze=False)
    for i, (metric, title) in enumerate(metrics):
        for j, layer in enumerate(layers):
            ax = axes[i][j]
            if metric in ("dead_fraction", "grad_dormant_fraction") and layer == output_layer:
                ax.set_axis_off()
                what = "no dead units" if metric == "dead_fraction" else "its units are the outputs"
                ax.text(0.5, 0.5, f"output layer: no activation,\n{what}", ha="center", va="center", fontsize=8)
                continue
            before = plasticity_series(runs, metric, layer, before=True)
            for group, (steps, values) in sorted(plasticity_matrix(runs, metric, layer).items()):
                _band(ax, steps, values, palette(group), style(configs[group]), names[group])
                if group in before:  # interventions: ▼ right before, the line right after
                    ax.plot(*before[group], "v", ms=3, color=palette(group), label=f"{names[group]}, before")
            ax.set_title(f"layer {j + 1} ({layer})", fontsize=9)
            ax.set_ylabel(title)
            if metric in ("dead_fraction", "grad_dormant_fraction"):
                ax.set_ylim(bottom=0)
            _steps_axis(ax)
            ax.grid(alpha=0.3)
    fig.suptitle(f"{env}: plasticity metrics on the fixed probe batch ({BAND_NOTE})", y=1.0, va="bottom")
    _legend_beside(fig, _AllLines(axes))
    paths = _save(fig, out, f"plasticity_{env}")
    plt.close(fig)
    return paths


def _pair_figure(
    plt: Any,
    pairs: dict[str, tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray] | None]],
    runs: list[Run],
    palette: Palette,
    titles: tuple[str, str],
    suptitle: str,
    path: tuple[Path, str],
    log_left: bool = False,
) -> list[Path]:
    """Two panels sharing one colour per configuration: ``pairs[group] = (left, right)`` curves;
    ``titles`` are the panels' y-axis quantities."""
    names = _labels(runs)
    configs = {r.group: r.config for r in runs}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for group, (left, right) in sorted(pairs.items()):
        kw = {"color": palette(group), "linestyle": style(configs[group]), "marker": ".", "markersize": 4}
        axes[0].plot(*left, label=names[group], **kw)
        if right is not None:
            axes[1].plot(*right, **kw)
    if log_left:
        axes[0].set_yscale("log")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(title)
        _steps_axis(ax)
        ax.grid(alpha=0.3)
    fig.suptitle(suptitle)
    _legend_beside(fig, axes[0])
    paths = _save(fig, *path)
    plt.close(fig)
    return paths


def _qvalue_figure(plt: Any, runs: list[Run], env: str, out: Path, palette: Palette) -> list[Path]:
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
    return _pair_figure(plt, pairs, runs, palette, titles, suptitle, (out, f"qvalues_{env}"))


def _trainability_figure(plt: Any, runs: list[Run], env: str, out: Path, palette: Palette) -> list[Path]:
    left = plasticity_matrix(runs, "trainability_ratio", "network")
    right = plasticity_matrix(runs, "grad_to_weight_ratio", "network")
    if not left:
        return []
    names = _labels(runs)
    configs = {r.group: r.config for r in runs}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    titles = ("trainability: final / initial loss on random targets", "TD-loss gradient-to-weight ratio ‖g‖/‖θ‖")
    for group in sorted(left):
        colour, ls = palette(group), style(configs[group])
        _band(axes[0], *left[group], colour, ls, names[group])
        if group in right:
            _band(axes[1], *right[group], colour, ls, names[group])
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(title)
        _steps_axis(ax)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{env}: trainability (lower = more plastic) and step size on the fixed probe batch ({BAND_NOTE})")
    _legend_beside(fig, axes[0])
    paths = _save(fig, out, f"trainability_{env}")
    plt.close(fig)
    return paths


def _final_figure(plt: Any, curves: list[GroupCurve], env: str, out: Path, palette: Palette, window: int) -> list[Path]:
    """Every configuration's final return: IQM over seeds with its 95 % bootstrap interval (a
    bar), each seed a dot; best first. The configuration's colour is the one of every figure."""
    if not curves:
        return []
    rows = []
    for c in curves:
        final = c.returns[:, -1]
        ci = stats.aggregate([final], "iqm") if final.size >= 2 and np.all(np.isfinite(final)) else None
        rows.append((c, final, float(stats.iqm(final)), ci))
    rows.sort(key=lambda r: r[2])
    fig, ax = plt.subplots(figsize=(8, 1.6 + 0.32 * len(rows)))
    for y, (c, final, point, ci) in enumerate(rows):
        colour = palette(c.group)
        if ci is not None:
            ax.plot([ci.low, ci.high], [y, y], color=colour, linewidth=4, alpha=0.45, solid_capstyle="butt")
        ax.plot([point], [y], marker="|", markersize=14, markeredgewidth=2.5, color=colour, linestyle="none")
        ax.plot(final, np.full(final.shape, y), marker=".", markersize=4, color="black", alpha=0.5, linestyle="none")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{label(c.config)} (n={final.size})" for c, final, _, _ in rows], fontsize=7)
    ax.set_xlabel(f"final return: mean evaluation return over the last {window} evaluations")
    ax.set_ylabel("configuration")
    ax.grid(alpha=0.3, axis="x")
    ax.set_title(f"{env}: final return (tick: IQM over seeds, bar: 95 % bootstrap CI, dots: seeds)", fontsize=10)
    fig.tight_layout()
    paths = _save(fig, out, f"final_{env}")
    plt.close(fig)
    return paths


def _hessian_figure(plt: Any, runs: list[Run], env: str, out: Path, palette: Palette) -> list[Path]:
    top = plasticity_series(runs, "hessian_lambda_max", "network")
    bottom = plasticity_series(runs, "hessian_lambda_min", "network")
    if not top:
        return []
    pairs = {group: (top[group], bottom.get(group)) for group in top}
    titles = ("TD-loss Hessian λ_max", "TD-loss Hessian λ_min")
    suptitle = f"{env}: curvature on the fixed probe batch (mean over seeds)"
    return _pair_figure(plt, pairs, runs, palette, titles, suptitle, (out, f"hessian_{env}"), log_left=True)
