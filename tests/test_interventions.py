"""Interventions: ReDo on the dueling DQN, an SB3 PPO policy, a Nature-CNN and a residual MLP,
checked against an independent account of which entries may change; Shrink & Perturb and layer
resets; the global RNG; the reference agent and the CLI.

The expected dormant units come from our own numpy computation on features recorded by plain
forward hooks (not the library's tracer); the expected changed entries come from the layer
wiring written out by hand for each architecture."""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_config
from torch import nn

import plasticity_probe as pp
from reference_agent import rundir
from reference_agent.engine import train
from reference_agent.experiments.plots import label, plot_runs
from reference_agent.experiments.results import load_run

TAU = 0.025


# ----------------------------------------------------------------------------- models
class DuelingQ(nn.Module):
    def __init__(self, obs: int = 6, hidden: int = 16, actions: int = 3) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(obs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.value = nn.Linear(hidden, 1)
        self.advantage = nn.Linear(hidden, actions)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.trunk(x)
        a = self.advantage(h)
        return self.value(h) + a - a.mean(dim=1, keepdim=True)


class NatureCNN(nn.Module):
    """conv → conv → flatten → linear → linear on 4×36×36 inputs (36 → 8 → 3 positions)."""

    def __init__(self, actions: int = 3) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(4, 8, 8, stride=4)
        self.c2 = nn.Conv2d(8, 6, 4, stride=2)
        self.fc = nn.Linear(6 * 3 * 3, 16)
        self.out = nn.Linear(16, actions)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        return self.out(torch.relu(self.fc(x.flatten(1))))


class ResidualMLP(nn.Module):
    def __init__(self, obs: int = 5, width: int = 12) -> None:
        super().__init__()
        self.inp = nn.Linear(obs, width)
        self.l1 = nn.Linear(width, width)
        self.l2 = nn.Linear(width, width)
        self.head = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.inp(x))
        s = a + self.l2(torch.relu(self.l1(a)))
        return self.head(torch.relu(s))


class NormMLP(nn.Module):
    def __init__(self, norm: type[nn.Module]) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 10)
        self.norm = norm(10)
        self.out = nn.Linear(10, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.norm(self.fc(x))))


# ----------------------------------------------------------------------------- independent checks
def record_features(model: nn.Module, modules: dict[str, nn.Module], batch: torch.Tensor) -> dict[str, np.ndarray]:
    """Outputs of the given (activation) modules on ``batch``, by plain forward hooks."""
    out: dict[str, np.ndarray] = {}
    handles = [
        m.register_forward_hook(lambda _m, _i, o, name=name: out.__setitem__(name, o.detach().numpy().copy()))
        for name, m in modules.items()
    ]
    with torch.no_grad():
        model(batch)
    for h in handles:
        h.remove()
    return out


def dormant_units(h: np.ndarray, tau: float = TAU) -> set[int]:
    """ReDo: s_i = E|h_i| / mean_k E|h_k| ≤ τ; conv channels are units (axis 1)."""
    h = np.abs(h.astype(np.float64))
    per_unit = h.transpose(1, 0, *range(2, h.ndim)).reshape(h.shape[1], -1).mean(1) if h.ndim > 2 else h.mean(0)
    return {int(i) for i in np.flatnonzero(per_unit / per_unit.mean() <= tau)}


def silence(layer: nn.Linear | nn.Conv2d, units: list[int]) -> None:
    """Make ``units`` output exactly 0 before the activation (ReLU and tanh of 0 are 0)."""
    with torch.no_grad():
        layer.weight[units] = 0
        if layer.bias is not None:
            layer.bias[units] = 0


def adam_with_state(model: nn.Module, batch: torch.Tensor, steps: int = 3) -> torch.optim.Adam:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, amsgrad=True)
    for _ in range(steps):
        opt.zero_grad()
        out = model(batch)
        outs = out if isinstance(out, tuple) else (out,)
        sum(o.pow(2).mean() for o in outs if o.is_floating_point()).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return opt


Mask = dict[str, torch.Tensor]


