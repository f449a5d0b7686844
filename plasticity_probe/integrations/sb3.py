"""Stable-Baselines3: a probing callback and a DQN whose loss carries the successive penalty.

::

    from plasticity_probe.integrations.sb3 import ProbeCallback, RegularizedDQN

    model = RegularizedDQN("MlpPolicy", "CartPole-v1", penalty="l2init", lam=0.01, delta=1.25)
    model.learn(50_000, callback=ProbeCallback(every=1000))

Metrics reach SB3's own logger as ``plasticity/<network>/<layer>/<metric>`` (so its CSV and
TensorBoard outputs get them) and, optionally, our sinks.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from plasticity_probe.layers import Args, call_model
from plasticity_probe.probe import Probe
from plasticity_probe.regularizers import SuccessiveRegularizer

try:
    from stable_baselines3 import DQN
    from stable_baselines3.common.buffers import DictReplayBuffer, DictRolloutBuffer, ReplayBuffer, RolloutBuffer
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.policies import ActorCriticPolicy
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "plasticity_probe.integrations.sb3 needs Stable-Baselines3: pip install 'plasticity-probe[sb3]'"
    ) from err

__all__ = ["ProbeCallback", "RegularizedDQN", "probed_networks"]


def probed_networks(policy: nn.Module) -> dict[str, nn.Module]:
    """The networks worth probing in an SB3 policy: the Q-network of DQN, actor and critic of
    SAC/TD3/DDPG, or the whole actor-critic policy of PPO/A2C."""
    if hasattr(policy, "q_net") and isinstance(policy.q_net, nn.Module):
        return {"q_net": policy.q_net}
    nets = {
        name: getattr(policy, name)
        for name in ("actor", "critic")
        if isinstance(getattr(policy, name, None), nn.Module)
    }
    return nets or {"policy": policy}


def network_input(net: nn.Module, obs: Any, actions: torch.Tensor) -> Args:
    """How to call an SB3 network on a probe batch without sampling (the global RNG is left
    alone): critics get ``(obs, actions)``, networks whose ``forward`` takes ``deterministic``
    get ``deterministic=True``, the rest ``obs`` alone."""
    params = inspect.signature(net.forward).parameters
    if "actions" in params:
        return Args(obs, actions)
    if "deterministic" in params:
        return Args(obs, deterministic=True)
    return Args(obs)


def _distribution_params(dist: Any) -> torch.Tensor:
    """Logits (categorical, Bernoulli; each of a multi-categorical) or the mean (Gaussian), flat."""
    if isinstance(dist, list | tuple):
        return torch.cat([_distribution_params(d) for d in dist], dim=1)
    params = getattr(dist, "logits", None)
    params = dist.mean if params is None else params
    return params.reshape(params.shape[0], -1)


def _fit_output(net: nn.Module, batch: Any) -> torch.Tensor:
    """What the trainability probe fits: an actor-critic policy's action-distribution parameters
    (logits, or the Gaussian mean) beside its values — its actions are sampled or argmax, with no
    gradient; for other networks the first tensor they return (a critic's first Q-head, an
    actor's actions)."""
    if isinstance(net, ActorCriticPolicy) and isinstance(batch, Args):
        obs = batch.args[0]
        params = _distribution_params(net.get_distribution(obs).distribution)
        return torch.cat([params, net.predict_values(obs)], dim=1).float()
    out = call_model(net, batch)
    first = out if isinstance(out, torch.Tensor) else next(t for t in out if isinstance(t, torch.Tensor))
    return first.float()


def _rows(array: np.ndarray, size: int, shape: tuple[int, ...]) -> np.ndarray:
    return array[:size].reshape(-1, *shape)


class ProbeCallback(BaseCallback):
    """Every ``every`` timesteps, probe the policy's networks on a fixed batch of observations
    (and actions, for critics) drawn once from the replay buffer (off-policy) or rollout buffer
    (on-policy). Dict observations (``MultiInputPolicy``) are kept as dicts.

    Args:
        every: timesteps between reports: one at the first step at or past each multiple of
            ``every`` (with ``n_envs`` environments the count moves ``n_envs`` at a time).
        batch_size: observations in the fixed probe batch.
        metrics: per-layer metrics (default: ``Probe``'s).
        sinks: extra writers (``JsonlSink``, ``CsvSink``, ``TensorBoardSink``).
        prefix: logger key prefix.
        seed: seed of the draw of the probe batch (its own generator, not the global RNG).
        loss_fn: ``loss_fn(model) -> scalar`` recomputing a training loss through the policy (for
            DQN, e.g. the TD loss on a replay sample): adds the gradient metrics of each network
            (``grad_norm``, ``grad_to_weight_ratio``, GraMa's ``grad_dormant_fraction``).
        trainability: add the trainability probe (fit random targets on a private copy).

    ``distance_from_init`` is measured from the parameters at the start of training.
    """

    def __init__(
        self,
        every: int = 1000,
        batch_size: int = 256,
        metrics: Sequence[str] | None = None,
        sinks: Sequence[Any] = (),
        prefix: str = "plasticity",
        seed: int = 0,
        loss_fn: Callable[[Any], torch.Tensor] | None = None,
        trainability: bool = False,
        verbose: int = 0,
    ) -> None:
        super().__init__(verbose)
        if every < 1 or batch_size < 1:
            raise ValueError("every and batch_size must be >= 1")
        self.every, self.batch_size, self.metrics = every, batch_size, metrics
        self.sinks, self.prefix, self.seed = list(sinks), prefix, seed
        self.loss_fn, self.trainability = loss_fn, trainability
        self.probe_batch: tuple[Any, torch.Tensor] | None = None
        self.probes: dict[str, Probe] = {}
        self.last_reports: dict[str, Any] = {}
        self._reported = 0  # multiples of every reported

    def _on_training_start(self) -> None:
        self.probes = {
            name: Probe(net, metrics=self.metrics) for name, net in probed_networks(self.model.policy).items()
        }  # θ_0 for distance_from_init: the parameters when training starts

    def _draw_batch(self) -> tuple[Any, torch.Tensor] | None:
        """(observations, actions) of the probe batch as tensors on the model's device."""
        buffer = getattr(self.model, "replay_buffer", None)
        if isinstance(buffer, ReplayBuffer | DictReplayBuffer):
            size = buffer.buffer_size if buffer.full else buffer.pos
        else:
            buffer = getattr(self.model, "rollout_buffer", None)
            if not isinstance(buffer, RolloutBuffer | DictRolloutBuffer):
                return None
            size = buffer.buffer_size if buffer.full else buffer.pos
        if size == 0:
            return None
        obs_store, obs_shape = buffer.observations, buffer.obs_shape
        actions = _rows(buffer.actions, size, (buffer.action_dim,))
        rng = np.random.default_rng(self.seed)
        idx = rng.choice(len(actions), size=min(self.batch_size, len(actions)), replace=False)
        device = self.model.device
        if isinstance(obs_store, dict):
            obs: Any = {
                k: torch.as_tensor(_rows(v, size, obs_shape[k])[idx], device=device)  # type: ignore[arg-type]
                for k, v in obs_store.items()
            }
        else:
            obs = torch.as_tensor(_rows(obs_store, size, obs_shape)[idx], device=device)
        return obs, torch.as_tensor(actions[idx], dtype=torch.float32, device=device)

    def _on_step(self) -> bool:
        multiple = self.num_timesteps // self.every  # n_envs steps per call: report once past each
        if multiple <= self._reported:
            return True
        self._reported = multiple
        if self.probe_batch is None:
            self.probe_batch = self._draw_batch()
            if self.probe_batch is None:
                return True
        obs, actions = self.probe_batch
        user_loss, model = self.loss_fn, self.model
        loss_fn = (lambda: user_loss(model)) if user_loss is not None else None
        for name, net in probed_networks(self.model.policy).items():
            probe = self.probes.setdefault(name, Probe(net, metrics=self.metrics))
            with torch.random.fork_rng(devices=[]):
                report = probe.measure(
                    network_input(net, obs, actions),
                    loss_fn=loss_fn,
                    gradients=loss_fn is not None,
                    trainability=self.trainability,
                    trainability_kwargs={"forward": _fit_output},
                )
            self.last_reports[name] = report
            for row in report.rows():
                self.logger.record(f"{self.prefix}/{name}/{row['layer']}/{row['metric']}", row["value"])
            for sink in self.sinks:
                sink.write(self.num_timesteps, report, network=name)
        return True


class RegularizedDQN(DQN):
    """SB3's DQN with ``SuccessiveRegularizer`` added to its TD loss.

    ``train`` performs SB3's DQN update (Huber TD loss against the target network, gradient-norm
    clipping, Adam step) with ``loss + reg(num_timesteps)``; with ``lam=0`` it reproduces
    ``DQN`` exactly. ``reg_every`` counts timesteps, like ``target_update_interval``: pass
    ``reg_every=model.target_update_interval`` for "only on target updates".
    """

    def __init__(
        self,
        *args: Any,
        penalty: str = "l2init",
        lam: float = 0.01,
        delta: float = 1.25,
        reg_every: int = 1,
        **kwargs: Any,
    ) -> None:
        self.penalty, self.lam, self.delta, self.reg_every = penalty, lam, delta, reg_every
        super().__init__(*args, **kwargs)

    def _setup_model(self) -> None:
        super()._setup_model()
        space = self.observation_space
        example = torch.as_tensor(space.sample()[None], device=self.device).float()
        self.regularizer = SuccessiveRegularizer(
            self.q_net, self.penalty, self.lam, self.delta, every=self.reg_every, example_input=example
        )

    def train(self, gradient_steps: int, batch_size: int = 100) -> None:
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)
        losses, penalties = [], []
        for _ in range(gradient_steps):
            data = self.replay_buffer.sample(batch_size, env=self._vec_normalize_env)  # type: ignore[union-attr]
            discount = getattr(data, "discounts", None)
            gamma = self.gamma if discount is None else discount
            with torch.no_grad():
                best_next = self.q_net_target(data.next_observations).max(dim=1).values.reshape(-1, 1)
                targets = data.rewards + (1 - data.dones) * gamma * best_next
            q_taken = self.q_net(data.observations).gather(1, data.actions.long())
            td = F.smooth_l1_loss(q_taken, targets)
            penalty = self.regularizer(self.num_timesteps)
            self.policy.optimizer.zero_grad()
            (td + penalty).backward()
            torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.max_grad_norm)
            self.policy.optimizer.step()
            losses.append(td.item())
            penalties.append(penalty.item())
        self._n_updates += gradient_steps
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self.logger.record("train/loss", float(np.mean(losses)))
        self.logger.record("train/penalty", float(np.mean(penalties)))


