"""mlpipe.log: a few lines in training code, and every run says which data, which
preprocessing, what the data looked like, and how training went.

Example (runs as it is, with a folder of NIfTI volumes in the Decathlon layout)::

    import mlpipe.log as mlog
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, ScaleIntensityRanged

    train_tf = Compose([
        LoadImaged(keys=["image", "label"]),
        EnsureChannelFirstd(keys=["image", "label"]),
        ScaleIntensityRanged(keys="image", a_min=-57, a_max=164, b_min=0, b_max=1, clip=True),
    ])
    data = mlog.dataset("data/Task09_Spleen")       # name, version, content digest, manifest
    mlog.preprocessing(train_tf, name="train")      # JSON description, digest, flat params
    mlog.data_profile(data, max_volumes=20)         # spacing, shape, intensities, label fractions
    mlog.params({"lr": 1e-4, "model": "unet"})
    for epoch in range(10):
        mlog.metrics({"train_loss": 0.1 / (epoch + 1)}, step=epoch)   # batched, background
    mlog.overlay(image, label=label, prediction=pred, step=9)      # a picture in the UI
    mlog.flush()                                                    # also done at exit

Every helper logs to the active MLflow run: the one ``mlpipe run`` started (``MLFLOW_RUN_ID``)
or one from ``mlflow.start_run()``; with none active they start one, as MLflow's fluent API
does. Bad input raises before anything is logged.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from mlpipe.data.dataset import DatasetInfo

__all__ = [
    "artifact",
    "data_profile",
    "dataset",
    "environment",
    "flush",
    "metrics",
    "overlay",
    "params",
    "preprocessing",
]

logger = logging.getLogger("mlpipe")

MANIFEST_ARTIFACT = "mlpipe/dataset_manifest.json"
PROFILE_ARTIFACT = "mlpipe/data_profile.json"
INPUT_DIGEST_CHARS = 12
"""MLflow's dataset table keeps digests of at most 36 characters; the tag keeps all 64."""

_env_logged: set[str] = set()
_clients: dict[str, MlflowClient] = {}


def dataset(
    source: str | os.PathLike[str],
    *,
    name: str | None = None,
    version: str | None = None,
    context: str = "train",
) -> DatasetInfo:
    """Record which data the run used: tags, a ``log_input`` entry and the manifest.

    Args:
        source: a Decathlon folder (``imagesTr/``, ``labelsTr/``, ``dataset.json``), a folder of
            ``*_image``/``*_label`` pairs, or a CSV/JSON manifest of image/label pairs.
        name: dataset name [default: ``dataset.json``'s name, else the folder's].
        version: dataset version [default: ``dataset.json``'s version, else the digest's first
            12 characters, with a warning].
        context: how the run uses it (``train``, ``validation``, ``test``).

    Returns:
        The manifest, its digest and the image/label pairs (absolute paths) for loading.

    Raises:
        DatasetError: a missing folder, no volumes, an image without its label, an unreadable
            or truncated file, or image/label shapes that differ; nothing is logged.
    """
    from mlpipe.data.dataset import build_manifest

    info = build_manifest(source, name=name, version=version, progress=_Progress("hashing"))
    if not info.version_declared:
        logger.warning(
            "Dataset %s declares no version; using its digest prefix %s. Pass version= or add "
            '"version" to dataset.json.',
            info.name,
            info.version,
        )
    run_id, client = _run()
    client.log_batch(run_id, tags=_tags(dataset_tags(info)))
    _log_input(info, context)
    client.log_dict(run_id, info.manifest(), MANIFEST_ARTIFACT)
    return info


def dataset_tags(info: DatasetInfo) -> dict[str, str]:
    """The ``mlpipe.dataset.*`` tags of a manifest (DESIGN.md)."""
    return {
        "mlpipe.dataset.name": info.name,
        "mlpipe.dataset.version": info.version,
        "mlpipe.dataset.digest": info.digest,
        "mlpipe.dataset.uri": str(info.source),
        "mlpipe.dataset.files": str(len(info.files)),
        "mlpipe.dataset.bytes": str(info.total_bytes),
    }


