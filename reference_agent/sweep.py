"""Sweeps: the paper's grids as presets, custom grids, and a resumable parallel runner.

A sweep directory holds one run directory per configuration and seed (named by
``DQNConfig.run_name``) and ``sweep.json`` (the configurations and, after each run, its
outcome). Rerunning a sweep skips finished runs and resumes the others from their checkpoints;
a failed run is recorded with its error and does not stop the others.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import tomllib

from reference_agent import rundir
from reference_agent.config import DQNConfig, Reg, RegEvery

PAPER_DELTAS = (0.75, 1.0, 1.25)
PAPER_HESSIAN_EVERY = 10_000
"""The presets also record the TD-loss Hessian extremes every 10k steps (about 1 s each)."""
PAPER_PENALTIES = (Reg.l2, Reg.l2init, Reg.singular)


def paper_lam(reg: Reg) -> float:
    """λ of the paper's sweep: 0.01, and 0.001 for the singular penalty."""
    return 0.001 if reg is Reg.singular else 0.01


def paper_lunarlander(seeds: int = 2) -> list[DQNConfig]:
    """No-reg baseline + {l2, l2init, singular} × δ ∈ {0.75, 1, 1.25} × {every update, target
    updates only}: 19 configurations × seeds."""
    configs = []
    for seed in range(seeds):
        configs.append(DQNConfig(env_id="LunarLander-v3", seed=seed, hessian_every=PAPER_HESSIAN_EVERY))
        for reg, delta, every in itertools.product(PAPER_PENALTIES, PAPER_DELTAS, RegEvery):
            configs.append(
                DQNConfig(
                    env_id="LunarLander-v3",
                    seed=seed,
                    reg=reg,
                    lam=paper_lam(reg),
                    delta=delta,
                    reg_every=every,
                    hessian_every=PAPER_HESSIAN_EVERY,
                )
            )
    return configs


def paper_transfer(env_id: str, seeds: int = 2) -> list[DQNConfig]:
    """Baseline, l2init (λ 0.01, δ 1.25) and singular (λ 0.001, δ 1.25), every update: the best
    LunarLander configuration as the text (l2init) and the Figure 3 caption (singular) name it."""
    configs = []
    for seed in range(seeds):
        configs.append(DQNConfig(env_id=env_id, seed=seed, hessian_every=PAPER_HESSIAN_EVERY))
        for reg in (Reg.l2init, Reg.singular):
            configs.append(
                DQNConfig(
                    env_id=env_id, seed=seed, reg=reg, lam=paper_lam(reg), delta=1.25, hessian_every=PAPER_HESSIAN_EVERY
                )
            )
    return configs


PRESETS: dict[str, Callable[[int], list[DQNConfig]]] = {
    "paper-lunarlander": paper_lunarlander,
    "paper-cartpole": lambda seeds: paper_transfer("CartPole-v1", seeds),
    "paper-mountaincar": lambda seeds: paper_transfer("MountainCar-v0", seeds),
    "paper": lambda seeds: [
        *paper_lunarlander(seeds),
        *paper_transfer("CartPole-v1", seeds),
        *paper_transfer("MountainCar-v0", seeds),
    ],
}


