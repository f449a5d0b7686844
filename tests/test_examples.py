"""The examples run as a user would run them (short budgets)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_example(script: str, out: Path, *args: str) -> tuple[str, list[dict[str, Any]]]:
    """Run ``examples/<script>`` with ``--out out``; its stdout and the plasticity rows it wrote."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *args, "--out", str(out)],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (out / "plasticity.jsonl").read_text().splitlines()]
    return result.stdout, rows


def test_cleanrl_style_example(tmp_path: Path) -> None:
    stdout, rows = run_example(
        "cleanrl_style_dqn.py", tmp_path, "--total-steps", "1200", "--learning-starts", "400", "--probe-every", "400"
    )
    assert {r["step"] for r in rows} == {400, 800, 1200}
    assert {r["layer"] for r in rows} == {"0", "2", "4", "network"}
    assert "penultimate effective rank" in stdout


def test_sb3_example(tmp_path: Path) -> None:
    stdout, rows = run_example("sb3_dqn.py", tmp_path, "--timesteps", "600", "--probe-every", "200")
    assert "time/" not in stdout and len(stdout.splitlines()) == 2  # quiet by default: a summary only
    header = (tmp_path / "progress.csv").read_text().splitlines()[0]
    assert "plasticity/q_net/q_net.2/effective_rank" in header and "train/penalty" in header
    assert {r["step"] for r in rows} == {200, 400, 600}


@pytest.mark.slow
def test_sb3_example_learns_cartpole(tmp_path: Path) -> None:
    """The default settings (50k steps, λ = 1e-4) measured 469.5 ± 31.5 greedy return (10 episodes,
    seed 0) and 500.0 ± 0.0 (seed 1); CartPole-v1's maximum is 500, a random policy gets about 20."""
    stdout, _ = run_example("sb3_dqn.py", tmp_path)
    greedy = float(stdout.split("episodes: ")[1].split()[0])
    assert greedy >= 400, stdout