def expected_masks(
    model: nn.Module,
    dormant: dict[str, set[int]],
    consumers: dict[str, list[tuple[str, int]]],
) -> tuple[Mask, Mask]:
    """Entries that may change: rows (+bias) of each dormant unit, and the consumers' columns —
    ``(consumer, positions)``: unit i owns columns i·positions … (i+1)·positions − 1."""
    params = dict(model.named_parameters())
    rows = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in params.items()}
    cols = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in params.items()}
    for layer, units in dormant.items():
        for i in units:
            rows[f"{layer}.weight"][i] = True
            if f"{layer}.bias" in rows:
                rows[f"{layer}.bias"][i] = True
            for consumer, positions in consumers[layer]:
                cols[f"{consumer}.weight"][:, i * positions : (i + 1) * positions] = True
    return rows, cols


def check_redo(
    model: nn.Module,
    before: nn.Module,
    opt: torch.optim.Optimizer,
    opt_before: dict,
    rows: Mask,
    cols: Mask,
) -> None:
    """Rows re-initialized (changed, within the default init bound), columns 0, everything else
    and every other optimizer entry bit-identical, Adam moments 0 at the changed entries."""
    old = dict(before.named_parameters())
    for name, p in model.named_parameters():
        q = old[name]
        changed = rows[name] | cols[name]
        assert torch.equal(p[~changed], q[~changed]), name
        assert torch.all(p[cols[name]] == 0), name
        only_rows = rows[name] & ~cols[name]
        if only_rows.any():
            assert not torch.equal(p[only_rows], q[only_rows]), name
            fan_in = p[0].numel() if name.endswith("weight") else old[name.replace("bias", "weight")][0].numel()
            assert float(p[only_rows].abs().max()) <= 1 / fan_in**0.5 + 1e-7, name
        state, saved = opt.state[p], opt_before["state"][list(dict(model.named_parameters())).index(name)]
        assert torch.equal(state["step"], saved["step"]), name  # per-tensor step kept
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert torch.equal(state[key][~changed], saved[key][~changed]), (name, key)
            assert torch.all(state[key][changed] == 0), (name, key)


def run_redo_case(
    model: nn.Module,
    batch: torch.Tensor,
    silenced: dict[str, list[int]],
    acts: dict[str, nn.Module],
    consumers: dict[str, list[tuple[str, int]]],
    skipped: dict[str, str],
    call: Callable[[nn.Module], object] | None = None,
) -> pp.ResetRecord:
    opt = adam_with_state(model, batch)
    modules = dict(model.named_modules())
    for layer, units in silenced.items():
        silence(modules[layer], units)  # type: ignore[arg-type]
    feats = record_features(model, {layer: modules[a] for layer, a in acts.items()}, batch)
    dormant = {layer: dormant_units(h) for layer, h in feats.items()}
    for layer, units in silenced.items():
        assert set(units) <= dormant[layer]
    before, opt_before = copy.deepcopy(model), copy.deepcopy(opt.state_dict())
    rng = torch.get_rng_state()
    record = pp.ReDo(model, opt, tau=TAU, seed=0).reset(batch)
    assert torch.equal(rng, torch.get_rng_state())
    assert {r.layer: set(r.indices) for r in record.layers} == dormant
    assert {r.layer: set(r.consumers) for r in record.layers} == {k: {c for c, _ in v} for k, v in consumers.items()}
    for layer, fragment in skipped.items():
        assert fragment in {s.name: s.reason for s in record.skipped}[layer]
    rows, cols = expected_masks(model, dormant, consumers)
    check_redo(model, before, opt, opt_before, rows, cols)
    return record


# ----------------------------------------------------------------------------- ReDo: architectures
def test_redo_dueling_dqn() -> None:
    torch.manual_seed(0)
    model = DuelingQ()
    record = run_redo_case(
        model,
        torch.randn(64, 6),
        {"trunk.0": [1, 4], "trunk.2": [0, 7, 9]},
        {"trunk.0": "trunk.1", "trunk.2": "trunk.3"},
        {"trunk.0": [("trunk.2", 1)], "trunk.2": [("value", 1), ("advantage", 1)]},
        {"value": "output layer", "advantage": "output layer"},
    )
    assert record.units_reset >= 5


