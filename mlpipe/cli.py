"""The ``mlpipe`` command line: parses options, calls one use case, prints the result.

Only click and ``mlpipe.errors`` are imported here at module level; each command imports its
use case inside its body, so ``mlpipe --help`` starts without mlflow, torch or monai
(``tests/test_cli.py`` guards this). Errors become ``Error: ...`` and an exit code in one place.
"""

from __future__ import annotations

import json
import sys

import click

from mlpipe import __version__
from mlpipe.errors import MlpipeError

_ENV_MANAGERS = ["local", "uv", "virtualenv", "conda"]


class MlpipeGroup(click.Group):
    """Turns ``MlpipeError`` into ``Error: <message>`` and its exit code; Ctrl-C into 130.

    Anything else keeps its traceback: a bug should look like a bug. ``--debug`` re-raises.
    """

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MlpipeError as exc:
            if ctx.meta.get("mlpipe.debug"):
                raise
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            if ctx.meta.get("mlpipe.debug"):
                raise
            click.echo("Interrupted.", err=True)
            ctx.exit(130)


@click.group(cls=MlpipeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="mlpipe")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of short errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """mlpipe: MLflow done right for medical-imaging ML teams.

    Runs MLflow projects reproducibly and checked, tags every run with the data and
    preprocessing it used, and promotes models to production behind gates.
    """
    ctx.meta["mlpipe.debug"] = debug


