"""The examples run as a user would run them (short budgets)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cleanrl_style_example(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "cleanrl_style_dqn.py"),
            "--total-steps",
            "1200",
            "--learning-starts",
            "400",
            "--probe-every",
            "400",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in (tmp_path / "plasticity.jsonl").read_text().splitlines()]
    assert {r["step"] for r in rows} == {400, 800, 1200}
    assert {r["layer"] for r in rows} == {"0", "2", "4", "network"}
    assert "penultimate effective rank" in out.stdout


def test_sb3_example(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "sb3_dqn.py"),
            "--timesteps",
            "600",
            "--probe-every",
            "200",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    header = (tmp_path / "progress.csv").read_text().splitlines()[0]
    assert "plasticity/q_net/q_net.2/effective_rank" in header and "train/penalty" in header
    rows = [json.loads(line) for line in (tmp_path / "plasticity.jsonl").read_text().splitlines()]
    assert {r["step"] for r in rows} == {200, 400, 600}