def preprocessing(transform: Any, *, name: str = "train") -> dict:
    """Record a preprocessing chain so a service can rebuild exactly it.

    Args:
        transform: a MONAI ``Compose``, a list of MONAI transforms, or a plain dict.
        name: which chain (``train``, ``val``, ``infer``); one artifact per name.

    Returns:
        The canonical description that was logged.

    Raises:
        PreprocessingError: a transform that cannot be described (named in the message).
    """
    from mlpipe.data import preprocessing as prep

    path = prep.artifact_path(name)  # refuses an unsafe name before anything is logged
    description = prep.describe(transform)
    digest = prep.digest(description)
    params = prep.flat_params(description, name)
    run_id, client = _run()
    client.log_text(run_id, prep.to_json(description), path)
    tags = {"mlpipe.preprocessing.digest": digest}
    if name != "train":
        tags = {f"mlpipe.preprocessing.{name}.digest": digest}
    client.log_batch(run_id, tags=_tags(tags))
    _batcher(run_id, client).log_params(params)
    return description


def data_profile(
    source: DatasetInfo | str | os.PathLike[str], *, max_volumes: int | None = None
) -> dict:
    """Profile the volumes (geometry, intensities, label fractions) and log the profile.

    Args:
        source: what ``dataset()`` returned, or anything ``dataset()`` accepts.
        max_volumes: profile at most this many volumes, spread evenly over the dataset.

    Returns:
        The profile, also logged as ``mlpipe/data_profile.json`` with summary params.

    Raises:
        DatasetError: a volume cannot be read (the message names it); nothing is logged.
    """
    from mlpipe.data.dataset import DatasetInfo, build_manifest
    from mlpipe.data.profile import profile_dataset, summary_params

    info = source if isinstance(source, DatasetInfo) else build_manifest(source)
    profile = profile_dataset(info, max_volumes=max_volumes, progress=_Progress("profiling"))
    run_id, client = _run()
    client.log_dict(run_id, profile, PROFILE_ARTIFACT)
    _batcher(run_id, client).log_params(summary_params(profile))
    return profile


def params(values: Mapping[str, Any]) -> None:
    """Log parameters, batched with the metrics and sent in the background."""
    from mlpipe.core.store_limits import param_values

    checked = param_values(values)  # before a run is started: bad input creates nothing
    run_id, client = _run()
    _batcher(run_id, client).log_params(checked)


def metrics(values: Mapping[str, float], step: int | None = None) -> None:
    """Log metrics; costs microseconds: points are batched and sent by a background thread.

    NaN and infinity are logged as ``mlflow.log_metric`` logs them (a diverged loss is a result).

    Every point is checked here, in the caller's line, against what the tracking store
    accepts (names, numbers, a step in MLflow's 64-bit range), before a run is started.

    Raises:
        ValueError: a value that is not a number, a name MLflow refuses, or a step that is not
            a 64-bit integer (the key is named); nothing is logged and no run is started.
    """
    from mlpipe.core.store_limits import metric_points

    points = metric_points(values, step)  # before a run is started: bad input creates nothing
    run_id, client = _run()
    _batcher(run_id, client).add_points(points)


def flush(timeout: float | None = 30.0) -> None:
    """Send every queued point now (it also happens at run end and at process exit).

    Raises:
        TrackingUnavailableError: points could not be sent after retries (the count is named).
    """
    from mlpipe.log.batching import flush_all

    flush_all(timeout=timeout)


