"""The MLflow adapter: the one place where mlpipe's use cases call the tracking client.

An explicit ``MlflowClient`` built from resolved settings, run ids passed around, and MLflow's
exceptions translated at this boundary into mlpipe errors with a message a user can act on.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING

from mlpipe.core.errors import MlpipeError, NotFoundError, TrackingUnavailableError, UsageError
from mlpipe.core.settings import Settings, environ_overlay, is_http_uri, redact_uri

if TYPE_CHECKING:
    from mlflow import MlflowClient

PREFLIGHT_TIMEOUT_S = 5.0
"""Budget for the tracking pre-flight: with start-up and imports, the answer comes within 10 s."""
FINISH_PROGRESS_S = 15.0
"""While waiting to mark a run's end, a progress line this often."""


def server_answers(uri: str, *, timeout: float = 3.0) -> bool:
    """Whether an ``http(s)`` tracking server answers ``/health`` now (other URIs: True)."""
    if not is_http_uri(uri):
        return True
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


@contextmanager
def bounded_http(timeout: float, retries: int = 0) -> Iterator[None]:
    """Bound the MLflow client's HTTP requests in this process for the block.

    MLflow reads ``MLFLOW_HTTP_REQUEST_TIMEOUT`` and ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` at
    each request; by default a request waits 120 s and is retried 7 times with backoff, about
    4 minutes against a dead server. These are process-wide variables: use this only where
    mlpipe owns the process's MLflow calls (the CLI's own calls, not a training process).
    """
    values = {
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, round(timeout))),
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    }
    with environ_overlay(values):
        yield


def check_reachable(uri: str, *, timeout: float = PREFLIGHT_TIMEOUT_S) -> None:
    """Fail fast when an ``http(s)`` tracking server does not answer its ``/health``.

    The MLflow client alone retries for about 4 minutes and then prints ~100 lines of
    traceback; this answers within ``timeout`` seconds. Other URIs (sqlite, file) pass.

    Raises:
        TrackingUnavailableError: naming the URI and what to check.
    """
    if not is_http_uri(uri):
        return
    url = uri.rstrip("/") + "/health"
    deadline = time.monotonic() + timeout
    reason = "no answer"
    while True:
        left = deadline - time.monotonic()
        try:
            with urllib.request.urlopen(url, timeout=max(left, 0.5)) as response:
                if response.status == 200:
                    return
                reason = f"HTTP {response.status}"
        except urllib.error.HTTPError as exc:
            reason = f"HTTP {exc.code}"
            if exc.code < 500:
                break  # a 4xx will not change by waiting
        except (urllib.error.URLError, OSError) as exc:
            reason = str(getattr(exc, "reason", exc))
            if "refused" in reason.lower() or "name or service" in reason.lower():
                break  # nothing listens there: waiting will not help
        if time.monotonic() + 1.0 > deadline:
            break
        time.sleep(1.0)
    raise TrackingUnavailableError(
        f"Tracking server {redact_uri(uri)} does not answer ({reason}). Check that it is "
        "running (`mlflow server` or `mlpipe server`), the host and port, and your network; "
        "or unset MLFLOW_TRACKING_URI to track into ./mlruns.db. Nothing was created."
    )


def quiet_mlflow_logs() -> None:
    """Hide MLflow's INFO chatter (table creation, temp folders) from mlpipe's own output.

    MLflow configures only its root ``mlflow`` logger at import, so levels set on these
    children stick; the project's own process is untouched.
    """
    import logging

    import mlflow  # noqa: F401 - configures MLflow's loggers first

    for name in ("mlflow.projects", "mlflow.store.db.utils", "mlflow.tracking"):
        logging.getLogger(name).setLevel(logging.WARNING)


