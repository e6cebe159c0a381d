"""``mlpipe run``, ``init``, ``validate``: the project commands."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import click

from mlpipe.cli.group import cli

if TYPE_CHECKING:
    from mlpipe.run.runner import RunPlan

_ENV_MANAGERS = ["local", "uv", "virtualenv", "conda"]


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
    from mlpipe.run.runner import RunRequest, execute, plan_run

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
        echo_checks(plan)
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
    from mlpipe.run.scaffold import init_project

    created = init_project(directory, name=name)
    click.echo(f"Created {len(created)} files in {directory}:")
    for path in created:
        click.echo(f"  {path}")
    click.echo(f"Next: mlpipe validate {directory} && mlpipe run {directory}")


@cli.command()
@click.argument("directory", default=".", type=click.Path(file_okay=False))
def validate(directory: str) -> None:
    """Lint a project against the mlpipe conventions; exit 2 on errors."""
    from mlpipe.core.errors import ProjectError
    from mlpipe.run.project import iter_findings, load_project

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


def echo_checks(plan: RunPlan) -> None:
    """The project's warnings and what its pre-flight check said, on stderr."""
    for finding in plan.project.warnings:
        click.echo(f"Warning: {finding}", err=True)
    if plan.preflight and plan.preflight.warning:
        click.echo(f"Warning: {plan.preflight.warning}", err=True)
    elif plan.preflight:
        click.echo(f"mlpipe: {plan.preflight.note}", err=True)
