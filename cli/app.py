"""The ``probe`` command: parse, call the library or the agent, render with rich."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from cli.config_options import config_from_options, config_parameters, config_warnings
from cli.errors import DEBUG, INTERRUPTED, fail, user_errors, warn
from cli.progress import UpdateClock, progress_bar

app = typer.Typer(
    name="probe",
    help="Plasticity diagnostics for deep RL: train the reference DQN, analyze checkpoints, "
    "run the paper's sweeps and plot them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
console = Console()


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"probe (plasticity-probe) {version('plasticity-probe')}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")] = False,
    show_version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    DEBUG["on"] = debug


def say(text: str) -> None:
    """Print a line that contains user data (paths, names) verbatim: never read as markup."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)  # paths stay copyable


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
    device: Annotated[str, typer.Option(help="torch device of the networks and updates: cpu, cuda, cuda:1…")] = "cpu",
    **config: Any,
) -> None:
    """Train the reference DQN; results go to OUT/<run-name>/.

    Examples:

      probe train --env CartPole-v1

      probe train --env MountainCar-v0 --reg l2init --lam 0.01 --delta 1.25 --reg-every update

      probe train --resume runs/CartPole-v1__none__s0
    """
    from reference_agent import rundir
    from reference_agent.engine import EngineOptions
    from reference_agent.engine import train as run_training

    if resume is not None:  # checked before the progress bar starts: a wrong path gets one line
        if not resume.is_dir() or not any((resume / f).exists() for f in (rundir.CONFIG, rundir.CHECKPOINT)):
            raise fail(f"--resume: {resume} is not a run directory")
        if (resume / rundir.CONFIG).exists():
            rundir.read_config(resume)  # a malformed config.json: one line, before the bar too
        cfg, run_dir = None, resume
    else:
        cfg = config_from_options(config)
        run_dir = out / cfg.run_name
        for text in config_warnings(cfg):
            warn(text)
    with progress_bar(console, quiet) as progress:
        task = progress.add_task("train", total=cfg.total_steps if cfg else None, info="", remaining_s=None)
        clock = UpdateClock()

        def on_progress(step: int, total: int, info: dict[str, float]) -> None:
            text = f"{info['steps_per_s']:,.0f} steps/s"
            if "last_eval" in info:
                text += f"  eval {info['last_eval']:.1f}"
            remaining = clock.remaining(int(info["updates"]), int(info["updates_total"]))
            progress.update(task, completed=step, total=total, info=text, remaining_s=remaining)

        options = EngineOptions(device=_check_device(device))
        result = run_training(cfg, run_dir, resume=resume is not None, progress=on_progress, options=options)
    for text in result.warnings:
        warn(text)
    last = f", last eval return {result.last_eval:.1f}" if result.last_eval is not None else ""
    say(f"{result.state} at step {result.step:,}{last}; results in {result.run_dir}")
    if result.state == "diverged":
        raise fail(result.message)
    if result.state == "interrupted":
        say(f"resume with: probe train --resume {result.run_dir}")
        raise typer.Exit(INTERRUPTED)


_base = [
    p
    for p in inspect.signature(train, eval_str=True).parameters.values()
    if p.kind is not inspect.Parameter.VAR_KEYWORD
]
train.__signature__ = inspect.Signature([*_base, *config_parameters()])  # type: ignore[attr-defined]
train.__annotations__ = {p.name: p.annotation for p in train.__signature__.parameters.values()}  # type: ignore[attr-defined]
app.command(no_args_is_help=False)(user_errors(train))


def _check_device(device: str) -> str:
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise fail(f"--device: {device!r} is not a torch device (cpu, cuda, cuda:1…)") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise fail("--device cuda: no CUDA GPU is available to torch on this machine")
    return device


class Engine(str, Enum):
    batched = "batched"
    process = "process"


class Backend(str, Enum):
    local = "local"
    ray = "ray"


