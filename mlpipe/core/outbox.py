"""The outbox: metrics and params a process could not send, kept as JSON lines on disk, and
sent by the next ``mlpipe run`` or ``mlpipe doctor`` (``replay_outbox``) so nothing logged is
lost to a dead tracking server.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mlpipe.core.settings import redact_uri
from mlpipe.core.store_limits import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAMS_PER_BATCH,
    first_line,
    is_retryable,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient

logger = logging.getLogger("mlpipe")


OUTBOX = "outbox"


FAILURE_TAG = "mlpipe.failure"


@dataclass(frozen=True)
class Replayed:
    """What :func:`replay_outbox` sent for one run."""

    run_id: str
    metrics: int
    params: int
    status: str | None
    """The status the run was marked with, when an end was recorded."""
    gone: bool = False
    """The run no longer exists on the server; its records were dropped."""


def outbox_dir(env: Mapping[str, str] | None = None) -> Path:
    """``$MLPIPE_CACHE_DIR/outbox``, else ``$XDG_CACHE_HOME/mlpipe/outbox`` (``~/.cache``)."""
    env = os.environ if env is None else env
    if env.get("MLPIPE_CACHE_DIR"):
        base = Path(env["MLPIPE_CACHE_DIR"]).expanduser()
    else:
        base = Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlpipe"
    return base / OUTBOX


def _uri_key(uri: str) -> str:
    # A digest, not the URI: a URI may hold a password, and it must not end up in a path.
    import hashlib

    return hashlib.sha256(uri.rstrip("/").encode("utf-8")).hexdigest()[:16]


def write_outbox(uri: str, run_id: str, records: list[dict]) -> Path:
    """Write records (``metric``, ``param``, ``end``) for ``run_id`` on ``uri``; the file's path.

    One new file per call (a process never appends to another's file), named so that a
    run's files sort in the order they were written.
    """
    folder = outbox_dir() / _uri_key(uri)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{run_id}.{time.time_ns()}.{os.getpid()}.jsonl"
    header = {"type": "header", "run_id": run_id, "uri": redact_uri(uri), "pid": os.getpid()}
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for record in [header, *records]:
            fh.write(json.dumps(record) + "\n")
    os.replace(tmp, path)  # a reader never sees half a file
    return path


def outbox_files(uri: str, run_id: str | None = None) -> list[Path]:
    """The outbox files waiting for ``uri`` (and ``run_id``), oldest first."""
    folder = outbox_dir() / _uri_key(uri)
    if not folder.is_dir():
        return []
    files = sorted(folder.glob(f"{run_id or '*'}.*.jsonl"), key=lambda p: p.name.split(".")[1])
    return files


def replay_outbox(client: MlflowClient, run_id: str | None = None) -> list[Replayed]:
    """Send what the outbox holds for ``client``'s server (and ``run_id``), then delete it.

    Points first, then the recorded end: the run is marked with its status (``FAILED``)
    and tagged ``mlpipe.failure`` with the reason. The records of a run that was deleted
    or does not exist there are dropped.

    Raises:
        Exception: the client's error when the server refuses or does not answer; the files
            are kept for the next try.
    """
    from mlflow.entities import Metric, Param

    uri = str(client.tracking_uri)
    by_run: dict[str, list[Path]] = {}
    for path in outbox_files(uri, run_id):
        by_run.setdefault(path.name.split(".")[0], []).append(path)
    done = []
    for rid, paths in by_run.items():
        records = [r for path in paths for r in _read_records(path)]
        metrics = [
            Metric(r["key"], float(r["value"]), int(r["timestamp"]), int(r["step"]))
            for r in records
            if r.get("type") == "metric"
        ]
        params = [Param(r["key"], str(r["value"])) for r in records if r.get("type") == "param"]
        ends = [r for r in records if r.get("type") == "end"]
        if _run_gone(client, rid):
            done.append(Replayed(rid, 0, 0, None, gone=True))
        else:
            for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
                chunk = metrics[i : i + MAX_METRICS_PER_BATCH]
                client.log_batch(rid, metrics=chunk, synchronous=True)
            for i in range(0, len(params), MAX_PARAMS_PER_BATCH):
                _send_params_leniently(client, rid, params[i : i + MAX_PARAMS_PER_BATCH])
            status = None
            if ends:
                end = ends[-1]
                status = str(end.get("status") or "FAILED")
                if end.get("reason"):
                    client.set_tag(rid, FAILURE_TAG, str(end["reason"])[:5000])
                client.set_terminated(rid, status)
            done.append(Replayed(rid, len(metrics), len(params), status))
        for path in paths:
            path.unlink(missing_ok=True)
    return done


def _run_gone(client: MlflowClient, run_id: str) -> bool:
    """Whether the run was deleted or never existed there: its records can only be dropped."""
    try:
        return client.get_run(run_id).info.lifecycle_stage == "deleted"
    except Exception as exc:
        if getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
            return True
        raise


def _send_params_leniently(client: MlflowClient, run_id: str, params: list) -> None:
    # A param the server already holds with another value is refused (4xx) and would fail
    # the batch: send one by one then, so only that one is dropped.
    try:
        client.log_batch(run_id, params=params, synchronous=True)
    except Exception as exc:
        if is_retryable(exc):
            raise
        for param in params:
            try:
                client.log_batch(run_id, params=[param], synchronous=True)
            except Exception as single:
                if is_retryable(single):
                    raise
                logger.warning(
                    "Outbox: param %s of run %s refused: %s", param.key, run_id, first_line(single)
                )


def _read_records(path: Path) -> list[dict]:
    records = []
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:  # another process replayed it meanwhile
        return []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            logger.warning("Outbox: skipping a damaged line in %s", path)
    return records
