"""Sweeps: the paper's grids as presets, custom grids, and a resumable parallel runner.

A sweep directory holds one run directory per configuration and seed (named by
``DQNConfig.run_name``) and ``sweep.json`` (the configurations and, after each run, its
outcome). Rerunning a sweep skips finished runs and resumes the others from their checkpoints;
a failed run is recorded with its error and does not stop the others.

The runs are grouped into *batches* (``plan_batches``): with the ``batched`` engine, runs that
share ``engine.batch_key`` (environment, network shape, step settings) train in lockstep in one
process, split so that every worker gets a share; with the ``process`` engine every run is its
own batch. Batches run in a local process pool (``workers`` processes) or as Ray tasks on a
cluster (``backend="ray"``; Ray schedules them, this module only submits and collects).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from multiprocessing import get_context
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as connection_wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import tomllib

from reference_agent import rundir
from reference_agent.config import DQNConfig, Reg, RegEvery
from reference_agent.engine import batch_key

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


STEP_FIELDS = (
    "learning_starts",
    "target_update_period",
    "eval_every",
    "probe_every",
    "hessian_every",
    "log_every",
    "checkpoint_every",
)
"""Intervals and offsets measured in environment steps: ``scale_steps`` scales them with the run."""


def scale_steps(cfg: DQNConfig, total_steps: int, keep: Iterable[str] = ()) -> DQNConfig:
    """``cfg`` shortened (or lengthened) to ``total_steps``: every field of ``STEP_FIELDS`` not in
    ``keep`` scaled by the same factor (rounded, at least 1; 0 = never stays 0), so that a quick
    run keeps the shape of the full one (learning starts at the same fraction, the same number of
    evaluations, probes and target updates)."""
    factor = total_steps / cfg.total_steps
    data = cfg.to_dict()
    data["total_steps"] = total_steps
    for name in STEP_FIELDS:
        if name not in keep and data[name] > 0:
            data[name] = max(1, round(data[name] * factor))
    return DQNConfig.from_dict(data)


SMOKE_STEPS = 5_000


def smoke(seeds: int = 2) -> list[DQNConfig]:
    """``paper-cartpole`` scaled to 5,000 steps: every code path of the paper's runs in about a
    minute (not evidence for any claim)."""
    return [scale_steps(c, SMOKE_STEPS) for c in paper_transfer("CartPole-v1", seeds)]


INTERVENTIONS = ("redo", "shrink-perturb")
"""The interventions beside the penalties in the definitive rerun: ReDo (Sokar et al. 2023) and
Shrink & Perturb (Ash & Adams 2020), each with its defaults and no penalty."""
SMALL_MARGIN_ENVS = ("LunarLander-v3", "CartPole-v1")
"""Where the definitive rerun doubles the seeds (10 instead of 5): every claim on LunarLander
(δ, frequency, the best penalty: the 2-seed sweep put the top configurations within 2 points of
each other, inside seed ranges of 12 to 42) and on CartPole (the method against the baseline:
315.9 ± 184.1 against 444.8 ± 55.2). MountainCar stays at 5: every configuration returned −200 in
every evaluation, and more seeds of that do not separate anything."""


def alternatives(env_id: str, seeds: int = 5) -> list[DQNConfig]:
    """Beside the paper's rows, what a reader would try instead (every update, paper defaults
    otherwise):

    * the authors'-code variants (``reg_variant="authors"``): l2init λ 0.01 δ 1.25 and singular
      λ 0.001 (their penultimate-features penalty without δ), and on LunarLander also l2 δ 1.25;
    * the plain L2 baseline with δ = 1 (constant weight decay, λ 0.01), on CartPole and
      MountainCar (LunarLander's grid already has it);
    * ReDo and Shrink & Perturb without a penalty."""
    rows: list[dict[str, Any]] = [
        {"reg": "l2init", "lam": 0.01, "delta": 1.25, "reg_variant": "authors"},
        {"reg": "singular", "lam": 0.001, "delta": 1.0, "reg_variant": "authors"},
    ]
    if env_id.startswith("LunarLander"):
        rows.append({"reg": "l2", "lam": 0.01, "delta": 1.25, "reg_variant": "authors"})
    else:
        rows.append({"reg": "l2", "lam": 0.01, "delta": 1.0})
    rows += [{"intervention": name} for name in INTERVENTIONS]
    return [
        DQNConfig.from_dict({"env_id": env_id, "seed": seed, "hessian_every": PAPER_HESSIAN_EVERY, **row})
        for seed in range(seeds)
        for row in rows
    ]


def definitive(seeds: int = 5) -> list[DQNConfig]:
    """The definitive rerun (docs/reproduction.md): the paper's three presets and the alternatives, ``seeds`` seeds per
    configuration (at least 5) and twice as many on the environments of ``SMALL_MARGIN_ENVS``."""
    seeds = max(seeds, 5)
    configs = []
    for env_id in ("LunarLander-v3", "CartPole-v1", "MountainCar-v0"):
        n = 2 * seeds if env_id in SMALL_MARGIN_ENVS else seeds
        paper_rows = paper_lunarlander(n) if env_id.startswith("LunarLander") else paper_transfer(env_id, n)
        configs += [*paper_rows, *alternatives(env_id, n)]
    return configs


PRESET_SEEDS = {"paper5": 5, "definitive": 5, "alternatives": 5}
"""Seeds per configuration of a preset when ``--seeds`` is not given (otherwise 2, the paper's)."""

PRESETS: dict[str, Callable[[int], list[DQNConfig]]] = {
    "smoke": smoke,
    "paper-lunarlander": paper_lunarlander,
    "paper-cartpole": lambda seeds: paper_transfer("CartPole-v1", seeds),
    "paper-mountaincar": lambda seeds: paper_transfer("MountainCar-v0", seeds),
    "paper": lambda seeds: [
        *paper_lunarlander(seeds),
        *paper_transfer("CartPole-v1", seeds),
        *paper_transfer("MountainCar-v0", seeds),
    ],
    "paper5": lambda seeds: PRESETS["paper"](max(seeds, 5)),
    "definitive": definitive,
    "alternatives": lambda seeds: [
        *alternatives("LunarLander-v3", seeds),
        *alternatives("CartPole-v1", seeds),
        *alternatives("MountainCar-v0", seeds),
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
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"--grid {path}: not valid {'TOML' if path.suffix == '.toml' else 'JSON'} ({err})") from None
    except OSError as err:
        raise OSError(f"--grid {path}: {err.strerror or err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a grid file holds a table of field = [values]")
    return {k: v if isinstance(v, list) else [v] for k, v in data.items()}


def apply_grid(configs: list[DQNConfig], grid: dict[str, list[Any]]) -> list[DQNConfig]:
    """Every config of ``configs`` (a preset) once per combination of ``grid``'s values, those
    fields overridden."""
    keys = list(grid)
    return [
        DQNConfig.from_dict({**c.to_dict(), **dict(zip(keys, values, strict=True))})
        for c in configs
        for values in itertools.product(*(grid[k] for k in keys))
    ]


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


ENGINES = ("batched", "process")
BACKENDS = ("local", "ray")


def plan_batches(configs: list[DQNConfig], workers: int = 1, engine: str = "batched") -> list[list[DQNConfig]]:
    """The batches a sweep trains, largest first. ``process``: one run each. ``batched``: runs
    with equal ``batch_key``, each group split into near-equal batches of at most
    ``ceil(len(configs) / workers)`` runs, so that ``workers`` processes share the work."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if engine == "process":
        return [[c] for c in configs]
    groups: dict[tuple[Any, ...], list[DQNConfig]] = {}
    for c in configs:
        groups.setdefault(batch_key(c), []).append(c)
    limit = max(1, math.ceil(len(configs) / max(1, workers)))
    batches = []
    for group in groups.values():
        parts = math.ceil(len(group) / limit)
        size = math.ceil(len(group) / parts)
        batches += [group[i : i + size] for i in range(0, len(group), size)]
    return sorted(batches, key=lambda b: -len(b) * b[0].total_steps)


@dataclass
class RunOutcome:
    run: str
    """The run's name (its directory in the sweep)."""
    state: str
    """``status.json``'s state at the end: finished, diverged, interrupted, failed."""
    message: str
    """Why it ended so."""
    warnings: list[str] = field(default_factory=list)
    """What the run reported along the way (``RunResult.warnings``): ``probe sweep`` prints them."""


PARENT_POLL_S = 1.0
"""How often a worker checks that its sweep process is still alive."""


def _watch_parent(parent: int) -> None:
    """Worker thread: when the sweep process dies (its worker is re-parented), stop this worker
    with SIGTERM (a run in progress checkpoints and ends ``interrupted``)."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os.kill(os.getpid(), signal.SIGTERM)


def train_runs(
    configs: list[dict[str, Any]],
    run_dirs: list[str],
    device: str = "cpu",
    stop_signals: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM),
) -> list[RunOutcome]:
    """Train or resume one batch (``engine.train_batch``); errors become ``failed`` outcomes.
    ``stop_signals``: ``EngineOptions.stop_signals``."""
    from reference_agent.engine import EngineOptions, train_batch

    cfgs = [DQNConfig.from_dict(c) for c in configs]
    options = EngineOptions(device=device, stop_signals=stop_signals)
    try:
        results = train_batch(cfgs, [Path(d) for d in run_dirs], resume=True, options=options)
        return [RunOutcome(c.run_name, r.state, r.message, r.warnings) for c, r in zip(cfgs, results, strict=True)]
    except Exception as err:  # recorded, the sweep goes on
        return [RunOutcome(c.run_name, "failed", f"{type(err).__name__}: {err}") for c in cfgs]


def _run_batch(
    configs: list[dict[str, Any]], run_dirs: list[str], device: str, parent: int, results: Connection
) -> None:
    """Worker process: train one batch and send its outcomes. Ctrl-C in the terminal reaches the
    whole process group: the worker ignores SIGINT, also while it trains, and the sweep process
    stops it with SIGTERM instead (one orderly stop, no tracebacks, every run ``stopped by
    SIGTERM``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    outcomes = train_runs(configs, run_dirs, device, stop_signals=(signal.SIGTERM,))
    with contextlib.suppress(OSError):  # the sweep process is gone; the run directories hold the outcomes
        results.send(outcomes)


def run_state(run_dir: Path) -> str | None:
    path = run_dir / rundir.STATUS
    if not path.exists():
        return None
    try:
        return str(rundir.read_json(path).get("state"))
    except (ValueError, OSError, AttributeError):
        return None


def run_step(run_dir: Path) -> int:
    try:
        return int(rundir.read_json(run_dir / rundir.STATUS).get("step", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0


def _lost(configs: list[DQNConfig], out_dir: Path, message: str) -> list[RunOutcome]:
    """Outcomes of a batch whose worker died without reporting: ``failed``, also in each run's
    ``status.json`` when that still says ``running``."""
    for cfg in configs:
        run_dir = out_dir / cfg.run_name
        if (run_dir / rundir.CONFIG).exists() and run_state(run_dir) in (None, "running"):
            status = {"state": "failed", "step": run_step(run_dir), "total_steps": cfg.total_steps}
            rundir.write_json(run_dir / rundir.STATUS, {**status, "message": message, "steps_per_s": None})
    return [RunOutcome(c.run_name, "failed", message) for c in configs]


@dataclass(frozen=True)
class SweepProgressReport:
    """Where a sweep stands, from the runs' ``status.json`` steps."""

    steps: int
    """Environment steps taken, summed over the runs."""
    steps_total: int
    updates: int
    """Gradient steps taken, summed over the runs (``DQNConfig.updates_by``)."""
    updates_total: int
    """Gradient steps taken once the runs still training end: an ended run (finished, failed,
    diverged, interrupted) counts as it stands."""
    runs_finished: int
    runs_total: int


SweepProgress = Callable[[SweepProgressReport], None]
"""Called about every ``poll_s`` seconds while the sweep runs."""


@dataclass
class _Worker:
    configs: list[DQNConfig]
    out_dir: Path
    process: BaseProcess
    results: Connection

    def outcomes(self) -> list[RunOutcome]:
        """The outcomes the worker sent; for a worker that exited without them (killed, out of
        memory…) ``failed``."""
        try:
            if self.results.poll():
                sent: list[RunOutcome] = self.results.recv()
                return sent
        except (EOFError, OSError):
            pass
        self.process.join()
        code = self.process.exitcode
        how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
        return _lost(self.configs, self.out_dir, f"worker process lost ({how}); rerun the sweep to resume this run")


def run_sweep(
    configs: list[DQNConfig],
    out_dir: Path,
    *,
    workers: int = 1,
    progress: SweepProgress | None = None,
    poll_s: float = 1.0,
    engine: str = "batched",
    backend: str = "local",
    address: str | None = None,
    device: str = "cpu",
) -> list[RunOutcome]:
    """Run ``configs`` as batches (``plan_batches``) in up to ``workers`` processes at once (one
    torch thread each), or as Ray tasks (``backend="ray"``, on the cluster at ``address``, or a
    local Ray instance when None); skip finished runs.

    A batch whose process dies has its runs recorded ``failed`` and the others go on; rerunning
    the sweep resumes them from their checkpoints. Ctrl-C (SIGINT) stops the running batches with
    a checkpoint (``interrupted``) and returns without starting the others; ``outcomes`` then
    lacks the runs not started. Local workers stop when the sweep process dies."""
    names = [c.run_name for c in configs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"the sweep has duplicate runs: {', '.join(duplicates)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    with rundir.lock(out_dir, "sweep directory"):
        return _run_locked(configs, out_dir, max(1, workers), progress, poll_s, engine, backend, address, device)


def _run_locked(
    configs: list[DQNConfig],
    out_dir: Path,
    workers: int,
    progress: SweepProgress | None,
    poll_s: float,
    engine: str,
    backend: str,
    address: str | None,
    device: str,
) -> list[RunOutcome]:
    sweep_file = out_dir / "sweep.json"
    names = [c.run_name for c in configs]
    outcomes: dict[str, RunOutcome] = {}
    todo: list[DQNConfig] = []
    for cfg in configs:
        if run_state(out_dir / cfg.run_name) == "finished":
            outcomes[cfg.run_name] = RunOutcome(cfg.run_name, "finished", "finished (skipped)")
        else:
            todo.append(cfg)

    def record(new: list[RunOutcome] = ()) -> None:  # type: ignore[assignment]
        for o in new:
            outcomes[o.run] = o
        rundir.write_json(
            sweep_file,
            {
                "runs": [c.to_dict() for c in configs],
                "outcomes": {
                    n: {"state": o.state, "message": o.message, "warnings": o.warnings} for n, o in outcomes.items()
                },
            },
        )

    def report_progress() -> None:
        if progress is not None:
            steps = [run_step(out_dir / c.run_name) for c in configs]
            report = SweepProgressReport(
                steps=sum(steps),
                steps_total=sum(c.total_steps for c in configs),
                updates=sum(c.updates_by(s) for c, s in zip(configs, steps, strict=True)),
                updates_total=sum(
                    c.updates_by(s if c.run_name in outcomes else c.total_steps)
                    for c, s in zip(configs, steps, strict=True)
                ),
                runs_finished=sum(o.state == "finished" for o in outcomes.values()),
                runs_total=len(configs),
            )
            progress(report)

    record()
    report_progress()
    batches = plan_batches(todo, workers, engine)
    try:
        if backend == "ray":
            from reference_agent.experiments.ray_backend import run_batches_on_ray

            run_batches_on_ray(batches, out_dir, address, device, record, report_progress, poll_s)
        else:
            _run_local(batches, out_dir, workers, device, record, report_progress, poll_s)
    except _Interrupted:
        raise SweepInterrupted([outcomes[n] for n in names if n in outcomes]) from None
    return [outcomes[n] for n in names]


class _Interrupted(Exception):
    """Ctrl-C stopped the batches (each recorded its runs' outcomes)."""


def _run_local(
    batches: list[list[DQNConfig]],
    out_dir: Path,
    workers: int,
    device: str,
    record: Callable[[list[RunOutcome]], None],
    report_progress: Callable[[], None],
    poll_s: float,
) -> None:
    context = get_context("spawn")
    running: list[_Worker] = []

    def start(batch: list[DQNConfig]) -> None:
        receive, send = context.Pipe(duplex=False)
        name = batch[0].run_name if len(batch) == 1 else f"batch of {len(batch)}: {batch[0].run_name}, …"
        process = context.Process(
            target=_run_batch,
            args=([c.to_dict() for c in batch], [str(out_dir / c.run_name) for c in batch], device, os.getpid(), send),
            name=name,
        )
        process.start()
        send.close()
        running.append(_Worker(batch, out_dir, process, receive))

    def collect(timeout: float) -> None:
        ready = set(connection_wait([w.process.sentinel for w in running], timeout=timeout))
        for w in [w for w in running if w.process.sentinel in ready]:
            outcomes = w.outcomes()
            w.process.join()
            w.results.close()
            running.remove(w)
            record(outcomes)

    queue = list(batches)
    try:
        while queue or running:
            while queue and len(running) < workers:
                start(queue.pop(0))
            collect(poll_s)
            report_progress()
    except KeyboardInterrupt:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not orphan workers
        try:
            for w in running:
                if w.process.is_alive():
                    os.kill(w.process.pid, signal.SIGTERM)  # type: ignore[arg-type]
            while running:
                collect(poll_s)
        finally:
            signal.signal(signal.SIGINT, previous)
        report_progress()
        raise _Interrupted from None


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped the sweep; ``outcomes`` holds the runs that ended (running ones
    ``interrupted``)."""

    def __init__(self, outcomes: list[RunOutcome]) -> None:
        super().__init__("sweep interrupted")
        self.outcomes = outcomes