class Preset(str, Enum):
    smoke = "smoke"
    paper = "paper"
    paper_lunarlander = "paper-lunarlander"
    paper_cartpole = "paper-cartpole"
    paper_mountaincar = "paper-mountaincar"
    paper5 = "paper5"
    definitive = "definitive"
    alternatives = "alternatives"


@app.command()
@user_errors
def sweep(
    preset: Annotated[
        Preset | None,
        typer.Option(
            help="One of the paper's grids; smoke: paper-cartpole in 5,000 steps (a minute); paper5: paper with "
            "5 seeds; definitive: the rerun that settles the claims (paper grids with 10 seeds on LunarLander "
            "and CartPole, 5 on MountainCar, plus alternatives); alternatives: authors'-code variants, L2 δ=1, "
            "ReDo, Shrink & Perturb."
        ),
    ] = None,
    grid: Annotated[Path | None, typer.Option(help=escape("JSON/TOML file of field = [values]."))] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="A grid axis key=v1,v2 (repeatable); with --preset, overrides its runs."),
    ] = None,
    seeds: Annotated[
        int | None,
        typer.Option(min=1, help="Seeds per configuration (default: 2; 5 for paper5, definitive, alternatives)."),
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Steps of every run; the step intervals (learning starts, target updates, evaluation, "
            "probes, checkpoints) scale with it unless set with --set.",
        ),
    ] = None,
    workers: Annotated[int, typer.Option(min=1, help="Parallel worker processes (local backend).")] = 2,
    engine: Annotated[
        Engine,
        typer.Option(
            help="batched: runs sharing environment, network shape and step settings train in lockstep in one "
            "process (split over the workers); process: one process per run."
        ),
    ] = Engine.batched,
    backend: Annotated[
        Backend, typer.Option(help="local: a process pool on this machine; ray: tasks on a Ray cluster.")
    ] = Backend.local,
    address: Annotated[
        str | None,
        typer.Option(help="Ray cluster address HOST:PORT (backend ray; default: a Ray instance on this machine)."),
    ] = None,
    device: Annotated[str, typer.Option(help="torch device of the networks and updates: cpu, cuda…")] = "cpu",
    out: Annotated[Path | None, typer.Option(help="Sweep directory (default sweeps/<preset or custom>).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar (for scripts).")] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List the runs and their step settings; run nothing.")
    ] = False,
) -> None:
    """Run a grid of training runs in parallel; rerun to resume (finished runs are skipped).

    Examples:

      probe sweep --preset smoke

      probe sweep --preset paper-cartpole --workers 2

      probe sweep --preset definitive --out sweeps/definitive

      probe sweep --preset paper-cartpole --steps 20000 --set lam=0.001,0.01

      probe sweep --set env_id=CartPole-v1 --set reg=l2,l2init --set delta=1,1.25 --steps 30000

      probe sweep --preset paper --backend ray --address 10.0.0.5:6379
    """
    from reference_agent.experiments import sweep as sw

    axes: dict[str, list[Any]] = {}
    if address is not None and backend is not Backend.ray:
        raise fail("--address is for --backend ray")
    if grid is not None:
        axes.update(sw.load_grid_file(grid))
    axes.update(sw.parse_sets(set_ or []))
    if preset is None and not axes:
        raise fail("give --preset NAME, --grid FILE or --set key=v1,v2")
    if preset is not None:
        n_seeds = seeds if seeds is not None else sw.PRESET_SEEDS.get(preset.value, 2)
        configs = sw.apply_grid(sw.PRESETS[preset.value](n_seeds), axes)
    else:
        configs = sw.expand_grid(axes, seeds if seeds is not None else 2)
    if steps is not None:
        configs = [sw.scale_steps(c, steps, keep=axes) for c in configs]
    for text in sorted({w for c in configs for w in config_warnings(c)}):
        warn(text)
    out = out or Path("sweeps") / (preset.value if preset else "custom")
    say(f"{len(configs)} runs → {out}")
    if backend is not Backend.ray:
        device = _check_device(device)
    batches = sw.plan_batches(configs, workers, engine.value)
    say(f"{len(batches)} batch(es) ({engine.value} engine, {backend.value} backend)")
    if dry_run:
        for c in configs:
            budget = f"{c.total_steps:,} steps, learning starts {c.learning_starts}, τ {c.target_update_period}"
            say(f"  {c.run_name}: {budget}")
        return
    interrupted = False
    with progress_bar(console, quiet) as progress:
        task = progress.add_task("sweep", total=None, info="", remaining_s=None)
        clock = UpdateClock()

        def on_progress(at: sw.SweepProgressReport) -> None:
            progress.update(
                task,
                completed=at.steps,
                total=at.steps_total,
                info=f"finished {at.runs_finished}/{at.runs_total}",
                remaining_s=clock.remaining(at.updates, at.updates_total),
            )

        try:
            outcomes = sw.run_sweep(
                configs,
                out,
                workers=workers,
                progress=on_progress,
                engine=engine.value,
                backend=backend.value,
                address=address,
                device=device,
            )
        except sw.SweepInterrupted as stop:
            outcomes, interrupted = stop.outcomes, True
    for o in outcomes:
        for text in o.warnings:
            warn(f"{o.run}: {text}")
    failed = [o for o in outcomes if o.state != "finished"]
    for o in failed:
        console.print(Text.assemble((o.run, "red"), f": {o.state}: {o.message}"), highlight=False)
    say(f"{len(outcomes) - len(failed)}/{len(configs)} runs finished; results in {out}")
    if interrupted:
        say("rerun the same command to resume")
        raise typer.Exit(INTERRUPTED)
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
    gradients: Annotated[
        bool,
        typer.Option(
            "--gradients",
            help="Add gradient norms, gradient-to-weight ratios and GraMa dormancy of the TD loss "
            "(reference-agent checkpoints).",
        ),
    ] = False,
    json_: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    max_memory: Annotated[
        float, typer.Option(min=0.001, help="GiB a checkpoint may make the analysis allocate (hostile files).")
    ] = 2.0,
) -> None:
    """Plasticity read-out of a checkpoint: agent checkpoints, torch state dicts, SB3 zips,
    safetensors. Files are loaded with weights_only=True; pickles that could run code are refused,
    and sizes are checked before anything is allocated.

    Examples:

      probe analyze runs/CartPole-v1__none__s0/checkpoint.pt --hessian --gradients

      probe analyze cleanrl_dqn.cleanrl_model --obs observations.npy

      probe analyze early/checkpoint.pt late/checkpoint.pt
    """
    import json

    from reference_agent.analysis import analyze as run_analysis
    from reference_agent.analysis import diff as run_diff

    if len(checkpoints) > 2:
        raise fail("give one checkpoint, or two to compare")
    max_bytes = int(max_memory * 1024**3)
    results = [
        run_analysis(p, obs=obs, model=model, hessian=hessian, gradients=gradients, max_bytes=max_bytes)
        for p in checkpoints
    ]
    if len(results) == 2:
        rows = run_diff(*results)
        if not rows:
            raise fail("the two checkpoints share no network and layer to compare")
        if json_:
            typer.echo(json.dumps({"a": str(checkpoints[0]), "b": str(checkpoints[1]), "rows": rows}, indent=2))
            return
        table = Table(title=Text(f"{checkpoints[0]} → {checkpoints[1]}"))
        for col in ("network", "l", "layer", "metric", "a", "b", "b − a"):
            table.add_column(col, justify="left" if col in ("network", "layer", "metric") else "right")
        for r in rows:
            table.add_row(
                Text(r["network"]),
                str(r["index"]),
                Text(r["layer"]),
                Text(r["metric"]),
                *(f"{r[k]:.4g}" for k in ("a", "b", "delta")),
            )
        console.print(table)
        return
    result = results[0]
    if json_:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    for note in result.notes:
        console.print(Text(note, style="dim"), highlight=False)
    for name, report in result.reports.items():
        orientation = "layer" if console.width >= report.table_width() else "metric"
        console.print(report.table(title=f"{name} — {result.path}", rows=orientation))
        for note in report.notes:
            say(f"  {note}")