def test_redo_sb3_ppo_policy() -> None:
    pytest.importorskip("stable_baselines3")
    from stable_baselines3 import PPO

    torch.manual_seed(0)
    policy = PPO("MlpPolicy", "CartPole-v1", seed=0, device="cpu").policy
    obs = torch.randn(64, 4)
    ext = "mlp_extractor"
    run_redo_case(
        policy,
        obs,
        {f"{ext}.policy_net.0": [3], f"{ext}.policy_net.2": [5, 60], f"{ext}.value_net.2": [10]},
        {f"{ext}.{net}.{i}": f"{ext}.{net}.{i + 1}" for net in ("policy_net", "value_net") for i in (0, 2)},
        {
            f"{ext}.policy_net.0": [(f"{ext}.policy_net.2", 1)],
            f"{ext}.policy_net.2": [("action_net", 1)],
            f"{ext}.value_net.0": [(f"{ext}.value_net.2", 1)],
            f"{ext}.value_net.2": [("value_net", 1)],
        },
        {"action_net": "output layer", "value_net": "output layer"},
    )


def test_redo_nature_cnn_conv_to_conv_and_flatten_to_linear() -> None:
    torch.manual_seed(0)
    model = NatureCNN()
    # functional ReLUs: record the features with hooks on the layers and apply ReLU in numpy
    x = torch.randn(32, 4, 36, 36)
    opt = adam_with_state(model, x)
    silence(model.c1, [2])
    silence(model.c2, [1, 4])
    silence(model.fc, [3])
    raw = record_features(model, {"c1": model.c1, "c2": model.c2, "fc": model.fc}, x)
    dormant = {k: dormant_units(np.maximum(v, 0)) for k, v in raw.items()}
    assert {2} <= dormant["c1"] and {1, 4} <= dormant["c2"] and {3} <= dormant["fc"]
    before, opt_before = copy.deepcopy(model), copy.deepcopy(opt.state_dict())
    rec = pp.ReDo(model, opt, seed=1).reset(x)
    assert {r.layer: set(r.indices) for r in rec.layers} == dormant
    consumers = {"c1": [("c2", 1)], "c2": [("fc", 9)], "fc": [("out", 1)]}
    rows, cols = expected_masks(model, dormant, consumers)
    # conv → conv: input channel i of c2 is weight[:, i] (all kernel positions)
    for i in dormant["c1"]:
        assert cols["c2.weight"][:, i].all() and cols["c2.weight"].sum() == 6 * len(dormant["c1"]) * 16
    check_redo(model, before, opt, opt_before, rows, cols)
    assert torch.all(model.fc.weight[:, 9:18] == 0) and torch.all(model.fc.weight[:, 36:45] == 0)


def test_redo_residual_mlp_skips_the_stream() -> None:
    torch.manual_seed(0)
    model = ResidualMLP()
    x = torch.randn(48, 5)
    opt = adam_with_state(model, x)
    silence(model.inp, [0])
    silence(model.l1, [2, 3])
    before, opt_before = copy.deepcopy(model), copy.deepcopy(opt.state_dict())
    record = pp.ReDo(model, opt).reset(x)
    reasons = {s.name: s.reason for s in record.skipped}
    assert set(reasons) == {"inp", "l2", "head"}
    assert "mixes units" in reasons["inp"] and "mixes units" in reasons["l2"] and "output layer" in reasons["head"]
    raw = record_features(model, {"l1": model.l1}, x)
    raw_before = record_features(before, {"l1": before.l1}, x)
    dormant = {"l1": dormant_units(np.maximum(raw_before["l1"], 0))}
    assert {2, 3} <= dormant["l1"] and raw["l1"].shape == raw_before["l1"].shape
    rows, cols = expected_masks(model, dormant, {"l1": [("l2", 1)]})
    check_redo(model, before, opt, opt_before, rows, cols)