def artifact(
    local_path: str | os.PathLike[str],
    artifact_path: str | None = None,
    *,
    run_id: str | None = None,
) -> str:
    """Upload a file (a checkpoint, a report) to the run's artifacts; one clear error if it fails.

    The upload is retried by MLflow's HTTP client (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, 7 by
    default, with backoff: about 4 minutes), which rides out a tracking server or an S3 store
    that restarts. When it still fails, the error is one line naming the file, the run, the
    server and what to check, instead of MLflow's chain of urllib3 and requests tracebacks.
    The local file is never touched, so a training loop may catch the error and go on::

        try:
            mlog.artifact(f"ckpt/epoch_{epoch:03d}.pt", "checkpoints")
        except mlpipe.errors.TrackingUnavailableError as exc:
            print(exc)  # the checkpoint is on disk; the next epoch tries again

    Args:
        local_path: the file to upload.
        artifact_path: the folder in the run's artifacts [default: the top].
        run_id: the run [default: the active one].

    Returns:
        The artifact's path in the run.

    Raises:
        UsageError: ``local_path`` is not a file.
        TrackingUnavailableError: the upload failed after the retries.
    """
    from mlpipe.core.errors import TrackingUnavailableError, UsageError
    from mlpipe.core.settings import redact_uri

    path = Path(local_path)
    if not path.is_file():
        raise UsageError(f"mlog.artifact: {path} is not a file; pass the path of a file to upload.")
    if run_id is None:
        run_id, client = _run()
    else:
        client = client_for_active_uri()
    began = time.monotonic()
    try:
        client.log_artifact(run_id, str(path), artifact_path)
    except Exception as exc:
        size = path.stat().st_size / 1e6
        retries = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")
        error = TrackingUnavailableError(
            f"Uploading {path.name} ({size:.1f} MB) to run {run_id} through "
            f"{redact_uri(str(client.tracking_uri))} failed after "
            f"{time.monotonic() - began:.0f} s and MLflow's retries "
            f"(MLFLOW_HTTP_REQUEST_MAX_RETRIES={retries}): {_upload_reason(exc)}. The file is "
            f"still at {path.resolve()}; upload it again once the store is back."
        )
        error.original = exc  # type: ignore[attr-defined]
        # `from None`: the chain (urllib3, requests, MLflow) is ~100 lines in a training log
        # and says less than the message; it stays reachable as `error.original`.
        raise error from None
    return f"{artifact_path}/{path.name}" if artifact_path else path.name


def _upload_reason(exc: BaseException) -> str:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    text = str(getattr(exc, "message", None) or exc)
    lowered = text.lower()
    server_side = (
        "the tracking server dropped or refused the upload (its artifact store, e.g. S3, may "
        "be down or refusing it: see the server's log)"
    )
    if status is not None:
        return f"HTTP {status}: " + (server_side if status >= 500 else text.splitlines()[0][:200])
    if "remote end closed" in lowered or "connection aborted" in lowered:
        return server_side
    if "too many 5" in lowered or "error code 5" in lowered:  # urllib3 / MLflow on 5xx
        return server_side
    if "connection refused" in lowered:
        return "the tracking server does not answer"
    if "timeout" in lowered or "timed out" in lowered:
        return "the upload timed out (MLFLOW_HTTP_REQUEST_TIMEOUT)"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return first[:300]


def overlay(
    image: Any,
    *,
    label: Any = None,
    prediction: Any = None,
    step: int | None = None,
    name: str = "overlay",
    spacing: Any = None,
    run_id: str | None = None,
) -> str:
    """Log a picture of a segmentation: the most informative axial, coronal, sagittal slices.

    ``run_id`` names the run explicitly, for calls from a background thread (MLflow's active
    run is per thread, so there a helper would otherwise start a new run).

    Returns:
        The artifact path of the image.
    """
    from mlpipe.log.figures import render_overlay

    picture = render_overlay(image, label, prediction, spacing=spacing)
    suffix = f"_step{step:06d}" if step is not None else ""
    path = f"overlays/{name}{suffix}.png"
    if run_id is None:
        run_id, client = _run()
    else:
        client = client_for_active_uri()
    client.log_image(run_id, picture, artifact_file=path)
    return path


def environment() -> dict[str, str]:
    """Tag the run with library versions and the GPU (``mlpipe.env.*``); returns the tags."""
    from mlpipe.core.environment import environment_tags

    tags = environment_tags()
    run_id, client = _run(log_environment=False)
    client.log_batch(run_id, tags=_tags(tags))
    _env_logged.add(run_id)
    return tags


