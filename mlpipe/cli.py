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


# --- issue 6: server (commands go between these markers) ---


@cli.command(context_settings={"show_default": True})
@click.option(
    "--backend-store-uri",
    envvar="MLFLOW_BACKEND_STORE_URI",
    metavar="URI",
    help="Tracking database: postgresql://USER:PASS@HOST:5432/DB (SQLite: one user only). "
    "[env: MLFLOW_BACKEND_STORE_URI]",
)
@click.option(
    "--artifacts-destination",
    envvar="MLFLOW_ARTIFACTS_DESTINATION",
    metavar="s3://BUCKET/PREFIX",
    help="Where the server stores artifacts; clients reach them through the server. "
    "[env: MLFLOW_ARTIFACTS_DESTINATION]",
)
@click.option("--host", default="127.0.0.1", help="Interface to bind; 0.0.0.0 for all.")
@click.option("--port", default=5000, type=int)
@click.option("--workers", default=4, type=int, help="uvicorn worker processes.")
@click.option(
    "--s3-endpoint-url",
    metavar="URL",
    help="S3 endpoint (MinIO, moto); set as MLFLOW_S3_ENDPOINT_URL for the server only.",
)
@click.option("--create-bucket", is_flag=True, help="Create the bucket if it is missing.")
@click.option(
    "--auth",
    is_flag=True,
    help="MLflow basic auth; the admin password comes from $MLFLOW_AUTH_ADMIN_PASSWORD.",
)
@click.option(
    "--auth-db-uri", metavar="URI", help="Where the auth tables live [default: the backend]."
)
@click.option(
    "--allowed-hosts",
    metavar="HOSTS",
    help="Comma-separated Host headers to accept (MLflow's default: localhost, private IPs).",
)
@click.option("--start-timeout", default=180.0, type=float, help="Seconds to wait for /health.")
@click.option(
    "--dry-run", is_flag=True, help="Check the options, print the command; start nothing."
)
@click.pass_context
def server(
    ctx: click.Context,
    backend_store_uri: str | None,
    artifacts_destination: str | None,
    host: str,
    port: int,
    workers: int,
    s3_endpoint_url: str | None,
    create_bucket: bool,
    auth: bool,
    auth_db_uri: str | None,
    allowed_hosts: str | None,
    start_timeout: float,
    dry_run: bool,
) -> None:
    """Run the team tracking server: mlflow server, PostgreSQL, artifacts proxied to S3.

    Checks first that the database and the bucket answer (exit 2 naming which one does
    not), then starts `mlflow server` with the artifacts proxied (clients need no S3
    credentials and get no direct S3 links), waits for /health and prints the line
    researchers export. Ctrl-C or SIGTERM stops every process of the server. The server's
    S3 credentials come from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in its environment.

    \b
    Example:
      mlpipe server --backend-store-uri postgresql://mlflow@127.0.0.1:5432/mlflow \\
        --artifacts-destination s3://mlflow/artifacts \\
        --s3-endpoint-url http://127.0.0.1:9000 --create-bucket
    """
    from mlpipe import server as srv

    server_plan = srv.plan(
        backend_store_uri=backend_store_uri,
        artifacts_destination=artifacts_destination,
        host=host,
        port=port,
        workers=workers,
        s3_endpoint_url=s3_endpoint_url,
        create_bucket=create_bucket,
        auth=auth,
        auth_db_uri=auth_db_uri,
        allowed_hosts=allowed_hosts,
    )
    for warning in server_plan.warnings:
        click.echo(f"Warning: {warning}", err=True)
    if dry_run:
        described = server_plan.describe()
        click.echo("Dry run: nothing was checked or started.")
        for key in ("url", "backend_store_uri", "artifacts_destination", "s3_endpoint_url"):
            click.echo(f"  {key:<22}{described[key]}")
        click.echo(f"  {'auth':<22}{'basic auth' if auth else 'off'}")
        click.echo("  environment (server only):")
        for name, value in described["environment"].items():
            click.echo(f"    {name}={value}")
        click.echo(f"  command: {described['command']}")
        return
    for note in srv.preflight(server_plan):
        click.echo(note, err=True)
    click.echo(f"Starting mlflow server on {server_plan.local_url} ...", err=True)
    handle = srv.start(
        server_plan, echo=lambda line: click.echo(line, err=True), timeout=start_timeout
    )
    click.echo(f"Tracking server ready: {handle.url}")
    click.echo(f"  artifacts: {server_plan.artifacts_destination} (proxied by the server)")
    click.echo("Researchers run:")
    click.echo(f"  {server_plan.export_line}")
    if auth:
        click.echo("  export MLFLOW_TRACKING_USERNAME=... MLFLOW_TRACKING_PASSWORD=...")
    click.echo("Check it: mlpipe doctor. Stop it: Ctrl-C.", err=True)
    signum = srv.serve(handle)
    click.echo("Stopped the tracking server.", err=True)
    ctx.exit(128 + signum)


