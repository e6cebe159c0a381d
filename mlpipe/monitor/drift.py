"""Do new volumes look like the training data? Per-feature tests against the training profile.

``mlpipe drift MODEL_URI DIR`` finds the model version's source run, reads the data profile
that ``mlpipe.log.data_profile`` logged there (``mlpipe/data_profile.json``: one entry per
profiled volume), profiles the new volumes with the same ``mlpipe.data.profile.profile_volume``, and
compares the two samples feature by feature:

* numeric features (spacing and shape per axis; intensity p0_5, p50, p99_5, mean, std): the
  two-sample Kolmogorov-Smirnov test (``scipy.stats.ks_2samp``) plus the shift of the median,
  relative to a scale (the training median for spacing, shape and std; the training intensity
  range, median p99_5 - p0_5, for the intensity location features, which may sit near 0 HU).
  A feature has **drifted** when the shift exceeds ``shift`` AND either the KS p-value is below
  ``ks_pvalue`` or the new median lies outside the training range. Needing both keeps a tiny
  but significant difference (many volumes) or a large but unsupported one (few volumes) from
  failing a gate; either alone gives the verdict **check**. The range test lets a handful of
  new volumes with a clearly new value (a spacing no training volume had) be called drift,
  which KS alone cannot do with so few samples; and on identical values (constant spacing)
  KS is degenerate while the shift still reads right.
* orientation (categorical): the share of new volumes whose orientation no training volume
  had; **drift** above ``unseen_share``, **check** when some but not more.

Serving keeps the input profiles of ``mlpipe serve`` in a JSON-lines file (``--from-serving``):
``<cache>/serving/<model>/profiles.jsonl``, one ``profile_volume`` dict per line plus
``received`` (ISO time) and ``model_version``; ``read_serving_profiles`` reads it.

Library only: values are returned and typed errors raised; nothing prints.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from mlpipe.core.errors import DriftFoundError, NotFoundError, UsageError
from mlpipe.core.tracking import Tracking, translate_errors
from mlpipe.inference.models import ModelSource, resolve_model
from mlpipe.monitor.features import (
    CHECK,
    DRIFT,
    FeatureResult,
    Thresholds,
    _power_notes,
    _side_text,
    _spread,
    _statistic_text,
    _usable,
    compare_profiles,
)
from mlpipe.monitor.new_volumes import (
    _default_serving,
    _parse_time,
    find_images,
    profile_images,
    read_serving_profiles,
)

if TYPE_CHECKING:
    pass


REPORT_FORMAT = "mlpipe.drift_report/1"


PROFILE_ARTIFACT = "mlpipe/data_profile.json"  # as mlpipe.log writes it


ARTIFACT_DIR = "drift"


MONITORING_SUFFIX = "-monitoring"


Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class DriftRequest:
    """What ``mlpipe drift`` checks, as its options give it.

    Attributes:
        model_uri: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or ``runs:/RUN_ID/PATH``.
        folder: new volumes (NIfTI images; label files and ``labels*/`` folders are skipped).
        from_serving: read the profiles ``mlpipe serve`` kept for the model instead.
        serving_file: that JSON-lines file, when not at its default place.
        since: only serving profiles received at or after this ISO time.
        thresholds: the verdict rules' thresholds.
        max_volumes: profile at most this many new volumes, spread evenly.
        experiment: where the check is logged [default: ``<model>-monitoring``].
        output: folder for ``report.json``, ``report.png``, ``new_profile.json``.
        log: log the check as a run (False: only the local report).
    """

    model_uri: str
    folder: str | None = None
    from_serving: bool = False
    serving_file: str | None = None
    since: str | None = None
    thresholds: Thresholds = field(default_factory=Thresholds)
    max_volumes: int | None = None
    experiment: str | None = None
    output: str = "drift-report"
    log: bool = True


@dataclass
class DriftReport:
    """The outcome of a drift check: per-feature results and where the report went."""

    model: ModelSource
    source: str
    source_kind: str  # folder | serving
    training_dataset: dict
    thresholds: Thresholds
    features: list[FeatureResult]
    notes: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    run_id: str | None = None
    experiment: str | None = None
    link: str | None = None
    created: str = field(
        default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds")
    )

    @property
    def drifted(self) -> list[str]:
        return [f.feature for f in self.features if f.verdict == DRIFT]

    @property
    def checks(self) -> list[str]:
        return [f.feature for f in self.features if f.verdict == CHECK]

    @property
    def n_training(self) -> int:
        return len(self.features[0].training) if self.features else 0

    @property
    def n_new(self) -> int:
        return len(self.features[0].new) if self.features else 0

    def rows(self) -> list[tuple[str, str, str, str, str]]:
        """(feature, training, new, statistic, verdict) per feature, for the terminal."""
        return [
            (
                f.feature + (f" ({f.unit})" if f.unit else ""),
                _side_text(f, f.training),
                _side_text(f, f.new),
                _statistic_text(f),
                f.verdict.upper() if f.verdict == DRIFT else f.verdict,
            )
            for f in self.features
        ]

    def to_json(self) -> dict:
        return {
            "format": REPORT_FORMAT,
            "created": self.created,
            "verdict": DRIFT if self.drifted else "no drift",
            "drifted": self.drifted,
            "check": self.checks,
            "model": {
                "uri": self.model.uri,
                "name": self.model.name,
                "version": self.model.version,
                "source_run": self.model.run_id,
            },
            "training": {"volumes": self.n_training, "dataset": self.training_dataset},
            "new": {"volumes": self.n_new, "source": self.source, "kind": self.source_kind},
            "thresholds": {
                "ks_pvalue": self.thresholds.ks_pvalue,
                "shift": self.thresholds.shift,
                "unseen_share": self.thresholds.unseen_share,
            },
            "features": [f.to_json() for f in self.features],
            "notes": self.notes,
            "run_id": self.run_id,
        }


def check_drift(
    tracking: Tracking, request: DriftRequest, *, progress: Progress | None = None
) -> DriftReport:
    """Profile the new volumes, compare them with the training profile, report and log.

    Everything is read and checked before anything is written or logged.

    Returns:
        The report; ``drifted`` names the features that moved (see ``raise_if_drift``).

    Raises:
        UsageError: bad options or MODEL_URI, no volumes in the folder, an empty serving file.
        NotFoundError: the model, version or run does not exist, or its run has no profile.
        DatasetError: none of the new volumes can be read.
    """
    _check_request(request)
    model = resolve_model(tracking, request.model_uri)
    training = load_training_profile(model)
    notes: list[str] = []
    if request.from_serving or request.serving_file:
        path = Path(request.serving_file) if request.serving_file else _default_serving(model)
        new, skipped = read_serving_profiles(path, since=request.since)
        if skipped:
            notes.append(f"{skipped} line(s) of {path} could not be read and were skipped.")
        if not new:
            since = f" received since {request.since}" if request.since else ""
            raise UsageError(f"No input profiles{since} in {path}; nothing to compare.")
        new = _spread(new, request.max_volumes)
        source, kind = str(path), "serving"
    else:
        assert request.folder is not None
        images = _spread(find_images(request.folder), request.max_volumes)
        new, failed = profile_images(images, progress=progress)
        if failed:
            listed = "; ".join(failed[:5]) + ("; ..." if len(failed) > 5 else "")
            notes.append(f"{len(failed)} volume(s) could not be read and were skipped: {listed}")
        source, kind = str(Path(request.folder).absolute()), "folder"

    features = compare_profiles(training["volumes"], new, request.thresholds)
    notes += _power_notes(len(training["volumes"]), len(new), request.thresholds)
    report = DriftReport(
        model=model,
        source=source,
        source_kind=kind,
        training_dataset=dict(training.get("dataset") or {}),
        thresholds=request.thresholds,
        features=features,
        notes=notes,
    )
    report.files = write_report(report, new, Path(request.output))
    if request.log:
        log_report(tracking, report, experiment=request.experiment)
    return report


def raise_if_drift(report: DriftReport) -> None:
    """Raise when any feature drifted, naming them (exit 4: a retraining job can gate on it).

    Raises:
        DriftFoundError: one or more features drifted.
    """
    if report.drifted:
        raise DriftFoundError(
            f"Drift found in {len(report.drifted)} feature(s): {', '.join(report.drifted)}. "
            f"The new volumes do not look like {report.model.uri}'s training data."
        )


def _check_request(request: DriftRequest) -> None:
    serving = request.from_serving or bool(request.serving_file)
    if request.folder and serving:
        raise UsageError("Give DIR or --from-serving/--serving-file, not both.")
    if not request.folder and not serving:
        raise UsageError(
            "Nothing to check: give DIR (a folder of new NIfTI volumes) or --from-serving."
        )
    if request.since and not serving:
        raise UsageError("--since filters serving profiles; give --from-serving too.")
    if request.since:
        _parse_time(request.since, "--since")
    if request.max_volumes is not None and request.max_volumes < 1:
        raise UsageError(f"--max-volumes must be at least 1, not {request.max_volumes}.")


def load_training_profile(model: ModelSource) -> dict:
    """The training profile the inference core read from the model's source run, checked.

    The profile keeps one entry per profiled volume (all of them, or ``max_volumes`` spread
    evenly; seg3d's train profiles up to 50), which is what the KS test needs.

    Raises:
        NotFoundError: the model has no source run, the run has no readable profile, or a
            profile without volumes.
    """
    if not model.run_id:
        raise NotFoundError(
            f"{model.uri} has no source run, so its training profile cannot be found. Register "
            "versions from a run (log_model(..., registered_model_name=...) inside the run)."
        )
    profile = model.training_profile
    if profile is None:
        raise NotFoundError(
            f"Run {model.run_id} (source of {model.uri}) has no readable {PROFILE_ARTIFACT}. "
            "Call mlpipe.log.data_profile(...) in the training code so drift can be checked "
            "against it."
        )
    volumes = [v for v in profile.get("volumes", []) if _usable(v)]
    if not volumes:
        raise NotFoundError(
            f"The training profile of run {model.run_id} holds no volume entries; nothing to "
            "compare with. Profile the training data with mlpipe.log.data_profile(data)."
        )
    return {**profile, "volumes": volumes}


def write_report(report: DriftReport, new_profiles: Sequence[dict], folder: Path) -> dict:
    """Write ``report.json``, ``report.png`` (histograms) and ``new_profile.json``.

    ``new_profile.json`` has the format of a training data profile, so a later check (or a
    training run) can use it as it is.

    Returns:
        ``{"json": ..., "png": ..., "profile": ...}`` paths as strings.

    Raises:
        UsageError: the folder cannot be created or written.
    """
    from mlpipe.data.profile import FORMAT, summarize
    from mlpipe.monitor.report import drift_figure

    try:
        folder.mkdir(parents=True, exist_ok=True)
        paths = {
            "json": folder / "report.json",
            "png": folder / "report.png",
            "profile": folder / "new_profile.json",
        }
        paths["json"].write_text(json.dumps(report.to_json(), indent=2), encoding="utf-8")
        profile = {"format": FORMAT, "volumes": list(new_profiles)}
        profile["summary"] = summarize(profile["volumes"])
        paths["profile"].write_text(json.dumps(profile, indent=1), encoding="utf-8")
        title = f"{report.model.uri}: {report.n_new} new vs {report.n_training} training volumes"
        drift_figure(report.features, paths["png"], title=title)
    except OSError as exc:
        raise UsageError(f"Cannot write the drift report into {folder}: {exc}") from exc
    return {key: str(path) for key, path in paths.items()}


def monitoring_experiment(tracking: Tracking, model: ModelSource) -> str:
    """``<model>-monitoring``; for an unregistered ``runs:/`` model, after its run's experiment.

    Under the team's ``experiment_prefix``, like every experiment mlpipe creates.
    """
    if model.name:
        return tracking.settings.prefixed(model.name + MONITORING_SUFFIX)
    with translate_errors(f"experiment {model.experiment_id}"):
        name = tracking.client.get_experiment(model.experiment_id).name
    return tracking.settings.prefixed(name + MONITORING_SUFFIX)


def log_report(tracking: Tracking, report: DriftReport, *, experiment: str | None = None) -> str:
    """Log the check as a run: params, per-feature metrics, ``mlpipe.drift.*`` tags, files.

    Sets ``report.run_id``, ``report.experiment`` and ``report.link``; returns the run id.
    """
    from mlflow.entities import Metric

    from mlpipe import __version__

    name = experiment or monitoring_experiment(tracking, report.model)
    experiment_id = tracking.experiment_id(name)
    model = report.model
    version = model.version or "-"
    tags = {
        "mlpipe.version": __version__,
        "mlpipe.drift.model": model.name or "",
        "mlpipe.drift.model_version": model.version or "",
        "mlpipe.drift.model_uri": model.uri,
        "mlpipe.drift.source_run": model.run_id,
        "mlpipe.drift.verdict": DRIFT if report.drifted else "no drift",
        "mlpipe.drift.features": ",".join(report.drifted),
        "mlpipe.drift.check": ",".join(report.checks),
        "mlpipe.drift.source": report.source_kind,
        "mlpipe.drift.training_dataset": " ".join(
            str(report.training_dataset.get(k, "")) for k in ("name", "version")
        ).strip(),
    }
    params = {
        "model_uri": model.uri,
        "model_version": version,
        "source_run": model.run_id,
        "n_volumes": str(report.n_new),
        "n_training_volumes": str(report.n_training),
        "new_data": report.source,
        "ks_pvalue": f"{report.thresholds.ks_pvalue:g}",
        "shift": f"{report.thresholds.shift:g}",
        "unseen_share": f"{report.thresholds.unseen_share:g}",
    }
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    run_name = f"drift-{model.name or model.run_id[:8]}-v{version}-{stamp}"
    run_id = tracking.create_run(
        experiment_id, tags={k: v for k, v in tags.items() if v}, params=params, run_name=run_name
    )
    report.run_id, report.experiment = run_id, name
    status = "FAILED"
    try:
        if report.files.get("json"):
            # written before the run existed: rewritten with its id, so that the local copy
            # and the logged artifact both say which run holds the report
            Path(report.files["json"]).write_text(
                json.dumps(report.to_json(), indent=2), encoding="utf-8"
            )
        now = int(datetime.now(timezone.utc).timestamp() * 1000)
        values = {
            "n_drifted_features": float(len(report.drifted)),
            "n_check_features": float(len(report.checks)),
            "n_volumes": float(report.n_new),
        }
        for result in report.features:
            for key in ("shift", "ks_pvalue", "unseen_share"):
                value = result.statistics.get(key)
                if value is not None and math.isfinite(value):
                    values[f"{key}.{result.feature}"] = float(value)
        metrics = [Metric(k, v, now, 0) for k, v in values.items()]
        with translate_errors(f"run {run_id}"):
            tracking.client.log_batch(run_id, metrics=metrics)
            for path in report.files.values():
                tracking.client.log_artifact(run_id, path, ARTIFACT_DIR)
        status = "FINISHED"
    finally:
        tracking.finish(run_id, status)
    report.link = tracking.ui_link(experiment_id, run_id)
    return run_id