@cli.command(context_settings={"show_default": True})
@click.argument("uri")
@click.option("-e", "--entry-point", default="main", help="Entry point to run.")
@click.option(
    "-P",
    "--param",
    "params",
    multiple=True,
    metavar="KEY=VALUE",
    help="A parameter of the entry point; repeat for more.",
)
@click.option(
    "--version",
    "version",
    metavar="REF",
    help="Git branch, tag or (short) commit to run; cloned into a temporary folder.",
)
@click.option(
    "--experiment",
    help="Experiment name [default: $MLFLOW_EXPERIMENT_NAME, then the MLproject's name].",
)
@click.option(
    "--tracking-uri",
    help="Tracking URI [default: $MLFLOW_TRACKING_URI, then "
    "mlpipe.yaml, then sqlite:///mlruns.db here].",
)
@click.option(
    "--env-manager",
    type=click.Choice(_ENV_MANAGERS),
    default="local",
    help="Where the command runs: this environment, or one MLflow builds.",
)
@click.option("--backend", type=click.Choice(["local", "kubernetes"]), default="local")
@click.option(
    "--backend-config",
    type=click.Path(dir_okay=False),
    help="JSON for --backend kubernetes (kube-job-template-path, repository-uri).",
)
@click.option("--gpus", is_flag=True, help="docker_env projects: pass -A gpus=all to docker.")
@click.option(
    "--dataset-version",
    help="Version of the dataset the dataset parameter names (tag mlpipe.dataset.version).",
)
@click.option("--run-name", help="Name of the run in the MLflow UI.")
@click.option(
    "--allow-extra-params",
    is_flag=True,
    help="Pass unknown parameters to the command as --name value, as mlflow run does.",
)
@click.option("--dry-run", is_flag=True, help="Check and print what would run; create nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan or the result as JSON.")
def run(
    uri: str,
    entry_point: str,
    params: tuple[str, ...],
    version: str | None,
    experiment: str | None,
    tracking_uri: str | None,
    env_manager: str,
    backend: str,
    backend_config: str | None,
    gpus: bool,
    dataset_version: str | None,
    run_name: str | None,
    allow_extra_params: bool,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Check a project and its parameters, then run it through MLflow Projects.

    URI is a project folder or a git URL (https://, ssh://, git@host:org/repo, file://),
    optionally with #subdir. Every -P is checked against the entry point's declared type
    before any run is created.

    \b
    Examples:
      mlpipe run projects/seg3d -P epochs=5
      mlpipe run https://github.com/org/repo#projects/seg3d --version v1.2 -e train
    """
    from mlpipe.runner import RunRequest, execute, plan_run

    request = RunRequest(
        uri=uri,
        entry_point=entry_point,
        params=params,
        version=version,
        experiment=experiment,
        tracking_uri=tracking_uri,
        env_manager=env_manager,
        backend=backend,
        backend_config=backend_config,
        gpus=gpus,
        dataset_version=dataset_version,
        allow_extra_params=allow_extra_params,
        run_name=run_name,
    )
    plan = plan_run(request)
    try:
        for finding in plan.project.warnings:
            click.echo(f"Warning: {finding}", err=True)
        if dry_run:
            _print_plan(plan.describe(), as_json)
            return
        outcome = execute(plan, echo=lambda msg: click.echo(msg, err=True))
    finally:
        plan.source.cleanup()
    if as_json:
        click.echo(json.dumps(outcome.__dict__, indent=2, default=str))
        return
    click.echo(f"Run {outcome.run_id} finished in experiment {outcome.experiment!r}.")
    for name, value in sorted(outcome.metrics.items()):
        click.echo(f"  {name} = {value:.6g}")
    if outcome.ui_link:
        click.echo(f"Open it: {outcome.ui_link}")
    elif outcome.tracking_uri.startswith("sqlite:"):
        click.echo(f"See it: mlflow ui --backend-store-uri {outcome.tracking_uri}")


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--name", help="Project name [default: the folder's name].")
def init(directory: str, name: str | None) -> None:
    """Create a new project in DIRECTORY from MLproject.template, following the conventions."""
    from mlpipe.scaffold import init_project

    created = init_project(directory, name=name)
    click.echo(f"Created {len(created)} files in {directory}:")
    for path in created:
        click.echo(f"  {path}")
    click.echo(f"Next: mlpipe validate {directory} && mlpipe run {directory}")


@cli.command()
@click.argument("directory", default=".", type=click.Path(file_okay=False))
def validate(directory: str) -> None:
    """Lint a project against the mlpipe conventions; exit 2 on errors."""
    from mlpipe.errors import ProjectError
    from mlpipe.project import iter_findings, load_project

    project = load_project(directory)
    findings = list(iter_findings(project))
    for finding in findings:
        click.echo(str(finding))
    errors = len(project.errors)
    kind = "convention 1" if project.is_convention else "foreign project (no mlpipe: section)"
    summary = f"{errors} error(s), {len(project.warnings)} warning(s); {kind}."
    if errors:
        raise ProjectError(summary)
    click.echo(f"OK: {summary}")


_TRACKING_URI_HELP = (
    "Tracking URI [default: $MLFLOW_TRACKING_URI, then mlpipe.yaml, then sqlite:///mlruns.db here]."
)


def _confirm(question: str, yes: bool) -> None:
    """Ask only on an interactive terminal; never wait for input when stdin is not a TTY."""
    if yes or not sys.stdin.isatty():
        return
    if not click.confirm(question, default=False):
        raise click.Abort()


@cli.command(context_settings={"show_default": True})
@click.argument("model")
@click.argument("version")
@click.option("--alias", default="production", help="The alias to move.")
@click.option(
    "--require",
    "requires",
    multiple=True,
    metavar="'METRIC>=X'",
    help="A gate on the source run's metrics (>=, >, <=, <, ==); repeat for more.",
)
@click.option("--metric", help="Compare on this metric [default: the run's primary metric].")
@click.option(
    "--goal",
    type=click.Choice(["max", "min"]),
    help="Whether --metric is better higher or lower [default: the run's goal].",
)
@click.option(
    "--allow-regression", is_flag=True, help="Promote even if worse than the current holder."
)
@click.option("--reason", help="Why; recorded in the history (needed with --force).")
@click.option("--no-stage", is_flag=True, help="Leave the deprecated stages as they are.")
@click.option("--force", is_flag=True, help="Promote a version without the convention tags.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--tracking-uri", help=_TRACKING_URI_HELP)
def promote(
    model: str,
    version: str,
    alias: str,
    requires: tuple[str, ...],
    metric: str | None,
    goal: str | None,
    allow_regression: bool,
    reason: str | None,
    no_stage: bool,
    force: bool,
    yes: bool,
    tracking_uri: str | None,
) -> None:
    """Point MODEL's alias (production) at VERSION, behind gates, with an audit record.

    Every check runs before anything changes, and all failures are reported together:
    the version exists, its run FINISHED, it carries the dataset and preprocessing tags,
    every --require holds, and the primary metric is not worse than the current holder's.
    Exit 3 when a check refuses (nothing changed), 2 for bad input or not found.

    \b
    Examples:
      mlpipe promote seg3d 7 --require 'val_dice>=0.85' --reason "new data v3"
      mlpipe promote seg3d 6 --allow-regression --reason "v7 fails on pediatric scans"
    """
    from mlpipe.registry import (
        PromotionRequest,
        connect,
        execute_promotion,
        plan_promotion,
        refuse_if_needed,
    )
    from mlpipe.tables import format_rows

    request = PromotionRequest(
        model=model,
        version=version,
        alias=alias,
        requires=requires,
        metric=metric,
        goal=goal,
        allow_regression=allow_regression,
        reason=reason,
        no_stage=no_stage,
        force=force,
    )
    tracking = connect(tracking_uri)
    plan = plan_promotion(tracking, request)
    current = f"v{plan.current.version}" if plan.current else "none"
    click.echo(
        format_rows(
            ["", f"candidate v{plan.candidate.version}", f"@{alias} now: {current}"],
            plan.comparison(),
        )
    )
    for note in plan.notes:
        click.echo(f"Note: {note}", err=True)
    refuse_if_needed(plan)
    if plan.is_noop:
        click.echo(f"{model} v{version} already holds @{alias}; nothing to do.")
        return
    _confirm(f"Move {model}@{alias} from {current} to v{version}?", yes)
    result = execute_promotion(
        tracking, plan, echo=lambda msg: click.echo(f"Warning: {msg}", err=True)
    )
    if result.event is None:
        click.echo(f"{model} v{version} already holds @{alias}; nothing to do.")
        return
    staged = " and stage Production" if result.staged else ""
    previous = f"v{result.previous}" if result.previous else "none"
    click.echo(f"Promoted {model} v{version} to @{alias}{staged} (was {previous}).")
    click.echo(f"Load it: mlflow.pyfunc.load_model('models:/{model}@{alias}')")


@cli.command(context_settings={"show_default": True})
@click.argument("model")
@click.option("--alias", default="production", help="The alias to move back.")
@click.option("--reason", required=True, help="Why; recorded in the history.")
@click.option("--no-stage", is_flag=True, help="Leave the deprecated stages as they are.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--tracking-uri", help=_TRACKING_URI_HELP)
def rollback(
    model: str, alias: str, reason: str, no_stage: bool, yes: bool, tracking_uri: str | None
) -> None:
    """Move MODEL's alias back to the version that held it before, as the history records.

    Repeated rollbacks walk further back through the promotions.
    """
    from mlpipe.registry import connect, execute_rollback, plan_rollback

    tracking = connect(tracking_uri)
    plan = plan_rollback(tracking, model, alias)
    current = f"v{plan.current}" if plan.current else "none"
    _confirm(f"Move {model}@{alias} back from {current} to v{plan.target}?", yes)
    result = execute_rollback(
        tracking,
        plan,
        reason=reason,
        no_stage=no_stage,
        echo=lambda msg: click.echo(f"Warning: {msg}", err=True),
    )
    click.echo(f"Rolled {model}@{alias} back from {current} to v{result.version}.")


@cli.command()
@click.argument("model")
@click.option("--alias", help="Only this alias's moves.")
@click.option("--json", "as_json", is_flag=True, help="Print the events as JSON.")
@click.option("--tracking-uri", help=_TRACKING_URI_HELP)
def history(model: str, alias: str | None, as_json: bool, tracking_uri: str | None) -> None:
    """Who moved MODEL's aliases, when, from which version to which, why, and which gates."""
    from mlpipe.registry import connect
    from mlpipe.registry import history as read_history
    from mlpipe.tables import format_rows

    events = read_history(connect(tracking_uri), model, alias)
    if as_json:
        click.echo(json.dumps([e.__dict__ for e in events], indent=2))
        return
    if not events:
        click.echo(f"No alias moves recorded for {model}.")
        return
    rows = [
        (
            e.seq,
            e.time,
            e.who,
            e.action,
            f"@{e.alias}",
            f"{'v' + e.from_version if e.from_version else 'none'} -> v{e.to_version}",
            e.reason or "-",
            "; ".join(e.gates) or "-",
        )
        for e in events
    ]
    header = ["#", "time (UTC)", "who", "action", "alias", "from -> to", "reason", "gates"]
    click.echo(format_rows(header, rows))


@cli.command()
@click.argument("model", required=False)
@click.option("--tracking-uri", help=_TRACKING_URI_HELP)
def models(model: str | None, tracking_uri: str | None) -> None:
    """List registered models, or MODEL's versions with aliases, stage and primary metric."""
    from mlpipe.registry import connect, list_models, list_versions
    from mlpipe.tables import format_frame

    tracking = connect(tracking_uri)
    frame = list_versions(tracking, model) if model else list_models(tracking)
    click.echo(format_frame(frame, empty="No registered models." if not model else "No versions."))


def _print_plan(plan: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(plan, indent=2))
        return
    click.echo("Dry run: nothing was created.")
    for key in (
        "project",
        "directory",
        "entry_point",
        "experiment",
        "tracking_uri",
        "env_manager",
        "backend",
    ):
        click.echo(f"  {key:<13}{plan[key]}")
    click.echo("  parameters:")
    for name, item in plan["parameters"].items():
        click.echo(f"    {name} = {item['value']!r} ({item['type']})")
    for name, value in plan["extra_parameters"].items():
        click.echo(f"    {name} = {value!r} (extra, passed as --{name})")
    if plan["docker_args"]:
        args = " ".join(f"-A {k}={v}" for k, v in plan["docker_args"].items())
        click.echo(f"  docker args: {args}")
    click.echo(f"  command:     {plan['command']}")


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="mlpipe")


if __name__ == "__main__":
    sys.exit(main())
