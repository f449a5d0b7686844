"""Third-party trainers: Stable-Baselines3 and Lightning, and the TensorBoard sink."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import plasticity_probe as pp


def test_importing_the_library_imports_no_framework() -> None:
    frameworks = "('stable_baselines3', 'lightning', 'pytorch_lightning')"
    code = f"import sys, plasticity_probe; print(any(m.split('.')[0] in {frameworks} for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_sb3_dqn_callback_logs_per_layer_metrics(tmp_path: Path) -> None:
    sb3 = pytest.importorskip("stable_baselines3", reason="needs the sb3 extra")
    from stable_baselines3.common.logger import configure

    from plasticity_probe.integrations.sb3 import ProbeCallback

    model = sb3.DQN(
        "MlpPolicy",
        "CartPole-v1",
        learning_starts=50,
        batch_size=32,
        seed=0,
        policy_kwargs={"net_arch": [32, 32]},
        verbose=0,
    )
    model.set_logger(configure(str(tmp_path), ["csv"]))
    sink_path = tmp_path / "plasticity.jsonl"
    with pp.JsonlSink(sink_path) as sink:
        callback = ProbeCallback(every=100, batch_size=64, sinks=[sink])
        model.learn(400, callback=callback, log_interval=1)
    report = callback.last_reports["q_net"]
    assert [r.name for r in report.layers] == ["q_net.0", "q_net.2", "q_net.4"]
    assert callback.probe_batch is not None and callback.probe_batch[0].shape == (64, 4)
    rows = list(csv.DictReader((tmp_path / "progress.csv").open()))
    key = "plasticity/q_net/q_net.2/effective_rank"
    logged = [(int(r["time/total_timesteps"]), float(r[key])) for r in rows if r.get(key)]
    assert logged, "the metric reached SB3's CSV output"
    written = {
        row["step"]: row["value"]
        for row in map(json.loads, sink_path.read_text().splitlines())
        if row["layer"] == "q_net.2" and row["metric"] == "effective_rank"
    }
    for timesteps, value in logged:  # each dump holds the latest measurement before it
        latest = max(s for s in written if s <= timesteps)
        assert value == pytest.approx(written[latest])
        assert 1.0 <= value <= 32.0
    assert written[400] == report["q_net.2"].metrics["effective_rank"]
    dead = [
        float(r["plasticity/q_net/network/dead_fraction"])
        for r in rows
        if r.get("plasticity/q_net/network/dead_fraction")
    ]
    assert all(0.0 <= d <= 1.0 for d in dead)
    assert set(written) == {100, 200, 300, 400}


def test_regularized_dqn_with_zero_lambda_is_sb3_dqn() -> None:
    sb3 = pytest.importorskip("stable_baselines3", reason="needs the sb3 extra")
    from plasticity_probe.integrations.sb3 import RegularizedDQN

    kw = dict(learning_starts=50, batch_size=32, seed=3, policy_kwargs={"net_arch": [16, 16]}, verbose=0)
    plain = sb3.DQN("MlpPolicy", "CartPole-v1", **kw).learn(300)
    same = RegularizedDQN("MlpPolicy", "CartPole-v1", penalty="l2", lam=0.0, **kw).learn(300)
    for a, b in zip(plain.policy.parameters(), same.policy.parameters(), strict=True):
        assert torch.equal(a, b)
    reg = RegularizedDQN("MlpPolicy", "CartPole-v1", penalty="l2init", lam=1.0, delta=1.25, **kw).learn(300)
    assert not all(torch.equal(a, b) for a, b in zip(plain.policy.parameters(), reg.policy.parameters(), strict=True))
    assert [i.name for i in reg.regularizer.layers] == ["q_net.0", "q_net.2", "q_net.4"]
    singular = RegularizedDQN("MlpPolicy", "CartPole-v1", penalty="singular", lam=0.01, **kw).learn(200)
    assert set(singular.regularizer.last_terms) == {"q_net.0", "q_net.2", "q_net.4"}


def test_sb3_callback_on_policy_ppo() -> None:
    sb3 = pytest.importorskip("stable_baselines3", reason="needs the sb3 extra")
    from plasticity_probe.integrations.sb3 import ProbeCallback

    class KeepWeights(ProbeCallback):
        """Remembers the weights each report saw (PPO trains again after the last rollout)."""

        def _on_step(self) -> bool:
            result = super()._on_step()
            self.weights = {k: v.clone() for k, v in self.model.policy.state_dict().items()}
            return result

    model = sb3.PPO("MlpPolicy", "CartPole-v1", n_steps=64, batch_size=32, n_epochs=1, seed=0, verbose=0)
    callback = KeepWeights(every=64, batch_size=32)
    model.learn(192, callback=callback)
    model.policy.load_state_dict(callback.weights)
    report = callback.last_reports["policy"]
    assert report["mlp_extractor.policy_net.2"].n_units == 64  # the policy latent, not the 4 observations
    obs = callback.probe_batch[0]
    policy = model.policy
    with torch.no_grad():  # independent: the post-tanh latents, written out
        pi = torch.tanh(policy.mlp_extractor.policy_net[2](torch.tanh(policy.mlp_extractor.policy_net[0](obs))))
        vf = torch.tanh(policy.mlp_extractor.value_net[2](torch.tanh(policy.mlp_extractor.value_net[0](obs))))
    for name, latent in (("mlp_extractor.policy_net.2", pi), ("mlp_extractor.value_net.2", vf)):
        assert report[name].metrics["effective_rank"] == pytest.approx(pp.effective_rank(latent), rel=1e-9)
        assert report[name].metrics["feature_norm"] == pytest.approx(pp.feature_norm(latent), rel=1e-9)


def test_lightning_callback_logs_through_the_trainer(tmp_path: Path) -> None:
    L = pytest.importorskip("lightning.pytorch", reason="needs the lightning extra")
    from plasticity_probe.integrations.lightning import ProbeCallback

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.mse_loss(self(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 3), torch.randn(64, 1))
    loader = torch.utils.data.DataLoader(data, batch_size=16)

    def mse(module: L.LightningModule, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return nn.functional.mse_loss(module(batch[0]), batch[1])

    callback = ProbeCallback(every=6, eval_mode=True, loss_fn=mse, trainability=True)  # reports at steps 6 and 12
    trainer = L.Trainer(
        max_steps=12,
        callbacks=[callback],
        logger=L.loggers.CSVLogger(str(tmp_path)),
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    module = Module()
    trainer.fit(module, loader)
    assert module.training  # eval_mode measurements restore train mode
    report = callback.last_report
    assert report is not None and [r.name for r in report.layers] == ["net.0", "net.2"]
    logged = trainer.logged_metrics
    assert float(logged["plasticity/net.0/effective_rank"]) == pytest.approx(
        report["net.0"].metrics["effective_rank"], rel=1e-5
    )
    assert callback.probe_batch is not None and callback.probe_batch.shape == (16, 3)
    x, y = callback.loss_batch  # independent: the gradient of the loss on the kept batch, by autograd
    grads = torch.autograd.grad(nn.functional.mse_loss(module(x), y), list(module.net[2].parameters()))
    expected = float(sum((g.double() ** 2).sum() for g in grads).sqrt())
    assert report["net.2"].metrics["grad_norm"] == pytest.approx(expected, rel=1e-5)  # the last report: these weights
    assert float(logged["plasticity/net.2/grad_norm"]) == pytest.approx(report["net.2"].metrics["grad_norm"], rel=1e-5)
    assert "trainability_ratio" in report.network and report["net.0"].metrics["distance_from_init"] > 0


def test_tensorboard_sink_roundtrip(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="needs the tensorboard extra")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1))
    report = pp.Probe(model, probe_batch=torch.randn(32, 3)).measure()
    with pp.TensorBoardSink(tmp_path) as sink:
        sink.write(10, report)
        sink.write(20, report)
        sink.write_scalars(20, {"eval/return": 5.0})
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    tag = "plasticity/0/effective_rank"
    assert tag in acc.Tags()["scalars"]
    events = acc.Scalars(tag)
    assert [e.step for e in events] == [10, 20]
    assert events[0].value == pytest.approx(report["0"].metrics["effective_rank"], rel=1e-6)
    assert acc.Scalars("eval/return")[0].value == 5.0


def test_sb3_callback_gradients_trainability_and_distance_from_training_start() -> None:
    sb3 = pytest.importorskip("stable_baselines3", reason="needs the sb3 extra")
    import torch.nn.functional as F

    from plasticity_probe.integrations.sb3 import ProbeCallback

    def td_loss(model: Any) -> torch.Tensor:  # SB3 DQN's TD loss on a fixed replay sample
        data = model.replay_buffer.sample(32, env=None)
        with torch.no_grad():
            best = model.q_net_target(data.next_observations).max(dim=1).values.reshape(-1, 1)
            target = data.rewards + (1 - data.dones) * model.gamma * best
        q = model.q_net(data.observations).gather(1, data.actions.long())
        return F.smooth_l1_loss(q, target)

    kw = dict(learning_starts=50, buffer_size=1000, train_freq=1, seed=0, verbose=0)
    model = sb3.DQN("MlpPolicy", "CartPole-v1", **kw)
    start = {k: v.clone() for k, v in model.policy.q_net.named_parameters()}
    callback = ProbeCallback(every=100, batch_size=32, loss_fn=td_loss, trainability=True)
    model.learn(200, callback=callback)
    report = callback.last_reports["q_net"]
    assert {"grad_norm", "grad_to_weight_ratio", "grad_dormant_fraction"} <= set(report["q_net.2"].metrics)
    assert 0 < report.network["trainability_ratio"] < 1
    moved = callback.probes["q_net"].init
    assert all(torch.equal(moved[k], start[k]) for k in start)  # θ_0 = the parameters at the start of training
    assert report["q_net.0"].metrics["distance_from_init"] > 0


def test_sb3_callbacks_keep_their_interval_with_several_environments(tmp_path: Path) -> None:
    """With n_envs = 4 the timestep count moves 4 at a time: ``num_timesteps % every == 0`` held
    only at multiples of lcm(every, 4) (every 20 steps for every = 10, the first report at 4,004
    for every = 1,001). One report (and one intervention) past each multiple of ``every``."""
    sb3 = pytest.importorskip("stable_baselines3", reason="needs the sb3 extra")
    from stable_baselines3.common.env_util import make_vec_env

    from plasticity_probe.integrations.sb3 import InterventionCallback, ProbeCallback

    env = make_vec_env("CartPole-v1", n_envs=4, seed=0)
    model = sb3.DQN("MlpPolicy", env, learning_starts=8, policy_kwargs={"net_arch": [16]}, seed=0, verbose=0)
    sink_path = tmp_path / "p.jsonl"
    with pp.JsonlSink(sink_path) as sink:
        probe = ProbeCallback(every=10, batch_size=8, sinks=[sink], metrics=["weight_magnitude"])
        shrink = InterventionCallback("shrink-perturb", every=10, batch_size=8)
        model.learn(100, callback=[probe, shrink])
    steps = sorted({json.loads(line)["step"] for line in sink_path.read_text().splitlines()})
    total = model.num_timesteps  # SB3 may run past 100 to finish its last rollout
    calls = range(4, total + 1, 4)  # num_timesteps at each callback call
    expected = [min(n for n in calls if n >= 10 * k) for k in range(1, total // 10 + 1)]
    assert steps == expected and steps[:4] == [12, 20, 32, 40]  # the first call at or past 10, 20, …
    assert sorted({t for t, _ in shrink.records}) == steps


@pytest.mark.filterwarnings("ignore:Found .* module\\(s\\) in eval mode")
def test_lightning_probes_once_per_multiple_with_accumulation_and_keeps_frozen_parts_in_eval(
    tmp_path: Path,
) -> None:
    L = pytest.importorskip("lightning.pytorch", reason="needs the lightning extra")
    from plasticity_probe.integrations.lightning import InterventionCallback, ProbeCallback

    class Module(L.LightningModule):
        """A frozen backbone kept in eval mode (its BatchNorm statistics must not move)."""

        def __init__(self) -> None:
            super().__init__()
            self.backbone = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8)).eval().requires_grad_(False)
            self.head = nn.Sequential(nn.ReLU(), nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 1))
            self.modes: list[bool] = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.backbone(x))

        def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
            self.backbone.eval()  # the user's rule, once per batch
            self.modes.append(self.backbone.training)

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _idx: int) -> torch.Tensor:
            self.modes.append(self.backbone.training)
            return nn.functional.mse_loss(self(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.head.parameters(), lr=0.01)

    class Steps(ProbeCallback):
        def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            before = self.last_report
            super().on_train_batch_end(trainer, pl_module, *args)
            if self.last_report is not before:
                self.steps.append(trainer.global_step)
            pl_module.modes.append(pl_module.backbone.training)

    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(96, 3), torch.randn(96, 1)), batch_size=8
    )
    probe = Steps(every=2, eval_mode=True)
    probe.steps = []
    shrink = InterventionCallback("shrink-perturb", every=2)
    trainer = L.Trainer(
        max_steps=6,
        accumulate_grad_batches=2,
        callbacks=[probe, shrink],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    module = Module()
    stats = module.backbone[1].running_mean.clone()
    trainer.fit(module, loader)
    assert probe.steps == [2, 4, 6]  # one report per multiple of every, none before the first update
    assert [step for step, _ in shrink.records] == [2, 4, 6]
    assert not any(module.modes)  # the backbone never left eval mode
    assert torch.equal(module.backbone[1].running_mean, stats)


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_sb3_trainability_of_an_actor_critic_fits_its_distribution_and_values(env_id: str) -> None:
    """PPO's forward returns sampled or argmax actions, which have no gradient (discrete ones
    made learn() raise); the probe fits the distribution's logits or mean beside the values."""
    sb3 = pytest.importorskip("stable_baselines3", reason="needs the sb3 extra")
    from plasticity_probe.integrations.sb3 import ProbeCallback

    model = sb3.PPO("MlpPolicy", env_id, n_steps=64, batch_size=32, n_epochs=1, seed=0, verbose=0)
    callback = ProbeCallback(every=64, batch_size=32, trainability=True)
    model.learn(128, callback=callback)
    network = callback.last_reports["policy"].network
    assert 0 < network["trainability_ratio"] < 1  # Adam on fresh targets lowers the loss


