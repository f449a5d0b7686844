"""Sweeps on a Ray cluster: each batch of runs is one Ray task (``ray.remote``); Ray places and
runs them, this module submits them and collects their outcomes into the sweep directory.

Requirements (docs/reference-agent.md, "Sweeps on Ray"): ``pip install 'plasticity-probe[ray]'``
on the driver and on every node, and a sweep directory on a filesystem every node sees at the
same path (NFS, or one machine): tasks write their run directories there, as local workers do.
A task whose worker dies (killed, out of memory, node lost) leaves its runs ``failed`` with
their last checkpoints; rerunning the sweep resumes them. Tasks are not retried by Ray
(``max_retries=0``) so that a crashing run cannot loop.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from reference_agent.config import DQNConfig
from reference_agent.experiments import sweep


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ImportError("the Ray backend needs Ray: pip install 'plasticity-probe[ray]'") from None
    return ray


def _train_task(
    configs: list[dict[str, Any]], run_dirs: list[str], device: str
) -> list[tuple[str, str, str, list[str]]]:
    """The body of a Ray task: one batch, outcomes as plain tuples."""
    return [(o.run, o.state, o.message, o.warnings) for o in sweep.train_runs(configs, run_dirs, device)]


def run_batches_on_ray(
    batches: list[list[DQNConfig]],
    out_dir: Path,
    address: str | None,
    device: str,
    record: Callable[[list[sweep.RunOutcome]], None],
    report_progress: Callable[[], None],
    poll_s: float,
) -> None:
    """Submit every batch as a task (one CPU per torch thread, one GPU with ``device="cuda"``)
    and record outcomes as tasks end. Ctrl-C cancels the tasks, which checkpoint and end their
    runs ``interrupted``."""
    ray = _ray()
    out_dir = out_dir.resolve()
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, include_dashboard=False, configure_logging=False)
    pending: dict[Any, list[DQNConfig]] = {}
    for batch in batches:
        task = ray.remote(_train_task).options(
            num_cpus=batch[0].threads,
            num_gpus=1 if device.startswith("cuda") else 0,
            max_retries=0,
            name=f"probe-sweep:{batch[0].run_name}" + (f"+{len(batch) - 1}" if len(batch) > 1 else ""),
        )
        ref = task.remote([c.to_dict() for c in batch], [str(out_dir / c.run_name) for c in batch], device)
        pending[ref] = batch

    def collect(timeout: float) -> None:
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=timeout)
        for ref in ready:
            batch = pending.pop(ref)
            try:
                outcomes = [sweep.RunOutcome(*o) for o in ray.get(ref)]
            except ray.exceptions.RayError as err:
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                message = f"Ray task lost ({type(err).__name__}: {first}); rerun the sweep to resume this run"
                outcomes = sweep._lost(batch, out_dir, message)
            record(outcomes)

    try:
        while pending:
            collect(poll_s)
            report_progress()
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref)  # a KeyboardInterrupt in the task: its runs checkpoint and stop
        while pending:
            collect(poll_s)
        report_progress()
        raise sweep._Interrupted from None
