"""Reference DQN (Mnih et al. 2015) with successive weight regularization (Teo et al. 2023).

Readable top to bottom: ``train`` holds the whole algorithm. The library is used only through
its public API: ``SuccessiveRegularizer`` adds the penalty to the TD loss, ``Probe`` measures the
online network on a fixed probe batch, ``JsonlSink`` writes the results.

One gradient step per environment step once ``learning_starts`` steps are in the buffer;
MSE TD loss ``(r + γ (1 − terminated) max_a' Q_target(s', a') − Q(s, a))²`` where a time-limit
truncation is not terminal; hard target update every τ steps; no gradient clipping. With
``intervention``, ReDo / Shrink & Perturb / a reset of the output layer acts on the online network
and its Adam state every ``intervention_every`` steps after learning starts (``make_intervention``).
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F

import plasticity_probe as pp
from reference_agent import rundir
from reference_agent.checkpoint import load_checkpoint, save_checkpoint
from reference_agent.config import DQNConfig, InterventionKind, Reg, RegEvery, epsilon
from reference_agent.envs import episode_seed, make_env
from reference_agent.network import QNetwork
from reference_agent.replay import Batch, ReplayBuffer

ProgressFn = Callable[[int, int, dict[str, float]], None]
"""``progress(step, total_steps, info)``; info has ``steps_per_s`` and ``last_eval`` when known."""


class DivergenceError(RuntimeError):
    """The TD loss became NaN or Inf."""


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


def td_loss(
    q: torch.nn.Module, target: torch.nn.Module, batch: Batch, gamma: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MSE TD loss, and the Q(s, a) and targets y it compares."""
    with torch.no_grad():
        next_q = target(batch.next_obs).max(dim=1).values
        y = batch.rewards + gamma * (1.0 - batch.terminated) * next_q
    q_sa = q(batch.obs).gather(1, batch.actions.unsqueeze(1)).squeeze(1)
    return F.mse_loss(q_sa, y), q_sa, y


def make_intervention(
    cfg: DQNConfig, q: torch.nn.Module, optimizer: torch.optim.Optimizer, obs_dim: int
) -> Callable[[Batch, torch.Generator], pp.ResetRecord] | None:
    """The configured intervention as ``intervene(minibatch, generator) -> record`` on the online
    network and its Adam state (``None`` for ``intervention = none``); the generator, seeded per
    step, makes every fresh initialization reproducible on resume."""
    kind = cfg.intervention
    if kind is InterventionKind.redo:
        redo = pp.ReDo(q, optimizer, tau=cfg.redo_tau)
        return lambda batch, gen: redo.reset(batch.obs, generator=gen)
    if kind is InterventionKind.shrink_perturb:
        return lambda _batch, gen: pp.shrink_perturb(q, 0.8, 0.01, optimizer=optimizer, generator=gen)
    if kind is InterventionKind.reset_last:
        last = pp.discover_layers(q, torch.zeros(1, obs_dim))[0][-1].name
        return lambda _batch, gen: pp.reset_layers(q, [last], optimizer=optimizer, generator=gen)
    return None


def dormant(report: pp.Report) -> dict[str, float]:
    """Dormant fraction per layer and over the hidden layers (``network``) of a report."""
    out = {r.name: r.metrics["dormant_fraction"] for r in report.layers if "dormant_fraction" in r.metrics}
    if "dormant_fraction" in report.network:
        out["network"] = report.network["dormant_fraction"]
    return out


def evaluate(q: torch.nn.Module, env: gym.Env, seed: int, first_episode: int, episodes: int) -> list[float]:
    """Greedy returns of ``episodes`` episodes, each reset with its own evaluation seed."""
    returns = []
    for k in range(episodes):
        obs, _ = env.reset(seed=episode_seed(seed, 1, first_episode + k))
        done, total = False, 0.0
        while not done:
            with torch.inference_mode():
                action = int(q(torch.from_numpy(np.asarray(obs, dtype=np.float32))).argmax())
            obs, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    return returns


