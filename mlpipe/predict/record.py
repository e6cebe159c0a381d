"""Every batch (every shard of it) as an MLflow inference run, in ``<prefix><model>-inference``.

The run answers: which model version made these masks (``mlpipe.predict.*`` tags: model name,
pinned version, the alias it was resolved from, batch id, shard), on which inputs (the
``mlpipe.dataset.*`` tags of what was read, the manifest, a ``log_input`` entry), how each case
went and how long it took (``predictions.csv``; metrics ``cases``, ``failed``, p50/p95 seconds
per case, cases per second), whether the inputs looked like the training data (a drift summary
with ``mlpipe drift``'s code: ``mlpipe.drift.verdict`` and the features that moved) and, with
``--labels``, how good the masks were (Dice and HD95 per case and their means).

Run creation comes first (status RUNNING), results at the end; the CLI marks it FINISHED,
FAILED or KILLED. A SIGKILL cannot be caught: the rerun of the same batch and shard marks the
run it left RUNNING as FAILED.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from mlpipe.core.errors import NotFoundError
from mlpipe.core.tracking import Tracking, translate_errors
from mlpipe.predict.batch import FAILED, SKIPPED, WRITTEN, CaseRow

if TYPE_CHECKING:
    from mlpipe.data.dataset import DatasetInfo
    from mlpipe.inference.models import ModelSource
    from mlpipe.monitor.drift import DriftReport
    from mlpipe.predict.inputs import CaseList, Shard

logger = logging.getLogger("mlpipe.predict")

INFERENCE_SUFFIX = "-inference"
PREDICTIONS_ARTIFACT = "predictions.csv"
DRIFT_ARTIFACT = "drift/report.json"
MANIFEST_ARTIFACT = "mlpipe/dataset_manifest.json"
TAG = "mlpipe.predict."
"""Prefix of the inference run's own tags (``mlpipe.predict.batch_id``, ...)."""


@dataclass(frozen=True)
class RunPlan:
    """What the inference run records up front: the batch and how it was asked for."""

    batch_id: str
    shard: Shard
    out: str
    inputs: str
    device: str
    workers: int
    overwrite: bool
    labels: bool
    formats: tuple[str, ...]
    cases: int
    skipped: int


def inference_experiment(tracking: Tracking, model: ModelSource) -> str:
    """``<prefix><model>-inference``; an unregistered ``runs:/`` model's after its run's
    experiment, as ``mlpipe drift`` names its monitoring experiment."""
    if model.name:
        return tracking.settings.prefixed(model.name + INFERENCE_SUFFIX)
    with translate_errors(f"experiment {model.experiment_id}"):
        name = tracking.client.get_experiment(model.experiment_id).name
    return tracking.settings.prefixed(name + INFERENCE_SUFFIX)


def predict_tags(model: ModelSource, plan: RunPlan) -> dict[str, str]:
    """The ``mlpipe.predict.*`` tags (DESIGN.md): model, pinned version, alias, batch, shard."""
    return {
        TAG + "model": model.name or "",
        TAG + "model_version": model.version or "",
        TAG + "model_alias": model.alias or "",
        TAG + "model_uri": model.uri,
        TAG + "source_run": model.run_id or "",
        TAG + "batch_id": plan.batch_id,
        TAG + "shard": str(plan.shard),
        TAG + "shard_index": str(plan.shard.index),
        TAG + "shard_count": str(plan.shard.count),
        TAG + "out": plan.out,
        TAG + "formats": ",".join(plan.formats),
    }