@app.command(name="diff")
@user_errors
def diff_cmd(
    a: Annotated[Path, typer.Argument(help="The earlier checkpoint.")],
    b: Annotated[Path, typer.Argument(help="The later checkpoint.")],
    json_: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Compare two checkpoints layer by layer (the same as: probe analyze A B).

    Example:

      probe diff runs/early/checkpoint.pt runs/late/checkpoint.pt
    """
    analyze([a, b], obs=None, model=None, hessian=False, gradients=False, json_=json_, max_memory=2.0)


def _ci(row: dict[str, Any], name: str) -> str:
    point, low, high = row[f"final_{name}"], row[f"final_{name}_low"], row[f"final_{name}_high"]
    return f"{point:.1f} [{low:.1f}, {high:.1f}]" if low is not None else f"{point:.1f} (1 seed)"


SUMMARY_COLUMNS = ("env", "config", "seeds", "final IQM [95% CI]", "final mean [95% CI]", "best", "best at step")


def _summary_title(window: int) -> str:
    return (
        f"final return = mean evaluation return over the last {window} evaluations: IQM and mean over seeds "
        "[95 % bootstrap CI]; best = max of the SMA-smoothed mean curve ± half-range over seeds"
    )


def _summary_cells(rows: list[dict[str, Any]]) -> list[list[str]]:
    return [
        [
            r["env"],
            r["config"],
            str(r["seeds"]),
            _ci(r, "iqm"),
            _ci(r, "mean"),
            f"{r['best_mean']:.1f} ± {r['best_spread']:.1f}",
            f"{r['best_step']:,}",
        ]
        for r in rows
    ]


def _summary_table(rows: list[dict[str, Any]], window: int) -> Table:
    table = Table(title=_summary_title(window))
    for col in SUMMARY_COLUMNS:
        table.add_column(col, justify="left" if col in ("env", "config") else "right")
    for cells in _summary_cells(rows):
        table.add_row(*(Text(c) for c in cells))
    return table


def _one_format(json_: bool, markdown: bool) -> None:
    if json_ and markdown:
        raise fail("--json and --markdown: choose one")


def _markdown(columns: Sequence[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured Markdown table (line breaks inside a cell become ``<br>``, ``|`` is
    escaped)."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(map(cell, columns)) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(map(cell, r)) + " |" for r in rows]
    return "\n".join(lines)


def _read_runs(dirs: list[Path]) -> list[Any]:
    """The runs in ``dirs``, each file's malformed records reported in a warning line."""
    from reference_agent.experiments import results

    runs = results.find_runs(dirs)
    for run in runs:
        for problem in run.problems:
            warn(problem)
    return runs


@app.command()
@user_errors
def summarize(
    dirs: Annotated[list[Path], typer.Argument(help="Run or sweep directories.")],
    smooth: Annotated[int, typer.Option(min=1, help="Simple-moving-average window, in evaluations.")] = 3,
    csv_out: Annotated[Path | None, typer.Option("--csv", help="Also write the table to this CSV file.")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print a Markdown table instead.")] = False,
) -> None:
    """Final return per configuration (mean over the last SMOOTH evaluations): IQM and mean over
    seeds with 95 % stratified bootstrap confidence intervals, and the best smoothed return.

    Example:

      probe summarize sweeps/paper-cartpole
    """
    import json

    from reference_agent.experiments import results

    _one_format(json_, markdown)
    rows = results.summarize(results.group_curves(_read_runs(dirs), smooth))
    if not rows:
        raise fail("the runs have no evaluation results yet")
    if csv_out is not None:
        results.write_csv(csv_out, rows)
    if json_:
        typer.echo(json.dumps(rows, indent=2))
    elif markdown:
        typer.echo(_markdown(SUMMARY_COLUMNS, _summary_cells(rows)))
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
    curvature) with 95 % bootstrap bands over seeds, and write summary.csv, curves.csv,
    plasticity.csv and runs.csv (one row per run: its final return and end-of-training metrics)
    beside them.

    Example:

      probe plot sweeps/paper --out docs/figures
    """
    from reference_agent.experiments import plots, results

    runs = _read_runs(dirs)
    written = plots.plot_runs(runs, out, smooth)
    rows = results.summarize(results.group_curves(runs, smooth))
    results.write_csv(out / "summary.csv", rows)
    results.write_csv(out / "curves.csv", results.curve_rows(runs))
    results.write_csv(out / "plasticity.csv", results.plasticity_rows(runs))
    results.write_csv(out / "runs.csv", results.run_rows(runs, smooth))
    if rows:
        console.print(_summary_table(rows, smooth))
    say(f"{len(written)} figures and 4 CSV files in {out}")


class DecisionStatistic(str, Enum):
    poi = "poi"
    iqm = "iqm"
    mean = "mean"


@app.command()
@user_errors
def claims(
    dirs: Annotated[list[Path], typer.Argument(help="Sweep or run directories (the paper presets).")],
    last: Annotated[
        int, typer.Option(min=1, help="k: a run's final return is its mean evaluation return over the last k.")
    ] = 3,
    statistic: Annotated[
        DecisionStatistic,
        typer.Option(help="What a comparison is decided on: probability of improvement, or IQM / mean difference."),
    ] = DecisionStatistic.poi,
    min_seeds: Annotated[int, typer.Option(min=2, help="Seeds a configuration needs to take part in a verdict.")] = 5,
    min_updates: Annotated[
        int,
        typer.Option(
            min=1, help="Gradient steps a run needs (a run of the paper: 80,000); lower it to exercise the code."
        ),
    ] = 80_000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap resampling.")] = 0,
    json_: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print a Markdown table instead.")] = False,
) -> None:
    """Decide the paper's claims from 95 % stratified bootstrap confidence intervals over seeds:
    supported, not supported, inconclusive, or no data (with the reason). Runs that never took
    a gradient step or took fewer than --min-updates are left out (with a warning); a
    configuration needs --min-seeds seeds. The rule is in docs/reproduction.md.

    Examples:

      probe claims sweeps/definitive

      probe claims sweeps/paper5 --statistic iqm --json

      probe claims sweeps/smoke --min-updates 1000 --min-seeds 3   # exercises the code, tests nothing
    """
    import dataclasses
    import json

    from reference_agent.experiments.claims_intervals import Rules, check_claims, refuse

    _one_format(json_, markdown)
    rules = Rules(min_seeds=min_seeds, min_updates=min_updates, last=last, statistic=statistic.value, seed=seed)
    runs, left_out = refuse(_read_runs(dirs), rules)
    for text in left_out:
        warn(text)
    verdicts = check_claims(runs, rules)
    if json_:
        typer.echo(json.dumps([dataclasses.asdict(v) for v in verdicts], indent=2))
        return
    columns = ("claim", "verdict", "statistic [95% CI]", "evidence")
    cells = [
        [
            v.claim,
            f"{v.verdict}\n({v.caveat})" if v.caveat else v.verdict,
            f"{v.estimate:.3g} [{v.low:.3g}, {v.high:.3g}]\n{v.statistic}" if v.estimate is not None else "",
            v.evidence,
        ]
        for v in verdicts
    ]
    if markdown:
        typer.echo(_markdown(columns, cells))
        return
    table = Table(title="the paper's claims against these runs (rule: docs/reproduction.md)", show_lines=True)
    for col in columns:
        table.add_column(col)
    for row in cells:
        table.add_row(*(Text(c) for c in row))
    console.print(table)
