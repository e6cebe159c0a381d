"""``mlpipe sweep``: hyperparameter search, one checked MLflow run per trial."""

from __future__ import annotations

import click

from mlpipe.cli.group import TRACKING_URI_HELP, cli
from mlpipe.cli.run import echo_checks


@cli.command(context_settings={"show_default": True})
@click.argument("project", required=False)
@click.option("-e", "--entry-point", help="Entry point of each trial [default: main].")
@click.option(
    "-P",
    "--param",
    "params",
    multiple=True,
    metavar="KEY=VALUE",
    help="A fixed parameter of every trial; repeat for more.",
)
@click.option(
    "--space",
    "space",
    multiple=True,
    metavar="NAME=EXPR",
    help="A searched parameter: loguniform(a,b), uniform(a,b), float(a,b[,step=s][,log=true]), "
    "int(a,b[,step=k]) or choice(x,y,...); repeat for more "
    "[default: the MLproject's mlpipe.sweep.space].",
)
@click.option("--trials", type=int, help="Trials to run in all, over every worker.")
@click.option("--parallel", type=int, help="Trials at a time in this worker [default: 1].")
@click.option("--study", help="Study name [default: <project>-<UTC time>].")
@click.option(
    "--storage",
    metavar="URL",
    help="Optuna storage [default: sqlite mlpipe-sweeps.db beside the local tracking store]; "
    "postgresql://user@host/db for many machines.",
)
@click.option("--metric", help="Metric to optimise [default: mlpipe.primary_metric].")
@click.option("--goal", type=click.Choice(["max", "min"]), help="Maximise or minimise it.")
@click.option(
    "--pruner",
    type=click.Choice(["median", "hyperband", "none"]),
    help="Stop hopeless trials early, from the metric they log per step [default: median].",
)
@click.option("--sampler", type=click.Choice(["tpe", "random"]), help="[default: tpe]")
@click.option("--timeout", metavar="DURATION", help="Start no trial after this (90s, 30m, 2h).")
@click.option("--register", is_flag=True, help="Register the best trial's model (mlpipe.model).")
@click.option("--gpus", metavar="IDS", help="One trial per listed GPU at a time, e.g. 0,1,2,3.")
@click.option("--resume", is_flag=True, help="Continue the stopped --study where it stopped.")
@click.option("--join", metavar="NAME", help="Add this machine as a worker of study NAME.")
@click.option("--experiment", help="Experiment [default: the MLproject's name].")
@click.option("--tracking-uri", help=TRACKING_URI_HELP)
@click.option(
    "--env-manager",
    type=click.Choice(["local", "uv", "virtualenv", "conda"]),
    default="local",
    help="Where each trial's command runs.",
)
@click.option("--version", "version", metavar="REF", help="Git branch, tag or commit to run.")
def sweep(
    project: str | None,
    entry_point: str | None,
    params: tuple[str, ...],
    space: tuple[str, ...],
    trials: int | None,
    parallel: int | None,
    study: str | None,
    storage: str | None,
    metric: str | None,
    goal: str | None,
    pruner: str | None,
    sampler: str | None,
    timeout: str | None,
    register: bool,
    gpus: str | None,
    resume: bool,
    join: str | None,
    experiment: str | None,
    tracking_uri: str | None,
    env_manager: str,
    version: str | None,
) -> None:
    """Search hyperparameters of PROJECT with Optuna: a parent run, one child run per trial.

    The space is checked against the entry point's declared types and choices before
    anything is created. Each trial runs like `mlpipe run` (its own process group, dataset
    tags, KILLED on Ctrl-C); hopeless trials are pruned from the metric they log per step.
    Workers on other machines join with --join and share the study in PostgreSQL.

    \b
    Examples:
      mlpipe sweep projects/seg3d -e train --space 'lr=loguniform(1e-4,1e-2)' \\
          --space 'model=choice(unet,segresnet)' --trials 20 --parallel 2
      mlpipe sweep projects/seg3d -e train --trials 40 --study lr-search \\
          --storage postgresql://optuna@db.lab:5432/optuna
      mlpipe sweep --join lr-search --storage postgresql://optuna@db.lab:5432/optuna
    """
    from mlpipe.sweep.driver import run_sweep
    from mlpipe.sweep.plan import SweepRequest, plan_sweep
    from mlpipe.sweep.results import summary_lines, table_header, table_row, table_widths

    request = SweepRequest(
        project=project,
        entry_point=entry_point,
        params=params,
        space=space,
        trials=trials,
        parallel=parallel,
        study=study,
        storage=storage,
        metric=metric,
        goal=goal,
        pruner=pruner,
        sampler=sampler,
        timeout=timeout,
        register=register,
        gpus=gpus,
        resume=resume,
        join=join,
        experiment=experiment,
        tracking_uri=tracking_uri,
        env_manager=env_manager,
        version=version,
    )
    plan = plan_sweep(request)
    header = table_header(plan.space, plan.metric)
    widths = table_widths(plan.space, plan.metric)

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    def on_row(row) -> None:
        click.echo(line(table_row(row, plan.space)))

    try:
        echo_checks(plan.base)
        click.echo(
            f"Sweep {plan.study_name}: {plan.trials} trials of {plan.base.entry_point.name}, "
            f"{plan.metric} ({plan.goal}), pruner {plan.pruner}, {plan.parallel} at a time"
        )
        click.echo(line(header))
        outcome = run_sweep(plan, echo=lambda msg: click.echo(msg, err=True), on_row=on_row)
    finally:
        plan.base.source.cleanup()
    if not outcome.complete:
        click.echo(f"Stopped at --timeout; continue with --resume --study {plan.study_name}.")
    if outcome.finalized is not None:
        for text in summary_lines(outcome.finalized, plan.metric):
            click.echo(text)
    elif outcome.complete:
        click.echo(f"Sweep {plan.study_name} is complete (another worker closed it).")
    click.echo(
        f"Parent run: {outcome.parent_run_id}. Trials: mlpipe compare --sweep {plan.study_name}"
    )
