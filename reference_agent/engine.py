"""The reference DQN (Mnih et al. 2015) with successive weight regularization (Teo et al. 2023),
for K ≥ 1 runs in lockstep in one process (K = 1 is a single run: there is no other loop).

Readable top to bottom: ``train_batch`` sets the runs up and ``_Engine.run`` holds the
algorithm. The runs of a batch share the environment, the network shape and every step setting
(``batch_key``); they may differ in seed, penalty, λ, δ, frequency, penalized layers, variant and
ε schedule. Their parameters are stacked (``StackedQ``): each environment step does one batched
forward, backward and Adam step for all of them, and the results of a run do not depend on the
other runs of its batch (tested). Each run keeps its own run directory, replay buffer, RNG
streams, episode, statistics, probe batch and checkpoint, in the format of a single run.

With ``intervention``, ReDo / Shrink & Perturb / a reset of the output layer acts on a run's own
network and its slice of the Adam state every ``intervention_every`` steps after learning starts
(``make_intervention``), between a probe right before and one right after.

One gradient step per environment step once ``learning_starts`` steps are in the buffer; MSE TD
loss ``(r + γ (1 − terminated) max_a' Q_target(s', a') − Q(s, a))²`` where a time-limit
truncation is not terminal; hard target update every τ steps; no gradient clipping.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from gymnasium.vector import AutoresetMode, SyncVectorEnv
from torch import nn

import plasticity_probe as pp
from reference_agent import heap, rundir
from reference_agent.checkpoint import load_checkpoint, save_checkpoint
from reference_agent.config import DQNConfig, InterventionKind, epsilon
from reference_agent.envs import episode_seed, make_env
from reference_agent.network import QNetwork
from reference_agent.penalties import StackedPenalty
from reference_agent.replay import Batch, StackedReplay
from reference_agent.stacked import StackedQ, mlp_forward
from reference_agent.update import BatchedUpdate, stack_key

ProgressFn = Callable[[int, int, dict[str, float]], None]
"""``progress(step, total_steps, info)``; info has ``steps_per_s``, ``runs`` (still training),
``updates`` and ``updates_total`` (each run's gradient steps, ``DQNConfig.updates_by``) and, for a
single run, ``last_eval`` when known."""

PER_RUN_FIELDS = frozenset(
    {
        "seed",
        "reg",
        "lam",
        "delta",
        "reg_every",
        "reg_variant",
        "reg_layers",
        "eps_start",
        "eps_end",
        "eps_fraction",
        "extra",
    }
)
"""Settings that may differ between the runs of one batch; every other field must be equal."""


class DivergenceError(RuntimeError):
    """The TD loss, its statistics or the penalty became NaN or Inf."""


class RunExistsError(FileExistsError):
    """The run directory already holds a run and resume was not asked for."""


@dataclass
class RunResult:
    run_dir: Path
    state: str
    step: int
    message: str
    last_eval: float | None
    warnings: list[str] = field(default_factory=list)
    """What the user should know (malformed records dropped on resume, stale files removed)."""


@dataclass
class EngineOptions:
    """How to run a batch (not part of any run's results)."""

    device: str = "cpu"
    """torch device of the networks, the replay buffers and the updates (``cuda``: a GPU)."""
    hooks: Sequence[UpdateHook] = ()
    """Called after every gradient step as ``hook(step, run)`` for each run still training."""
    compile: bool | None = None
    """Compile the update with inductor (``BatchedUpdate``, ``update.CompiledStep``); None: on the CPU for batches of
    at least ``COMPILE_MIN_UPDATES`` gradient steps over all their runs, where the one-off
    compilation pays off."""
    stop_signals: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)
    """Signals that stop the batch after the current step: every run checkpointed and
    ``interrupted``. A sweep's worker stops on SIGTERM alone (``sweep._run_batch``): the sweep
    process sends it on Ctrl-C, and the terminal's SIGINT, which reaches the whole process group,
    stays ignored, so every run of the sweep ends the same way."""


VALUE_CHUNK = 4096
"""Rows per forward pass when the buffer's next-state values are recomputed."""

UNCONVERGED = "the TD-loss Hessian's extremes did not converge (Lanczos stopped at max_iter products)"
"""The run's warning, once, in place of ``hessian_spectrum``'s ``ConvergenceWarning`` at every probe."""

COMPILE_MIN_UPDATES = 20_000
"""With ``EngineOptions.compile=None``, batches of ≥ 20k gradient steps (runs × updates per run)
compile their update: the compilation is paid once per batch, 0.6 s (K = 1) to 2.4 s (the paper's
19-run LunarLander batch) with inductor's disk cache warm and 5–60 s the first time a shape is
compiled on a machine, and saves about 110–150 µs per run and update (docs/performance.md)."""


def use_compile(choice: bool | None, cfg: DQNConfig, device: torch.device, k: int = 1) -> bool:
    """Whether a batch of ``k`` runs like ``cfg`` compiles its update (``EngineOptions.compile``)."""
    if choice is not None:
        return choice
    return device.type == "cpu" and k * (cfg.total_steps - cfg.learning_starts) >= COMPILE_MIN_UPDATES


def batch_key(cfg: DQNConfig) -> tuple[Any, ...]:
    """Runs with equal keys can train in one batch (same environment, shape and step settings)."""
    data = cfg.to_dict()
    return tuple((k, repr(data[k])) for k in sorted(data) if k not in PER_RUN_FIELDS)


def td_loss(
    q: torch.nn.Module, target: torch.nn.Module, batch: Batch, gamma: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MSE TD loss of one network, and the Q(s, a) and targets y it compares (the definition the
    batched update implements; the probes use it on a run's own modules)."""
    with torch.no_grad():
        next_q = target(batch.next_obs).max(dim=1).values
        y = batch.rewards + gamma * (1.0 - batch.terminated) * next_q
    q_sa = q(batch.obs).gather(1, batch.actions.unsqueeze(1)).squeeze(1)
    return F.mse_loss(q_sa, y), q_sa, y


class RunAdam:
    """One run's slice of the stacked Adam state, keyed by that run's own parameters, as an
    intervention expects ``optimizer.state``: per-entry resets (ReDo) write into the stack;
    dropping a parameter's state (Shrink & Perturb, layer resets) zeroes the run's moments. Adam's
    ``step`` belongs to the stacked tensor, shared by the batch, and is kept."""

    def __init__(self, optimizer: torch.optim.Optimizer, stacked: Sequence[torch.Tensor], own: nn.Module, i: int):
        self._optimizer, self._stacked, self._own, self._i = optimizer, list(stacked), own, i

    @property
    def state(self) -> _ZeroOnPop:
        out = _ZeroOnPop()
        for p, full in zip(self._own.parameters(), self._stacked, strict=True):
            s = self._optimizer.state.get(full)
            if s:
                out[p] = {key: v[self._i] for key, v in s.items() if key in ("exp_avg", "exp_avg_sq")}
        return out

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self._own.parameters())}]