def start_run(tracking: Tracking, model: ModelSource, plan: RunPlan) -> tuple[str, str, str]:
    """Create the inference run (RUNNING) and end what a killed run of this shard left behind.

    Returns:
        ``(run_id, experiment_id, experiment_name)``.
    """
    from mlpipe import __version__
    from mlpipe.core.environment import environment_tags

    experiment = inference_experiment(tracking, model)
    experiment_id = tracking.experiment_id(experiment)
    tags = {"mlpipe.version": __version__, **environment_tags(), **predict_tags(model, plan)}
    params = {
        "model_uri": model.uri,
        "model_version": model.version or "-",
        "inputs": plan.inputs,
        "out": plan.out,
        "device": plan.device,
        "workers": str(plan.workers),
        "shard": str(plan.shard),
        "overwrite": str(plan.overwrite).lower(),
        "labels": str(plan.labels).lower(),
        "formats": ",".join(plan.formats),
    }
    label = f"{model.name}-v{model.version}" if model.name else (model.run_id or "model")[:12]
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    run_name = f"predict-{label}-{plan.batch_id}-{plan.shard.index}of{plan.shard.count}-{stamp}"
    run_id = tracking.create_run(
        experiment_id, tags={k: v for k, v in tags.items() if v}, params=params, run_name=run_name
    )
    _end_abandoned(tracking, experiment_id, plan, run_id)
    return run_id, experiment_id, experiment


def _end_abandoned(tracking: Tracking, experiment_id: str, plan: RunPlan, new_run: str) -> None:
    """Mark FAILED the runs of this batch and shard still RUNNING: a SIGKILL left them so."""
    from mlpipe.core.outbox import FAILURE_TAG

    query = (
        f"tags.`{TAG}batch_id` = '{plan.batch_id}' and tags.`{TAG}shard` = '{plan.shard}' "
        "and attributes.status = 'RUNNING'"
    )
    with translate_errors("earlier runs of this batch"):
        stale = tracking.client.search_runs([experiment_id], filter_string=query)
        for run in stale:
            if run.info.run_id == new_run:
                continue
            tracking.client.set_tag(
                run.info.run_id,
                FAILURE_TAG,
                f"ended without finishing (killed?); the batch was resumed by run {new_run}",
            )
            tracking.client.set_terminated(run.info.run_id, status="FAILED")


def batch_metrics(rows: Sequence[CaseRow], seconds: float) -> dict[str, float]:
    """cases, written, skipped, failed, p50/p95 seconds per case, cases per second."""
    import numpy as np

    written = [r for r in rows if r.status == WRITTEN]
    times = [r.seconds for r in written if r.seconds is not None]
    metrics = {
        "cases": float(len(rows)),
        "written": float(len(written)),
        "skipped": float(sum(r.status == SKIPPED for r in rows)),
        "failed": float(sum(r.status == FAILED for r in rows)),
        "wall_seconds": float(seconds),
        "cases_per_second": len(written) / seconds if seconds > 0 else 0.0,
    }
    if times:
        metrics["seconds_per_case_p50"] = float(np.percentile(times, 50))
        metrics["seconds_per_case_p95"] = float(np.percentile(times, 95))
    scored = [r.scores for r in written if r.scores]
    if scored:
        import pandas as pd

        from mlpipe.inference.scores import summarize

        classes = 1 + max(int(k.split("_")[-1]) for s in scored for k in s if k.startswith("dice_"))
        metrics.update(summarize(pd.DataFrame(scored), classes))
    return {k: v for k, v in metrics.items() if math.isfinite(v)}


def dataset_of(listed: CaseList, rows: Sequence[CaseRow]) -> DatasetInfo | None:
    """The manifest of what this run read (every case with a hash), as ``mlog.dataset`` makes it."""
    from mlpipe.data.dataset import DatasetInfo, FileEntry, digest_of

    entries = tuple(
        sorted(
            (
                FileEntry(
                    path=r.file,
                    size=r.bytes,
                    sha256=r.sha256,
                    role="image",
                    case=r.case,
                    split="test",
                )
                for r in rows
                if r.sha256
            ),
            key=lambda e: e.path,
        )
    )
    if not entries:
        return None
    digest = digest_of(entries)
    return DatasetInfo(
        name=listed.name,
        version=listed.version or digest[:12],
        version_declared=listed.version is not None,
        digest=digest,
        source=listed.source,
        files=entries,
        pairs=(),
    )