# ----------------------------------------------------------------------------- ReDo: chain norms, scores
def test_redo_batchnorm_chain_resets_affine_and_statistics() -> None:
    torch.manual_seed(0)
    model = NormMLP(nn.BatchNorm1d)
    x = torch.randn(40, 5)
    opt = adam_with_state(model, x)
    model.eval()
    with torch.no_grad():
        model.norm.running_mean.uniform_(-1, 1)
        model.norm.running_var.uniform_(0.5, 2)
        model.norm.weight.uniform_(0.5, 2)
        model.norm.bias[[2, 6]] = -100.0  # after the norm: ReLU(−100 + …) = 0
    before = copy.deepcopy(model)
    record = pp.ReDo(model, opt).reset(x)
    assert record.layers[0].layer == "fc" and set(record.layers[0].indices) == {2, 6}
    idx, keep = [2, 6], [i for i in range(10) if i not in (2, 6)]
    n = model.norm
    assert torch.all(n.weight[idx] == 1) and torch.all(n.bias[idx] == 0)
    assert torch.all(n.running_mean[idx] == 0) and torch.all(n.running_var[idx] == 1)
    for attr in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(n, attr)[keep], getattr(before.norm, attr)[keep])
    assert torch.equal(n.num_batches_tracked, before.norm.num_batches_tracked)
    for p_name in ("norm.weight", "norm.bias"):
        state = opt.state[dict(model.named_parameters())[p_name]]
        assert torch.all(state["exp_avg"][idx] == 0) and torch.all(state["exp_avg_sq"][idx] == 0)
    assert torch.all(model.out.weight[:, idx] == 0)


def test_redo_skips_layernorm_chain() -> None:
    model = NormMLP(nn.LayerNorm)
    before = copy.deepcopy(model)
    record = pp.ReDo(model).reset(torch.randn(8, 5))
    assert "normalizes over the units" in {s.name: s.reason for s in record.skipped}["fc"]
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), before.state_dict().values(), strict=True)
    )


def test_scoring_pass_restores_buffers_and_rng_in_train_mode() -> None:
    model = NormMLP(nn.BatchNorm1d).train()
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    x = torch.randn(8, 5)
    rng = torch.get_rng_state()
    pp.ReDo(model).reset(x)
    assert torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())


def test_unit_scores_match_dormant_fraction() -> None:
    h = torch.relu(torch.randn(50, 20) - torch.linspace(-1, 3, 20))
    h[:, 3] = 0
    s = pp.interventions.unit_scores(h)
    assert abs(float((s <= TAU).double().mean()) - pp.dormant_fraction(h, TAU)) < 1e-12
    conv = torch.relu(torch.randn(4, 6, 5, 5))
    conv[:, 2] = 0
    assert float(pp.interventions.unit_scores(conv)[2]) == 0.0


def test_gradient_score_flags_units_without_gradient() -> None:
    """GraMa-style: E|∂L/∂z_i| of the pre-activation, checked against autograd by hand."""
    torch.manual_seed(0)
    model = DuelingQ()
    x = torch.randn(32, 6)
    with torch.no_grad():
        model.trunk[2].bias[[1, 5]] = -100.0  # dead ReLUs: no gradient reaches their pre-activation
    z = {}
    hook = model.trunk[2].register_forward_hook(lambda _m, _i, o: z.__setitem__("z", o))
    loss = model(x).pow(2).mean()
    hook.remove()
    (g,) = torch.autograd.grad(loss, z["z"])
    per_unit = g.abs().double().mean(0).numpy()
    expected = {int(i) for i in np.flatnonzero(per_unit / per_unit.mean() <= 0.1)}
    assert {1, 5} <= expected
    record = pp.ReDo(model, score="gradient", tau=0.1).reset(x, loss_fn=lambda out: out.pow(2).mean())
    assert set(next(r for r in record.layers if r.layer == "trunk.2").indices) == expected
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="loss_fn"):
        pp.ReDo(model, score="gradient").reset(x)


# ----------------------------------------------------------------------------- Shrink & Perturb, layer resets
def test_shrink_perturb_is_a_linear_mix_with_a_fresh_init() -> None:
    torch.manual_seed(0)
    model = NatureCNN()
    theta = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    only_shrink = copy.deepcopy(model)
    pp.shrink_perturb(only_shrink, shrink=0.8, perturb=0.0, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(only_shrink.state_dict()[k], theta[k] * 0.8) for k in theta)
    fresh = copy.deepcopy(model)
    pp.shrink_perturb(fresh, shrink=0.0, perturb=1.0, generator=torch.Generator().manual_seed(5))
    bound = 1 / (4 * 8 * 8) ** 0.5
    assert float(fresh.c1.weight.abs().max()) <= bound and not torch.equal(fresh.c1.weight, model.c1.weight)
    record = pp.shrink_perturb(model, 0.7, 0.05, generator=torch.Generator().manual_seed(5))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, 0.7 * theta[k] + 0.05 * fresh.state_dict()[k], rtol=0, atol=1e-6)
    assert torch.equal(rng, torch.get_rng_state())
    assert set(record.params) == set(theta)