def test_sb3_probing_with_a_sampling_loss_changes_nothing_in_training() -> None:
    """The same seeded DQN run with and without ``ProbeCallback(loss_fn, trainability)``: the
    loss samples the replay buffer (NumPy's global RNG, which SB3's sampling and ε-greedy use)
    and the trainability fit draws targets (torch's); the trained parameters are identical."""
    sb3 = pytest.importorskip("stable_baselines3", reason="needs the sb3 extra")
    import torch.nn.functional as F

    from plasticity_probe.integrations.sb3 import ProbeCallback

    def td_loss(model: Any) -> torch.Tensor:
        data = model.replay_buffer.sample(32, env=None)
        q = model.q_net(data.observations).gather(1, data.actions.long())
        return F.mse_loss(q, data.rewards)

    def run(callback: ProbeCallback | None) -> dict[str, torch.Tensor]:
        kw = dict(learning_starts=50, buffer_size=1000, train_freq=1, policy_kwargs={"net_arch": [16]})
        model = sb3.DQN("MlpPolicy", "CartPole-v1", seed=0, verbose=0, **kw)
        model.learn(300, callback=callback)
        return {k: v.clone() for k, v in model.policy.state_dict().items()}

    probed = ProbeCallback(every=60, batch_size=32, loss_fn=td_loss, trainability=True)
    with_probe, without = run(probed), run(None)
    assert len(probed.last_reports) == 1 and "grad_norm" in probed.last_reports["q_net"]["q_net.0"].metrics
    assert all(torch.equal(with_probe[k], without[k]) for k in without)