class _ZeroOnPop(dict):
    def pop(self, key: Any, default: Any = None) -> Any:
        for value in self.get(key, {}).values():
            value.zero_()
        return super().pop(key, default)


Intervene = Callable[[torch.Tensor, torch.Generator], pp.ResetRecord]


def make_intervention(cfg: DQNConfig, q: nn.Module, optimizer: Any, obs_dim: int) -> Intervene | None:
    """The configured intervention as ``intervene(minibatch_obs, generator) -> record`` on a run's
    online network and its Adam state (``None`` for ``intervention = none``); the generator,
    seeded per step, makes every fresh initialization reproducible on resume."""
    kind = cfg.intervention
    if kind is InterventionKind.redo:
        redo = pp.ReDo(q, optimizer, tau=cfg.redo_tau)
        return lambda obs, gen: redo.reset(obs, generator=gen)
    if kind is InterventionKind.shrink_perturb:
        return lambda _obs, gen: pp.shrink_perturb(q, 0.8, 0.01, optimizer=optimizer, generator=gen)
    if kind is InterventionKind.reset_last:
        last = pp.discover_layers(q, torch.zeros(1, obs_dim))[0][-1].name
        return lambda _obs, gen: pp.reset_layers(q, [last], optimizer=optimizer, generator=gen)
    return None


def dormant(report: pp.Report) -> dict[str, float]:
    """Dormant fraction per layer and over the hidden layers (``network``) of a report."""
    out = {r.name: r.metrics["dormant_fraction"] for r in report.layers if "dormant_fraction" in r.metrics}
    if "dormant_fraction" in report.network:
        out["network"] = report.network["dormant_fraction"]
    return out


def package_versions() -> dict[str, str]:
    out = {}
    for name in ("plasticity-probe", "torch", "numpy", "gymnasium"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "unknown"
    return out


@contextmanager
def stop_on_signals(signals: Sequence[signal.Signals]) -> Iterator[dict[str, int | None]]:
    """Turn ``signals`` into a flag the loop checks (main thread only); the others keep their
    handlers."""
    flag: dict[str, int | None] = {"signal": None}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, _frame: Any) -> None:
        flag["signal"] = signum

    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def train(
    cfg: DQNConfig | None,
    run_dir: Path,
    *,
    resume: bool = False,
    progress: ProgressFn | None = None,
    options: EngineOptions | None = None,
) -> RunResult:
    """Train (or resume) one run in ``run_dir``; returns how it ended.

    ``resume=True`` continues from ``run_dir/checkpoint.pt`` with the config saved there (``cfg``
    may then be None); the result equals an uninterrupted run with the same seed. Without a
    checkpoint it starts afresh. ``resume=False`` refuses a directory that already holds a run.
    The run directory is locked while the run writes it (``rundir.LockedError`` for a second
    writer), and temporary files a killed writer left are removed.
    """
    return train_batch([cfg], [Path(run_dir)], resume=resume, progress=progress, options=options)[0]


