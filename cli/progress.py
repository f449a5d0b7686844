"""The progress bars of ``probe train`` and ``probe sweep``: steps done, a free-text field, and the
time left estimated from the gradient steps (``UpdateClock``)."""

from __future__ import annotations

import time
from collections.abc import Callable

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn
from rich.text import Text


class StepsColumn(ProgressColumn):
    """``done/total`` with thousands separators; ``?`` while the total is unknown."""

    def render(self, task: Task) -> Text:
        total = f"{task.total:,.0f}" if task.total is not None else "?"
        return Text(f"{task.completed:,.0f}/{total}")


class RemainingColumn(ProgressColumn):
    """The task's ``remaining_s`` field as ``h:mm:ss``; ``-:--:--`` while it is None (unknown)."""

    def render(self, task: Task) -> Text:
        seconds = task.fields.get("remaining_s")
        if seconds is None:
            return Text("-:--:--", style="progress.remaining")
        hours, rest = divmod(round(seconds), 3600)
        return Text(f"{hours}:{rest // 60:02d}:{rest % 60:02d}", style="progress.remaining")


class UpdateClock:
    """Time left = gradient steps still to take × seconds per gradient step, measured from the first
    report with a gradient step in this process.

    A DQN's environment steps before ``learning_starts`` only act and store, far faster than the
    steps with an update (the README's CartPole run, 2026-12-07: its first 20,000 steps at 13,400
    per second, all 100,000 at 1,840), so a rate over environment steps (rich's own estimate)
    showed 2 minutes left at 722,000 of the paper preset's 5,000,000 steps, in a sweep of 23
    minutes. Unknown (None) until two reports with gradient steps are in; started again when the
    count falls."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._first: tuple[float, int] | None = None

    def remaining(self, updates: int, updates_total: int) -> float | None:
        now = self._clock()
        if updates <= 0:
            return None
        if self._first is None or updates < self._first[1]:
            self._first = (now, updates)
            return None
        start, first_updates = self._first
        if updates == first_updates:
            return None
        return (now - start) / (updates - first_updates) * max(0, updates_total - updates)


def progress_bar(console: Console, quiet: bool) -> Progress:
    """The bar of a long command: ``description``, bar, steps, the ``info`` field (each task needs
    it), time left (the ``remaining_s`` field; unknown while absent or None)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        StepsColumn(),
        TextColumn("{task.fields[info]}", markup=False),
        RemainingColumn(),
        console=console,
        disable=quiet,
        transient=False,
    )
