"""`probe claims` decided from intervals, on run directories written by hand (made-up scores,
the documented layout), checked against scores and statistics computed here independently."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.app import app
from reference_agent.config import DQNConfig
from reference_agent.experiments.claims_intervals import Rules, check_claims, refuse
from reference_agent.experiments.results import final_return, find_runs

runner = CliRunner()
EVAL_STEPS = list(range(5_000, 100_001, 5_000))


def write_run(
    root: Path,
    score: float,
    *,
    seed: int,
    env: str = "LunarLander-v3",
    steps: int = 100_000,
    probes: dict[str, tuple[float, float]] | None = None,
    **fields: Any,
) -> Path:
    """A finished run whose evaluation returns rise linearly to ``score`` at its last three
    evaluations (score − 2, score − 1, score + 3: their mean is ``score``), and whose network
    metrics go linearly from ``probes[m][0]`` (first probe) to ``probes[m][1]`` (last)."""
    cfg = DQNConfig(env_id=env, seed=seed, total_steps=steps, **fields)
    run = root / cfg.run_name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"config": cfg.to_dict(), "versions": {}}))
    (run / "status.json").write_text(json.dumps({"state": "finished", "step": steps}))
    evals = EVAL_STEPS if steps == 100_000 else [steps * i // 20 for i in range(1, 21)]
    values = [score * i / len(evals) for i in range(len(evals))]
    values[-3:] = [score - 2, score - 1, score + 3][-len(values[-3:]) :]
    lines = [
        {"step": s, "kind": "eval", "return_mean": v, "return_std": 0.0, "returns": [v]}
        for s, v in zip(evals, values, strict=True)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    probe_steps = [cfg.learning_starts, (cfg.learning_starts + steps) // 2, steps]
    rows = []
    for metric, (first, last) in (probes or {}).items():
        layer = "net.2" if metric == "effective_rank" else "network"
        for k, s in enumerate(probe_steps):
            value = first + (last - first) * k / 2
            rows.append({"step": s, "network": "online", "layer": layer, "index": 0, "metric": metric, "value": value})
    (run / "plasticity.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    return run


def noise(seed: int) -> float:
    return [0.0, 1.5, -1.0, 2.5, -2.0, 0.5, -0.5, 1.0, -1.5, 2.0][seed]


def verdicts(root: Path, *args: str) -> dict[str, dict[str, Any]]:
    result = runner.invoke(app, ["claims", str(root), "--json", *args])
    assert result.exit_code == 0, result.output
    return {v["claim"]: v for v in json.loads(result.output[result.output.index("[") :])}


def brute_poi(x: list[float], y: list[float]) -> float:
    total = sum((Fraction(1) if a > b else Fraction(1, 2) if a == b else Fraction(0)) for a in x for b in y)
    return float(total / (len(x) * len(y)))


DELTA = "LunarLander: δ = 1.25 beats δ = 0.75"
EVERY = "LunarLander: penalizing every update beats target updates only"


def delta_sweep(root: Path, levels: dict[tuple[float, str], float], seeds: int = 5) -> None:
    for (delta, every), level in levels.items():
        for s in range(seeds):
            write_run(root, level + noise(s), seed=s, reg="l2", delta=delta, reg_every=every)


def test_final_return_is_the_mean_of_the_last_k_evaluations(tmp_path: Path) -> None:
    write_run(tmp_path, 10.0, seed=0)
    run = find_runs([tmp_path])[0]
    assert final_return(run) == pytest.approx(10.0)  # (8 + 9 + 13) / 3
    assert final_return(run, 1) == pytest.approx(13.0)
    assert final_return(run, 2) == pytest.approx(11.0)
    assert final_return(run, 21) is None  # 20 evaluations


def test_clear_win_is_supported_and_the_estimate_is_the_brute_force_probability(tmp_path: Path) -> None:
    delta_sweep(
        tmp_path, {(1.25, "update"): 30.0, (0.75, "update"): 10.0, (1.25, "target"): 5.0, (0.75, "target"): 0.0}
    )
    v = verdicts(tmp_path)[DELTA]
    assert v["verdict"] == "supported"
    assert (v["estimate"], v["low"], v["high"], v["threshold"]) == (1.0, 1.0, 1.0, 0.5)  # complete separation
    assert v["seeds"] == [5, 5, 5, 5] and "P(δ=1.25 > δ=0.75)" in v["statistic"] and "2 matched pairs" in v["statistic"]
    assert v["caveat"] == "" and v["source"] == "paper"
    # frequency: every update against target updates only at δ 1.25 (30 vs 5) and δ 0.75 (10 vs 0)
    assert verdicts(tmp_path)[EVERY]["verdict"] == "supported"


def test_reversed_is_not_supported_and_overlap_is_inconclusive(tmp_path: Path) -> None:
    delta_sweep(tmp_path / "a", {(1.25, "update"): 0.0, (0.75, "update"): 20.0})
    assert verdicts(tmp_path / "a")[DELTA]["verdict"] == "not supported"
    # interleaved: δ 1.25 scores {0, 1.5, -1, 2.5, -2}, δ 0.75 the same shifted by 0.25
    delta_sweep(tmp_path / "b", {(1.25, "update"): 0.0, (0.75, "update"): 0.25})
    v = verdicts(tmp_path / "b")[DELTA]
    x = [0.0 + noise(s) for s in range(5)]
    y = [0.25 + noise(s) for s in range(5)]
    assert v["estimate"] == pytest.approx(brute_poi(x, y))
    assert v["verdict"] == "inconclusive" and v["low"] < 0.5 < v["high"]


def test_iqm_difference_statistic_matches_hand_computation(tmp_path: Path) -> None:
    delta_sweep(tmp_path, {(1.25, "update"): 7.0, (0.75, "update"): 3.0, (1.25, "target"): 1.0, (0.75, "target"): 2.0})
    v = verdicts(tmp_path, "--statistic", "iqm")[DELTA]
    # IQM of 5 values: 0.3·x(2) + 0.4·x(3) + 0.3·x(4); the noises sorted: −2, −1, 0, 1.5, 2.5 → IQM 0.15
    noise_iqm = 0.3 * -1 + 0.4 * 0 + 0.3 * 1.5
    assert v["estimate"] == pytest.approx(((7 + noise_iqm) - (3 + noise_iqm) + (1 + noise_iqm) - (2 + noise_iqm)) / 2)
    assert v["threshold"] == 0.0 and "IQM(δ=1.25) − IQM(δ=0.75)" in v["statistic"]
    mean = verdicts(tmp_path, "--statistic", "mean")[DELTA]
    assert mean["estimate"] == pytest.approx(1.5) and mean["verdict"] in ("supported", "inconclusive")


def test_few_seeds_and_short_runs_give_no_data_with_the_reason(tmp_path: Path) -> None:
    delta_sweep(tmp_path / "two", {(1.25, "update"): 30.0, (0.75, "update"): 10.0}, seeds=2)
    v = verdicts(tmp_path / "two")[DELTA]
    assert v["verdict"] == "no data" and "fewer than 5 seeds" in v["evidence"] and "(2)" in v["evidence"]
    assert verdicts(tmp_path / "two", "--min-seeds", "2")[DELTA]["verdict"] in ("supported", "inconclusive")
    assert "intervals too narrow" in verdicts(tmp_path / "two", "--min-seeds", "2")[DELTA]["caveat"]

    short = tmp_path / "short"
    for s in range(5):
        for delta, level in ((1.25, 30.0), (0.75, 10.0)):
            write_run(short, level + noise(s), seed=s, steps=5_000, learning_starts=1_000, reg="l2", delta=delta)
    result = runner.invoke(app, ["claims", str(short), "--json"])
    assert result.exit_code == 0
    assert "10 runs left out, shorter than the claims need: as few as 4,001 gradient steps" in result.output
    found = {v["claim"]: v for v in json.loads(result.output[result.output.index("[") :])}
    assert found[DELTA]["verdict"] == "no data" and "no LunarLander run" in found[DELTA]["evidence"]
    assert all(v["verdict"] == "no data" for v in found.values())  # every claim has a row, none decided
    lowered = verdicts(short, "--min-updates", "1000")[DELTA]
    assert lowered["verdict"] == "supported" and lowered["caveat"].startswith("too short to test: 10/10 runs")


def test_pairs_with_too_few_seeds_are_left_out_of_the_interval(tmp_path: Path) -> None:
    delta_sweep(tmp_path, {(1.25, "update"): 30.0, (0.75, "update"): 10.0})
    for s in range(2):  # a second pair, 2 seeds only, going the other way
        write_run(tmp_path, 0.0 + noise(s), seed=s, reg="l2", delta=1.25, reg_every="target")
        write_run(tmp_path, 50.0 + noise(s), seed=s, reg="l2", delta=0.75, reg_every="target")
    v = verdicts(tmp_path)[DELTA]
    assert v["verdict"] == "supported" and v["seeds"] == [5, 5] and v["estimate"] == 1.0
    assert "1 pair(s) left out: fewer than 5 seeds" in v["evidence"] and "l2_lam0.01_d1.25_target (2)" in v["evidence"]


def test_runs_that_never_learned_are_left_out(tmp_path: Path) -> None:
    write_run(tmp_path, 0.0, seed=0, steps=3_000, learning_starts=20_000)
    runs = find_runs([tmp_path])
    kept, lines = refuse(runs, Rules(min_updates=1))
    assert kept == [] and "never took a gradient step (stopped at step 3,000, learning starts at 20,000)" in lines[0]


def transfer_sweep(root: Path, seeds: int = 5) -> None:
    for s in range(seeds):
        write_run(root, 100 + noise(s), seed=s, env="CartPole-v1")
        write_run(root, 400 + noise(s), seed=s, env="CartPole-v1", reg="l2init", delta=1.25)
        write_run(root, 9.5 + noise(s) / 10, seed=s, env="CartPole-v1", reg="singular", lam=0.001, delta=1.25)
        for reg in ("none", "l2init"):
            write_run(root, -200.0, seed=s, env="MountainCar-v0", reg=reg, delta=1.25)


def test_transfer_claims_one_row_per_method(tmp_path: Path) -> None:
    transfer_sweep(tmp_path)
    v = verdicts(tmp_path)
    assert v["CartPole-v1: the method beats the baseline (l2init_lam0.01_d1.25_update)"]["verdict"] == "supported"
    assert v["CartPole-v1: the method beats the baseline (singular_lam0.001_d1.25_update)"]["verdict"] == (
        "not supported"
    )
    mc = v["MountainCar-v0: the method does worse than the baseline (l2init_lam0.01_d1.25_update)"]
    assert mc["verdict"] == "inconclusive" and (mc["estimate"], mc["low"], mc["high"]) == (0.5, 0.5, 0.5)
    assert "P(baseline > method)" in mc["statistic"]


def test_highest_return_and_rank(tmp_path: Path) -> None:
    ranks = {"singular": 30.0, "l2": 20.0, "none": 10.0}
    for s in range(5):
        for reg, level in (("none", 0.0), ("l2", 10.0), ("singular", 20.0)):
            lam = 0.001 if reg == "singular" else 0.01
            write_run(
                tmp_path,
                level + noise(s),
                seed=s,
                reg=reg,
                lam=lam,
                probes={"effective_rank": (5.0, ranks[reg] + noise(s))},
            )
        write_run(tmp_path, 5.0 + noise(s), seed=s, reg="l2", delta=0.75)  # a worse l2 setting: not selected
    v = verdicts(tmp_path)
    top = v["LunarLander: the singular loss gives the highest evaluation return"]
    assert top["verdict"] == "supported" and "vs l2_lam0.01_d1.25_update" in top["evidence"]
    assert "l2_lam0.01_d0.75" not in top["evidence"]  # only the best l2 setting is a rival
    assert v["LunarLander: the singular loss gives the highest effective rank"]["verdict"] == "supported"

    flipped = tmp_path / "flipped"
    for s in range(5):
        write_run(flipped, 30.0 + noise(s), seed=s, reg="l2")
        write_run(flipped, 0.0 + noise(s), seed=s, reg="singular", lam=0.001)
        write_run(flipped, 25.0 + noise(s) * 5, seed=s)  # baseline overlapping l2
    w = verdicts(flipped)["LunarLander: the singular loss gives the highest evaluation return"]
    assert w["verdict"] == "not supported"
    rank = verdicts(flipped)["LunarLander: the singular loss gives the highest effective rank"]
    assert rank["verdict"] == "no data" and "no effective-rank probes" in rank["evidence"]


def test_trend_claims(tmp_path: Path) -> None:
    for s in range(5):
        for reg, delta in (("none", 1.25), ("l2", 0.75)):
            write_run(
                tmp_path,
                0.0,
                seed=s,
                reg=reg,
                delta=delta,
                probes={
                    "weight_magnitude": (10.0, 12.0 + s),
                    "dead_fraction": (0.2, 0.1 - s / 100),
                    "zero_fraction": (0.5, 0.5 + noise(s) / 100),
                },
            )
    v = verdicts(tmp_path)
    grow = v["During training, weight magnitudes grow (whole network ‖θ‖₂)"]
    changes = np.array([2.0 + s for s in range(5)] * 2)
    assert grow["verdict"] == "supported" and grow["seeds"] == [5, 5]
    # 10 changes 2,2,3,3,4,4,5,5,6,6; IQM weights (0, 0, .1, .2, .2, .2, .2, .1, 0, 0) → .3 + 3.2 + .5 = 4
    assert grow["estimate"] == pytest.approx(4.0)
    assert float(np.sort(changes) @ np.r_[0, 0, 0.1, 0.2, 0.2, 0.2, 0.2, 0.1, 0, 0]) == pytest.approx(4.0)
    dead = v["During training, dead units rise (fraction of units dead on the whole probe batch)"]
    assert dead["verdict"] == "not supported" and dead["high"] < 0
    sparse = next(c for k, c in v.items() if k.startswith("During training, activations become sparser"))
    assert sparse["verdict"] == "inconclusive"


def test_plasticity_question_of_issue_14(tmp_path: Path) -> None:
    for s in range(5):
        write_run(tmp_path, 0.0, seed=s, probes={"trainability_ratio": (0.1, 0.5 + s / 100)})
        write_run(tmp_path, 0.0, seed=s, reg="l2", delta=1.25, probes={"trainability_ratio": (0.1, 0.2 + s / 100)})
        write_run(tmp_path, 0.0, seed=s, reg="l2", delta=0.75, probes={"trainability_ratio": (0.1, 0.9)})  # δ<1: not in
    v = verdicts(tmp_path)
    t = next(c for k, c in v.items() if "trainability ratio" in k)
    assert t["verdict"] == "supported" and t["source"] == "issue 14" and t["seeds"] == [5, 5]
    g = next(c for k, c in v.items() if "gradient-dormant" in k)
    assert g["verdict"] == "no data"


def test_verdicts_are_deterministic_and_the_table_renders(tmp_path: Path) -> None:
    delta_sweep(tmp_path, {(1.25, "update"): 0.0, (0.75, "update"): 0.25})
    first = runner.invoke(app, ["claims", str(tmp_path), "--json"]).output
    assert first == runner.invoke(app, ["claims", str(tmp_path), "--json"]).output
    assert first != runner.invoke(app, ["claims", str(tmp_path), "--json", "--seed", "1"]).output
    table = runner.invoke(app, ["claims", str(tmp_path)])
    assert table.exit_code == 0 and "inconclusive" in table.output and "no data" in table.output
    markdown = runner.invoke(app, ["claims", str(tmp_path), "--markdown"]).output.splitlines()
    rows = [json.loads(first)[i] for i in range(len(markdown) - 2)]
    assert markdown[:2] == ["| claim | verdict | statistic [95% CI] | evidence |", "|---|---|---|---|"]
    for line, row in zip(markdown[2:], rows, strict=True):  # one line per claim, its cells in order
        assert line.startswith(f"| {row['claim']} | {row['verdict']}") and line.count(" | ") >= 3
    bad = runner.invoke(app, ["claims", str(tmp_path), "--min-seeds", "1"])
    assert bad.exit_code == 2


def test_check_claims_covers_every_claim_of_the_design(tmp_path: Path) -> None:
    write_run(tmp_path, 0.0, seed=0)
    titles = [c.claim for c in check_claims(find_runs([tmp_path]))]
    for needle in (
        "δ = 1.25 beats δ = 0.75",
        "every update beats target updates only",
        "singular loss gives the highest evaluation return",
        "singular loss gives the highest effective rank",
        "weight magnitudes grow",
        "dead units rise",
        "activations become sparser",
        "CartPole-v1: the method beats the baseline",
        "MountainCar-v0: the method does worse than the baseline",
        "trainability ratio",
        "gradient-dormant fraction",
    ):
        assert sum(needle in t for t in titles) == 1, needle
