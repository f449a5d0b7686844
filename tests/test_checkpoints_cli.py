"""``probe analyze`` on real files of every supported format, bad input, and the CLI."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_config
from torch import nn
from typer.testing import CliRunner

import plasticity_probe as pp
from cli.app import app
from plasticity_probe.checkpoints import CheckpointError, load_checkpoint, mlp_from_state_dict, weight_report
from reference_agent.analysis import analyze
from reference_agent.engine import train

runner = CliRunner()


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))


@pytest.fixture(scope="module")
def agent_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("agent")
    cfg = tiny_config(
        total_steps=600,
        learning_starts=200,
        eval_every=300,
        eval_episodes=1,
        probe_every=200,
        checkpoint_every=300,
        reg="l2init",
    )
    train(cfg, out / "run")
    return out / "run" / "checkpoint.pt"


class Evil:
    """Unpickling this creates a file: the attack weights_only loading must refuse."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (os.system, (f"touch {self.target}",))


# ---- formats ----------------------------------------------------------------------------------
def test_agent_checkpoint_full_analysis(agent_ckpt: Path) -> None:
    result = analyze(agent_ckpt, hessian=True)
    assert result.kind == "agent" and set(result.reports) == {"online", "target"}
    online = result.reports["online"]
    assert [r.name for r in online.layers] == ["net.0", "net.2", "net.4"]
    assert {"effective_rank", "dead_fraction", "distance_from_init", "weight_stable_rank"} <= set(
        online["net.2"].metrics
    )
    assert "hessian_lambda_max" in online.network
    # the numbers are those of the library on the stored probe batch
    data = torch.load(agent_ckpt, weights_only=True)
    net = nn.Sequential(nn.Linear(4, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
    net.load_state_dict({k.removeprefix("net."): v for k, v in data["online"].items()})
    ref = pp.Probe(net, probe_batch=data["probe_batch"]["obs"]).measure()
    assert online["net.2"].metrics["effective_rank"] == pytest.approx(ref["2"].metrics["effective_rank"])
    distance = float(
        sum(((data["online"][k] - data["init"][k]) ** 2).sum() for k in ("net.0.weight", "net.0.bias")).sqrt()
    )
    assert online["net.0"].metrics["distance_from_init"] == pytest.approx(distance, rel=1e-6)


def test_agent_checkpoint_gradients_of_the_td_loss(agent_ckpt: Path) -> None:
    online = analyze(agent_ckpt, gradients=True).reports["online"]
    data = torch.load(agent_ckpt, weights_only=True)
    nets = {}
    for name in ("online", "target"):  # independent: the TD loss written out on plain modules
        net = nn.Sequential(nn.Linear(4, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
        net.load_state_dict({k.removeprefix("net."): v for k, v in data[name].items()})
        nets[name] = net
    pb, gamma = data["probe_batch"], 0.99  # the fixture's γ, the default
    q = nets["online"](pb["obs"]).gather(1, pb["actions"].long().reshape(-1, 1)).squeeze(1)
    with torch.no_grad():
        best = nets["target"](pb["next_obs"]).max(1).values
        y = pb["rewards"] + gamma * (1 - pb["terminated"].float()) * best
    grads = torch.autograd.grad(((q - y) ** 2).mean(), list(nets["online"][2].parameters()))
    expected = float(sum((g.double() ** 2).sum() for g in grads).sqrt())
    assert online["net.2"].metrics["grad_norm"] == pytest.approx(expected, rel=1e-4)
    assert {"grad_to_weight_ratio", "grad_dormant_fraction"} <= set(online["net.2"].metrics)
    assert "grad_norm" not in analyze(agent_ckpt).reports["online"]["net.2"].metrics


def test_plain_and_wrapped_state_dicts(tmp_path: Path) -> None:
    model = mlp()
    torch.save(model.state_dict(), tmp_path / "dqn.cleanrl_model")
    torch.save({"model": model.state_dict(), "step": 5}, tmp_path / "wrapped.pt")
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, tmp_path / "lightning.ckpt")
    for name, net in (("dqn.cleanrl_model", "model"), ("wrapped.pt", "model"), ("lightning.ckpt", "state_dict")):
        loaded = load_checkpoint(tmp_path / name)
        assert loaded.kind == "state_dict" and list(loaded.networks) == [net]
    report = weight_report(model.state_dict())
    assert [r.name for r in report.layers] == ["0", "2", "4"]
    w = model[2].weight.detach()
    assert report["2"].metrics["weight_stable_rank"] == pytest.approx(pp.stable_rank(w))
    assert report["2"].metrics["weight_magnitude"] == pytest.approx(pp.weight_magnitude(model[2]))


def test_chain_rebuild_and_obs(tmp_path: Path) -> None:
    model = mlp()
    torch.save(model.state_dict(), tmp_path / "m.pt")
    obs = np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32)
    np.save(tmp_path / "obs.npy", obs)
    result = analyze(tmp_path / "m.pt", obs=tmp_path / "obs.npy")
    assert any("ReLU between layers assumed" in n for n in result.notes)
    ref = pp.Probe(model, probe_batch=torch.from_numpy(obs)).measure()
    assert result.reports["model"]["2"].metrics["effective_rank"] == pytest.approx(ref["2"].metrics["effective_rank"])
    rebuilt = mlp_from_state_dict(model.state_dict())
    assert rebuilt is not None and rebuilt[1] == {"0": "0", "2": "2", "4": "4"}


def test_model_factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mymodels.py").write_text(
        "from torch import nn\n"
        "def make():\n"
        "    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.save(mlp().state_dict(), tmp_path / "m.pt")
    np.save(tmp_path / "obs.npy", np.ones((8, 4), np.float32))
    result = analyze(tmp_path / "m.pt", obs=tmp_path / "obs.npy", model="mymodels:make")
    assert "effective_rank" in result.reports["model"]["0"].metrics


def test_sb3_zip_saved_by_sb3(tmp_path: Path) -> None:
    sb3 = pytest.importorskip("stable_baselines3", reason="needs the sb3 extra")
    model = sb3.DQN("MlpPolicy", "CartPole-v1", learning_starts=10, policy_kwargs={"net_arch": [32, 32]}, seed=0)
    model.learn(50)
    model.save(tmp_path / "dqn_cartpole")
    loaded = load_checkpoint(tmp_path / "dqn_cartpole.zip")
    assert loaded.kind == "sb3" and set(loaded.networks) == {"q_net", "q_net_target"}
    assert loaded.metadata.get("policy_class") == "stable_baselines3.dqn.policies"
    np.save(tmp_path / "obs.npy", np.zeros((10, 4), np.float32))
    result = analyze(tmp_path / "dqn_cartpole.zip", obs=tmp_path / "obs.npy")
    assert [r.name for r in result.reports["q_net"].layers] == ["0", "2", "4"]
    w = model.policy.q_net.q_net[0].weight.detach()
    assert result.reports["q_net"]["0"].metrics["weight_stable_rank"] == pytest.approx(pp.stable_rank(w))


def test_safetensors(tmp_path: Path) -> None:
    st = pytest.importorskip("safetensors.torch", reason="needs the safetensors extra")
    model = mlp()
    st.save_file(model.state_dict(), str(tmp_path / "m.safetensors"))
    loaded = load_checkpoint(tmp_path / "m.safetensors")
    assert loaded.kind == "safetensors"
    assert torch.equal(loaded.networks["model"]["2.weight"], model[2].weight.detach())


# ---- bad input ----------------------------------------------------------------------------------
def test_malicious_pickles_are_refused_and_never_run(tmp_path: Path) -> None:
    target = tmp_path / "pwned"
    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps(Evil(str(target)), protocol=2))
    torch_evil = tmp_path / "evil.pt"
    torch.save({"model": Evil(str(target))}, torch_evil)
    for path in (raw, torch_evil):
        with pytest.raises(CheckpointError, match="refused"):
            load_checkpoint(path)
        result = runner.invoke(app, ["analyze", str(path)])
        assert result.exit_code == 2 and "refused" in result.output
    assert not target.exists()


def test_hostile_sb3_zips_and_obs_files_never_run_code(tmp_path: Path) -> None:
    """A real SB3 save, then edited: its ``policy.pth`` replaced by a pickle that would run code
    (refused), a ``:serialized:`` pickle added to its ``data`` (never decoded: the file loads),
    and a ``--obs`` ``.pt`` file that would run code (refused)."""
    sb3 = pytest.importorskip("stable_baselines3", reason="needs the sb3 extra")
    import base64
    import json
    import zipfile

    model = sb3.DQN("MlpPolicy", "CartPole-v1", learning_starts=10, policy_kwargs={"net_arch": [8]}, seed=0)
    model.save(tmp_path / "real")
    target = tmp_path / "pwned"

    def edited(name: str, replace: dict[str, bytes]) -> Path:
        out = tmp_path / f"{name}.zip"
        with zipfile.ZipFile(tmp_path / "real.zip") as src, zipfile.ZipFile(out, "w") as dst:
            for item in src.infolist():
                dst.writestr(item.filename, replace.get(item.filename, src.read(item.filename)))
        return out

    evil_policy = tmp_path / "evil_policy.pth"
    torch.save({"q_net.q_net.0.weight": Evil(str(target))}, evil_policy)
    bad_policy = edited("bad_policy", {"policy.pth": evil_policy.read_bytes()})
    result = runner.invoke(app, ["analyze", str(bad_policy)])
    assert result.exit_code == 2 and "refused" in result.output, result.output

    with zipfile.ZipFile(tmp_path / "real.zip") as src:
        data = json.loads(src.read("data"))
    pickled = base64.b64encode(pickle.dumps(Evil(str(target)), protocol=2)).decode()
    data["hostile"] = {":type:": "<class 'object'>", ":serialized:": pickled}
    with_pickle = edited("with_pickle", {"data": json.dumps(data).encode()})
    loaded = load_checkpoint(with_pickle)
    assert loaded.kind == "sb3" and "hostile" not in loaded.metadata

    evil_obs = tmp_path / "obs.pt"
    torch.save(Evil(str(target)), evil_obs)
    result = runner.invoke(app, ["analyze", str(tmp_path / "real.zip"), "--obs", str(evil_obs)])
    assert result.exit_code == 2 and "refused" in result.output, result.output
    assert not target.exists()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, "no such file"),
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: p.write_text("hello, not a checkpoint"), "not a checkpoint"),
    ],
)
def test_bad_files(tmp_path: Path, make: object, message: str) -> None:
    path = tmp_path / "x.pt"
    make(path)  # type: ignore[operator]
    result = runner.invoke(app, ["analyze", str(path)])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_truncated_checkpoint(tmp_path: Path, agent_ckpt: Path) -> None:
    cut = tmp_path / "cut.pt"
    cut.write_bytes(agent_ckpt.read_bytes()[:5000])
    result = runner.invoke(app, ["analyze", str(cut)])
    assert result.exit_code == 2 and ("truncated" in result.output or "corrupt" in result.output)