def train_batch(
    cfgs: Sequence[DQNConfig | None],
    run_dirs: Sequence[Path],
    *,
    resume: bool = False,
    progress: ProgressFn | None = None,
    options: EngineOptions | None = None,
) -> list[RunResult]:
    """Train (or resume) the runs ``cfgs`` in ``run_dirs`` in lockstep, as ``train`` does each.

    The runs must share ``batch_key``. Runs resumed from checkpoints of different steps train as
    separate batches, one after the other (a batch's runs checkpoint together, so this happens
    only after a crash in the middle of writing them)."""
    if len(cfgs) != len(run_dirs) or not cfgs:
        raise ValueError("train_batch needs one run directory per config, and at least one run")
    options = options or EngineOptions()
    with ExitStack() as stack:
        for d in run_dirs:
            stack.enter_context(rundir.lock(Path(d)))
        prepared = [_prepare(c, Path(d), resume) for c, d in zip(cfgs, run_dirs, strict=True)]
        keys = {batch_key(p.cfg) for p in prepared}
        if len(keys) > 1:
            raise ValueError("runs of one batch must share the environment, network shape and step settings")
        results: dict[int, RunResult] = {}
        for step in sorted({p.step for p in prepared}):
            # stacked in the order that lets runs with the singular penalty share chunks
            chosen = sorted(
                (i for i, p in enumerate(prepared) if p.step == step), key=lambda i: stack_key(prepared[i].cfg)
            )
            engine = _Engine([prepared[i] for i in chosen], progress, options)
            for i, result in zip(chosen, engine.run(), strict=True):
                results[i] = result
        return [results[i] for i in range(len(prepared))]


@dataclass
class _Prepared:
    cfg: DQNConfig
    run_dir: Path
    ckpt: dict[str, Any] | None
    warnings: list[str]

    @property
    def step(self) -> int:
        return int(self.ckpt["step"]) if self.ckpt is not None else 0


def _prepare(cfg: DQNConfig | None, run_dir: Path, resume: bool) -> _Prepared:
    """The run's config and checkpoint (on resume), after removing stale temporary files."""
    warnings = [
        f"removed {p.name}, left by a process killed while writing" for p in rundir.remove_stale_temporaries(run_dir)
    ]
    ckpt_path = run_dir / rundir.CHECKPOINT
    ckpt: dict[str, Any] | None = None
    if resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path)
        saved = DQNConfig.from_dict(ckpt["config"])
        if cfg is not None and cfg.to_dict() != saved.to_dict():
            diff = sorted(k for k, v in cfg.to_dict().items() if saved.to_dict()[k] != v)
            raise ValueError(f"config differs from the checkpoint's in {diff}; resume uses the saved config")
        cfg = saved
    elif resume and cfg is None and (run_dir / rundir.CONFIG).exists():
        cfg = rundir.read_config(run_dir)
    elif not resume and ((run_dir / rundir.CONFIG).exists() or ckpt_path.exists()):
        raise RunExistsError(f"{run_dir} already holds a run; resume it or choose another output directory")
    if cfg is None:
        raise ValueError(f"nothing to resume in {run_dir} and no config given")
    return _Prepared(cfg, run_dir, ckpt, warnings)


@dataclass
class RunState:
    """One run of a batch: what hooks see (``q`` and ``target`` are the run's own networks, whose
    parameters share storage with the stack) and the run's bookkeeping."""

    index: int
    cfg: DQNConfig
    run_dir: Path
    q: QNetwork
    target: QNetwork
    init_state: dict[str, torch.Tensor]
    rng: np.random.Generator
    warnings: list[str]
    episode: int = 0
    ep_actions: list[int] = field(default_factory=list)
    ep_return: float = 0.0
    probe_batch: Batch | None = None
    stats_count: int = 0
    state: str = "running"
    message: str = ""
    last_eval: float | None = None
    stopped_at: int | None = None
    metrics: pp.JsonlSink = field(init=False)
    plasticity: pp.JsonlSink = field(init=False)
    interventions: pp.JsonlSink | None = None
    intervene: Intervene | None = None
    optimizer_state: Callable[[], dict[str, dict[str, torch.Tensor]]] = field(default=dict)
    """Adam's state of this run by parameter name (``exp_avg``, ``exp_avg_sq``: views into the
    stacked state, so an intervention can reset them in place)."""

    @property
    def training(self) -> bool:
        return self.state == "running"

    def intervention_due(self, t: int) -> bool:
        since = t - self.cfg.learning_starts
        return self.intervene is not None and since > 0 and since % self.cfg.intervention_every == 0