# --- end server ---

# --- issue 6: doctor, config (commands go between these markers) ---


@cli.group()
def config() -> None:
    """Settings mlpipe resolves: tracking URI, S3 endpoint, experiment prefix, credentials."""


@config.command("show")
@click.option(
    "--project",
    "project_dir",
    default=".",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Project folder whose mlpipe.yaml is read.",
)
@click.option("--tracking-uri", help="As the flag of mlpipe run; it wins over everything.")
@click.option("--json", "as_json", is_flag=True, help="Print the settings as JSON.")
def config_show(project_dir: str, tracking_uri: str | None, as_json: bool) -> None:
    """Print every resolved setting and where it came from; secrets show as set or unset.

    Precedence: command-line flag > environment > the project's mlpipe.yaml > the user
    config ($MLPIPE_CONFIG, else ~/.config/mlpipe/config.yaml) > default.
    """
    from mlpipe.settings import resolve_settings
    from mlpipe.tables import format_rows

    settings = resolve_settings(tracking_uri=tracking_uri, project_dir=project_dir)
    rows = settings.rows()
    if as_json:
        data = {
            "settings": {name: {"value": value, "source": src} for name, value, src in rows},
            "files": {path: exists for path, exists in settings.files},
        }
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(format_rows(["setting", "value", "from"], rows))
    for path, exists in settings.files:
        click.echo(f"{'read' if exists else 'absent'}: {path}")


@cli.command()
@click.option("--tracking-uri", help=_TRACKING_URI_HELP)
@click.option(
    "--project",
    "project_dir",
    default=".",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Project folder whose mlpipe.yaml is read.",
)
@click.option(
    "--timeout",
    default=5.0,
    show_default=True,
    type=click.FloatRange(0.5, 300),
    help="Seconds each network request may take.",
)
@click.option("--keep-artifact", is_flag=True, help="Leave the 1 MB test file in the doctor's run.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def doctor(
    tracking_uri: str | None,
    project_dir: str,
    timeout: float,
    keep_artifact: bool,
    as_json: bool,
) -> None:
    """Check the tracking setup: server, version, login, runs, artifacts, registry, GPU.

    Each check says PASS, INFO, WARN, FAIL or SKIP, with the fix when it fails. It creates
    one run in the experiment mlpipe-doctor (ended FINISHED) and sends a 1 MB file through
    the artifact store and back (then deletes it, unless --keep-artifact). It also sends
    what earlier runs left unsent while the server was down, and ends those runs FAILED.
    Exit 2 when a check fails, else 0. With the server down it answers within seconds.
    """
    from mlpipe.doctor import exit_code, run_checks
    from mlpipe.settings import redact_uri, resolve_settings
    from mlpipe.tables import format_rows

    settings = resolve_settings(tracking_uri=tracking_uri, project_dir=project_dir)
    if not as_json:
        uri = redact_uri(settings.tracking_uri.value)
        click.echo(f"Checking {uri} (from {settings.tracking_uri.source})", err=True)
    results = run_checks(settings, timeout=timeout, keep_artifact=keep_artifact)
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in results], indent=2))
    else:
        rows = [(r.status, r.name, r.detail) for r in results]
        click.echo(format_rows(["", "check", "found"], rows))
        for r in results:
            if r.fix and r.status in ("FAIL", "WARN"):
                click.echo(f"{r.status} {r.name}: {r.fix}")
    code = exit_code(results)
    if code:
        failed = sum(r.status == "FAIL" for r in results)
        if not as_json:
            click.echo(f"{failed} check(s) failed.", err=True)
        sys.exit(code)