def test_nan_weights(tmp_path: Path) -> None:
    sd = mlp().state_dict()
    sd["2.weight"][0, 0] = float("nan")
    torch.save(sd, tmp_path / "nan.pt")
    result = runner.invoke(app, ["analyze", str(tmp_path / "nan.pt")])
    assert result.exit_code == 2 and "NaN" in result.output


def test_obs_shape_mismatch(tmp_path: Path, agent_ckpt: Path) -> None:
    np.save(tmp_path / "obs.npy", np.zeros((5, 7), np.float32))
    result = runner.invoke(app, ["analyze", str(agent_ckpt), "--obs", str(tmp_path / "obs.npy")])
    assert result.exit_code == 2 and "expects 4" in result.output
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object))
    result = runner.invoke(app, ["analyze", str(agent_ckpt), "--obs", str(tmp_path / "obj.npy")])
    assert result.exit_code == 2 and "not a plain .npy" in result.output


# ---- CLI ------------------------------------------------------------------------------------------
def test_cli_analyze_json_and_table(agent_ckpt: Path) -> None:
    result = runner.invoke(app, ["analyze", str(agent_ckpt), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["kind"] == "agent"
    assert data["networks"]["online"]["layers"][1]["name"] == "net.2"
    table = runner.invoke(app, ["analyze", str(agent_ckpt)])
    assert table.exit_code == 0 and "online" in table.output and "target" in table.output


def test_cli_diff(tmp_path: Path, agent_ckpt: Path) -> None:
    other = tmp_path / "other.pt"
    shutil.copy(agent_ckpt, other)
    result = runner.invoke(app, ["diff", str(agent_ckpt), str(other), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)["rows"]
    assert rows and all(r["delta"] == 0 for r in rows)


def test_cli_train_bad_options(tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", "--env", "NoSuchEnv-v0", "--out", str(tmp_path), "-q"])
    assert result.exit_code == 2 and "cannot make environment" in result.output
    result = runner.invoke(app, ["train", "--batch-size", "0", "--out", str(tmp_path), "-q"])
    assert result.exit_code == 2 and "--batch-size must be >= 1" in result.output
    result = runner.invoke(app, ["train", "--reg", "l3"])
    assert result.exit_code == 2 and "l3" in result.output
    result = runner.invoke(app, ["train", "--resume", str(tmp_path / "none")])
    assert result.exit_code == 2 and "not a run directory" in result.output


def test_cli_train_runs_and_resumes(tmp_path: Path) -> None:
    args = [
        "train",
        "--env",
        "CartPole-v1",
        "--steps",
        "400",
        "--learning-starts",
        "100",
        "--batch-size",
        "16",
        "--eval-every",
        "200",
        "--eval-episodes",
        "1",
        "--probe-every",
        "100",
        "--hidden-sizes",
        "8,8",
        "--out",
        str(tmp_path),
        "-q",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    run = tmp_path / "CartPole-v1__none__s0"
    assert "finished at step 400" in result.output and str(run) in result.output.replace("\n", "")
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "already holds a run" in again.output
    resumed = runner.invoke(app, ["train", "--resume", str(run), "-q"])
    assert resumed.exit_code == 0 and "finished at step 400" in resumed.output


def test_installed_executable(agent_ckpt: Path) -> None:
    exe = shutil.which("probe") or str(Path(sys.executable).parent / "probe")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and "analyze" in out.stdout
    bad = subprocess.run([exe, "analyze", "/no/such/file.pt"], capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "no such file" in bad.stderr and "Traceback" not in bad.stderr
    good = subprocess.run([exe, "analyze", str(agent_ckpt), "--json"], capture_output=True, text=True, check=False)
    assert good.returncode == 0 and json.loads(good.stdout)["kind"] == "agent"


def test_analyze_bad_input_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rest of docs/analyze.md's bad-input list through the CLI: one ``error:`` line, exit 2."""
    model = mlp()
    torch.save(model.state_dict(), tmp_path / "m.pt")
    inf = {k: v.clone() for k, v in model.state_dict().items()}
    inf["2.weight"][0, 0] = float("inf")
    torch.save(inf, tmp_path / "inf.pt")
    (tmp_path / "othernet.py").write_text(
        "from torch import nn\ndef make():\n    return nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))\n"
    )
    monkeypatch.chdir(tmp_path)  # --model finds modules in the current directory, as python -m does
    cases = [
        (["analyze", str(tmp_path)], "is a directory"),
        (["analyze", "inf.pt"], "holds NaN or Inf"),
        (["analyze", "m.pt", "--model", "othernet:make"], "--model does not match network 'model'"),
        (["analyze", "m.pt", "--model", "nosuchmodule:make"], "--model: cannot import 'nosuchmodule'"),
        (["analyze", "m.pt", "--hessian"], "--hessian needs a loss"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args)
        lines = [line for line in result.output.splitlines() if line.startswith("error")]
        assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], (args, result.output)
        assert "Traceback" not in result.output


def test_weight_report_distance_from_init_counts_parameters_not_running_statistics() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    init = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    model(torch.randn(16, 3) * 5 + 2)  # moves the running statistics only
    report = weight_report(model.state_dict(), init)
    assert report["1"].metrics["distance_from_init"] == 0.0
    assert report["1"].n_params == 8  # BatchNorm's weight and bias
    with torch.no_grad():
        model[1].weight[2] += 0.3
        model[0].bias[1] -= 0.4
    report = weight_report(model.state_dict(), init)
    assert report["1"].metrics["distance_from_init"] == pytest.approx(0.3, rel=1e-6)
    assert report["0"].metrics["distance_from_init"] == pytest.approx(0.4, rel=1e-6)
