"""The ``probe`` command: parse, call the library or the agent, render with rich."""

from __future__ import annotations

import inspect
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from cli.config_options import config_from_options, config_parameters
from cli.errors import DEBUG, fail, user_errors

app = typer.Typer(
    name="probe",
    help="Plasticity diagnostics for deep RL: train the reference DQN, analyze checkpoints, "
    "run the paper's sweeps and plot them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
console = Console()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")] = False,
) -> None:
    DEBUG["on"] = debug


def _progress(quiet: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:,.0f}/{task.total:,.0f}"),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        console=console,
        disable=quiet,
        transient=False,
    )


def train(
    *,
    out: Annotated[Path, typer.Option(help="Parent directory of the run directory.")] = Path("runs"),
    resume: Annotated[
        Path | None,
        typer.Option(help="Continue the run in this directory from its checkpoint, with its saved config "
                     "(the configuration options are then ignored)."),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar (for scripts).")] = False,
    **config: Any,
) -> None:
    """Train the reference DQN; results go to OUT/<run-name>/.

    Examples:

      probe train --env CartPole-v1

      probe train --env MountainCar-v0 --reg l2init --lam 0.01 --delta 1.25 --reg-every update

      probe train --resume runs/CartPole-v1__none__s0
    """
    from reference_agent.dqn import train as run_training

    if resume is not None:
        if not resume.is_dir():
            raise fail(f"--resume: {resume} is not a run directory")
        cfg, run_dir = None, resume
    else:
        cfg = config_from_options(config)
        run_dir = out / cfg.run_name
    with _progress(quiet) as progress:
        task = progress.add_task("train", total=cfg.total_steps if cfg else None, info="")

        def on_progress(step: int, total: int, info: dict[str, float]) -> None:
            text = f"{info['steps_per_s']:,.0f} steps/s"
            if "last_eval" in info:
                text += f"  eval {info['last_eval']:.1f}"
            progress.update(task, completed=step, total=total, info=text)

        result = run_training(cfg, run_dir, resume=resume is not None, progress=on_progress)
    last = f", last eval return {result.last_eval:.1f}" if result.last_eval is not None else ""
    console.print(f"{result.state} at step {result.step:,}{last}; results in {result.run_dir}")
    if result.state == "diverged":
        raise fail(result.message)
    if result.state == "interrupted":
        console.print(f"resume with: probe train --resume {result.run_dir}")
        raise typer.Exit(130)


_base = [p for p in inspect.signature(train).parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
train.__signature__ = inspect.Signature([*_base, *config_parameters()])  # type: ignore[attr-defined]
train.__annotations__ = {p.name: p.annotation for p in train.__signature__.parameters.values()}  # type: ignore[attr-defined]
app.command(no_args_is_help=False)(user_errors(train))


class Preset(str, Enum):
    paper = "paper"
    paper_lunarlander = "paper-lunarlander"
    paper_cartpole = "paper-cartpole"
    paper_mountaincar = "paper-mountaincar"


@app.command()
@user_errors
def sweep(
    preset: Annotated[Preset | None, typer.Option(help="One of the paper's grids.")] = None,
    grid: Annotated[Path | None, typer.Option(help="JSON/TOML file of field = [values].")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="A grid axis key=v1,v2 (repeatable).")
    ] = None,
    seeds: Annotated[int, typer.Option(min=1, help="Seeds per configuration.")] = 2,
    steps: Annotated[int | None, typer.Option(help="Override total_steps of every run.")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Parallel worker processes.")] = 2,
    out: Annotated[Path | None, typer.Option(help="Sweep directory (default sweeps/<preset or custom>).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Run a grid of training runs in parallel; rerun to resume (finished runs are skipped).

    Examples:

      probe sweep --preset paper-cartpole --workers 2

      probe sweep --set env_id=CartPole-v1 --set reg=l2,l2init --set delta=1,1.25 --steps 30000
    """
    from reference_agent import sweep as sw

    axes: dict[str, list[Any]] = {}
    if grid is not None:
        axes.update(sw.load_grid_file(grid))
    axes.update(sw.parse_sets(set_ or []))
    if preset is not None and axes:
        raise fail("give either --preset or a custom grid (--grid/--set), not both")
    if preset is None and not axes:
        raise fail("give --preset NAME, --grid FILE or --set key=v1,v2")
    if preset is not None:
        configs = sw.PRESETS[preset.value](seeds)
    else:
        configs = sw.expand_grid(axes, seeds)
    if steps is not None:
        configs = [type(c).from_dict({**c.to_dict(), "total_steps": steps}) for c in configs]
    out = out or Path("sweeps") / (preset.value if preset else "custom")
    console.print(f"{len(configs)} runs → {out}")
    with _progress(quiet) as progress:
        task = progress.add_task("sweep", total=None, info="")

        def on_progress(done: int, total: int, runs_done: int, runs_total: int) -> None:
            progress.update(task, completed=done, total=total, info=f"runs {runs_done}/{runs_total}")

        outcomes = sw.run_sweep(configs, out, workers=workers, progress=on_progress)
    failed = [o for o in outcomes if o.state != "finished"]
    for o in failed:
        console.print(f"[red]{o.run}[/]: {o.state}: {o.message}", highlight=False)
    console.print(f"{len(outcomes) - len(failed)}/{len(outcomes)} runs finished; results in {out}")
    if failed:
        raise typer.Exit(1)


def main() -> None:
    app()
