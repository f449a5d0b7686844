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
        typer.Option(
            help="Continue the run in this directory from its checkpoint, with its saved config "
            "(the configuration options are then ignored)."
        ),
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


_base = [
    p
    for p in inspect.signature(train, eval_str=True).parameters.values()
    if p.kind is not inspect.Parameter.VAR_KEYWORD
]
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
    set_: Annotated[list[str] | None, typer.Option("--set", help="A grid axis key=v1,v2 (repeatable).")] = None,
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
    configs = sw.PRESETS[preset.value](seeds) if preset is not None else sw.expand_grid(axes, seeds)
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


@app.command()
@user_errors
def analyze(
    checkpoints: Annotated[list[Path], typer.Argument(help="One checkpoint, or two to compare layer by layer.")],
    obs: Annotated[
        Path | None, typer.Option(help="Observations (.npy or .pt, shape N×obs_dim) for activation metrics.")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Architecture as module:factory (factory() returns the nn.Module).")
    ] = None,
    hessian: Annotated[
        bool, typer.Option("--hessian", help="Add TD-loss curvature (reference-agent checkpoints).")
    ] = False,
    json_: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Plasticity read-out of a checkpoint: agent checkpoints, torch state dicts, SB3 zips,
    safetensors. Files are loaded with weights_only=True; pickles that could run code are refused.

    Examples:

      probe analyze runs/CartPole-v1__none__s0/checkpoint.pt --hessian

      probe analyze cleanrl_dqn.cleanrl_model --obs observations.npy

      probe analyze early/checkpoint.pt late/checkpoint.pt
    """
    import json

    from reference_agent.analysis import analyze as run_analysis
    from reference_agent.analysis import diff as run_diff

    if len(checkpoints) > 2:
        raise fail("give one checkpoint, or two to compare")
    results = [run_analysis(p, obs=obs, model=model, hessian=hessian) for p in checkpoints]
    if len(results) == 2:
        rows = run_diff(*results)
        if not rows:
            raise fail("the two checkpoints share no network and layer to compare")
        if json_:
            typer.echo(json.dumps({"a": str(checkpoints[0]), "b": str(checkpoints[1]), "rows": rows}, indent=2))
            return
        from rich.table import Table

        table = Table(title=f"{checkpoints[0]} → {checkpoints[1]}")
        for col in ("network", "l", "layer", "metric", "a", "b", "b − a"):
            table.add_column(col, justify="left" if col in ("network", "layer", "metric") else "right")
        for r in rows:
            table.add_row(
                r["network"], str(r["index"]), r["layer"], r["metric"], *(f"{r[k]:.4g}" for k in ("a", "b", "delta"))
            )
        console.print(table)
        return
    result = results[0]
    if json_:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    for note in result.notes:
        console.print(f"[dim]{note}[/]", highlight=False)
    for name, report in result.reports.items():
        orientation = "layer" if console.width >= report.table_width() else "metric"
        console.print(report.table(title=f"{name} — {result.path}", rows=orientation))
        for note in report.notes:
            console.print(f"  {note}", highlight=False)


@app.command(name="diff")
@user_errors
def diff_cmd(
    a: Annotated[Path, typer.Argument(help="The earlier checkpoint.")],
    b: Annotated[Path, typer.Argument(help="The later checkpoint.")],
    json_: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Compare two checkpoints layer by layer (same as ``probe analyze A B``)."""
    analyze([a, b], obs=None, model=None, hessian=False, json_=json_)


def _summary_table(rows: list[dict[str, Any]], window: int) -> Any:
    from rich.table import Table

    table = Table(title=f"evaluation return, SMA {window}: mean ± half-range over seeds")
    for col in ("env", "config", "seeds", "final", "best", "best at step"):
        table.add_column(col, justify="left" if col in ("env", "config") else "right")
    for r in rows:
        table.add_row(
            r["env"],
            r["config"],
            str(r["seeds"]),
            f"{r['final_mean']:.1f} ± {r['final_spread']:.1f}",
            f"{r['best_mean']:.1f} ± {r['best_spread']:.1f}",
            f"{r['best_step']:,}",
        )
    return table


@app.command()
@user_errors
def summarize(
    dirs: Annotated[list[Path], typer.Argument(help="Run or sweep directories.")],
    smooth: Annotated[int, typer.Option(min=1, help="Simple-moving-average window, in evaluations.")] = 3,
    csv_out: Annotated[Path | None, typer.Option("--csv", help="Also write the table to this CSV file.")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Final and best smoothed evaluation return per configuration, over seeds.

    Example:

      probe summarize sweeps/paper-cartpole
    """
    import json

    from reference_agent import results

    rows = results.summarize(results.group_curves(results.find_runs(dirs), smooth))
    if not rows:
        raise fail("the runs have no evaluation results yet")
    if csv_out is not None:
        results.write_csv(csv_out, rows)
    if json_:
        typer.echo(json.dumps(rows, indent=2))
    else:
        console.print(_summary_table(rows, smooth))


@app.command()
@user_errors
def plot(
    dirs: Annotated[list[Path], typer.Argument(help="Run or sweep directories.")],
    out: Annotated[Path, typer.Option(help="Where the figures (PNG and SVG) and CSV summaries go.")] = Path("figures"),
    smooth: Annotated[int, typer.Option(min=1, help="Simple-moving-average window, in evaluations.")] = 3,
) -> None:
    """Draw the paper's figures (evaluation return, δ × frequency, per-layer plasticity, Q-values,
    curvature) and write summary.csv, curves.csv and plasticity.csv beside them.

    Example:

      probe plot sweeps/paper --out docs/figures
    """
    from reference_agent import plots, results

    runs = results.find_runs(dirs)
    written = plots.plot_runs(runs, out, smooth)
    rows = results.summarize(results.group_curves(runs, smooth))
    results.write_csv(out / "summary.csv", rows)
    results.write_csv(out / "curves.csv", results.curve_rows(runs))
    results.write_csv(out / "plasticity.csv", results.plasticity_rows(runs))
    if rows:
        console.print(_summary_table(rows, smooth))
    console.print(f"{len(written)} figures and 3 CSV files in {out}")


@app.command()
@user_errors
def claims(
    dirs: Annotated[list[Path], typer.Argument(help="Sweep or run directories (the paper presets).")],
    smooth: Annotated[int, typer.Option(min=1, help="Simple-moving-average window, in evaluations.")] = 3,
    json_: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Check the paper's claims against finished runs: supported, not supported or inconclusive.

    Example:

      probe claims sweeps/paper
    """
    import dataclasses
    import json

    from rich.table import Table

    from reference_agent import results
    from reference_agent.claims import check_claims

    verdicts = check_claims(results.find_runs(dirs), smooth)
    if not verdicts:
        raise fail("no runs of the paper's environments with evaluations found")
    if json_:
        typer.echo(json.dumps([dataclasses.asdict(v) for v in verdicts], indent=2))
        return
    table = Table(title="the paper's claims against these runs", show_lines=True)
    for col in ("claim", "verdict", "evidence"):
        table.add_column(col)
    for v in verdicts:
        table.add_row(v.claim, v.verdict, v.evidence)
    console.print(table)