class Tracking:
    """Tracking and registry calls for one resolved set of settings."""

    def __init__(self, settings: Settings):
        from mlflow import MlflowClient

        self.settings = settings
        self.uri = settings.tracking_uri.value or ""
        self.client: MlflowClient = MlflowClient(
            tracking_uri=self.uri, registry_uri=settings.registry_uri.value
        )

    def experiment_id(self, name: str, *, create: bool = True) -> str:
        """The id of experiment ``name``, created when missing (and ``create``)."""
        with translate_errors(f"experiment {name!r}"):
            experiment = self.client.get_experiment_by_name(name)
            if experiment is not None:
                if experiment.lifecycle_stage == "deleted":
                    raise UsageError(
                        f"Experiment {name!r} is deleted. Restore it in the MLflow UI or pick "
                        "another name with --experiment."
                    )
                return experiment.experiment_id
            if not create:
                raise NotFoundError(f"Experiment {name!r} does not exist.")
            return self.client.create_experiment(name)

    def create_run(
        self,
        experiment_id: str,
        *,
        tags: Mapping[str, str],
        params: Mapping[str, str],
        run_name: str | None = None,
    ) -> str:
        """Create a run with its tags and parameters in two calls; returns its id."""
        from mlflow.entities import Param

        with translate_errors("run"):
            run = self.client.create_run(experiment_id, tags=dict(tags), run_name=run_name)
            run_id = run.info.run_id
            if params:
                self.client.log_batch(
                    run_id, params=[Param(k, _param_value(v)) for k, v in params.items()]
                )
            return run_id

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        with translate_errors(f"run {run_id}"):
            self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def finish(
        self,
        run_id: str,
        status: str,
        *,
        wait: float = 10.0,
        echo: Callable[[str], None] | None = None,
        reason: str | None = None,
    ) -> None:
        """Send what the run's processes left in the outbox, then mark the run ``status``.

        Keeps trying for ``wait`` seconds, so a server that restarts does not leave the run
        RUNNING; each try is bounded (10 s, no MLflow retries) and ``echo`` gets a progress
        line every 15 s (more often for short waits). When the server never answers, the end
        is written to the outbox (``mlpipe.core.outbox``): the next ``mlpipe run`` or ``mlpipe
        doctor`` against this server marks the run FAILED, tagged ``mlpipe.failure`` with
        the reason.

        Args:
            run_id: the run.
            status: ``FINISHED``, ``FAILED`` or ``KILLED``.
            wait: seconds to keep trying.
            echo: where progress lines go.
            reason: for a ``FAILED`` end, the ``mlpipe.failure`` tag.

        Raises:
            TrackingUnavailableError: the server did not answer within ``wait``; the message
                says what was kept and how it gets sent.
            UsageError, NotFoundError: the server refused (unknown run, credentials).
        """
        from mlpipe.core.outbox import FAILURE_TAG, replay_outbox, write_outbox

        began = time.monotonic()
        deadline = began + wait
        every = min(FINISH_PROGRESS_S, max(wait / 4, 2.0))
        next_note = began + every
        last = "no answer"
        while True:
            if server_answers(self.uri):
                try:
                    with bounded_http(10.0), translate_errors(f"run {run_id}"):
                        replay_outbox(self.client, run_id)
                        if reason:
                            self.client.set_tag(run_id, FAILURE_TAG, reason[:5000])
                        self.client.set_terminated(run_id, status=status)
                    return
                except TrackingUnavailableError as exc:
                    last = str(exc)
                except UsageError as exc:
                    if not _server_side_error(exc):
                        raise
                    last = str(exc)
            now = time.monotonic()
            if now >= deadline:
                break
            if echo is not None and now >= next_note:
                next_note = now + every
                echo(
                    f"mlpipe: tracking server {redact_uri(self.uri)} does not answer; still "
                    f"trying to mark run {run_id} {status} ({now - began:.0f} s of {wait:g} s)"
                )
            time.sleep(min(2.0, max(deadline - now, 0.0)))
        end_reason = reason or (
            f"the tracking server did not answer for {wait:g} s when the run ended "
            f"({status} at {time.strftime('%Y-%m-%d %H:%M:%S %Z')}); marked FAILED later"
        )
        kept = write_outbox(
            self.uri, run_id, [{"type": "end", "status": "FAILED", "reason": end_reason}]
        )
        raise TrackingUnavailableError(
            f"Could not mark run {run_id} {status}: tracking server {redact_uri(self.uri)} did "
            f"not answer for {wait:g} s (MLPIPE_FINISH_TIMEOUT; last: {_short(last, 200)}). "
            f"The run stays RUNNING there until the next `mlpipe run` or `mlpipe doctor` "
            f"against it marks it FAILED and sends what the run left unsent ({kept.parent})."
        )

    def replay_outbox(self) -> list:
        """Send what earlier runs left in the outbox for this server; the ``Replayed`` list.

        Called by ``mlpipe run`` before a new run and by ``mlpipe doctor``; each try is
        bounded, and what cannot be sent stays for the next time.

        Raises:
            TrackingUnavailableError, UsageError: the server did not take it.
        """
        from mlpipe.core.outbox import outbox_files, replay_outbox

        if not outbox_files(self.uri):
            return []
        with bounded_http(10.0), translate_errors("outbox"):
            return replay_outbox(self.client)

    def run_summary(self, run_id: str) -> dict:
        with translate_errors(f"run {run_id}"):
            run = self.client.get_run(run_id)
        return {
            "run_id": run_id,
            "status": run.info.status,
            "experiment_id": run.info.experiment_id,
            "metrics": dict(run.data.metrics),
            "artifact_uri": run.info.artifact_uri,
        }

    def run_status(self, run_id: str) -> str:
        with translate_errors(f"run {run_id}"):
            return self.client.get_run(run_id).info.status

    def ui_link(self, experiment_id: str, run_id: str | None = None) -> str | None:
        """A link into the MLflow UI's runs table (not the 3.17 GenAI overview), for servers."""
        if not is_http_uri(self.uri):
            return None
        base = redact_uri(self.uri).rstrip("/")
        if run_id:
            return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"
        return f"{base}/#/experiments/{experiment_id}/runs"