def test_shrink_perturb_lists_parameters_without_initializer_and_resets_optimizer_state() -> None:
    class WithLogStd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)
            self.log_std = nn.Parameter(torch.full((2,), -0.5))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) * self.log_std.exp()

    model = WithLogStd()
    opt = adam_with_state(model, torch.randn(4, 3))
    log_std = model.log_std.detach().clone()
    record = pp.shrink_perturb(model, optimizer=opt)
    assert [s.name for s in record.skipped] == ["log_std"] and torch.equal(model.log_std, log_std)
    assert model.fc.weight not in opt.state and model.log_std in opt.state


def test_reset_layers_exact() -> None:
    torch.manual_seed(0)
    model = NormMLP(nn.BatchNorm1d)
    x = torch.randn(16, 5)
    opt = adam_with_state(model, x)
    with torch.no_grad():
        model.norm.weight.fill_(3.0)
    before, opt_before = copy.deepcopy(model), copy.deepcopy(opt.state_dict())
    rng = torch.get_rng_state()
    record = pp.reset_layers(model, ["norm", "out"], opt, generator=torch.Generator().manual_seed(0))
    assert torch.equal(rng, torch.get_rng_state())
    assert set(record.params) == {"norm.weight", "norm.bias", "out.weight", "out.bias"}
    assert torch.equal(model.fc.weight, before.fc.weight) and torch.equal(model.fc.bias, before.fc.bias)
    assert torch.all(model.norm.weight == 1) and torch.all(model.norm.running_var == 1)
    assert int(model.norm.num_batches_tracked) == 0
    assert not torch.equal(model.out.weight, before.out.weight)
    assert float(model.out.weight.abs().max()) <= 1 / 10**0.5
    params = dict(model.named_parameters())
    for name in ("norm.weight", "norm.bias", "out.weight", "out.bias"):
        assert params[name] not in opt.state
    for i, name in enumerate(params):
        if name.startswith("fc."):
            saved = opt_before["state"][i]
            assert all(torch.equal(opt.state[params[name]][k], saved[k]) for k in saved)
    model(x).sum().backward()
    opt.step()
    assert float(opt.state[params["out.weight"]]["step"]) == 1.0
    assert float(opt.state[params["fc.weight"]]["step"]) == 4.0
    with pytest.raises(ValueError, match="unknown module"):
        pp.reset_layers(model, ["nope"])


def test_schedule() -> None:
    calls: list[object] = []

    def fake(batch: object) -> pp.ResetRecord:
        calls.append(batch)
        return pp.ResetRecord("fake")

    maybe = pp.InterventionSchedule(fake, every=3, start=10)
    fired = [step for step in range(25) if maybe(step, step) is not None]
    assert fired == [13, 16, 19, 22] and calls == fired
    assert [s for s, _ in maybe.records] == fired


# ----------------------------------------------------------------------------- integrations
def test_sb3_intervention_callback() -> None:
    pytest.importorskip("stable_baselines3")
    from stable_baselines3 import PPO

    from plasticity_probe.integrations.sb3 import InterventionCallback

    model = PPO("MlpPolicy", "CartPole-v1", n_steps=64, batch_size=32, n_epochs=1, seed=0, device="cpu")
    callback = InterventionCallback("redo", every=64)
    model.learn(192, callback=callback)
    assert [step for step, _ in callback.records] == [64, 128, 192]
    assert all(r.kind == "redo" for _, r in callback.records)