class InterventionCallback(BaseCallback):
    """Every ``every`` timesteps, apply an intervention to each network of the policy (those of
    :func:`probed_networks`) with its optimizer (``net.optimizer`` or ``policy.optimizer``), on a
    fresh batch of observations from the replay or rollout buffer.

    Args:
        intervention: ``"redo"`` (:class:`~plasticity_probe.interventions.ReDo`),
            ``"shrink-perturb"`` (:func:`~plasticity_probe.interventions.shrink_perturb`), or
            ``fn(name, net, optimizer, obs) -> ResetRecord``.
        every: timesteps between interventions, one at the first step at or past each multiple
            (for PPO/A2C, a multiple of ``n_steps`` applies it at the end of a rollout).
        batch_size: observations scored by ReDo.
        tau: ReDo's τ; shrink, perturb: Shrink & Perturb's λ and σ.
        seed: with the timestep, seeds the batch draw and the fresh initializations.

    ``records`` holds ``(num_timesteps, record)`` (one per network); the units reset go to SB3's logger as
    ``interventions/<network>/units_reset``. ReDo calls a network on observations alone, so a
    critic that needs actions (SAC/TD3) is skipped by ``"redo"``.
    """

    def __init__(
        self,
        intervention: str | Any = "redo",
        every: int = 10_000,
        batch_size: int = 256,
        tau: float = 0.025,
        shrink: float = 0.8,
        perturb: float = 0.01,
        seed: int = 0,
        verbose: int = 0,
    ) -> None:
        super().__init__(verbose)
        if every < 1 or batch_size < 1:
            raise ValueError("every and batch_size must be >= 1")
        if isinstance(intervention, str) and intervention not in ("redo", "shrink-perturb"):
            raise ValueError(f"unknown intervention {intervention!r}; use 'redo', 'shrink-perturb' or a callable")
        self.intervention, self.every, self.batch_size = intervention, every, batch_size
        self.tau, self.shrink, self.perturb, self.seed = tau, shrink, perturb, seed
        self.records: list[tuple[int, Any]] = []
        self._applied = 0  # multiples of every applied

    def _observations(self) -> Any:
        probe = ProbeCallback(batch_size=self.batch_size, seed=self.seed * 1_000_003 + self.num_timesteps)
        probe.model = self.model
        drawn = probe._draw_batch()
        return drawn[0] if drawn is not None else None

    def _on_step(self) -> bool:
        from plasticity_probe.interventions import ReDo, shrink_perturb

        multiple = self.num_timesteps // self.every  # n_envs steps per call: apply once past each
        if multiple <= self._applied:
            return True
        self._applied = multiple
        obs = self._observations()
        if obs is None:
            return True
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.num_timesteps)
        for name, net in probed_networks(self.model.policy).items():
            optimizer = getattr(net, "optimizer", None) or getattr(self.model.policy, "optimizer", None)
            if self.intervention == "redo":
                if name == "critic":
                    continue
                record = ReDo(net, optimizer, tau=self.tau).reset(obs, generator=generator)
            elif self.intervention == "shrink-perturb":
                record = shrink_perturb(net, self.shrink, self.perturb, optimizer=optimizer, generator=generator)
            else:
                assert callable(self.intervention)
                record = self.intervention(name, net, optimizer, obs)
            self.records.append((self.num_timesteps, record))
            self.logger.record(f"interventions/{name}/units_reset", record.units_reset)
        return True


__all__ += ["InterventionCallback"]