UpdateHook = Callable[[int, RunState], None]


class _Engine:
    """One batch of runs at the same step: set-up in ``__init__``, the algorithm in ``run``."""

    def __init__(self, prepared: list[_Prepared], progress: ProgressFn | None, options: EngineOptions) -> None:
        self.progress, self.hooks, self.stop_signals = progress, list(options.hooks), options.stop_signals
        self.device = torch.device(options.device)
        self.cfgs = cfgs = [p.cfg for p in prepared]
        cfg = self.cfg = cfgs[0]  # the shared settings
        self.k = k = len(cfgs)
        ckpts = [p.ckpt for p in prepared]

        # ---- set-up: environments, networks, optimizer, penalties, buffers ----------------------
        torch.set_num_threads(cfg.threads)
        self.envs = SyncVectorEnv(
            [partial(make_env, cfg.env_id) for _ in range(k)], autoreset_mode=AutoresetMode.DISABLED
        )
        self.eval_envs: list[list[gym.Env]] = [[] for _ in range(k)]
        space = self.envs.single_observation_space
        assert space.shape is not None
        self.obs_dim = obs_dim = int(space.shape[0])
        self.n_actions = n_actions = int(self.envs.single_action_space.n)  # type: ignore[attr-defined]
        nets, inits = [], []
        for c, ckpt in zip(cfgs, ckpts, strict=True):
            torch.manual_seed(c.seed)  # the run's initialization depends on its seed only
            net = QNetwork(obs_dim, n_actions, c.hidden_sizes)
            init_state = {n: v.clone() for n, v in (ckpt["init"] if ckpt else net.state_dict()).items()}
            net.load_state_dict(init_state)
            nets.append(net)
            inits.append(init_state)
        self.online = StackedQ(nets, self.device)
        self.target = StackedQ(nets, self.device)
        theta0 = [p.clone() for p in self.online.params()]
        self.penalty = StackedPenalty(cfgs, nets, theta0, self.device)
        self.update = BatchedUpdate(
            self.online,
            self.penalty,
            lr=cfg.learning_rate,
            gamma=cfg.gamma,
            compile=use_compile(options.compile, cfg, self.device, k),
        )
        self.optimizer = self.update.optimizer
        self.buffer = StackedReplay(k, cfg.capacity, obs_dim, self.device)
        self.values_current = False  # the buffer's next-state values match the target networks
        self.stats = torch.zeros(k, 4, dtype=torch.float64, device=self.device)  # TD loss, Q, target, penalty
        self.step = 0
        self.obs = np.asarray(self.envs.reset(seed=[episode_seed(c.seed, 0, 0) for c in cfgs])[0], np.float32).copy()

        self.runs: list[RunState] = []
        for i, (p, init_state) in enumerate(zip(prepared, inits, strict=True)):
            run = RunState(
                index=i,
                cfg=p.cfg,
                run_dir=p.run_dir,
                q=self.online.module(i),
                target=self.target.module(i),
                init_state=init_state,
                rng=np.random.default_rng(p.cfg.seed),
                warnings=p.warnings,
                optimizer_state=partial(self._optimizer_state, i),
            )
            run.intervene = make_intervention(
                p.cfg, run.q, RunAdam(self.optimizer, self.online.params(), run.q, i), obs_dim
            )
            self.runs.append(run)
        if ckpts[0] is not None:  # ---- resume: restore every piece of state, replay open episodes
            self._restore([c for c in ckpts if c is not None])
        else:
            for run in self.runs:
                for name in (rundir.METRICS, rundir.PLASTICITY, rundir.INTERVENTIONS):
                    (run.run_dir / name).unlink(missing_ok=True)
        for run in self.runs:
            run.run_dir.mkdir(parents=True, exist_ok=True)
            rundir.write_json(
                run.run_dir / rundir.CONFIG, {"config": run.cfg.to_dict(), "versions": package_versions()}
            )
            run.metrics = pp.JsonlSink(run.run_dir / rundir.METRICS)
            run.plasticity = pp.JsonlSink(run.run_dir / rundir.PLASTICITY)
            if run.intervene is not None:
                run.interventions = pp.JsonlSink(run.run_dir / rundir.INTERVENTIONS)
        self.started, self.start_step = time.perf_counter(), self.step

    def _restore(self, ckpts: list[dict[str, Any]]) -> None:
        self.step = int(ckpts[0]["step"])
        adam_states = [c["optimizer"]["state"] for c in ckpts]
        if adam_states[0]:
            stacked = {
                i: {
                    "step": adam_states[0][i]["step"].clone(),
                    **{s: torch.stack([a[i][s] for a in adam_states]) for s in ("exp_avg", "exp_avg_sq")},
                }
                for i in adam_states[0]
            }
            self.update.load_optimizer_state({"state": stacked, "param_groups": ckpts[0]["optimizer"]["param_groups"]})
        held_values = []
        for run, ckpt in zip(self.runs, ckpts, strict=True):
            i = run.index
            self.online.load_state_dict(i, ckpt["online"])
            self.target.load_state_dict(i, ckpt["target"])
            run.rng.bit_generator.state = ckpt["rng"]["numpy"]
            held_values.append(self.buffer.load_state_dict(i, ckpt["buffer"]))
            if ckpt["probe_batch"] is not None:
                # fresh (aligned) copies: float32 kernels can round differently on unaligned memory
                run.probe_batch = Batch(**{n: v.clone().to(self.device) for n, v in ckpt["probe_batch"].items()})
            self.stats[i] = ckpt["stats"]["sums"].to(self.device)
            run.stats_count = int(ckpt["stats"]["count"])
            run.episode = int(ckpt["episode"]["index"])
            run.ep_actions = [int(a) for a in ckpt["episode"]["actions"]]
            run.ep_return = float(ckpt["episode"]["return"])
            env = self.envs.envs[i]
            obs, _ = env.reset(seed=episode_seed(run.cfg.seed, 0, run.episode))
            for a in run.ep_actions:
                obs, *_ = env.step(a)
            self.obs[i] = obs
            for name in (rundir.METRICS, rundir.PLASTICITY, rundir.INTERVENTIONS):
                problem = rundir.truncate_jsonl(run.run_dir / name, self.step).problem()
                if problem:
                    run.warnings.append(problem + "; dropped on resume")
        # values are kept from the first update on; older checkpoints have none: recomputed then
        self.values_current = all(held_values) and self.step >= self.cfg.learning_starts
        if len(ckpts) == 1:
            torch.set_rng_state(ckpts[0]["rng"]["torch"])

    # ------------------------------------------------------------------ the algorithm
    def run(self) -> list[RunResult]:
        cfg = self.cfg
        for run in self.runs:
            self._status(run, "running")
        # Subnormal floats (|x| < 1.2e-38: tiny gradients, weights a penalty drives to 0) make x86
        # matrix kernels up to 10× slower (measured: 2 ms instead of 0.2 ms per bmm): flush them to
        # zero while the batch trains (restored afterwards; the process-wide default is off)
        torch.set_flush_denormal(True)
        try:
            with stop_on_signals(self.stop_signals) as stop, heap.train_heap():
                while self.step < cfg.total_steps and any(r.training for r in self.runs):
                    # ---- act ε-greedily in every run's environment, store the transitions -------
                    actions = self._act()
                    next_obs, rewards, terminated, truncated, _ = self.envs.step(actions)
                    self.buffer.add(self.obs, actions, rewards, next_obs, terminated)
                    self.obs = np.asarray(next_obs, np.float32).copy()
                    self.step += 1
                    t = self.step
                    for run in self.runs:
                        run.ep_actions.append(int(actions[run.index]))
                        run.ep_return += float(rewards[run.index])
                    done = terminated | truncated
                    if done.any():
                        self._end_episodes(t, done)

                    # ---- one batched gradient step on the TD losses (+ the penalties) ----------
                    if t >= cfg.learning_starts:
                        self._next_values(next_obs)
                        if self.runs[0].probe_batch is None:
                            self._draw_probe_batches()
                        minibatch = self._update(t)
                        if (t - cfg.learning_starts) % heap.TRIM_EVERY == 0:
                            heap.trim()  # bounds the process (reference_agent/heap.py)
                        for run in self._training():
                            if run.intervention_due(t):
                                self._intervene(run, t, minibatch.obs[run.index])
                        for hook in self.hooks:
                            for run in self.runs:
                                if run.training:
                                    hook(t, run)

                    # ---- logging, evaluation, probing, checkpoints (off the hot path) ----------
                    if t % cfg.log_every == 0:
                        self._log(t)
                    if t % cfg.eval_every == 0 or t == cfg.total_steps:
                        self._evaluate(t)
                    if (
                        self.runs[0].probe_batch is not None
                        and cfg.probe_every
                        and (t % cfg.probe_every == 0 or t == cfg.learning_starts)
                    ):
                        for run in self._training():
                            if not run.intervention_due(t):  # else already probed right after it
                                self._probe(run, t)
                    if t % cfg.checkpoint_every == 0 or t == cfg.total_steps:
                        for run in self._training():
                            self._checkpoint(run)
                    if self.progress is not None and t % 100 == 0:
                        self.progress(t, cfg.total_steps, self._progress_info(t))
                    if stop["signal"] is not None and t < cfg.total_steps:  # at the end: finished, checkpointed
                        name = signal.Signals(stop["signal"]).name
                        for run in self._training():
                            self._checkpoint(run)
                        for run in self._training():
                            run.state, run.message = "interrupted", f"stopped by {name}"
                            self._status(run, "interrupted", f"stopped by {name} at step {t}; resume to continue")
                        break
        except BaseException as err:
            for run in self._training():
                with contextlib.suppress(OSError):  # a full disk must not hide the original error
                    self._status(run, "failed", f"{type(err).__name__}: {err}")
            raise
        finally:
            torch.set_flush_denormal(False)
            for run in self.runs:
                run.metrics.close()
                run.plasticity.close()
                if run.interventions is not None:
                    run.interventions.close()
            self.envs.close()
            for envs in self.eval_envs:
                for env in envs:
                    env.close()
        for run in self._training():
            run.state, run.message = "finished", "finished"
            self._status(run, "finished")
        return [RunResult(r.run_dir, r.state, self._ended_at(r), r.message, r.last_eval, r.warnings) for r in self.runs]

    def _act(self) -> np.ndarray:
        """ε-greedy actions of all runs: each run draws from its own generator, in the order a
        single run does (``random()``, then ``integers`` when exploring)."""
        explore = [run.rng.random() < epsilon(self.step, run.cfg) for run in self.runs]
        greedy: list[int] = []
        if not all(explore):
            greedy = self.online.q_values(self.obs[:, None]).argmax(axis=2)[:, 0].tolist()
        return np.array(
            [
                int(run.rng.integers(self.n_actions)) if e else greedy[run.index]
                for run, e in zip(self.runs, explore, strict=True)
            ],
            dtype=np.int64,
        )

    def _end_episodes(self, t: int, done: np.ndarray) -> None:
        seeds: list[int | None] = [None] * self.k
        for run in self.runs:
            if not done[run.index]:
                continue
            if run.training:
                run.metrics.write_record(
                    {
                        "step": t,
                        "kind": "train_episode",
                        "episode": run.episode,
                        "return": run.ep_return,
                        "length": len(run.ep_actions),
                    }
                )
            run.episode, run.ep_actions, run.ep_return = run.episode + 1, [], 0.0
            seeds[run.index] = episode_seed(run.cfg.seed, 0, run.episode)
        obs, _ = self.envs.reset(seed=seeds, options={"reset_mask": np.asarray(done, dtype=np.bool_)})
        self.obs[done] = np.asarray(obs, np.float32)[done]

    def _draw_probe_batches(self) -> None:
        """Each run's fixed probe batch: drawn once, when learning starts, with its own stream."""
        for run in self.runs:
            n = min(run.cfg.probe_batch_size, self.buffer.size)
            idx = np.random.default_rng([run.cfg.seed, 2]).choice(self.buffer.size, n, replace=False)
            rows = torch.from_numpy(idx.astype(np.int64)).to(self.device)
            run.probe_batch = self.buffer.run_rows(run.index, rows)

    def _update(self, t: int) -> Batch:
        """One batched gradient step of all runs (``BatchedUpdate``); returns the stacked
        minibatch."""
        batch = self.buffer.sample([r.rng for r in self.runs], self.cfg.batch_size)
        self.stats += self.update(t, batch).double()
        for run in self.runs:
            run.stats_count += 1
        if t % self.cfg.target_update_period == 0:
            self.target.copy_from(self.online)
            self._refresh_next_values()
        return batch

    def _next_values(self, next_obs: np.ndarray) -> None:
        """Keep the buffer's next-state values current before an update: the newest row's from
        this step's next observations, or every row's when they are not current."""
        if not self.values_current:
            self._refresh_next_values()
            self.values_current = True
            return
        values = torch.from_numpy(self.target.q_values(next_obs[:, None]).max(axis=2)).to(self.device)
        self.buffer.set_next_values((self.buffer.pos - 1) % self.buffer.capacity, values)

    def _refresh_next_values(self, runs: slice = slice(None)) -> None:
        """``max_a' Q_target(s', a')`` of every row of the buffer of the runs ``runs``, in chunks
        of ``VALUE_CHUNK`` rows (after a target-network update: once every τ steps)."""
        params = [p[runs] for p in self.target.params()]
        with torch.no_grad():
            for start in range(0, self.buffer.size, VALUE_CHUNK):
                x = self.buffer.next_obs_rows(start, min(start + VALUE_CHUNK, self.buffer.size))[runs]
                self.buffer.set_next_values(start, mlp_forward(params, x)[-1].amax(dim=2), runs)

    def _log(self, t: int) -> None:
        means = self.stats.tolist()
        for run in self._training():
            if run.stats_count > 0:
                loss_mean, q_mean, y_mean, penalty_mean = (v / run.stats_count for v in means[run.index])
                named = {"TD loss": loss_mean, "mean Q": q_mean, "mean target": y_mean, "penalty": penalty_mean}
                bad = [f"{name} became {value}" for name, value in named.items() if not math.isfinite(value)]
                if bad:
                    self._diverged(run, DivergenceError(f"{', '.join(bad)} by step {t}"))
                    continue
                record: dict[str, Any] = {
                    "step": t,
                    "kind": "update",
                    "loss": loss_mean,
                    "q_mean": q_mean,
                    "target_mean": y_mean,
                    "epsilon": epsilon(t, run.cfg),
                    "updates": run.stats_count,
                }
                if self.penalty.kinds[run.index] is not None:
                    record["penalty"] = penalty_mean
                    record["reg_terms"] = self.penalty.last_terms(run.index)
                run.metrics.write_record(record)
                self.stats[run.index] = 0.0
                run.stats_count = 0
            self._status(run, "running")

    def _evaluate(self, t: int) -> None:
        """Greedy returns of ``eval_episodes`` episodes per run, each reset with its own evaluation
        seed; all runs' episodes are stepped together with one batched forward pass per step."""
        cfg, runs = self.cfg, self._training()
        episodes, first = cfg.eval_episodes, (t // cfg.eval_every) * cfg.eval_episodes
        obs = np.zeros((self.k, episodes, self.obs_dim), np.float32)
        live = np.zeros((self.k, episodes), dtype=bool)
        returns = np.zeros((self.k, episodes))
        for run in runs:
            envs = self.eval_envs[run.index]
            while len(envs) < episodes:
                envs.append(make_env(cfg.env_id))
            for e in range(episodes):
                obs[run.index, e] = envs[e].reset(seed=episode_seed(run.cfg.seed, 1, first + e))[0]
                live[run.index, e] = True
        while live.any():
            actions = self.online.q_values(obs).argmax(axis=2)
            for i, e in zip(*np.nonzero(live), strict=True):
                o, reward, terminated, truncated, _ = self.eval_envs[i][e].step(int(actions[i, e]))
                obs[i, e] = o
                returns[i, e] += float(reward)
                live[i, e] = not (terminated or truncated)
        for run in runs:
            values = [float(v) for v in returns[run.index]]
            run.last_eval = float(np.mean(values))
            run.metrics.write_record(
                {
                    "step": t,
                    "kind": "eval",
                    "return_mean": run.last_eval,
                    "return_std": float(np.std(values)),
                    "returns": values,
                }
            )

    def _intervene(self, run: RunState, t: int, obs: torch.Tensor) -> None:
        """Probe, intervene on this step's minibatch of the run, probe again, record."""
        assert run.intervene is not None and run.interventions is not None
        before = self._probe(run, t, "before")
        done = run.intervene(obs, torch.Generator().manual_seed(run.cfg.seed * 1_000_003 + t))
        after = self._probe(run, t, "after")
        if before is not None and after is not None:
            record = {"step": t, **done.to_dict(), "dormant_before": dormant(before), "dormant_after": dormant(after)}
            run.interventions.write_record(record)

    def _probe(self, run: RunState, t: int, phase: str | None = None) -> pp.Report | None:
        """The plasticity report of the run's own network on its fixed probe batch (``phase``:
        right ``before`` or ``after`` an intervention)."""
        assert run.probe_batch is not None
        pb, cfg = run.probe_batch, run.cfg
        with_hessian = phase != "before" and cfg.hessian_every > 0 and t % cfg.hessian_every == 0
        if with_hessian:  # the spectrum of a non-finite loss is meaningless: report the divergence
            with torch.no_grad():
                probe_loss = float(td_loss(run.q, run.target, pb, cfg.gamma)[0])
            if not math.isfinite(probe_loss) or not all(bool(torch.isfinite(p).all()) for p in run.q.parameters()):
                self._diverged(run, DivergenceError(f"TD loss became {probe_loss} by step {t} (before the Hessian)"))
                return None
        with warnings.catch_warnings():  # recorded instead: hessian_converged = 0, and once in the run's warnings
            warnings.simplefilter("ignore", pp.ConvergenceWarning)
            report = pp.Probe(run.q, probe_batch=pb.obs, init_state=run.init_state).measure(
                loss_fn=lambda: td_loss(run.q, run.target, pb, cfg.gamma)[0],
                gradients=True,
                hessian=with_hessian,
                hessian_kwargs={"trace_samples": 20, "seed": cfg.seed},
                trainability=True,
                trainability_kwargs={"seed": cfg.seed},
            )
        if report.network.get("hessian_converged") == 0.0 and not any(w.startswith(UNCONVERGED) for w in run.warnings):
            run.warnings.append(f"{UNCONVERGED} at step {t:,} (and where plasticity.jsonl has hessian_converged = 0)")
        if phase is None:
            run.plasticity.write(t, report, network="online")
        else:
            run.plasticity.write(t, report, network="online", phase=phase)
        return report

    def _checkpoint(self, run: RunState) -> None:
        i = run.index
        if not bool(torch.isfinite(self.stats[i]).all()):  # never overwrite a good checkpoint with NaN weights
            self._diverged(run, DivergenceError(f"TD loss became non-finite before step {self.step}"))
            return
        save_checkpoint(
            run.run_dir / rundir.CHECKPOINT,
            {
                "config": run.cfg.to_dict(),
                "versions": package_versions(),
                "step": self.step,
                "online": self.online.state_dict(i),
                "target": self.target.state_dict(i),
                "init": run.init_state,
                "optimizer": self._optimizer_state_dict(i),
                "rng": {"numpy": run.rng.bit_generator.state, "torch": torch.get_rng_state()},
                "episode": {
                    "index": run.episode,
                    "actions": torch.tensor(run.ep_actions, dtype=torch.int64),
                    "return": run.ep_return,
                    "length": len(run.ep_actions),
                },
                "buffer": self.buffer.state_dict(i),
                "probe_batch": {n: v.cpu() for n, v in run.probe_batch.as_dict().items()} if run.probe_batch else None,
                "stats": {"sums": self.stats[i].cpu().clone(), "count": run.stats_count},
            },
        )

    def _optimizer_state_dict(self, i: int) -> dict[str, Any]:
        """Run i's slice of the stacked Adam state, as ``torch.optim.Adam`` on its own network
        would save it."""
        full = self.optimizer.state_dict()
        state = {
            p: {
                "step": s["step"].clone(),
                "exp_avg": s["exp_avg"][i].cpu().clone(),
                "exp_avg_sq": s["exp_avg_sq"][i].cpu().clone(),
            }
            for p, s in full["state"].items()
        }
        return {"state": state, "param_groups": full["param_groups"]}

    def _optimizer_state(self, i: int) -> dict[str, dict[str, torch.Tensor]]:
        names = [n for n, _ in self.runs[i].q.named_parameters()]
        out = {}
        for name, p in zip(names, self.online.params(), strict=True):
            s = self.optimizer.state.get(p, {})
            out[name] = {key: v[i] for key, v in s.items() if key != "step"}
        return out

    def _diverged(self, run: RunState, err: DivergenceError) -> None:
        """Stop one run: its files keep what was written and its last good checkpoint; its slots
        in the stack are reset to θ_0 so that no NaN reaches a batched kernel."""
        run.state, run.message = "diverged", str(err)
        self._status(run, "diverged", f"{err}; results up to the last checkpoint are kept")
        i = run.index
        self.online.load_state_dict(i, run.init_state)
        self.target.load_state_dict(i, run.init_state)
        self._refresh_next_values(slice(i, i + 1))
        for s in self.optimizer.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                s[key][i].zero_()
        self.stats[i] = 0.0
        self.penalty.retire(i)

    def _status(self, run: RunState, state: str, message: str = "") -> None:
        elapsed = time.perf_counter() - self.started if hasattr(self, "started") else 0.0
        steps = self.step - getattr(self, "start_step", self.step)
        rundir.write_json(
            run.run_dir / rundir.STATUS,
            {
                "state": state,
                "step": self._ended_at(run) if state != "running" else self.step,
                "total_steps": run.cfg.total_steps,
                "message": message,
                "steps_per_s": steps / elapsed if elapsed > 0 else None,
            },
        )
        if state != "running":
            run.stopped_at = self.step

    def _ended_at(self, run: RunState) -> int:
        return self.step if run.stopped_at is None else run.stopped_at

    def _training(self) -> list[RunState]:
        return [r for r in self.runs if r.training]

    def _progress_info(self, t: int) -> dict[str, float]:
        elapsed = time.perf_counter() - self.started
        info = {"steps_per_s": (t - self.start_step) / elapsed if elapsed > 0 else 0.0}
        info["runs"] = float(len(self._training()))
        info["updates"] = float(self.cfg.updates_by(t))
        info["updates_total"] = float(self.cfg.updates_by(self.cfg.total_steps))
        if self.k == 1 and self.runs[0].last_eval is not None:
            info["last_eval"] = float(self.runs[0].last_eval)
        return info