def test_lightning_intervention_callback() -> None:
    L = pytest.importorskip("lightning.pytorch")
    from plasticity_probe.integrations.lightning import InterventionCallback

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _i: int) -> torch.Tensor:
            return nn.functional.mse_loss(self(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters())

    data = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
    callback = InterventionCallback("redo", every=2)
    trainer = L.Trainer(
        max_steps=6, callbacks=[callback], logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(Module(), torch.utils.data.DataLoader(data, batch_size=8))
    assert [step for step, _ in callback.records] == [2, 4, 6]


# ----------------------------------------------------------------------------- reference agent and CLI
def test_agent_redo_records_and_resume_is_exact(tmp_path: Path) -> None:
    cfg = tiny_config(intervention="redo", intervention_every=200)
    assert cfg.run_name == "CartPole-v1__none_redo-every200__s0"
    assert tiny_config(intervention="redo", redo_tau=0.1).run_name == "CartPole-v1__none_redo-every1000-tau0.1__s0"
    train(cfg, tmp_path / "full")
    records = list(rundir.read_jsonl(tmp_path / "full" / rundir.INTERVENTIONS))
    assert [r["step"] for r in records] == [500, 700, 900, 1100, 1300, 1500]
    first = records[0]
    assert first["kind"] == "redo" and first["units_reset"] > 0
    assert first["dormant_after"]["network"] < first["dormant_before"]["network"]
    phases = {
        (r["step"], r.get("phase"))
        for r in rundir.read_jsonl(tmp_path / "full" / rundir.PLASTICITY)
        if r["metric"] == "dormant_fraction"
    }
    assert (500, "before") in phases and (500, "after") in phases and (600, None) in phases
    run = load_run(tmp_path / "full")
    assert len(run.interventions) == 6 and {r.get("phase") for r in run.plasticity} == {None, "after"}
    assert {r["phase"] for r in run.plasticity_before} == {"before"}
    pytest.importorskip("matplotlib")
    written = plot_runs([run], tmp_path / "figures")
    assert tmp_path / "figures" / "plasticity_CartPole-v1.png" in written
    assert label(run.config) == "redo τ=0.025 every 200"

    def interrupt(step: int, total: int, info: dict[str, float]) -> None:
        if step == 800:
            os.kill(os.getpid(), signal.SIGINT)

    assert train(cfg, tmp_path / "cut", progress=interrupt).state == "interrupted"
    with (tmp_path / "cut" / rundir.INTERVENTIONS).open("a") as f:  # hand edits: not records of the format
        f.write('{}\n{"step": "x", "kind": "redo", "units": 1, "units_reset": 0}\n')
    resumed = train(None, tmp_path / "cut", resume=True)
    assert resumed.state == "finished"
    assert any("interventions.jsonl: skipped 2 malformed record(s)" in w for w in resumed.warnings), resumed.warnings
    for name in (rundir.METRICS, rundir.PLASTICITY, rundir.INTERVENTIONS):
        assert (tmp_path / "full" / name).read_text() == (tmp_path / "cut" / name).read_text()


@pytest.mark.parametrize("kind", ["shrink-perturb", "reset-last"])
def test_agent_other_interventions(tmp_path: Path, kind: str) -> None:
    cfg = tiny_config(intervention=kind, intervention_every=400, total_steps=800, hessian_every=700)
    assert train(cfg, tmp_path / cfg.run_name).state == "finished"
    hessian = {
        (r["step"], r.get("phase"))
        for r in rundir.read_jsonl(tmp_path / cfg.run_name / rundir.PLASTICITY)
        if r["metric"] == "hessian_lambda_max"
    }
    assert hessian == {(700, "after")}  # the report due at an intervention step is the one after it
    records = list(rundir.read_jsonl(tmp_path / cfg.run_name / rundir.INTERVENTIONS))
    assert [r["step"] for r in records] == [700]
    expected = {"shrink-perturb": "shrink_perturb", "reset-last": "reset_layers"}[kind]
    assert records[0]["kind"] == expected
    if kind == "reset-last":
        assert list(records[0]["layers"]) == ["net.4"]


def test_cli_intervention_flags_with_progress_bar(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cli.app import app

    args = ["train", "--env", "CartPole-v1", "--steps", "400", "--learning-starts", "100", "--batch-size", "16"]
    args += ["--eval-every", "200", "--eval-episodes", "1", "--probe-every", "100", "--hidden-sizes", "8,8"]
    args += ["--intervention", "redo", "--intervention-every", "100", "--out", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    run = tmp_path / "CartPole-v1__none_redo-every100__s0"
    records = [json.loads(line) for line in (run / "interventions.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [200, 300, 400]
    bad = CliRunner().invoke(app, ["train", "--intervention", "redo-all", "--out", str(tmp_path), "-q"])
    assert bad.exit_code == 2


def test_redo_skips_layouts_it_cannot_verify() -> None:
    """conv features flattened per channel (``flatten(2)``) into a linear layer: the consumer
    reads positions, not ``C·positions`` inputs, so the conv layer is skipped."""

    class PerChannel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3)
            self.fc = nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.conv(x)).flatten(2)).sum(dim=1)

    model = PerChannel()
    before = copy.deepcopy(model)
    record = pp.ReDo(model).reset(torch.randn(4, 2, 6, 6))
    assert "reshape" in {s.name: s.reason for s in record.skipped}["conv"]
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), before.state_dict().values(), strict=True)
    )