@contextmanager
def translate_errors(what: str) -> Iterator[None]:
    """Turn MLflow and connection errors into mlpipe errors naming ``what`` failed."""
    try:
        yield
    except MlpipeError:
        raise
    except Exception as exc:
        from mlflow.exceptions import MlflowException

        if isinstance(exc, MlflowException):
            code = getattr(exc, "error_code", "")
            message = _short(getattr(exc, "message", str(exc)))
            if code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
                raise NotFoundError(f"{what}: {message}") from exc
            if code in ("UNAUTHENTICATED", "PERMISSION_DENIED") or "401" in message:
                raise UsageError(
                    f"{what}: the tracking server refused the credentials ({message}). "
                    "Check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD."
                ) from exc
            raise UsageError(f"{what}: {message}") from exc
        if isinstance(exc, (ConnectionError, OSError)):
            raise TrackingUnavailableError(f"{what}: tracking server unreachable: {exc}") from exc
        raise


def _server_side_error(exc: UsageError) -> bool:
    """An MLflow error that is the server's trouble (5xx), worth trying again."""
    cause = exc.__cause__
    status = getattr(cause, "get_http_status_code", None)
    try:
        return callable(status) and int(status()) >= 500
    except (TypeError, ValueError):
        return False


def _short(message: str, limit: int = 400) -> str:
    message = message.strip().splitlines()[0] if message.strip() else message
    with suppress(ValueError, AttributeError):  # REST errors sometimes carry a JSON body
        message = json.loads(message).get("message", message)
    return message if len(message) <= limit else message[: limit - 3] + "..."


def _param_value(value: str) -> str:
    # MLflow refuses param values over 6000 characters; keep the head and say so.
    limit = 6000
    return value if len(value) <= limit else value[: limit - 15] + "...[truncated]"
