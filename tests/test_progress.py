"""The progress bars' time left: gradient steps counted as the engine takes them, the estimate
from a fake clock, its rendering, and the sweep's reports."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from helpers import tiny_config
from hypothesis import given
from hypothesis import strategies as st
from rich.progress import Progress

from cli.progress import RemainingColumn, UpdateClock
from reference_agent import rundir
from reference_agent.engine import train
from reference_agent.experiments import sweep


@pytest.mark.parametrize(
    ("learning_starts", "step", "expected"), [(5, 4, 0), (5, 5, 1), (5, 10, 6), (0, 3, 3), (1, 3, 3)]
)
def test_updates_by_hand_worked(learning_starts: int, step: int, expected: int) -> None:
    assert tiny_config(learning_starts=learning_starts).updates_by(step) == expected


def test_updates_reported_match_the_updates_the_engine_logged(tmp_path: Path) -> None:
    cfg = tiny_config(total_steps=700, learning_starts=250, log_every=50)
    seen: list[tuple[int, float, float]] = []
    result = train(
        cfg, tmp_path / "r", progress=lambda s, _, info: seen.append((s, info["updates"], info["updates_total"]))
    )
    assert result.state == "finished"
    logged = [r for r in rundir.read_jsonl(tmp_path / "r" / rundir.METRICS) if r["kind"] == "update"]
    assert sum(r["updates"] for r in logged) == 700 - 250 + 1  # one update per step from step 250 on
    for step, updates, total in seen:  # the reports agree with the log up to each report's step
        assert updates == sum(r["updates"] for r in logged if r["step"] <= step)  # logged before each report
        assert total == 451


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_update_clock_hand_worked() -> None:
    clock = FakeClock()
    eta = UpdateClock(clock)
    assert eta.remaining(0, 1000) is None  # before learning starts: unknown, whatever the steps' speed
    clock.now = 10.0
    assert eta.remaining(100, 1000) is None  # the first report with updates starts the clock
    clock.now = 14.0
    assert eta.remaining(300, 1000) == pytest.approx(4.0 / 200 * 700)  # 0.02 s per update, 700 left
    clock.now = 20.0
    assert eta.remaining(1000, 1000) == 0.0


def test_update_clock_restarts_when_the_count_falls() -> None:
    clock = FakeClock()
    eta = UpdateClock(clock)
    eta.remaining(500, 1000)
    clock.now = 1.0
    assert eta.remaining(200, 1000) is None  # fewer than before (another run's count): start again
    clock.now = 3.0
    assert eta.remaining(400, 1000) == pytest.approx(2.0 / 200 * 600)


@given(seconds=st.floats(0, 10 * 24 * 3600, allow_nan=False))
def test_remaining_column_is_h_mm_ss(seconds: float) -> None:
    progress = Progress()
    task_id = progress.add_task("x", remaining_s=seconds)
    task = progress.tasks[task_id]
    hours, minutes, secs = (int(p) for p in RemainingColumn().render(task).plain.split(":"))
    assert 0 <= minutes < 60 and 0 <= secs < 60
    assert hours * 3600 + minutes * 60 + secs == round(seconds)


def test_remaining_column_unknown() -> None:
    progress = Progress()
    task_id = progress.add_task("x", remaining_s=None)
    task = progress.tasks[task_id]
    assert RemainingColumn().render(task).plain == "-:--:--"


def test_sweep_reports_steps_and_updates(tmp_path: Path) -> None:
    configs = [tiny_config(total_steps=400, learning_starts=100, seed=s) for s in (0, 1)]
    reports: list[sweep.SweepProgressReport] = []
    outcomes = sweep.run_sweep(configs, tmp_path, progress=reports.append, poll_s=0.1)
    assert [o.state for o in outcomes] == ["finished", "finished"]
    assert reports[0].updates == 0 and reports[0].runs_finished == 0
    last = reports[-1]
    assert (last.steps, last.steps_total, last.runs_finished, last.runs_total) == (800, 800, 2, 2)
    assert last.updates == last.updates_total == 2 * (400 - 100 + 1)
    assert all(a.updates <= b.updates and a.steps <= b.steps for a, b in itertools.pairwise(reports))


def test_sweep_reports_an_ended_run_as_it_stands(tmp_path: Path) -> None:
    """A diverged run is not counted as finished, nor its steps as taken; nothing is left to do
    for it, so the last report has no updates to come (no time left is promised for it)."""
    bad = tiny_config(total_steps=400, learning_starts=100, seed=5, reg="l2", lam=1e38)  # λ‖θ‖² overflows
    good = tiny_config(total_steps=400, learning_starts=100, seed=6)
    reports: list[sweep.SweepProgressReport] = []
    outcomes = sweep.run_sweep([bad, good], tmp_path, progress=reports.append, poll_s=0.1)
    assert [o.state for o in outcomes] == ["diverged", "finished"]
    status = rundir.read_json(tmp_path / bad.run_name / rundir.STATUS)  # the input the report sums
    stopped = status["step"]
    assert status["state"] == "diverged" and 100 <= stopped < 400
    assert status["message"].startswith("penalty became inf by step")  # not the TD loss, still finite
    last = reports[-1]
    assert (last.runs_finished, last.runs_total, last.steps_total) == (1, 2, 800)
    assert last.steps == 400 + stopped
    assert last.updates == last.updates_total == (400 - 100 + 1) + (stopped - 100 + 1)