def test_consumer_through_clone_is_seen() -> None:
    from plasticity_probe.layers import DataFlowTracer

    class Clone(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.a(x))
            return self.b(h) + self.c(h.clone())

    tracer = DataFlowTracer(Clone())
    with tracer.record(), torch.no_grad():
        tracer.model(torch.randn(5, 3))
    assert {c.layer for c in tracer.trace().consumers["a"]} == {"b", "c"}


def test_a_parameter_free_layer_norm_in_the_chain_is_seen() -> None:
    class FreeNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(nn.functional.layer_norm(self.a(x), (4,))))

    model = FreeNorm()
    with torch.no_grad():
        model.a.bias[:2] = -100.0
    before = copy.deepcopy(model)
    record = pp.ReDo(model).reset(torch.randn(6, 3))
    assert "layer_norm" in {s.name: s.reason for s in record.skipped}["a"]
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before.parameters(), strict=True))
    trace_layers = pp.discover_layers(model, torch.randn(2, 3))[0]
    assert trace_layers[0].chain == ("layer_norm", "relu")


def test_tied_parameters_are_shrunk_and_reset_once() -> None:
    """A weight shared by two layers (tied embeddings): ``named_parameters()`` lists it once, and
    so must the interventions — shrunk once (λ·θ, not λ²·θ), its optimizer state dropped."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    model[2].weight = model[0].weight
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(8, 4)).square().sum().backward()
    opt.step()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    record = pp.shrink_perturb(model, shrink=0.5, perturb=0.0, optimizer=opt)
    assert record.params == ("0.weight", "0.bias", "2.bias")
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), 0.5 * before[name], rtol=0, atol=0)
    assert not opt.state
    model(torch.randn(8, 4)).square().sum().backward()
    opt.step()
    record = pp.reset_layers(model, ["2"], optimizer=opt)
    assert record.params == ("0.weight", "2.bias")  # the tied weight under its first name
    assert set(opt.state) == {model[0].bias}


def test_redo_resets_nothing_in_a_layer_whose_features_are_not_finite() -> None:
    """One unit overflowing to Inf made every score 0 (all dormant) and ReDo reset the whole
    layer, healthy units included; now the layer is skipped with a NonFiniteWarning."""
    from plasticity_probe.interventions import unit_scores

    scores = unit_scores(torch.tensor([[math.inf, 0.0, 1.0], [1.0, 0.0, 1.0]]))
    assert bool(torch.isnan(scores).all())
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight[0] = 3e38  # unit 0 of the first layer overflows to Inf on ones
    before = copy.deepcopy(model.state_dict())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        record = pp.ReDo(model, tau=0.1).reset(torch.ones(5, 3))
    messages = {str(w.message) for w in caught if issubclass(w.category, pp.NonFiniteWarning)}
    assert any(m.startswith("ReDo: layer 0: NaN or Inf") for m in messages), messages
    assert {w.filename for w in caught} == {__file__}  # reported where reset was called
    assert record.units_reset == 0
    assert ("0", "NaN or Inf in its features (or gradients) on this batch: scores undefined, not reset") in [
        (s.name, s.reason) for s in record.skipped
    ]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
