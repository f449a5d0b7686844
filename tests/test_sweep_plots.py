"""Sweep presets, custom grids, the resumable runner, summaries and figures."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import tiny_config
from typer.testing import CliRunner

from cli.app import app
from reference_agent.config import DQNConfig, Reg, RegEvery
from reference_agent.experiments import results, sweep

runner = CliRunner()
SWEEP_RUN = dict(
    total_steps=300,
    learning_starts=100,
    batch_size=16,
    eval_every=100,
    eval_episodes=1,
    probe_every=100,
    probe_batch_size=32,
    checkpoint_every=100,
    hidden_sizes=(8, 8),
)


def test_paper_lunarlander_grid_is_exactly_the_papers() -> None:
    configs = sweep.PRESETS["paper-lunarlander"](2)
    assert len(configs) == 2 * (1 + 3 * 3 * 2) == 38
    assert len({c.run_name for c in configs}) == 38
    assert {c.env_id for c in configs} == {"LunarLander-v3"}
    assert Counter(c.seed for c in configs) == {0: 19, 1: 19}
    settings = {(c.reg, c.lam, c.delta, c.reg_every) for c in configs if c.reg is not Reg.none}
    expected = {
        (reg, 0.001 if reg is Reg.singular else 0.01, d, every)
        for reg in (Reg.l2, Reg.l2init, Reg.singular)
        for d in (0.75, 1.0, 1.25)
        for every in RegEvery
    }
    assert settings == expected
    baseline = [c for c in configs if c.reg is Reg.none]
    assert len(baseline) == 2
    defaults = DQNConfig()
    for c in configs:  # everything else is the paper's/authors' defaults
        assert (c.total_steps, c.batch_size, c.learning_rate, c.target_update_period, c.learning_starts) == (
            defaults.total_steps,
            defaults.batch_size,
            defaults.learning_rate,
            defaults.target_update_period,
            defaults.learning_starts,
        )


@pytest.mark.parametrize(
    ("preset", "env"), [("paper-cartpole", "CartPole-v1"), ("paper-mountaincar", "MountainCar-v0")]
)
def test_transfer_presets(preset: str, env: str) -> None:
    configs = sweep.PRESETS[preset](2)
    assert len(configs) == 6 and {c.env_id for c in configs} == {env}
    regs = {(c.reg, c.lam, c.delta, c.reg_every) for c in configs}
    assert regs == {
        (Reg.none, 0.01, 1.25, RegEvery.update),
        (Reg.l2init, 0.01, 1.25, RegEvery.update),
        (Reg.singular, 0.001, 1.25, RegEvery.update),
    }
    assert len(sweep.PRESETS["paper"](2)) == 38 + 6 + 6


def test_custom_grid_from_sets_and_file(tmp_path: Path) -> None:
    grid = sweep.parse_sets(["reg=l2,l2init", "delta=1,1.25", "env-id=CartPole-v1"])
    configs = sweep.expand_grid(grid, seeds=2)
    assert len(configs) == 8
    assert {(c.reg.value, c.delta) for c in configs} == {("l2", 1), ("l2", 1.25), ("l2init", 1), ("l2init", 1.25)}
    (tmp_path / "g.toml").write_text('reg = ["l1"]\nlam = [0.1, 0.2]\ntotal_steps = 500\n')
    from_file = sweep.expand_grid(sweep.load_grid_file(tmp_path / "g.toml"), seeds=1)
    assert [(c.lam, c.total_steps) for c in from_file] == [(0.1, 500), (0.2, 500)]
    with pytest.raises(ValueError, match="key=v1"):
        sweep.parse_sets(["novalue"])
    with pytest.raises(ValueError, match="unknown config"):
        sweep.expand_grid({"nope": [1]})


def test_sweep_runs_records_failures_and_resumes(tmp_path: Path) -> None:
    good = [tiny_config(**SWEEP_RUN, seed=s) for s in (0, 1)]
    bad = tiny_config(**SWEEP_RUN, env_id="NoSuchEnv-v0")
    outcomes = sweep.run_sweep([*good, bad], tmp_path, workers=2, poll_s=0.2)
    states = {o.run: o.state for o in outcomes}
    assert states[good[0].run_name] == "finished" and states[good[1].run_name] == "finished"
    assert states[bad.run_name] == "failed"
    record = json.loads((tmp_path / "sweep.json").read_text())
    assert "NoSuchEnv" in record["outcomes"][bad.run_name]["message"]
    before = (tmp_path / good[0].run_name / "metrics.jsonl").stat().st_mtime_ns
    again = sweep.run_sweep(good, tmp_path, workers=1, poll_s=0.2)
    assert all(o.message == "finished (skipped)" for o in again)
    assert (tmp_path / good[0].run_name / "metrics.jsonl").stat().st_mtime_ns == before


def test_sweep_cli_errors() -> None:
    result = runner.invoke(app, ["sweep"])
    assert result.exit_code == 2 and "--preset" in result.output
    result = runner.invoke(app, ["sweep", "--set", "lam=1", "--grid", "/no/such/grid.json"])
    assert result.exit_code == 2 and "--grid /no/such/grid.json" in result.output
    result = runner.invoke(app, ["sweep", "--preset", "nope"])
    assert result.exit_code == 2


def fake_sweep(root: Path, env: str = "CartPole-v1") -> None:
    """Run directories with made-up curves, written in the documented layout."""
    for reg, delta, every, level in [
        ("none", 1.25, "update", 0.0),
        ("l2", 0.75, "update", 10.0),
        ("l2", 1.25, "update", 30.0),
        ("l2", 1.25, "target", 20.0),
    ]:
        for seed in (0, 1):
            cfg = DQNConfig(
                env_id=env, reg=reg, delta=delta, reg_every=every, seed=seed, total_steps=3000, learning_starts=500
            )
            run = root / cfg.run_name
            run.mkdir(parents=True)
            (run / "config.json").write_text(json.dumps({"config": cfg.to_dict(), "versions": {}}))
            (run / "status.json").write_text(json.dumps({"state": "finished", "step": 3000}))
            lines = []
            for step in range(1000, 3001, 1000):
                value = level + step / 100 + seed
                lines.append(
                    {"step": step, "kind": "update", "loss": 1.0, "q_mean": step / 1000, "target_mean": step / 900}
                )
                lines.append(
                    {"step": step, "kind": "eval", "return_mean": value, "return_std": 0.0, "returns": [value]}
                )
            (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
            rows = [
                {"step": step, "network": "online", "layer": layer, "index": i, "metric": m, "value": step / 1000 * i}
                for step in (1000, 2000, 3000)
                for i, layer in enumerate(["net.0", "net.2", "net.4"], 1)
                for m in ("weight_magnitude", "effective_rank", "dead_fraction")
            ]
            rows += [
                {"step": step, "network": "online", "layer": "network", "index": 0, "metric": m, "value": step / 1000}
                for step in (1000, 2000, 3000)
                for m in ("weight_magnitude", "dead_fraction")
            ]
            rows += [
                {
                    "step": 2000,
                    "network": "online",
                    "layer": "network",
                    "index": 0,
                    "metric": "hessian_lambda_max",
                    "value": 5.0,
                },
                {
                    "step": 2000,
                    "network": "online",
                    "layer": "network",
                    "index": 0,
                    "metric": "hessian_lambda_min",
                    "value": -1.0,
                },
            ]
            (run / "plasticity.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))


def test_summary_smoothing_by_hand(tmp_path: Path) -> None:
    fake_sweep(tmp_path)
    rows = {r["config"]: r for r in results.summarize(results.group_curves(results.find_runs([tmp_path]), window=2))}
    best = rows["l2_lam0.01_d1.25_update"]
    # seed s: 30 + 10k + s at k = 1, 2, 3 → SMA(2) final = 30 + 25 + s; mean over seeds = 55.5
    assert best["final_mean"] == pytest.approx(55.5) and best["final_spread"] == pytest.approx(0.5)
    assert best["best_step"] == 3000 and best["seeds"] == 2
    assert next(iter(rows)) == "l2_lam0.01_d1.25_update"  # sorted by best return
    assert np.allclose(results.sma(np.array([1.0, 3.0, 5.0, 7.0]), 3), [1.0, 2.0, 3.0, 5.0])


def test_plot_cli_writes_figures_and_csv(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="needs the plot extra")
    fake_sweep(tmp_path / "sweep")
    out = tmp_path / "figs"
    result = runner.invoke(app, ["plot", str(tmp_path / "sweep"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    for name in ("eval", "final", "delta_frequency", "plasticity", "qvalues", "hessian"):
        for fmt in ("png", "svg"):
            path = out / f"{name}_CartPole-v1.{fmt}"
            assert path.exists() and path.stat().st_size > 1000, path
    assert (out / "summary.csv").read_text().startswith("env,config,seeds")
    summary = runner.invoke(app, ["summarize", str(tmp_path / "sweep"), "--json"])
    assert summary.exit_code == 0 and json.loads(summary.output)[0]["config"] == "l2_lam0.01_d1.25_update"
    markdown = runner.invoke(app, ["summarize", str(tmp_path / "sweep"), "--markdown"]).output.splitlines()
    assert markdown[0].startswith("| env | config | seeds | final IQM [95% CI] |") and markdown[1].startswith("|---|")
    first = json.loads(summary.output)[0]
    assert markdown[2].startswith(f"| CartPole-v1 | {first['config']} | {first['seeds']} | {first['final_iqm']:.1f} ")
    assert len(markdown) == 2 + len(json.loads(summary.output))
    both = runner.invoke(app, ["summarize", str(tmp_path / "sweep"), "--markdown", "--json"])
    assert both.exit_code == 2 and "choose one" in both.output
    missing = runner.invoke(app, ["plot", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "no such directory" in missing.output


def test_claims_verdicts_on_a_fake_sweep(tmp_path: Path) -> None:
    fake_sweep(tmp_path, env="LunarLander-v3")
    fake_sweep(tmp_path, env="CartPole-v1")
    refused = runner.invoke(app, ["claims", str(tmp_path), "--json"])  # 2 seeds of 3,000 steps: refused
    assert refused.exit_code == 0 and "16 runs left out, shorter than the claims need" in refused.output
    result = runner.invoke(app, ["claims", str(tmp_path), "--json", "--min-updates", "1000", "--min-seeds", "2"])
    assert result.exit_code == 0, result.output
    verdicts = {v["claim"]: v["verdict"] for v in json.loads(result.output[result.output.index("[") :])}
    assert verdicts["LunarLander: δ = 1.25 beats δ = 0.75"] == "supported"  # 30 + s vs 10 + s
    assert verdicts["LunarLander: penalizing every update beats target updates only"] == "supported"  # 30 vs 20
    assert verdicts["During training, weight magnitudes grow (whole network ‖θ‖₂)"] == "supported"
    cartpole = [v for k, v in verdicts.items() if k.startswith("CartPole-v1: the method beats the baseline")]
    assert cartpole == ["supported"] * 3  # 10, 20, 30 vs 0
    assert verdicts["LunarLander: the singular loss gives the highest evaluation return"] == "no data"


def test_figures_share_colours_label_axes_and_format_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib", reason="needs the plot extra")
    from reference_agent.experiments import plots

    fake_sweep(tmp_path / "sweep")
    figures: dict[str, Any] = {}
    real_save = plots._save

    def keep(fig: Any, out: Path, name: str) -> list[Path]:
        figures[name.split("_CartPole")[0]] = fig
        return real_save(fig, out, name)

    monkeypatch.setattr(plots, "_save", keep)
    plots.plot_runs(results.find_runs([tmp_path / "sweep"]), tmp_path / "figs")
    colours: dict[str, set[str]] = {}
    final = figures.pop("final")
    for name, fig in figures.items():
        for ax in fig.axes:
            if not ax.axison:
                continue
            assert ax.get_xlabel() == "environment steps" and ax.get_ylabel(), (name, ax.get_title())
            assert ax.xaxis.get_major_formatter()(100_000, 0) == "100,000"
            assert ax.get_legend() is None  # legends sit beside the panels, not over the data
            for line in ax.get_lines():
                if not line.get_label().startswith("_"):
                    colours.setdefault(line.get_label().removesuffix(" (n=2)"), set()).add(str(line.get_color()))
        assert fig.legends, name
    assert colours and all(len(c) == 1 for c in colours.values()), colours  # one colour per configuration
    assert len({next(iter(c)) for c in colours.values()}) == len(colours)
    # the final-return chart: one row per configuration, its interval and IQM tick in that same colour
    (ax,) = final.axes
    rows = [t.get_text().removesuffix(" (n=2)") for t in ax.get_yticklabels()]
    assert sorted(rows) == sorted(colours)
    ticks = [line for line in ax.get_lines() if line.get_marker() == "|"]
    for line in ticks:
        y = int(line.get_ydata()[0])
        assert {str(line.get_color())} == colours[rows[y]], rows[y]
    iqms = [float(line.get_xdata()[0]) for line in sorted(ticks, key=lambda line: line.get_ydata()[0])]
    assert iqms == sorted(iqms)  # best at the top
    assert ax.get_xlabel().startswith("final return: mean evaluation return over the last 3 evaluations")
    # bands: each curve's 95 % band (in its colour) holds its IQM line and has width (the seeds differ by 1)
    import matplotlib.colors as mcolors

    (ax,) = figures["eval"].axes
    bands = {mcolors.to_hex(b.get_facecolor()[0]): b.get_paths()[0].vertices for b in ax.collections}
    for line in ax.get_lines():
        if line.get_label().startswith("_"):
            continue
        vertices = bands[mcolors.to_hex(line.get_color())]
        for x, y in zip(line.get_xdata(), line.get_ydata(), strict=True):
            at = vertices[np.isclose(vertices[:, 0], x), 1]
            assert at.min() <= y <= at.max() and at.max() - at.min() > 0.4, (line.get_label(), x)
    dead_panels = [ax.get_title() for ax in figures["plasticity"].axes if ax.get_ylabel() == "dead-unit fraction"]
    assert dead_panels == ["layer 1 (net.0)", "layer 2 (net.2)"]  # none for the output layer
    styles = {
        line.get_label(): line.get_linestyle() for ax in figures["delta_frequency"].axes for line in ax.get_lines()
    }
    assert styles["no regularization (n=2)"] == ":" and styles["l2 λ=0.01 δ=1.25, target updates only (n=2)"] == "--"


def test_definitive_preset_seeds_and_rows() -> None:
    configs = sweep.PRESETS["definitive"](5)
    seeds: dict[str, set[int]] = {}
    for c in configs:
        seeds.setdefault(c.run_name.rsplit("__s", 1)[0], set()).add(c.seed)
    assert len({c.run_name for c in configs}) == len(configs)
    for group, found in seeds.items():  # 10 seeds where claims are decided by small margins, 5 elsewhere
        expected = 5 if group.startswith("MountainCar") else 10
        assert found == set(range(expected)), group
    paper = {c.run_name for c in sweep.PRESETS["paper"](10) if not c.env_id.startswith("MountainCar")}
    assert paper <= {c.run_name for c in configs}  # the paper's grids, every configuration
    rows = {(c.env_id, c.reg.value, c.lam, c.delta, c.reg_variant.value) for c in configs}
    for env in ("LunarLander-v3", "CartPole-v1", "MountainCar-v0"):
        assert (env, "l2init", 0.01, 1.25, "authors") in rows and (env, "singular", 0.001, 1.0, "authors") in rows
        assert (env, "l2", 0.01, 1.0, "paper") in rows  # constant weight decay, δ = 1
    assert {c.intervention.value for c in configs} == {"none", "redo", "shrink-perturb"}
    assert {c.seed for c in sweep.PRESETS["paper5"](2)} == set(range(5))
    assert len(sweep.PRESETS["definitive"](1)) == len(configs)  # never fewer than 5 seeds


def test_sweep_cli_preset_default_seeds() -> None:
    result = runner.invoke(app, ["sweep", "--preset", "paper5", "--dry-run"])
    assert result.exit_code == 0 and "125 runs" in result.output  # (19 + 3 + 3) configurations × 5 seeds
    result = runner.invoke(app, ["sweep", "--preset", "paper", "--dry-run"])
    assert "50 runs" in result.output
    result = runner.invoke(app, ["sweep", "--preset", "paper-cartpole", "--seeds", "3", "--dry-run"])
    assert "9 runs" in result.output