# internals -------------------------------------------------------------------------------------
def _run(*, log_environment: bool = True) -> tuple[str, MlflowClient]:
    """The active run (started as MLflow's fluent API would) and a client for its server."""
    import mlflow

    _flush_at_run_end()
    run = mlflow.active_run() or mlflow.start_run()
    run_id = run.info.run_id
    client = client_for_active_uri()
    if log_environment and run_id not in _env_logged:
        environment()
    return run_id, client


def client_for_active_uri() -> MlflowClient:
    """One cached client for the current tracking URI (clients are safe to share by threads)."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    client = _clients.get(uri)
    if client is None:
        client = _clients[uri] = mlflow.MlflowClient(uri)
    return client


def _flush_at_run_end() -> None:
    """Make ``mlflow.end_run`` (and leaving ``with mlflow.start_run()``) send queued points first.

    MLflow has no run-end hook, so ``end_run`` is wrapped, once, where the fluent API looks it
    up. Without it, points still queued when a run ends would reach an already FINISHED run a
    moment later (or at exit), and a reader in between would see the run incomplete.
    """
    import mlflow
    from mlflow.tracking import fluent

    if getattr(fluent.end_run, "_mlpipe_flushes", False):
        return
    original = fluent.end_run

    @functools.wraps(original)
    def end_run(*args: Any, **kwargs: Any) -> None:
        from mlpipe.log.batching import close_run_or_spill

        run = mlflow.active_run()
        spilled = False
        if run is not None:
            try:
                spilled = close_run_or_spill(run.info.run_id)
            except Exception as exc:  # the run must still end; the loss is reported
                logger.warning("Ending run %s: %s", run.info.run_id, exc)
        if not spilled:
            original(*args, **kwargs)
            return
        # The server did not take the points: MLflow's own end would retry it for about
        # 4 minutes and then raise out of the training script. One quick try; the outbox
        # holds the points (and, without an `mlpipe run` parent, the run's end).
        from mlpipe.core.tracking import bounded_http

        try:
            with bounded_http(3.0, retries=0):
                original(*args, **kwargs)
        except Exception as exc:
            logger.warning(
                "mlpipe: run %s could not be marked ended either (the tracking server does not "
                "answer: %s)",
                run.info.run_id if run else "?",
                str(exc).strip().splitlines()[0][:200] if str(exc).strip() else exc,
            )

    end_run._mlpipe_flushes = True  # type: ignore[attr-defined]
    fluent.end_run = end_run
    if mlflow.end_run is original:
        mlflow.end_run = end_run


def _batcher(run_id: str, client: MlflowClient):
    from mlpipe.log.batching import get_batcher

    return get_batcher(client, run_id)


def _log_input(info: DatasetInfo, context: str) -> None:
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():
        # MLflow registers two local-artifact source classes under one name and warns that
        # a file:// URI fits both; either is right here.
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(Path(info.source).resolve().as_uri())
    data = MetaDataset(source=source, name=info.name, digest=info.digest[:INPUT_DIGEST_CHARS])
    mlflow.log_input(data, context=context, tags={"version": info.version})


def _tags(values: Mapping[str, str]):
    from mlflow.entities import RunTag

    return [RunTag(k, str(v)) for k, v in values.items()]


class _Progress:
    """Progress on stderr for work that takes longer than a second, at most once a second."""

    def __init__(self, verb: str):
        self.verb = verb
        self.started = time.monotonic()
        self.last = 0.0

    def __call__(self, done: int, total: int, *extra: int) -> None:
        now = time.monotonic()
        if now - self.started < 1.0 or (now - self.last < 1.0 and done < total):
            return
        self.last = now
        size = f" ({extra[0] / 1e6:.0f} MB)" if extra else ""
        end = "\n" if done >= total else "\r"
        sys.stderr.write(f"mlpipe: {self.verb} {done}/{total} files{size}{end}")
        sys.stderr.flush()
