"""``mlpipe server``, ``config show``, ``doctor``: the tracking server and the settings."""

from __future__ import annotations

import json
import sys

import click

from mlpipe.cli.group import TRACKING_URI_HELP, cli

AUTH_DB_URI_ENV = "MLPIPE_AUTH_DB_URI"


@cli.command(context_settings={"show_default": True})
@click.option(
    "--backend-store-uri",
    envvar="MLFLOW_BACKEND_STORE_URI",
    metavar="URI",
    help="Tracking database: postgresql://USER@HOST:5432/DB with the password in PGPASSWORD "
    "or ~/.pgpass (SQLite: one user only). A password given here is moved out of the "
    "command line (ps shows it). [env: MLFLOW_BACKEND_STORE_URI]",
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
    "--auth-db-uri",
    envvar=AUTH_DB_URI_ENV,
    metavar="URI",
    help=f"Where the auth tables live [default: the backend]. [env: {AUTH_DB_URI_ENV}]",
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
    from mlpipe.core.secrets import reexec_without_secrets

    reexec_without_secrets(
        {"--backend-store-uri": "MLFLOW_BACKEND_STORE_URI", "--auth-db-uri": AUTH_DB_URI_ENV},
        warn=lambda text: click.echo(f"Warning: {text}", err=True),
    )
    from mlpipe.server.launch import serve, start
    from mlpipe.server.plan import plan as make_plan
    from mlpipe.server.preflight import preflight

    server_plan = make_plan(
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
    for note in preflight(server_plan):
        click.echo(note, err=True)
    click.echo(f"Starting mlflow server on {server_plan.local_url} ...", err=True)
    handle = start(server_plan, echo=lambda line: click.echo(line, err=True), timeout=start_timeout)
    click.echo(f"Tracking server ready: {handle.url}")
    click.echo(f"  artifacts: {server_plan.artifacts_destination} (proxied by the server)")
    click.echo("Researchers run:")
    click.echo(f"  {server_plan.export_line}")
    if auth:
        click.echo("  export MLFLOW_TRACKING_USERNAME=... MLFLOW_TRACKING_PASSWORD=...")
    click.echo("Check it: mlpipe doctor. Stop it: Ctrl-C.", err=True)
    signum = serve(handle)
    click.echo("Stopped the tracking server.", err=True)
    ctx.exit(128 + signum)


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
    from mlpipe.core.settings import resolve_settings
    from mlpipe.core.tables import format_rows

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
@click.option("--tracking-uri", help=TRACKING_URI_HELP)
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
    from mlpipe.core.settings import redact_uri, resolve_settings
    from mlpipe.core.tables import format_rows
    from mlpipe.server.doctor import exit_code, run_checks

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
