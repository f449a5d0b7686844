"""Issue 15: the CLI, run directories, sweeps and ``probe analyze`` against new users and hostile input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import tiny_config
from torch import nn
from typer.testing import CliRunner

import plasticity_probe as pp
from cli.app import app
from plasticity_probe.checkpoints import CheckpointError, load_checkpoint
from reference_agent import rundir
from reference_agent.checkpoint import load_checkpoint as load_agent_checkpoint
from reference_agent.config import DQNConfig
from reference_agent.engine import train
from reference_agent.experiments import sweep

runner = CliRunner()
PROBE = shutil.which("probe") or str(Path(sys.executable).parent / "probe")
TINY_ARGS = [
    "--env",
    "CartPole-v1",
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
    "--checkpoint-every",
    "200",
    "--hidden-sizes",
    "8,8",
]
TINY_GRID = {
    "env_id": "CartPole-v1",
    "total_steps": 300,
    "learning_starts": 100,
    "batch_size": 16,
    "eval_every": 100,
    "eval_episodes": 1,
    "probe_every": 100,
    "checkpoint_every": 100,
    "hidden_sizes": [[8, 8]],
}


def errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error")]


def wait_for(predicate: Any, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise TimeoutError("condition not reached")
        time.sleep(0.1)


def status(run: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((run / "status.json").read_text()))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


# ---- the CLI --------------------------------------------------------------------------------------
def test_train_resume_and_sweep_with_progress_bars(tmp_path: Path) -> None:
    first = runner.invoke(app, ["train", *TINY_ARGS, "--steps", "300", "--out", str(tmp_path)])
    assert first.exit_code == 0, first.output
    run = tmp_path / "CartPole-v1__none__s0"
    resumed = runner.invoke(app, ["train", "--resume", str(run)])  # progress bar on, total unknown at first
    assert resumed.exit_code == 0, resumed.output
    assert "finished at step 300" in resumed.output and "Traceback" not in resumed.output
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps(TINY_GRID))
    swept = runner.invoke(
        app, ["sweep", "--grid", str(grid), "--seeds", "1", "--workers", "1", "--out", str(tmp_path / "s")]
    )
    assert swept.exit_code == 0, swept.output
    assert "1/1 runs finished" in swept.output


def test_a_sweep_prints_and_records_what_its_runs_warned(tmp_path: Path) -> None:
    """A run's warnings reach the sweep's terminal, with the run's name, and ``sweep.json``: here
    a stale temporary file in a run directory (a process killed while writing), removed when the
    sweep's worker process starts the run."""
    from reference_agent.experiments.sweep import expand_grid, load_grid_file

    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps(TINY_GRID))
    out = tmp_path / "s"
    name = expand_grid(load_grid_file(grid), seeds=1)[0].run_name
    (out / name).mkdir(parents=True)
    (out / name / ".metrics.jsonl.tmp").write_text('{"step": 1')
    swept = runner.invoke(app, ["sweep", "--grid", str(grid), "--seeds", "1", "--workers", "1", "--out", str(out)])
    assert swept.exit_code == 0, swept.output
    text = "removed .metrics.jsonl.tmp, left by a process killed while writing"
    assert f"warning: {name}: {text}" in " ".join(swept.output.split())
    assert json.loads((out / "sweep.json").read_text())["outcomes"][name]["warnings"] == [text]
    assert not (out / name / ".metrics.jsonl.tmp").exists()


def test_deliberate_errors_print_one_line() -> None:
    result = runner.invoke(app, ["train", "--resume", "/no/such/run"])
    assert result.exit_code == 2
    assert errors(result.output) == ["error: --resume: /no/such/run is not a run directory"]
    assert "error: 2" not in result.output