def parse_value(text: str) -> Any:
    """A grid value: JSON (numbers, true/false, lists) where it parses, else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_sets(sets: Iterable[str]) -> dict[str, list[Any]]:
    """``["lam=0.01,0.1", "reg=l2"]`` → ``{"lam": [0.01, 0.1], "reg": ["l2"]}``."""
    grid: dict[str, list[Any]] = {}
    for item in sets:
        key, sep, values = item.partition("=")
        if not sep or not key.strip() or not values:
            raise ValueError(f"--set expects key=v1,v2,…, got {item!r}")
        grid[key.strip().replace("-", "_")] = [parse_value(v.strip()) for v in values.split(",")]
    return grid


def load_grid_file(path: Path) -> dict[str, list[Any]]:
    """A JSON or TOML table of ``field = [values…]`` (a scalar means one value)."""
    text = path.read_text(encoding="utf-8")
    data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a grid file holds a table of field = [values]")
    return {k: v if isinstance(v, list) else [v] for k, v in data.items()}


def expand_grid(grid: dict[str, list[Any]], seeds: int = 1, base: dict[str, Any] | None = None) -> list[DQNConfig]:
    """The Cartesian product of ``grid`` over ``base`` fields, for seeds 0..seeds−1 (unless
    ``seed`` is itself in the grid)."""
    grid = dict(grid)
    grid.setdefault("seed", list(range(seeds)))
    keys = list(grid)
    return [
        DQNConfig.from_dict({**(base or {}), **dict(zip(keys, values, strict=True))})
        for values in itertools.product(*(grid[k] for k in keys))
    ]


@dataclass
class RunOutcome:
    run: str
    state: str
    message: str


def _run_one(config: dict[str, Any], run_dir: str) -> RunOutcome:
    """Worker: train or resume one run; errors become a ``failed`` outcome."""
    from reference_agent.dqn import train

    cfg = DQNConfig.from_dict(config)
    try:
        result = train(cfg, Path(run_dir), resume=True)
        return RunOutcome(cfg.run_name, result.state, result.message)
    except Exception as err:  # recorded, the sweep goes on
        return RunOutcome(cfg.run_name, "failed", f"{type(err).__name__}: {err}")


def run_state(run_dir: Path) -> str | None:
    path = run_dir / rundir.STATUS
    if not path.exists():
        return None
    try:
        return str(rundir.read_json(path).get("state"))
    except (json.JSONDecodeError, OSError):
        return None


def run_step(run_dir: Path) -> int:
    try:
        return int(rundir.read_json(run_dir / rundir.STATUS).get("step", 0))
    except (FileNotFoundError, json.JSONDecodeError, ValueError):
        return 0


SweepProgress = Callable[[int, int, int, int], None]
"""``progress(steps_done, steps_total, runs_done, runs_total)``."""


def run_sweep(
    configs: list[DQNConfig],
    out_dir: Path,
    *,
    workers: int = 1,
    progress: SweepProgress | None = None,
    poll_s: float = 1.0,
) -> list[RunOutcome]:
    """Run ``configs`` in ``workers`` processes (one torch thread each); skip finished runs."""
    names = [c.run_name for c in configs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"the sweep has duplicate runs: {duplicates}")
    out_dir.mkdir(parents=True, exist_ok=True)
    sweep_file = out_dir / "sweep.json"
    outcomes: dict[str, RunOutcome] = {}
    todo = []
    for cfg in configs:
        if run_state(out_dir / cfg.run_name) == "finished":
            outcomes[cfg.run_name] = RunOutcome(cfg.run_name, "finished", "finished (skipped)")
        else:
            todo.append(cfg)

    def record() -> None:
        rundir.write_json(
            sweep_file,
            {
                "runs": [c.to_dict() for c in configs],
                "outcomes": {n: {"state": o.state, "message": o.message} for n, o in outcomes.items()},
            },
        )

    def report_progress() -> None:
        if progress is not None:
            done = sum(c.total_steps if c.run_name in outcomes else run_step(out_dir / c.run_name) for c in configs)
            progress(done, sum(c.total_steps for c in configs), len(outcomes), len(configs))

    record()
    report_progress()
    with ProcessPoolExecutor(max_workers=max(1, workers), mp_context=get_context("spawn")) as pool:
        pending = {pool.submit(_run_one, c.to_dict(), str(out_dir / c.run_name)) for c in todo}
        while pending:
            finished, pending = wait(pending, timeout=poll_s, return_when=FIRST_COMPLETED)
            for future in finished:
                outcome = future.result()
                outcomes[outcome.run] = outcome
                record()
            report_progress()
            if not finished:
                time.sleep(0)
    return [outcomes[n] for n in names]
