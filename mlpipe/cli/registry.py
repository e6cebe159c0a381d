"""``mlpipe promote``, ``rollback``, ``history``, ``models``: the registry commands."""

from __future__ import annotations

import json

import click

from mlpipe.cli.group import TRACKING_URI_HELP, cli, confirm


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
@click.option("--tracking-uri", help=TRACKING_URI_HELP)
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
    from mlpipe.core.tables import format_rows
    from mlpipe.registry.promotion import (
        PromotionRequest,
        check_request,
        connect,
        execute_promotion,
        plan_promotion,
        refuse_if_needed,
    )

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
    check_request(request)  # mistakes that need no server are refused before connecting
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
    confirm(f"Move {model}@{alias} from {current} to v{version}?", yes)
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
@click.option("--tracking-uri", help=TRACKING_URI_HELP)
def rollback(
    model: str, alias: str, reason: str, no_stage: bool, yes: bool, tracking_uri: str | None
) -> None:
    """Move MODEL's alias back to the version that held it before, as the history records.

    Repeated rollbacks walk further back through the promotions.
    """
    from mlpipe.registry.promotion import (
        check_alias,
        check_model_name,
        check_reason,
        connect,
        execute_rollback,
        plan_rollback,
    )

    check_model_name(model)
    check_alias(alias)
    check_reason(reason)
    tracking = connect(tracking_uri)
    plan = plan_rollback(tracking, model, alias)
    current = f"v{plan.current}" if plan.current else "none"
    confirm(f"Move {model}@{alias} back from {current} to v{plan.target}?", yes)
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
@click.option("--tracking-uri", help=TRACKING_URI_HELP)
def history(model: str, alias: str | None, as_json: bool, tracking_uri: str | None) -> None:
    """Who moved MODEL's aliases, when, from which version to which, why, and which gates."""
    from mlpipe.core.tables import format_rows
    from mlpipe.registry.promotion import check_alias, check_model_name, connect
    from mlpipe.registry.views import history as read_history

    check_model_name(model)
    if alias is not None:
        check_alias(alias)
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
@click.option("--tracking-uri", help=TRACKING_URI_HELP)
def models(model: str | None, tracking_uri: str | None) -> None:
    """List registered models, or MODEL's versions with aliases, stage and primary metric."""
    from mlpipe.core.tables import format_frame
    from mlpipe.registry.promotion import check_model_name, connect
    from mlpipe.registry.views import list_models, list_versions

    if model is not None:
        check_model_name(model)
    tracking = connect(tracking_uri)
    frame = list_versions(tracking, model) if model else list_models(tracking)
    click.echo(format_frame(frame, empty="No registered models." if not model else "No versions."))
