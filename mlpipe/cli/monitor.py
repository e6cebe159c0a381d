"""``mlpipe compare`` and ``mlpipe drift``: looking at runs and at new data."""

from __future__ import annotations

import json
import sys

import click

from mlpipe.cli.group import TRACKING_URI_HELP, cli


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
@click.option("--sweep", metavar="NAME", help="Compare the trials of this `mlpipe sweep` study.")
@click.option("--tracking-uri", help=TRACKING_URI_HELP)
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
    sweep: str | None,
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
      mlpipe compare --sweep lr-search --top 5
    """
    from mlpipe.monitor.compare import CompareRequest, render
    from mlpipe.monitor.compare import compare as compare_runs
    from mlpipe.registry.promotion import connect

    request = CompareRequest(
        run_ids=run_ids,
        experiment=experiment,
        filter=filter_string,
        top=top,
        by=by,
        order=order,
        metrics=metrics,
        all_params=all_params,
        sweep=sweep,
    )
    comparison = compare_runs(connect(tracking_uri), request)
    click.echo(render(comparison, fmt))
    to_stderr = fmt == "csv"
    for note in comparison.notes:
        click.echo(f"Note: {note}", err=to_stderr)
    if comparison.link:
        click.echo(f"Compare in the MLflow UI: {comparison.link}", err=to_stderr)


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
@click.option("--tracking-uri", help=TRACKING_URI_HELP)
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
    from mlpipe.core.settings import redact_uri
    from mlpipe.core.tables import format_rows
    from mlpipe.monitor.drift import DriftRequest, check_drift, raise_if_drift
    from mlpipe.monitor.features import Thresholds
    from mlpipe.registry.promotion import connect

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
