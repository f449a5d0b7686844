"""Sweeps on Ray: a local cluster started by the test on 127.0.0.1 inside a private network
namespace (``unshare -n``), so it can neither reach nor disturb anything else on the machine."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from helpers import TINY_RUN

ROOT = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).with_name("ray")

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray is not installed (extra 'ray')"),
    pytest.mark.skipif(
        shutil.which("unshare") is None or shutil.which("ip") is None or os.geteuid() != 0,
        reason="needs unshare and ip as root for a private network namespace",
    ),
]

DRIVER = """
import json, os, signal, sys
from pathlib import Path
from reference_agent.config import DQNConfig
from reference_agent.experiments import sweep

out, address, mode = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
tiny = json.loads(sys.argv[4])
long = mode in ("interrupt", "resume")  # the victim still trains when Ctrl-C comes
victim = DQNConfig(**{**tiny, "total_steps": 40_000 if long else 4000, "checkpoint_every": 500, "seed": 7})
others = [DQNConfig(**{**tiny, "total_steps": 600, "seed": s}) for s in (0, 1)]
killed = []
signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job starts with SIGINT ignored

def progress(*_):
    if mode not in ("kill", "interrupt") or killed or not (out / victim.run_name / "checkpoint.pt").exists():
        return
    if mode == "interrupt":  # Ctrl-C in the driver's terminal, once
        killed.append(os.getpid())
        os.kill(os.getpid(), signal.SIGINT)  # the KeyboardInterrupt is raised here
        return
    for pid in os.listdir("/proc"):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except (OSError, ValueError):
            continue
        if pid.isdigit() and "probe-sweep:" + victim.run_name in cmd:
            os.kill(int(pid), signal.SIGKILL)
            killed.append(int(pid))

try:
    outcomes = sweep.run_sweep([victim, *others], out, backend="ray", address=address, progress=progress, poll_s=0.2)
except sweep.SweepInterrupted as stop:
    outcomes, mode = stop.outcomes, "interrupted"
status = {o.run: json.loads((out / o.run / "status.json").read_text()) for o in outcomes}
ends = {o.run: [o.state, o.message] for o in outcomes}
print(json.dumps({"killed": killed, "mode": mode, "outcomes": ends, "status": status}))
"""


def _driver_result(path: Path) -> dict:
    """The driver's JSON line: Ray prints its own notices (a worker died…) on the driver's stdout,
    before or after it."""
    return json.loads(next(line for line in reversed(path.read_text().splitlines()) if line.startswith("{")))


def test_a_sweep_on_a_local_ray_cluster_collects_and_resumes_killed_runs(tmp_path: Path) -> None:
    port = 6400 + os.getpid() % 500
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    tiny = json.dumps({**TINY_RUN, "hidden_sizes": [8, 8], "batch_size": 16})
    out, stopped = tmp_path / "sweep", tmp_path / "stopped"
    run = " ".join(
        f"{sys.executable} {driver} {where} 127.0.0.1:{port} {mode} '{tiny}' > {tmp_path / mode}.json;"
        for where, mode in ((out, "kill"), (out, "rerun"), (stopped, "interrupt"), (stopped, "resume"))
    )
    ray_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Unix socket paths must stay under 108 bytes
    # the cluster lives and dies with `ray start --block` (its own processes, stopped by its pid);
    # in its own pid namespace, whose processes all die with it when the test times out
    script = textwrap.dedent(f"""
        set -e
        ip link set lo up
        {RAY} start --head --block --node-ip-address=127.0.0.1 --port={port} --num-cpus=2 \\
            --include-dashboard=false --temp-dir={ray_dir} > {tmp_path / "ray.log"} 2>&1 &
        head=$!
        trap 'kill $head; wait $head || true' EXIT
        for i in $(seq 60); do {RAY} status --address=127.0.0.1:{port} > /dev/null 2>&1 && break; sleep 1; done
        {RAY} status --address=127.0.0.1:{port} > /dev/null
        {run}
    """)
    try:
        proc = subprocess.run(
            ["unshare", "-n", "-p", "--mount-proc", "--kill-child", "bash", "-c", script],
            env=env,
            capture_output=True,
            text=True,
            timeout=480,
        )
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
    assert proc.returncode == 0, (proc.stdout, proc.stderr[-3000:])
    first, again = (_driver_result(tmp_path / f"{mode}.json") for mode in ("kill", "rerun"))
    victim = next(n for n in first["outcomes"] if n.endswith("__s7"))
    assert first["killed"], first
    assert first["outcomes"][victim][0] == "failed" and "Ray task lost" in first["outcomes"][victim][1]
    assert all(state == "finished" for n, (state, _) in first["outcomes"].items() if n != victim)
    assert again["outcomes"][victim][0] == "finished"
    assert all(message == "finished (skipped)" for n, (_, message) in again["outcomes"].items() if n != victim)
    status = json.loads((out / victim / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == 4000
    steps = [json.loads(line)["step"] for line in (out / victim / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[0] < 500  # resumed: the records from before the kill are kept
    record = json.loads((out / "sweep.json").read_text())
    assert set(record["outcomes"]) == set(first["outcomes"])

    # Ctrl-C in the driver cancels the tasks: the running run checkpoints and ends `interrupted`,
    # and a rerun resumes it
    interrupted, resumed = (_driver_result(tmp_path / f"{mode}.json") for mode in ("interrupt", "resume"))
    assert interrupted["mode"] == "interrupted", interrupted
    state, message = interrupted["outcomes"][victim]
    assert state == "interrupted" and message.startswith("stopped by SIGINT"), interrupted
    status = interrupted["status"][victim]
    assert status["state"] == "interrupted" and 0 < status["step"] < 40_000, status
    assert resumed["outcomes"][victim][0] == "finished" and resumed["status"][victim]["step"] == 40_000, resumed
    steps = [json.loads(line)["step"] for line in (stopped / victim / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[0] < status["step"]  # resumed: the records from before Ctrl-C are kept