def package_versions() -> dict[str, str]:
    out = {}
    for name in ("plasticity-probe", "torch", "numpy", "gymnasium"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "unknown"
    return out


@contextmanager
def stop_on_signals() -> Iterator[dict[str, int | None]]:
    """Turn SIGINT/SIGTERM into a flag the loop checks (main thread only)."""
    flag: dict[str, int | None] = {"signal": None}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, _frame: Any) -> None:
        flag["signal"] = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
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
) -> RunResult:
    """Train (or resume) one run in ``run_dir``; returns how it ended.

    ``resume=True`` continues from ``run_dir/checkpoint.pt`` with the config saved there (``cfg``
    may then be None); the result equals an uninterrupted run with the same seed. Without a
    checkpoint it starts afresh. ``resume=False`` refuses a directory that already holds a run.
    The run directory is locked while the run writes it (``rundir.LockedError`` for a second
    writer), and temporary files a killed writer left are removed.
    """
    run_dir = Path(run_dir)
    with rundir.lock(run_dir):
        return _train_locked(cfg, run_dir, resume, progress)


def _train_locked(cfg: DQNConfig | None, run_dir: Path, resume: bool, progress: ProgressFn | None) -> RunResult:

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
        cfg = DQNConfig.from_dict(rundir.read_json(run_dir / rundir.CONFIG)["config"])
    elif not resume and ((run_dir / rundir.CONFIG).exists() or ckpt_path.exists()):
        raise RunExistsError(f"{run_dir} already holds a run; resume it or choose another output directory")
    if cfg is None:
        raise ValueError(f"nothing to resume in {run_dir} and no config given")

    # ---- set-up: seeds, environments, networks, optimizer, regularizer, buffer -------------------
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    env, eval_env = make_env(cfg.env_id), make_env(cfg.env_id)
    assert env.observation_space.shape is not None
    obs_dim = int(env.observation_space.shape[0])
    n_actions = int(env.action_space.n)  # type: ignore[attr-defined]
    q = QNetwork(obs_dim, n_actions, cfg.hidden_sizes)
    target = QNetwork(obs_dim, n_actions, cfg.hidden_sizes)
    init_state = {k: v.clone() for k, v in (ckpt["init"] if ckpt else q.state_dict()).items()}
    q.load_state_dict(init_state)
    target.load_state_dict(init_state)
    reg = None
    if cfg.reg is not Reg.none:  # built on θ_0, before any update: l2init regularizes toward it
        every = cfg.target_update_period if cfg.reg_every is RegEvery.target else 1
        reg = pp.SuccessiveRegularizer(
            q,
            cfg.reg.value,
            cfg.lam,
            cfg.delta,
            every=every,
            layers=list(cfg.reg_layers) or None,
            variant=cfg.reg_variant,
            example_input=torch.zeros(1, obs_dim),
        )
    optimizer = torch.optim.Adam(q.parameters(), lr=cfg.learning_rate, fused=True)
    intervene = make_intervention(cfg, q, optimizer, obs_dim)
    buffer = ReplayBuffer(cfg.capacity, obs_dim)
    probe_batch: Batch | None = None
    stats, stats_count = torch.zeros(4, dtype=torch.float64), 0  # sums of TD loss, Q, target, penalty
    no_penalty = torch.zeros(())  # the baseline's penalty: no tensor made or backpropagated per step
    step, episode, ep_actions, ep_return = 0, 0, [], 0.0
    obs, _ = env.reset(seed=episode_seed(cfg.seed, 0, episode))

    if ckpt is not None:  # ---- resume: restore every piece of state, replay the open episode --------
        q.load_state_dict(ckpt["online"])
        target.load_state_dict(ckpt["target"])
        optimizer.load_state_dict(ckpt["optimizer"])
        rng.bit_generator.state = ckpt["rng"]["numpy"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        buffer.load_state_dict(ckpt["buffer"])
        if ckpt["probe_batch"] is not None:
            # fresh (aligned) copies: float32 kernels can round differently on unaligned memory
            probe_batch = Batch(**{k: v.clone() for k, v in ckpt["probe_batch"].items()})
        stats, stats_count = ckpt["stats"]["sums"].clone(), int(ckpt["stats"]["count"])
        step, episode = int(ckpt["step"]), int(ckpt["episode"]["index"])
        ep_actions = [int(a) for a in ckpt["episode"]["actions"]]
        ep_return = float(ckpt["episode"]["return"])
        obs, _ = env.reset(seed=episode_seed(cfg.seed, 0, episode))
        for a in ep_actions:
            obs, *_ = env.step(a)
        for name in (rundir.METRICS, rundir.PLASTICITY, rundir.INTERVENTIONS):
            problem = rundir.truncate_jsonl(run_dir / name, step).problem()
            if problem:
                warnings.append(problem + "; dropped on resume")
    else:
        for name in (rundir.METRICS, rundir.PLASTICITY, rundir.INTERVENTIONS):
            (run_dir / name).unlink(missing_ok=True)

    run_dir.mkdir(parents=True, exist_ok=True)
    rundir.write_json(run_dir / rundir.CONFIG, {"config": cfg.to_dict(), "versions": package_versions()})
    metrics = pp.JsonlSink(run_dir / rundir.METRICS)
    plasticity = pp.JsonlSink(run_dir / rundir.PLASTICITY)
    interventions = pp.JsonlSink(run_dir / rundir.INTERVENTIONS) if intervene is not None else None
    started, start_step = time.perf_counter(), step
    last_eval: float | None = None

    def status(state: str, message: str = "") -> None:
        elapsed = time.perf_counter() - started
        rundir.write_json(
            run_dir / rundir.STATUS,
            {
                "state": state,
                "step": step,
                "total_steps": cfg.total_steps,
                "message": message,
                "steps_per_s": (step - start_step) / elapsed if elapsed > 0 else None,
            },
        )

    def checkpoint() -> None:
        if not bool(torch.isfinite(stats).all()):  # never overwrite a good checkpoint with NaN weights
            raise DivergenceError(f"TD loss became non-finite before step {step}")
        save_checkpoint(
            ckpt_path,
            {
                "config": cfg.to_dict(),
                "versions": package_versions(),
                "step": step,
                "online": q.state_dict(),
                "target": target.state_dict(),
                "init": init_state,
                "optimizer": optimizer.state_dict(),
                "rng": {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state()},
                "episode": {
                    "index": episode,
                    "actions": torch.tensor(ep_actions, dtype=torch.int64),
                    "return": ep_return,
                    "length": len(ep_actions),
                },
                "buffer": buffer.state_dict(),
                "probe_batch": probe_batch.as_dict() if probe_batch is not None else None,
                "stats": {"sums": stats.clone(), "count": stats_count},
            },
        )

    def probe_online(t: int, phase: str | None = None) -> pp.Report:
        assert probe_batch is not None
        pb = probe_batch
        with_hessian = phase != "before" and cfg.hessian_every > 0 and t % cfg.hessian_every == 0
        if with_hessian:  # the spectrum of a non-finite loss is meaningless: report the divergence
            with torch.no_grad():
                probe_loss = float(td_loss(q, target, pb, cfg.gamma)[0])
            if not math.isfinite(probe_loss) or not all(bool(torch.isfinite(p).all()) for p in q.parameters()):
                raise DivergenceError(f"TD loss became {probe_loss} by step {t} (before the Hessian)")
        report = pp.Probe(q, probe_batch=pb.obs, init_state=init_state).measure(
            loss_fn=lambda: td_loss(q, target, pb, cfg.gamma)[0],
            gradients=True,
            hessian=with_hessian,
            hessian_kwargs={"trace_samples": 20, "seed": cfg.seed},
            trainability=True,
            trainability_kwargs={"seed": cfg.seed},
        )
        if phase is None:
            plasticity.write(t, report, network="online")
        else:  # the reports right before and right after an intervention
            plasticity.write(t, report, network="online", phase=phase)
        return report

    def intervention_due(t: int) -> bool:
        return (
            intervene is not None
            and t > cfg.learning_starts
            and (t - cfg.learning_starts) % cfg.intervention_every == 0
        )

    status("running")
    try:
        with stop_on_signals() as stop:
            while step < cfg.total_steps:
                # ---- act ε-greedily and store the transition ------------------------------------
                if rng.random() < epsilon(step, cfg):
                    action = int(rng.integers(n_actions))
                else:
                    with torch.inference_mode():
                        action = int(q(torch.from_numpy(np.asarray(obs, dtype=np.float32))).argmax())
                next_obs, reward, terminated, truncated, _ = env.step(action)
                buffer.add(obs, action, float(reward), next_obs, terminated)
                ep_actions.append(action)
                ep_return += float(reward)
                obs = next_obs
                step += 1
                t = step
                if terminated or truncated:
                    metrics.write_record(
                        {
                            "step": t,
                            "kind": "train_episode",
                            "episode": episode,
                            "return": ep_return,
                            "length": len(ep_actions),
                        }
                    )
                    episode, ep_actions, ep_return = episode + 1, [], 0.0
                    obs, _ = env.reset(seed=episode_seed(cfg.seed, 0, episode))

                # ---- one gradient step on the TD loss (+ the successive penalty) ------------------
                if t >= cfg.learning_starts:
                    if probe_batch is None:  # fixed probe batch: drawn once, its own RNG stream
                        n = min(cfg.probe_batch_size, buffer.size)
                        idx = np.random.default_rng([cfg.seed, 2]).choice(buffer.size, n, replace=False)
                        probe_batch = buffer.gather(idx)
                    batch = buffer.sample(rng, cfg.batch_size)
                    loss, q_sa, y = td_loss(q, target, batch, cfg.gamma)
                    penalty = reg(t) if reg is not None else no_penalty
                    optimizer.zero_grad(set_to_none=True)
                    (loss + penalty if reg is not None else loss).backward()
                    optimizer.step()
                    stats += torch.stack((loss.detach(), q_sa.detach().mean(), y.mean(), penalty.detach())).double()
                    stats_count += 1
                    if t % cfg.target_update_period == 0:
                        target.load_state_dict(q.state_dict())
                    if intervention_due(t):  # probe, intervene on this step's minibatch, probe again
                        assert intervene is not None and interventions is not None
                        before = probe_online(t, "before")
                        done = intervene(batch, torch.Generator().manual_seed(cfg.seed * 1_000_003 + t))
                        after = probe_online(t, "after")
                        interventions.write_record(
                            {
                                "step": t,
                                **done.to_dict(),
                                "dormant_before": dormant(before),
                                "dormant_after": dormant(after),
                            }
                        )

                # ---- logging, evaluation, probing, checkpoints (off the hot path) ---------------
                if t % cfg.log_every == 0 and stats_count > 0:
                    loss_mean, q_mean, y_mean, penalty_mean = (stats / stats_count).tolist()
                    if not all(map(math.isfinite, (loss_mean, q_mean, y_mean, penalty_mean))):
                        raise DivergenceError(f"TD loss became {loss_mean} by step {t}")
                    record = {
                        "step": t,
                        "kind": "update",
                        "loss": loss_mean,
                        "q_mean": q_mean,
                        "target_mean": y_mean,
                        "epsilon": epsilon(t, cfg),
                        "updates": stats_count,
                    }
                    if reg is not None:
                        record["penalty"] = penalty_mean
                        record["reg_terms"] = {k: float(v) for k, v in reg.last_terms.items()}
                    metrics.write_record(record)
                    stats, stats_count = torch.zeros(4, dtype=torch.float64), 0
                if t % cfg.log_every == 0:
                    status("running")
                if t % cfg.eval_every == 0 or t == cfg.total_steps:
                    returns = evaluate(
                        q, eval_env, cfg.seed, (t // cfg.eval_every) * cfg.eval_episodes, cfg.eval_episodes
                    )
                    last_eval = float(np.mean(returns))
                    metrics.write_record(
                        {
                            "step": t,
                            "kind": "eval",
                            "return_mean": last_eval,
                            "return_std": float(np.std(returns)),
                            "returns": returns,
                        }
                    )
                if (
                    probe_batch is not None
                    and cfg.probe_every
                    and (t % cfg.probe_every == 0 or t == cfg.learning_starts)
                    and not intervention_due(t)  # already probed right after the intervention
                ):
                    probe_online(t)
                if t % cfg.checkpoint_every == 0 or t == cfg.total_steps:
                    checkpoint()
                if progress is not None and t % 100 == 0:
                    elapsed = time.perf_counter() - started
                    info = {"steps_per_s": (t - start_step) / elapsed if elapsed > 0 else 0.0}
                    if last_eval is not None:
                        info["last_eval"] = last_eval
                    progress(t, cfg.total_steps, info)
                if stop["signal"] is not None and t < cfg.total_steps:  # at the end: finished, checkpointed
                    checkpoint()
                    name = signal.Signals(stop["signal"]).name
                    status("interrupted", f"stopped by {name} at step {t}; resume to continue")
                    return RunResult(run_dir, "interrupted", t, f"stopped by {name}", last_eval, warnings)
    except DivergenceError as err:
        status("diverged", f"{err}; results up to the last checkpoint are kept")
        return RunResult(run_dir, "diverged", step, str(err), last_eval, warnings)
    except BaseException as err:
        with contextlib.suppress(OSError):  # a full disk must not hide the original error
            status("failed", f"{type(err).__name__}: {err}")
        raise
    finally:
        metrics.close()
        plasticity.close()
        if interventions is not None:
            interventions.close()
        env.close()
        eval_env.close()
        if reg is not None:
            reg.close()
    status("finished")
    return RunResult(run_dir, "finished", step, "finished", last_eval, warnings)