# --- end doctor ---

# --- issue 7: compare (commands go between these markers) ---


@cli.command(context_settings={"show_default": True})
@click.argument("run_ids", nargs=-1, metavar="[RUN_ID]...")
@click.option("--experiment", help="Compare runs of this experiment instead of given ids.")
@click.option(
    "--filter",
    "filter_string",
    metavar="FILTER",
    help="MLflow search filter for --experiment, e.g. \"params.lr = '0.001'\".",
)
@click.option(
    "--top", type=int, help="How many runs of --experiment (best by --by, else most recent). [5]"
)
@click.option("--by", metavar="METRIC", help="Rank --experiment's runs by this metric.")
@click.option(
    "--order",
    type=click.Choice(["asc", "desc"]),
    help="Ranking order for --by [default: the runs' primary_metric_goal, else desc].",
)
@click.option(
    "--metric",
    "metrics",
    multiple=True,
    help="A metric to show; repeat for more [default: all, primary metric first].",
)
@click.option("--all-params", is_flag=True, help="Show every param, not only those that differ.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "markdown"]), default="table")
@click.option("--tracking-uri", help=_TRACKING_URI_HELP)
def compare(
    run_ids: tuple[str, ...],
    experiment: str | None,
    filter_string: str | None,
    top: int | None,
    by: str | None,
    order: str | None,
    metrics: tuple[str, ...],
    all_params: bool,
    fmt: str,
    tracking_uri: str | None,
) -> None:
    """Show runs side by side: params that differ, metrics, data and code versions.

    Rows are fields (status, start, duration, git commit, dataset name/version/digest,
    preprocessing digest, metrics, params), columns are runs. A dataset or preprocessing
    digest that differs between the runs is pointed out: it often explains the metrics.
    With a tracking server, the MLflow UI compare link is printed too. CSV holds full
    values; notes and the link then go to stderr.

    \b
    Examples:
      mlpipe compare 3f2a... 9c1b...
      mlpipe compare --experiment seg3d --top 3 --by val_dice
      mlpipe compare --experiment seg3d --filter "params.model = 'unet'" --format markdown
    """
    from mlpipe.compare import CompareRequest, render
    from mlpipe.compare import compare as compare_runs
    from mlpipe.registry import connect

    request = CompareRequest(
        run_ids=run_ids,
        experiment=experiment,
        filter=filter_string,
        top=top,
        by=by,
        order=order,
        metrics=metrics,
        all_params=all_params,
    )
    comparison = compare_runs(connect(tracking_uri), request)
    click.echo(render(comparison, fmt))
    to_stderr = fmt == "csv"
    for note in comparison.notes:
        click.echo(f"Note: {note}", err=to_stderr)
    if comparison.link:
        click.echo(f"Compare in the MLflow UI: {comparison.link}", err=to_stderr)


# --- end compare ---

# --- issue 7: serve (commands go between these markers) ---


@cli.command(context_settings={"show_default": True})
@click.argument("model_uri")
@click.option("--host", default="127.0.0.1", help="Address to listen on (0.0.0.0: all).")
@click.option("--port", default=8080, type=click.IntRange(0, 65535), help="Port (0: any free).")
@click.option(
    "--token-env",
    metavar="NAME",
    help="Require 'Authorization: Bearer <token>', the token read from this variable.",
)
@click.option(
    "--max-bytes",
    default="512M",
    metavar="SIZE",
    help="Largest upload, in bytes or with K/M/G (powers of 1024).",
)
@click.option(
    "--range-factor",
    default=3.0,
    type=float,
    help="Refuse volumes whose spacing or shape is more than this many times outside the "
    "training data's range (0: no check).",
)
@click.option(
    "--concurrency",
    default=1,
    type=int,
    help="Inferences at once (each uses every CPU core; more helps on a GPU).",
)
@click.option("--max-queue", default=32, type=int, help="Requests that may wait; more get 503.")
@click.option(
    "--profile-file",
    type=click.Path(dir_okay=False),
    help="Where input profiles go [default: <cache>/serving/<model>/profiles.jsonl].",
)
@click.option("--max-profiles", default=10_000, type=int, help="Input profiles kept (newest).")
@click.option("--tracking-uri", help=_TRACKING_URI_HELP)
def serve(
    model_uri: str,
    host: str,
    port: int,
    token_env: str | None,
    max_bytes: str,
    range_factor: float,
    concurrency: int,
    max_queue: int,
    profile_file: str | None,
    max_profiles: int,
    tracking_uri: str | None,
) -> None:
    """Serve a registered seg3d model over HTTP, with a page to try it at /docs.

    MODEL_URI is models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/PATH. The model
    loads once; uploads (.nii/.nii.gz) are checked (NIfTI, 3D, size, spacing and shape
    against the training data profile) and every input's profile is kept for `mlpipe drift`.

    \b
    Examples:
      mlpipe serve models:/seg3d@production
      API_TOKEN=s3cret mlpipe serve models:/seg3d/3 --host 0.0.0.0 --token-env API_TOKEN
      curl -F file=@ct.nii.gz -o mask.nii.gz http://127.0.0.1:8080/segment
    """
    from mlpipe.serve import ServeOptions, bind, parse_size, prepare, run_server

    options = ServeOptions(
        model_uri=model_uri,
        host=host,
        port=port,
        token_env=token_env,
        max_bytes=parse_size(max_bytes),
        range_factor=range_factor,
        concurrency=concurrency,
        max_queue=max_queue,
        profile_file=profile_file,
        max_profiles=max_profiles,
        tracking_uri=tracking_uri,
    )
    options.check()
    sock = bind(host, port)
    try:
        state = prepare(options, echo=lambda msg: click.echo(msg, err=True))
    except BaseException:
        sock.close()
        raise
    url = f"http://{host if ':' not in host else f'[{host}]'}:{sock.getsockname()[1]}"
    click.echo(f"Serving {state.source.label} on {state.device} at {url}", err=True)
    click.echo(f"  try it:   {url}/docs", err=True)
    click.echo(f"  profiles: {state.profile_file}", err=True)
    if host not in ("127.0.0.1", "localhost", "::1") and not state.token:
        click.echo(
            "Warning: listening beyond this machine without --token-env: anyone who reaches "
            "it can use the model.",
            err=True,
        )
    run_server(state, sock)


# --- end serve ---

# --- issue 7: drift (commands go between these markers) ---


@cli.command(context_settings={"show_default": True})
@click.argument("model_uri")
@click.argument("directory", required=False, metavar="[DIR]")
@click.option(
    "--from-serving", is_flag=True, help="Check the inputs `mlpipe serve` kept for this model."
)
@click.option(
    "--serving-file",
    type=click.Path(dir_okay=False),
    help="The serving profiles (JSON lines) [default: <cache>/serving/<model>/profiles.jsonl].",
)
@click.option("--since", metavar="ISO-TIME", help="Only serving inputs received since then.")
@click.option(
    "--ks-pvalue",
    type=float,
    default=0.01,
    help="KS p-value below which a feature's two samples count as different.",
)
@click.option(
    "--shift",
    type=float,
    default=0.1,
    help="Relative median shift above which a difference counts as large (0.1 = 10%).",
)
@click.option(
    "--unseen-share",
    type=float,
    default=0.1,
    help="Share of new volumes with an orientation unseen in training that is drift.",
)
@click.option("--max-volumes", type=int, help="Profile at most this many new volumes.")
@click.option("--experiment", help="Log the check here [default: <model>-monitoring].")
@click.option(
    "--output",
    default="drift-report",
    type=click.Path(file_okay=False),
    help="Folder for report.json, report.png and new_profile.json.",
)
@click.option("--no-log", is_flag=True, help="Write the report only; log no run.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--tracking-uri", help=_TRACKING_URI_HELP)
def drift(
    model_uri: str,
    directory: str | None,
    from_serving: bool,
    serving_file: str | None,
    since: str | None,
    ks_pvalue: float,
    shift: float,
    unseen_share: float,
    max_volumes: int | None,
    experiment: str | None,
    output: str,
    no_log: bool,
    as_json: bool,
    tracking_uri: str | None,
) -> None:
    """Check whether new volumes look like MODEL_URI's training data; exit 4 if not.

    MODEL_URI is models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/PATH. The training
    side is the data profile (mlpipe.log.data_profile) of the version's source run; the new
    side is the NIfTI images in DIR (label files are skipped), profiled with the same code,
    or the inputs `mlpipe serve` recorded (--from-serving).

    \b
    Per feature (spacing and shape per axis, orientation, intensity p0.5/p50/p99.5,
    mean, std):
      drift  the median moved more than --shift (relative to the training median, or
             to the training intensity range for intensity p*/mean) AND the two-sample
             Kolmogorov-Smirnov p-value is below --ks-pvalue or the new median lies
             outside the training range;
      check  only one of the two holds (reported, does not fail);
      orientation: drift when more than --unseen-share of the new volumes have an
             orientation no training volume had.
    The check is logged as a run in <model>-monitoring with report.png (histograms)
    and report.json. Exit 4 when a feature drifted, 0 when none did.

    \b
    Examples:
      mlpipe drift models:/seg3d@production /data/incoming/2025-03
      mlpipe drift models:/seg3d/7 --from-serving --since 2025-03-01
    """
    from mlpipe.drift import DriftRequest, Thresholds, check_drift, raise_if_drift
    from mlpipe.registry import connect
    from mlpipe.settings import redact_uri
    from mlpipe.tables import format_rows

    request = DriftRequest(
        model_uri=model_uri,
        folder=directory,
        from_serving=from_serving,
        serving_file=serving_file,
        since=since,
        thresholds=Thresholds(ks_pvalue=ks_pvalue, shift=shift, unseen_share=unseen_share),
        max_volumes=max_volumes,
        experiment=experiment,
        output=output,
        log=not no_log,
    )
    tracking = connect(tracking_uri)
    click.echo(f"Checking {model_uri} against its training profile...", err=True)

    def progress(done: int, total: int) -> None:
        if sys.stderr.isatty():
            click.echo(f"\rProfiling {done}/{total} volumes", nl=done == total, err=True)

    report = check_drift(tracking, request, progress=progress)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        dataset = report.training_dataset
        named = f" ({dataset.get('name')} {dataset.get('version')})" if dataset else ""
        click.echo(
            f"Training: {report.n_training} volumes{named}, run {report.model.run_id}. "
            f"New: {report.n_new} volumes from {report.source}."
        )
        header = ["feature", "training median [min, max]", "new", "statistic", "verdict"]
        click.echo(format_rows(header, report.rows()))
        for result in report.features:
            if result.verdict != "ok":
                click.echo(f"  {result.feature}: {result.reason}")
        for note in report.notes:
            click.echo(f"Note: {note}")
        click.echo(f"Report: {report.files['png']} and {report.files['json']}")
        if report.run_id:
            where = report.link or (
                f"mlflow ui --backend-store-uri {tracking.uri}"
                if tracking.uri.startswith("sqlite:")
                else redact_uri(tracking.uri)
            )
            click.echo(f"Logged as run {report.run_id} in {report.experiment!r}: {where}")
        if not report.drifted:
            click.echo("No drift.")
    raise_if_drift(report)


# --- end drift ---


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
