"""``mlpipe predict``: segment folders of volumes with a registered model, as inference runs."""

from __future__ import annotations

import click

from mlpipe.cli.group import TRACKING_URI_HELP, cli
from mlpipe.core.errors import CasesFailedError, UsageError

_LISTED = 20


@cli.command(context_settings={"show_default": True})
@click.argument("model_uri", required=False)
@click.argument("inputs", nargs=-1, metavar="INPUT...")
@click.option("--out", metavar="DIR", help="Folder or s3://bucket/prefix for the masks.")
@click.option(
    "--labels",
    type=click.Path(file_okay=False),
    help="Folder of labels (<case>.nii.gz): score each mask (Dice, HD95).",
)
@click.option(
    "--device",
    type=click.Choice(["cpu", "cuda"]),
    help="Where the model runs [default: CUDA when there, else CPU].",
)
@click.option("--workers", default=1, type=int, help="Processes, each loading the model once.")
@click.option("--shard", metavar="I/N", help="This machine's share: index I (0-based) of N.")
@click.option("--overwrite", is_flag=True, help="Segment cases whose mask already exists.")
@click.option("--batch-id", metavar="ID", help="Name of the batch [default: from model+inputs].")
@click.option(
    "--range-factor",
    default=3.0,
    type=float,
    help="Fail cases whose spacing or shape is this many times outside the training range "
    "(0: no check).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["nifti", "dicom-seg", "both"]),
    default="nifti",
    show_default=True,
    help="Masks as <case>.nii.gz, as a DICOM SEG <case>_seg.dcm over the source series "
    "(DICOM inputs only), or both.",
)
@click.option("--summary", "summary_id", metavar="BATCH_ID", help="Report a batch's shards.")
@click.option("--tracking-uri", help=TRACKING_URI_HELP)
def predict(
    model_uri: str | None,
    inputs: tuple[str, ...],
    out: str | None,
    labels: str | None,
    device: str | None,
    workers: int,
    shard: str | None,
    overwrite: bool,
    batch_id: str | None,
    range_factor: float,
    fmt: str,
    summary_id: str | None,
    tracking_uri: str | None,
) -> None:
    """Segment volumes with a registered seg3d model; every batch is an inference run.

    MODEL_URI is models:/NAME@ALIAS (resolved once, the run records the version),
    models:/NAME/VERSION or runs:/RUN_ID/PATH. INPUT is NIfTI files, folders, a Decathlon
    folder (its imagesTs/) or a CSV/JSON manifest; a DICOM series (a folder of one series, or
    a .zip) is a case too. Each case's mask is written as <case>.nii.gz in the input's
    geometry (--format dicom-seg: <case>_seg.dcm over the source series); a case whose
    mask exists is skipped, so rerunning the command after a crash finishes the rest. A bad
    case is listed and the others go on (exit 1 when any failed). The run, in the experiment
    <model>-inference, holds predictions.csv, timings, the inputs' digest and a drift summary.

    \b
    Examples:
      mlpipe predict models:/seg3d@production scans/ --out masks/
      mlpipe predict models:/seg3d/3 data/Task09_Spleen --out s3://bucket/masks --labels lbl/
      mlpipe predict models:/seg3d@production scans/ --out s3://b/m --shard 0/4 --batch-id mar
      mlpipe predict models:/seg3d@production series/ --out segs/ --format both
      mlpipe predict --summary mar
    """
    if summary_id is not None:
        if model_uri or inputs:
            raise UsageError("--summary BATCH_ID takes no MODEL_URI or INPUT.")
        _summary(summary_id, tracking_uri)
        return
    if not model_uri or not inputs:
        raise UsageError(
            "Give MODEL_URI and at least one INPUT (e.g. mlpipe predict "
            "models:/seg3d@production scans/ --out masks/), or --summary BATCH_ID."
        )
    if not out:
        raise UsageError("--out is required: a folder or s3://bucket/prefix for the masks.")
    from mlpipe.predict.service import PredictRequest, run_batch

    request = PredictRequest(
        model_uri=model_uri,
        inputs=inputs,
        out=out,
        labels=labels,
        device=device,
        workers=workers,
        shard=shard,
        overwrite=overwrite,
        batch_id=batch_id,
        range_factor=range_factor,
        tracking_uri=tracking_uri,
        formats=("nifti", "dicom-seg") if fmt == "both" else (fmt,),
    )
    result = run_batch(request, echo=lambda msg: click.echo(msg, err=True))
    metrics = result.metrics
    click.echo(
        f"Batch {result.batch_id} shard {result.shard}: {int(metrics.get('written', 0))} "
        f"written, {int(metrics.get('skipped', 0))} skipped, {len(result.failed)} failed "
        f"into {result.out} ({metrics.get('cases_per_second', 0.0):.2f} cases/s)"
    )
    if "mean_dice" in metrics:
        click.echo(
            f"Labels: mean Dice {metrics['mean_dice']:.4f}, mean HD95 "
            f"{metrics.get('mean_hd95', float('nan')):.2f} mm"
        )
    drifted = f" ({', '.join(result.drifted)})" if result.drifted else ""
    click.echo(f"Drift against the training data: {result.drift_verdict}{drifted}")
    click.echo(f"Inference run {result.run_id} in {result.experiment}")
    if result.link:
        click.echo(f"  {result.link}")
    if result.failed:
        for row in result.failed[:_LISTED]:
            click.echo(f"  failed: {row.case}: {row.error}", err=True)
        if len(result.failed) > _LISTED:
            click.echo(f"  ... and {len(result.failed) - _LISTED} more (predictions.csv)", err=True)
        raise CasesFailedError(
            f"{len(result.failed)} of {len(result.rows)} case(s) failed (listed above and in "
            "the run's predictions.csv); the other masks were written. Fix or remove those "
            "files and run the same command again: only the missing masks are made."
        )


def _summary(batch_id: str, tracking_uri: str | None) -> None:
    from mlpipe.predict.summary import summarize_batch
    from mlpipe.registry.promotion import connect

    summary = summarize_batch(connect(tracking_uri), batch_id)
    click.echo(summary.render())
    if not summary.complete:
        raise CasesFailedError(
            f"Batch {batch_id} is not complete: "
            + "; ".join(
                part
                for part in (
                    f"{len(summary.missing)} shard(s) missing" if summary.missing else "",
                    f"{summary.failed} case(s) failed" if summary.failed else "",
                    "a shard's newest run did not finish"
                    if any(s.status != "FINISHED" for s in summary.shards)
                    else "",
                )
                if part
            )
            + "."
        )