def drift_summary(model: ModelSource, rows: Sequence[CaseRow], source: str) -> DriftReport | None:
    """This batch's inputs against the model's training profile, with ``mlpipe drift``'s code.

    ``None`` when the model's run logged no profile or no case of this run was profiled.
    """
    from mlpipe.monitor.drift import DriftReport, load_training_profile
    from mlpipe.monitor.features import Thresholds, _power_notes, compare_profiles

    new = [r.profile for r in rows if r.profile]
    if not new:
        return None
    try:
        training = load_training_profile(model)
    except NotFoundError as exc:
        logger.info("no drift summary: %s", exc)
        return None
    thresholds = Thresholds()
    features = compare_profiles(training["volumes"], new, thresholds)
    return DriftReport(
        model=model,
        source=source,
        source_kind="batch",
        training_dataset=dict(training.get("dataset") or {}),
        thresholds=thresholds,
        features=features,
        notes=_power_notes(len(training["volumes"]), len(new), thresholds),
    )


def drift_tags(report: DriftReport | None) -> dict[str, str]:
    """``mlpipe.drift.verdict`` (``drift``/``no drift``/``not checked``) and what moved."""
    if report is None:
        return {"mlpipe.drift.verdict": "not checked"}
    return {
        "mlpipe.drift.verdict": "drift" if report.drifted else "no drift",
        "mlpipe.drift.features": ",".join(report.drifted),
        "mlpipe.drift.check": ",".join(report.checks),
        "mlpipe.drift.source_run": report.model.run_id or "",
    }


def predictions_csv(rows: Sequence[CaseRow]) -> str:
    """``predictions.csv``: one row per case; columns in a stable order."""
    records = [r.record() for r in rows]
    columns: list[str] = []
    for record in records:
        columns += [k for k in record if k not in columns]
    fixed = ["case", "sha256", "shape", "spacing", "seconds"]
    volumes = sorted(c for c in columns if c.startswith("volume_ml_"))
    scores = sorted(c for c in columns if c.split("_")[0] in ("dice", "hd95", "volume"))
    scores = [c for c in scores if c not in volumes]
    order = [*fixed, *volumes, "status", "error", *scores]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=order, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({k: ("" if v is None else v) for k, v in record.items()})
    return out.getvalue()


def record_results(
    tracking: Tracking,
    run_id: str,
    rows: Sequence[CaseRow],
    *,
    seconds: float,
    dataset: DatasetInfo | None,
    drift: DriftReport | None,
) -> dict[str, float]:
    """Log the batch's metrics, tags and artifacts into its run; returns the metrics."""
    from mlflow.entities import Metric

    from mlpipe.log import dataset_tags

    metrics = batch_metrics(rows, seconds)
    tags = drift_tags(drift)
    if dataset is not None:
        tags.update(dataset_tags(dataset))
    now = int(datetime.now(timezone.utc).timestamp() * 1000)
    if drift is not None:
        metrics["n_drifted_features"] = float(len(drift.drifted))
    with translate_errors(f"run {run_id}"):
        points = [Metric(k, v, now, 0) for k, v in metrics.items()]
        tracking.client.log_batch(run_id, metrics=points)
        tracking.set_tags(run_id, {k: v for k, v in tags.items() if v})
        tracking.client.log_text(run_id, predictions_csv(rows), PREDICTIONS_ARTIFACT)
        if drift is not None:
            tracking.client.log_dict(run_id, drift.to_json(), DRIFT_ARTIFACT)
        if dataset is not None:
            tracking.client.log_dict(run_id, dataset.manifest(), MANIFEST_ARTIFACT)
            _log_input(tracking, run_id, dataset)
    return metrics


def _log_input(tracking: Tracking, run_id: str, dataset: DatasetInfo) -> None:
    """The inputs in the UI's Datasets column, as ``mlog.dataset`` records training data."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    from mlpipe.log import INPUT_DIGEST_CHARS

    first = dataset.source.split(";")[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # two local sources claim file:// URIs
        source = resolve_dataset_source(Path(first).resolve().as_uri())
    meta = MetaDataset(source=source, name=dataset.name, digest=dataset.digest[:INPUT_DIGEST_CHARS])
    tags = [InputTag("mlflow.data.context", "inference"), InputTag("version", dataset.version)]
    tracking.client.log_inputs(run_id, [DatasetInput(meta._to_mlflow_entity(), tags)])