def test_ctrl_c_on_train_exits_130_with_the_resume_command(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [PROBE, "train", *TINY_ARGS, "--steps", "200000", "--learning-starts", "100000", "--out", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    run = tmp_path / "CartPole-v1__none__s0"
    wait_for(lambda: status(run).get("state") == "running")
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
    assert "error" not in err and "Traceback" not in err
    assert f"resume with: probe train --resume {run}" in out
    assert status(run)["state"] == "interrupted"


def test_ctrl_c_on_a_sweep_stops_workers_without_tracebacks(tmp_path: Path) -> None:
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({**TINY_GRID, "total_steps": 200_000, "learning_starts": 100_000, "seed": [0, 1]}))
    out_dir = tmp_path / "s"
    proc = subprocess.Popen(
        [PROBE, "sweep", "--grid", str(grid), "--workers", "2", "--out", str(out_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal gives it
        # and SIGINT handled as a terminal gives it: an xdist worker ignores SIGINT, and an ignored
        # signal is inherited (Python then installs no KeyboardInterrupt handler)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    runs = [out_dir / DQNConfig(**{**TINY_GRID, "hidden_sizes": (8, 8), "seed": s}).run_name for s in (0, 1)]
    wait_for(lambda: all(status(r).get("state") == "running" for r in runs))
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole process group
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert all(status(r)["state"] == "interrupted" for r in runs)
    # the workers ignore the terminal's SIGINT and stop on the sweep's SIGTERM: the same stop for all
    assert all(status(r)["message"].startswith("stopped by SIGTERM at step") for r in runs), [status(r) for r in runs]
    assert "rerun the same command to resume" in out


def test_ctrl_c_on_a_sweep_starts_no_queued_runs(tmp_path: Path) -> None:
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({**TINY_GRID, "total_steps": 200_000, "learning_starts": 100_000, "seed": [0, 1, 2]}))
    out_dir = tmp_path / "s"
    proc = subprocess.Popen(
        [PROBE, "sweep", "--grid", str(grid), "--engine", "process", "--workers", "1", "--out", str(out_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as a terminal gives it
    )
    runs = [out_dir / DQNConfig(**{**TINY_GRID, "hidden_sizes": (8, 8), "seed": s}).run_name for s in (0, 1, 2)]
    wait_for(lambda: status(runs[0]).get("state") == "running")
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
    assert status(runs[0])["state"] == "interrupted"
    assert not any((r / "status.json").exists() for r in runs[1:])  # queued, never started
    outcomes = json.loads((out_dir / "sweep.json").read_text())["outcomes"]
    assert set(outcomes) == {runs[0].name}


def test_claims_leave_out_runs_without_gradient_steps_and_mark_short_ones(tmp_path: Path) -> None:
    from test_sweep_plots import fake_sweep

    fake_sweep(tmp_path, env="CartPole-v1")
    never = tmp_path / "never"
    shutil.copytree(next(tmp_path.glob("CartPole-v1__none__s0")), never)
    cfg = json.loads((never / "config.json").read_text())
    cfg["config"]["learning_starts"] = 20_000
    (never / "config.json").write_text(json.dumps(cfg))
    args = ["claims", str(tmp_path), str(never), "--json", "--min-updates", "1000", "--min-seeds", "2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "never took a gradient step (stopped at step 3,000, learning starts at 20,000)" in result.output
    verdicts = json.loads(result.output[result.output.index("[") :])
    cartpole = next(v for v in verdicts if v["claim"].startswith("CartPole"))
    assert cartpole["caveat"].startswith("too short to test: 4/4 runs with as few as 2,501 gradient steps")


def test_train_warns_when_it_would_never_learn(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["train", *TINY_ARGS, "--steps", "50", "--eval-every", "50", "--out", str(tmp_path), "-q"]
    )
    assert result.exit_code == 0, result.output
    assert "warning: --learning-starts 100 >= --steps 50: the run never takes a gradient step" in result.output


def test_quick_presets_scale_and_combine_with_set() -> None:
    quick = sweep.scale_steps(DQNConfig(), 3000)
    assert (quick.total_steps, quick.learning_starts, quick.target_update_period, quick.eval_every) == (
        3000,
        600,
        30,
        150,
    )
    assert sweep.scale_steps(DQNConfig(hessian_every=0), 3000).hessian_every == 0
    smoke = sweep.PRESETS["smoke"](2)
    assert {c.total_steps for c in smoke} == {5000} and all(c.learning_starts == 1000 for c in smoke)
    result = runner.invoke(
        app, ["sweep", "--preset", "paper-cartpole", "--steps", "3000", "--set", "lam=0.001,0.1", "--dry-run"]
    )
    assert result.exit_code == 0, result.output
    assert "12 runs" in result.output
    listed = [line for line in result.output.splitlines() if "__" in line]
    assert len(listed) == 12 and all("learning starts 600" in line for line in listed)


def test_help_text_and_version() -> None:
    sweep_help = runner.invoke(app, ["sweep", "--help"], env={"COLUMNS": "200"})
    assert "field = [values]" in sweep_help.output
    train_help = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert "``" not in train_help.output and "total_steps" in train_help.output
    diff_help = runner.invoke(app, ["diff", "--help"], env={"COLUMNS": "200"})
    assert "probe diff runs/early/checkpoint.pt runs/late/checkpoint.pt" in diff_help.output
    version = runner.invoke(app, ["--version"])
    assert version.exit_code == 0 and version.output.startswith("probe (plasticity-probe) ")


@pytest.mark.parametrize(("flag", "value"), [("--lam", "nan"), ("--delta", "inf"), ("--learning-rate", "nan")])
def test_non_finite_settings_are_refused_by_flag(tmp_path: Path, flag: str, value: str) -> None:
    result = runner.invoke(app, ["train", flag, value, "--out", str(tmp_path), "-q"])
    assert result.exit_code == 2
    assert errors(result.output) == [
        f"error: invalid config: {flag} must be a finite number " + (">= 0" if flag == "--lam" else "> 0")
    ]
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="finite"):
        pp.SuccessiveRegularizer(
            nn.Linear(2, 2),
            "l2",
            lam=float(value) if flag == "--lam" else 0.1,
            delta=float(value) if flag != "--lam" else 1.0,
        )


def test_markup_in_user_data_is_printed_verbatim(tmp_path: Path) -> None:
    sd = {"[/]odd.weight": torch.randn(3, 4), "[conceal]secret.weight": torch.randn(2, 3)}
    path = tmp_path / "[red]x[conceal]"
    path.mkdir()
    torch.save(sd, path / "m.pt")
    result = runner.invoke(app, ["analyze", str(path / "m.pt")], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "[/]odd" in result.output and "[conceal]secret" in result.output and "[red]x[conceal]" in result.output
    env = runner.invoke(app, ["train", "--env", "[/]Bad[conceal]-v0", "--out", str(tmp_path), "-q"])
    assert env.exit_code == 2 and "[/]Bad[conceal]-v0" in env.output and "Traceback" not in env.output
    missing = runner.invoke(app, ["analyze", str(tmp_path / "[conceal]gone.pt")])
    assert missing.exit_code == 2 and "[conceal]gone.pt: no such file" in missing.output


# ---- run directories and sweeps -------------------------------------------------------------------
def test_a_second_writer_is_refused(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from reference_agent import rundir; from pathlib import Path\n"
            "with rundir.lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(60)",
            str(tmp_path / "CartPole-v1__none__s0"),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        result = runner.invoke(app, ["train", *TINY_ARGS, "--steps", "300", "--out", str(tmp_path), "-q"])
        assert result.exit_code == 2
        assert errors(result.output) == [
            f"error: {tmp_path / 'CartPole-v1__none__s0'}: another process is writing this run directory "
            "(lock .lock held)"
        ]
        assert not (tmp_path / "CartPole-v1__none__s0" / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    assert runner.invoke(app, ["train", *TINY_ARGS, "--steps", "300", "--out", str(tmp_path), "-q"]).exit_code == 0


def flip_bit_in_tensor(path: Path, tensor: torch.Tensor) -> None:
    raw = bytearray(path.read_bytes())
    at = raw.index(tensor.numpy().tobytes()[:32])
    raw[at + 5] ^= 0x10
    path.write_bytes(bytes(raw))


def test_a_flipped_bit_is_caught_on_load(tmp_path: Path) -> None:
    result = train(tiny_config(total_steps=400, learning_starts=200, checkpoint_every=200), tmp_path / "r")
    ckpt = result.run_dir / "checkpoint.pt"
    flip_bit_in_tensor(ckpt, torch.load(ckpt, weights_only=True)["online"]["net.2.weight"])
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_agent_checkpoint(ckpt)
    resumed = runner.invoke(app, ["train", "--resume", str(result.run_dir), "-q"])
    assert resumed.exit_code == 2 and len(errors(resumed.output)) == 1 and "checksum mismatch" in resumed.output
    analyzed = runner.invoke(app, ["analyze", str(ckpt)])
    assert analyzed.exit_code == 2 and "fails its CRC-32 check" in analyzed.output


def test_checksum_survives_a_round_trip_and_catches_rewrites(tmp_path: Path) -> None:
    result = train(tiny_config(total_steps=400, learning_starts=200, checkpoint_every=200), tmp_path / "r")
    ckpt = result.run_dir / "checkpoint.pt"
    data = torch.load(ckpt, weights_only=True)
    assert data["version"] == 3 and len(data["checksum"]) == 64
    data["online"]["net.2.weight"][0, 0] += 1.0  # rewritten with valid zip CRCs: only the checksum notices
    torch.save(data, ckpt)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_checkpoint(ckpt)


def test_a_killed_worker_fails_its_run_and_the_others_finish(tmp_path: Path) -> None:
    import multiprocessing

    victim = tiny_config(total_steps=100_000, learning_starts=90_000, hidden_sizes=(8, 8), seed=7)
    others = [
        tiny_config(total_steps=300, learning_starts=100, batch_size=16, hidden_sizes=(8, 8), seed=s) for s in (0, 1)
    ]
    killed: list[int] = []

    def progress(_: sweep.SweepProgressReport) -> None:
        if not killed and status(tmp_path / victim.run_name).get("state") == "running":
            child = next(p for p in multiprocessing.active_children() if p.name == victim.run_name)
            assert child.pid is not None
            os.kill(child.pid, signal.SIGKILL)
            killed.append(child.pid)

    outcomes = {
        o.run: o for o in sweep.run_sweep([victim, *others], tmp_path, workers=2, progress=progress, poll_s=0.2)
    }
    assert killed
    assert outcomes[victim.run_name].state == "failed"
    assert "worker process lost (killed by SIGKILL)" in outcomes[victim.run_name].message
    assert all(outcomes[c.run_name].state == "finished" for c in others)
    assert status(tmp_path / victim.run_name)["state"] == "failed"


def test_rerunning_a_sweep_resumes_a_killed_run_exactly(tmp_path: Path) -> None:
    import multiprocessing

    victim = tiny_config(total_steps=6000, learning_starts=100, batch_size=16, hidden_sizes=(8, 8), seed=7)
    assert train(victim, tmp_path / "alone").state == "finished"  # the uninterrupted run
    killed: list[int] = []

    def progress(_: sweep.SweepProgressReport) -> None:
        if not killed and (tmp_path / "s" / victim.run_name / "checkpoint.pt").exists():
            child = next(p for p in multiprocessing.active_children() if p.name == victim.run_name)
            assert child.pid is not None
            os.kill(child.pid, signal.SIGKILL)
            killed.append(child.pid)

    first = sweep.run_sweep([victim], tmp_path / "s", progress=progress, poll_s=0.1)
    assert killed and first[0].state == "failed", first
    stopped_at = status(tmp_path / "s" / victim.run_name)["step"]
    assert 0 < stopped_at < 6000
    again = sweep.run_sweep([victim], tmp_path / "s", poll_s=0.1)
    assert again[0].state == "finished", again
    for name in (rundir.METRICS, rundir.PLASTICITY):
        assert (tmp_path / "s" / victim.run_name / name).read_text() == (tmp_path / "alone" / name).read_text()


def test_workers_stop_when_the_sweep_process_dies(tmp_path: Path) -> None:
    cfg = tiny_config(total_steps=200_000, learning_starts=100_000, hidden_sizes=(8, 8))
    script = (
        "import sys; from pathlib import Path; from reference_agent.experiments import sweep\n"
        "from reference_agent.config import DQNConfig\nimport json\n"
        "sweep.run_sweep([DQNConfig.from_dict(json.loads(sys.argv[1]))], Path(sys.argv[2]))"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script, json.dumps(cfg.to_dict()), str(tmp_path)],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    run = tmp_path / cfg.run_name
    wait_for(lambda: status(run).get("state") == "running")
    parent.kill()
    parent.wait()
    wait_for(lambda: status(run).get("state") == "interrupted", timeout=60)  # the orphan checkpointed and stopped


BAD_LINES = b'[1,2,3]\n{"step": "abc", "kind": "eval", "return_mean": 1.0}\n\xff\xfe{"step": 5}\n'


def test_malformed_records_are_skipped_and_reported(tmp_path: Path) -> None:
    from test_sweep_plots import fake_sweep

    fake_sweep(tmp_path / "s")
    run = next((tmp_path / "s").iterdir())
    with (run / "metrics.jsonl").open("ab") as f:
        f.write(BAD_LINES)
    summary = runner.invoke(app, ["summarize", str(tmp_path / "s")])
    assert summary.exit_code == 0, summary.output
    assert f"warning: {run / 'metrics.jsonl'}: skipped 3 malformed record(s) (line 7, 8, 9)" in summary.output
    pytest.importorskip("matplotlib", reason="needs the plot extra")
    plotted = runner.invoke(app, ["plot", str(tmp_path / "s"), "--out", str(tmp_path / "f")])
    assert plotted.exit_code == 0 and "skipped 3 malformed" in plotted.output


def test_resume_drops_malformed_records_and_stale_temporaries(tmp_path: Path) -> None:
    cfg = tiny_config(total_steps=800, checkpoint_every=400)
    stopped = train(cfg, tmp_path / "r", progress=lambda s, *_: s == 400 and os.kill(os.getpid(), signal.SIGINT))
    assert stopped.state == "interrupted"
    with (tmp_path / "r" / "metrics.jsonl").open("ab") as f:
        f.write(BAD_LINES)
    litter = tmp_path / "r" / ".checkpoint.pt.abc123.tmp"  # what SIGKILL during a write leaves
    litter.write_bytes(b"partial")
    resumed = train(None, tmp_path / "r", resume=True)
    assert resumed.state == "finished" and not litter.exists()
    assert any("removed .checkpoint.pt.abc123.tmp" in w for w in resumed.warnings)
    assert any("skipped 3 malformed record(s)" in w for w in resumed.warnings)
    assert not rundir.read_jsonl(tmp_path / "r" / "metrics.jsonl").bad_lines
    assert not list((tmp_path / "r").glob(".*.tmp"))


def test_sigint_during_the_last_step_still_finishes(tmp_path: Path) -> None:
    cfg = tiny_config(total_steps=600)
    result = train(cfg, tmp_path / "r", progress=lambda s, t, _: s == t and os.kill(os.getpid(), signal.SIGINT))
    assert result.state == "finished" and result.step == 600
    assert status(tmp_path / "r")["state"] == "finished"


def test_a_full_disk_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = tempfile.mkstemp

    def full_disk(*args: Any, **kwargs: Any) -> tuple[int, str]:
        fd, name = real(*args, **kwargs)
        if ".checkpoint.pt." in name:
            os.close(fd)
            fd = os.open("/dev/full", os.O_WRONLY)
        return fd, name

    monkeypatch.setattr(rundir.tempfile, "mkstemp", full_disk)
    result = runner.invoke(app, ["train", *TINY_ARGS, "--steps", "300", "--out", str(tmp_path), "-q"])
    assert result.exit_code == 2
    run = tmp_path / "CartPole-v1__none__s0"
    assert errors(result.output) == [
        f"error: cannot write {run / 'checkpoint.pt'}: No space left on device (the previous file is kept)"
    ]
    assert status(run)["state"] == "failed"


def test_a_failed_checkpoint_write_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real, writes = tempfile.mkstemp, []

    def full_disk_from_the_second(*args: Any, **kwargs: Any) -> tuple[int, str]:
        fd, name = real(*args, **kwargs)
        if ".checkpoint.pt." in name:
            writes.append(name)
            if len(writes) > 1:
                os.close(fd)
                fd = os.open("/dev/full", os.O_WRONLY)
        return fd, name

    monkeypatch.setattr(rundir.tempfile, "mkstemp", full_disk_from_the_second)
    result = runner.invoke(app, ["train", *TINY_ARGS, "--steps", "300", "--out", str(tmp_path), "-q"])
    assert result.exit_code == 2 and len(writes) == 2, result.output
    run = tmp_path / "CartPole-v1__none__s0"
    assert load_agent_checkpoint(run / "checkpoint.pt")["step"] == 200  # the first, intact (checksum verified)
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()
    resumed = runner.invoke(app, ["train", "--resume", str(run), "-q"])
    assert resumed.exit_code == 0, resumed.output
    assert status(run)["state"] == "finished" and load_agent_checkpoint(run / "checkpoint.pt")["step"] == 300


# ---- probe analyze on hostile files --------------------------------------------------------------
def test_expanded_tensors_are_refused_before_materializing(tmp_path: Path) -> None:
    torch.save({"w.weight": torch.randn(1).expand(30000, 30000)}, tmp_path / "x.pt")
    assert (tmp_path / "x.pt").stat().st_size < 5000
    start = time.perf_counter()
    result = runner.invoke(app, ["analyze", str(tmp_path / "x.pt")])
    assert result.exit_code == 2 and "expanded or strided tensor" in result.output
    assert time.perf_counter() - start < 10


def test_an_agent_checkpoint_declaring_huge_layers_is_refused(tmp_path: Path) -> None:
    result = train(tiny_config(total_steps=400, learning_starts=200, checkpoint_every=200), tmp_path / "r")
    data = torch.load(result.run_dir / "checkpoint.pt", weights_only=True)
    data["config"]["hidden_sizes"] = [60000, 60000]
    del data["checksum"]
    data["version"] = 2
    torch.save(data, tmp_path / "huge.pt")
    analyzed = runner.invoke(app, ["analyze", str(tmp_path / "huge.pt")])
    assert analyzed.exit_code == 2
    assert "config declares hidden_sizes [60000, 60000] but network 'online' has weights" in analyzed.output


def test_inflating_zip_members_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("policy.pth", b"\0" * (8 * 1024**2))
    assert path.stat().st_size < 100_000
    with pytest.raises(CheckpointError, match="would inflate to 8 MiB, more than the 1 MiB limit"):
        load_checkpoint(path, max_bytes=1024**2)
    result = runner.invoke(app, ["analyze", str(path), "--max-memory", "0.001"])
    assert result.exit_code == 2 and "would inflate" in result.output


def test_misnamed_and_one_byte_files(tmp_path: Path) -> None:
    torch.save(nn.Linear(2, 2).state_dict(), tmp_path / "x.safetensors")
    ok = runner.invoke(app, ["analyze", str(tmp_path / "x.safetensors")])
    assert ok.exit_code == 0, ok.output
    (tmp_path / "one.pt").write_bytes(b"\x80")
    bad = runner.invoke(app, ["analyze", str(tmp_path / "one.pt")])
    assert bad.exit_code == 2 and errors(bad.output) and "truncated or corrupt" in bad.output
    assert "Traceback" not in bad.output


# ---- library edge cases ---------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::plasticity_probe.NonFiniteWarning")
def test_a_diverging_run_with_hessians_ends_diverged(tmp_path: Path) -> None:
    cfg = tiny_config(
        learning_rate=1e30,
        gamma=1.0,
        total_steps=1200,
        log_every=1000,
        checkpoint_every=1000,
        probe_every=50,
        hessian_every=50,
    )
    result = train(cfg, tmp_path / "d")
    assert result.state == "diverged", result.message
    assert status(tmp_path / "d")["state"] == "diverged"


def test_resume_of_a_directory_without_a_run_is_one_line_before_any_progress_bar(tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", "--resume", str(tmp_path)])
    assert result.exit_code == 2
    assert errors(result.output) == [f"error: --resume: {tmp_path} is not a run directory"]
    assert "train" not in result.output.replace(f"{tmp_path}", "")  # no progress bar was drawn


@pytest.mark.parametrize(
    ("grid", "expected"),
    [
        ({"total_steps": "abc"}, "total_steps must be an integer, not 'abc'"),
        ({"total_steps": 1.5}, "total_steps must be an integer, not 1.5"),
        ({"hidden_sizes": 8}, "hidden_sizes must be a list of integers, not 8"),
        ({"hidden_sizes": [[8, "a"]]}, "hidden_sizes must be a list of integers, not [8, 'a']"),
        ({"lam": ["x"]}, "lam must be a number, not 'x'"),
        ({"seed": [True]}, "seed must be an integer, not True"),
        ({"reg": "nope"}, "reg must be one of none, l2, l2init, singular, l1, not 'nope'"),
        ({"env_id": 3}, "env_id must be a string, not 3"),
    ],
)
def test_a_grid_value_of_the_wrong_type_is_one_line(tmp_path: Path, grid: dict[str, Any], expected: str) -> None:
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(grid))
    result = runner.invoke(app, ["sweep", "--grid", str(path), "--dry-run"])
    assert result.exit_code == 2, result.output
    assert errors(result.output) == [f"error: invalid config: {expected}"], result.output
    assert "Traceback" not in result.output


def test_a_set_value_of_the_wrong_type_is_one_line() -> None:
    result = runner.invoke(app, ["sweep", "--preset", "smoke", "--set", "total_steps=abc", "--dry-run"])
    assert result.exit_code == 2, result.output
    assert errors(result.output) == ["error: invalid config: total_steps must be an integer, not 'abc'"]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("[]", "holds no config"),
        ('{"config": []}', "holds no config"),
        ('{"config": {"total_steps": "x"}}', "config.json: invalid config: total_steps must be an integer, not 'x'"),
    ],
)
def test_resuming_a_run_whose_config_is_malformed_is_one_line(tmp_path: Path, content: str, expected: str) -> None:
    (tmp_path / "config.json").write_text(content)
    result = runner.invoke(app, ["train", "--resume", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert len(errors(result.output)) == 1 and expected in errors(result.output)[0], result.output
    assert (tmp_path / "config.json").read_text() == content  # nothing overwritten
    assert "train" not in result.output.replace(f"{tmp_path}", "")  # reported before any progress bar


def test_config_types_are_checked_and_json_numbers_coerced() -> None:
    cfg = DQNConfig(total_steps=1e5, lam=1, hidden_sizes=[32, 16.0], reg="l2", reg_layers=["net.0"])
    assert (cfg.total_steps, cfg.lam, cfg.hidden_sizes, cfg.reg_layers) == (100_000, 1.0, (32, 16), ("net.0",))
    assert type(cfg.total_steps) is int and type(cfg.lam) is float and type(cfg.hidden_sizes[1]) is int
    assert DQNConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="total_steps must be an integer, not True; lam must be a number, not None"):
        DQNConfig(total_steps=True, lam=None)  # type: ignore[arg-type]


def test_a_second_sweep_into_a_locked_sweep_directory_is_refused(tmp_path: Path) -> None:
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps(TINY_GRID))
    out_dir = tmp_path / "s"
    out_dir.mkdir()
    (out_dir / "sweep.json").write_text('{"written": "by the sweep holding the lock"}')
    with rundir.lock(out_dir, "sweep directory"):  # a sweep in progress (an OS lock on its own descriptor)
        result = runner.invoke(app, ["sweep", "--grid", str(grid), "--out", str(out_dir), "-q"])
    assert result.exit_code == 2, result.output
    assert errors(result.output) == [
        f"error: {out_dir}: another process is writing this sweep directory (lock .lock held)"
    ], result.output
    assert (out_dir / "sweep.json").read_text() == '{"written": "by the sweep holding the lock"}'
    assert sorted(p.name for p in out_dir.iterdir()) == [".lock", "sweep.json"]  # no run started


@pytest.mark.filterwarnings("ignore::plasticity_probe.NonFiniteWarning")
def test_a_diverging_train_exits_2_and_keeps_its_last_good_checkpoint(tmp_path: Path) -> None:
    args = [*TINY_ARGS, "--learning-rate", "1e30", "--gamma", "1", "--steps", "1200", "--checkpoint-every", "100"]
    result = runner.invoke(app, ["train", *args, "--out", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert len(errors(result.output)) == 1 and "TD loss became" in errors(result.output)[0], result.output
    run = next(tmp_path.iterdir())
    assert status(run)["state"] == "diverged"
    ckpt = load_agent_checkpoint(run / "checkpoint.pt")  # checksum verified
    assert 0 < ckpt["step"] < 1200
    for name in ("online", "target"):
        assert all(bool(torch.isfinite(t).all()) for t in ckpt[name].values())
    assert bool(torch.isfinite(ckpt["stats"]["sums"]).all())


def test_address_without_the_ray_backend_is_one_line_before_anything_else() -> None:
    result = runner.invoke(app, ["sweep", "--preset", "smoke", "--address", "127.0.0.1:6379", "--dry-run"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == ["error: --address is for --backend ray"]


def test_sweep_warns_when_its_runs_would_never_learn() -> None:
    result = runner.invoke(app, ["sweep", "--preset", "smoke", "--set", "learning_starts=6000", "--dry-run"])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning")]
    assert warnings == [
        "warning: --learning-starts 6,000 >= --steps 5,000: the run never takes a gradient step "
        "(no learning, no plasticity reports)"
    ], result.output


def test_sigterm_on_train_checkpoints_and_exits_130(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [PROBE, "train", *TINY_ARGS, "--steps", "200000", "--learning-starts", "100000", "--out", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    run = tmp_path / "CartPole-v1__none__s0"
    wait_for(lambda: status(run).get("state") == "running")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
    assert status(run)["state"] == "interrupted" and status(run)["message"].startswith("stopped by SIGTERM")
    assert load_agent_checkpoint(run / "checkpoint.pt")["step"] == status(run)["step"]


def test_a_run_checkpointed_with_one_transition_in_its_buffer(tmp_path: Path) -> None:
    """Stopped (or finished) after its first step, a run's buffer fields are one-element views
    with the row's stride, which a one-element tensor may keep while "contiguous": the checksum's
    byte view of them failed, so SIGTERM right after the start lost the run."""
    from plasticity_probe.checkpoints import content_digest

    rows = torch.arange(24, dtype=torch.float32).reshape(2, 12)
    strided = rows[:1, 8].long()  # shape (1,), stride (12,)
    assert strided.stride() == (12,) and content_digest(strided) == content_digest(strided.clone().contiguous())
    result = train(tiny_config(total_steps=1), tmp_path / "r")
    assert result.state == "finished", result.message
    ckpt = load_agent_checkpoint(tmp_path / "r" / "checkpoint.pt")  # checksum verified
    assert ckpt["step"] == 1 and ckpt["buffer"]["size"] == 1
