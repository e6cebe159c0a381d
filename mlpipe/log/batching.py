"""Batched, background logging of metrics and params: what ``mlog.metrics`` and ``mlog.params``
sit on.

A training loop that logs every step must not wait for the tracking server. Against a local
``mlflow server``, one ``mlflow.log_metric`` call costs a full HTTP request (13 ms a point
measured here; DESIGN.md has 52 ms), while one ``log_batch`` of 1000 points costs about as much
as 15-20 single points. So :class:`MetricBatcher` only validates and appends to a queue in
the caller's thread (microseconds), and one daemon thread per run sends what has queued with
``MlflowClient.log_batch``: every ``flush_interval`` seconds, as soon as 1000 points wait, or
when :meth:`MetricBatcher.flush` or :meth:`MetricBatcher.close` asks.

Why not MLflow's own async logging (``MlflowClient.log_batch(..., synchronous=False)``,
``mlflow.log_metrics(..., synchronous=False)``, ``mlflow.flush_async_logging()``, in
``mlflow/utils/async_logging/async_logging_queue.py``)? Measured on MLflow 3.17.2 against a
local ``mlflow server`` (SQLite backend, one worker) with 2000 one-point calls:

- By default it does **not merge**: each call becomes its own ``log-batch`` request (2000
  requests; draining took 26.7 s, 13 ms a point, no faster than synchronous calls at 12 ms).
  A call is cheap through the client (0.2 ms) but not through the fluent API (0.6 ms). It
  merges only when the process-wide variable ``MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS`` is set
  (then 3 requests, 0.45 s), and a library should not change process-wide MLflow behaviour.
- Failures are not surfaced reliably: with merging on and the server down, only the first of
  50 merged calls' futures reported the error; the other 49 completed as if logged (a merged
  batch completes its child batches without passing on the exception). The queue logs one
  ERROR line per failed request, ``flush_async_logging()`` returns normally, and nothing is
  retried beyond the HTTP client's own retries.
- Requests go out on a pool of 10 threads, so batches of one run are sent concurrently, in no
  fixed order; each flush tears down and rebuilds the pools and registers another ``atexit``.
- What it does do: flush at exit (an ``atexit`` callback drains the queue) and split batches to
  MLflow's limits (1000 entities, 100 params).

So this module keeps its own small queue: one thread per run, batches sent in order (points of
a key reach the server in the order they were logged), a failed send retried with exponential
backoff, and points still failing after ``max_retries`` counted, logged as a warning on the
``mlpipe`` logger and raised from the next :meth:`~MetricBatcher.flush` or
:meth:`~MetricBatcher.close` as :class:`MetricsNotSentError` naming how many were lost.
Nothing is dropped silently. Every open batcher is flushed at process exit (``atexit``; this
handler is registered after MLflow's own, so it runs first, while the run is still active).
Params go in their own requests, so a param the server refuses (MLflow params cannot change
value) cannot take metrics down with it; a refused batch of params is re-sent one param at a
time, so only the offending one is lost.

Measured with ``benchmarks/metrics_logging.py`` (one server per run of the script, timed after
the server's start-up jobs settled; 2-core development machine; two runs): 10,000 points
through the batcher took 2.1-2.2 s including the final flush (0.21-0.22 ms a point, 10
requests; 6-7 us per ``log_metrics`` call in the caller's thread), against 13-18 ms a point
for per-call ``mlflow.log_metric`` (measured on 300 calls and extrapolated: 130-184 s for
10,000): 58x and 86x.

MLflow's HTTP client retries each request itself (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, default
7 with backoff: about 4 minutes against a dead server) before this module's retries start;
:meth:`~MetricBatcher.flush` bounds how long the caller waits regardless.

Kept whole: the batcher and the per-process registry that flushes every batcher at exit are
one idea (a batcher registers itself when it opens and leaves when it closes); the limits it
checks are in ``mlpipe.core.store_limits`` and the outbox it spills to in ``mlpipe.core.outbox``.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from mlpipe.core.errors import BatcherClosedError, MetricsNotSentError
from mlpipe.core.outbox import write_outbox
from mlpipe.core.settings import redact_uri
from mlpipe.core.store_limits import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_BATCH_CHARS,
    MAX_PARAMS_PER_BATCH,
    Delivery,
    deliver,
    first_line,
    is_refusal,
    is_retryable,
    metric_points,
    param_values,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient


logger = logging.getLogger("mlpipe")


MAX_BACKOFF_S = 30.0


DROPPED_TAG = "mlpipe.log.dropped_points"
"""Run tag: how many points the tracking store refused and mlpipe dropped (each was warned)."""


MAX_DROPS_NAMED = 10
"""Refused points named one warning line each per batch; more are counted in one line."""


EXIT_TIMEOUT_S = 30.0
"""How long process exit waits, over all batchers, for queued points to be sent.

``$MLPIPE_FLUSH_TIMEOUT`` overrides it; what is still unsent then goes to the outbox."""


FLUSH_TIMEOUT_ENV = "MLPIPE_FLUSH_TIMEOUT"


PARENT_RUN_ENV = "MLPIPE_PARENT_RUN"
"""Set by ``mlpipe run`` to the run id it owns: that parent marks the run's end itself."""


class MetricBatcher:
    """Queue metrics and params of one run; a daemon thread sends them in batches.

    Thread-safe: several threads may log to one batcher. Points of one key are sent in the
    order they were logged.

    Args:
        client: the client of the run's tracking server; used only from the sending thread.
        run_id: the run to log to.
        flush_interval: seconds between sends while fewer than 1000 points wait.
        max_retries: retries of a failed send before its points are given up and reported.
        retry_backoff: seconds before the first retry; doubled each time, at most 30 s.
    """

    def __init__(
        self,
        client: MlflowClient,
        run_id: str,
        *,
        flush_interval: float = 1.0,
        max_retries: int = 5,
        retry_backoff: float = 0.5,
    ):
        if flush_interval <= 0:
            raise ValueError(f"flush_interval must be positive, got {flush_interval!r}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be 0 or more, got {max_retries!r}")
        self.client = client
        self.run_id = run_id
        self.flush_interval = float(flush_interval)
        self.max_retries = int(max_retries)
        self.retry_backoff = float(retry_backoff)
        self._raw_uri = str(getattr(client, "tracking_uri", "") or "")
        self._uri = redact_uri(self._raw_uri)
        self._cond = threading.Condition()
        self._metrics: deque[tuple[str, float, int, int]] = deque()
        self._params: deque[tuple[str, str]] = deque()
        # Running counts: queued (logged), taken (by the thread), done (sent or given up).
        # flush() waits until done reaches what was queued when it was called.
        self._metrics_queued = self._metrics_taken = self._metrics_done = 0
        self._params_queued = self._params_taken = self._params_done = 0
        self._in_flight = 0
        # What the thread is sending now, kept so that a spill at exit includes it.
        self._sending: tuple[list[tuple[str, float, int, int]], list[tuple[str, str]]] = ([], [])
        self._sent = 0
        self._failed = 0
        self._unreported = 0  # failed points not yet raised from flush/close
        self._dropped = 0  # points the store refused (reported one by one, not raised)
        self._last_error = ""
        self._flush_waiters = 0
        self._closed = False
        self._stopping = False
        self._valid_keys: set[str] = set()
        self._param_values: dict[str, str] = {}
        self._thread = threading.Thread(
            target=self._work, name=f"mlpipe-batcher-{run_id[:12]}", daemon=True
        )
        self._thread.start()
        _track(self)

    # the caller's side: validate, append, return ------------------------------------------
    def log_metrics(
        self,
        metrics: Mapping[str, float],
        step: int | None = None,
        timestamp_ms: int | None = None,
    ) -> None:
        """Queue metric values; returns at once, the background thread sends them.

        Args:
            metrics: name -> value; a value is anything ``float()`` accepts that is finite
                (Python and NumPy numbers, one-element tensors), not a string.
            step: the training step [default: 0, as MLflow].
            timestamp_ms: milliseconds since the epoch [default: now].

        Raises:
            ValueError: a name MLflow would refuse, or a value that is not a finite number;
                the key is named and nothing of this call is queued.
            BatcherClosedError: the batcher was closed.
        """
        if self._closed:
            self._refuse()
        self.add_points(metric_points(metrics, step, timestamp_ms, self._valid_keys))

    def add_points(self, points: list[tuple[str, float, int, int]]) -> None:
        """Queue points already checked by :func:`~mlpipe.core.store_limits.metric_points`."""
        if not points:
            return
        with self._cond:
            if self._closed:
                self._refuse()
            self._metrics.extend(points)
            self._metrics_queued += len(points)
            if len(self._metrics) >= MAX_METRICS_PER_BATCH:
                self._cond.notify_all()

    def log_params(self, params: Mapping[str, object]) -> None:
        """Queue params (values as ``str()``, cut at MLflow's 6000 characters).

        Logging a param again with the same value is a no-op.

        Raises:
            ValueError: a name MLflow would refuse, or a param already logged through this
                batcher with a different value (MLflow params cannot change).
            BatcherClosedError: the batcher was closed.
        """
        if self._closed:
            self._refuse()
        values = param_values(params)
        if not values:
            return
        with self._cond:
            if self._closed:
                self._refuse()
            for key, value in values.items():
                old = self._param_values.get(key, value)
                if old != value:
                    raise ValueError(
                        f"param {key!r}: already logged as {old!r} for run {self.run_id}, now "
                        f"{value!r}. MLflow params cannot change; log a value that changes as "
                        "a metric or tag."
                    )
            new = [(k, v) for k, v in values.items() if k not in self._param_values]
            self._param_values.update(new)
            self._params.extend(new)
            self._params_queued += len(new)
            if len(self._params) >= MAX_PARAMS_PER_BATCH:
                self._cond.notify_all()

    def flush(self, timeout: float | None = 30.0) -> None:
        """Send everything queued so far and wait until it is sent or given up.

        Args:
            timeout: seconds to wait at most; ``None`` waits as long as it takes.

        Raises:
            MetricsNotSentError: points were given up after the retries since the last report
                (the count and the last error are named), or points were still queued when
                ``timeout`` ran out. It is a ``TrackingUnavailableError``.
        """
        with self._cond:
            metrics_target, params_target = self._metrics_queued, self._params_queued

            def done() -> bool:
                return self._metrics_done >= metrics_target and self._params_done >= params_target

            finished = done()
            if not finished:
                self._flush_waiters += 1
                self._cond.notify_all()
                try:
                    finished = self._cond.wait_for(done, timeout)
                finally:
                    self._flush_waiters -= 1
            failed, self._unreported = self._unreported, 0
            pending = 0 if finished else self._pending_locked()
            last_error = self._last_error
        if failed or pending:
            raise MetricsNotSentError(
                self._describe(failed, pending, last_error, timeout), failed=failed, pending=pending
            )

    def close(self, timeout: float | None = 30.0) -> None:
        """Flush, then stop the background thread; later calls do nothing.

        Raises:
            MetricsNotSentError: as :meth:`flush`. Points still queued after ``timeout`` keep
                being sent by the thread while the process lives.
        """
        with self._cond:
            if self._closed:
                return
            self._closed = True
        try:
            self.flush(timeout)
        finally:
            with self._cond:
                self._stopping = True
                self._cond.notify_all()
                drained = self._pending_locked() == 0
            if drained:
                self._thread.join(timeout=5.0)
                _untrack(self)

    @property
    def pending(self) -> int:
        """Points (metrics and params) queued or being sent, not yet sent or given up."""
        with self._cond:
            return self._pending_locked()

    @property
    def failed(self) -> int:
        """Points given up after the retries since this batcher started (reported or not)."""
        with self._cond:
            return self._failed

    @property
    def dropped(self) -> int:
        """Points the tracking store refused; each was named in a warning, none raised."""
        with self._cond:
            return self._dropped

    @property
    def sent(self) -> int:
        """Points the tracking server accepted."""
        with self._cond:
            return self._sent

    @property
    def closed(self) -> bool:
        return self._closed

    def spill(self, *, end_status: str | None = None, reason: str = "") -> Path | None:
        """Write every point not yet sent (queued or being sent) to the outbox; stop sending.

        For process exit with the server still down: the points outlive the process in a
        file that :func:`replay_outbox` sends later (``mlpipe run`` when the server is back,
        ``mlpipe doctor``). A point being sent at this moment may also arrive; the replay's
        duplicate is harmless (MLflow stores a metric point once; a param of the same value
        again is accepted).

        Args:
            end_status: also record that the run should end with this status on replay
                (when no ``mlpipe run`` parent will mark it).
            reason: why, for the ``mlpipe.failure`` tag of that end.

        Returns:
            The file written, or ``None`` when nothing was left to send.
        """
        with self._cond:
            metrics = list(self._sending[0]) + list(self._metrics)
            params = list(self._sending[1]) + list(self._params)
            self._metrics.clear()
            self._params.clear()
            self._closed = self._stopping = True
            self._cond.notify_all()
        _untrack(self)  # spilled once: the exit hook must not write these points again
        if not metrics and not params:
            return None
        records: list[dict] = [
            {"type": "metric", "key": k, "value": v, "timestamp": t, "step": s}
            for k, v, t, s in metrics
        ]
        records += [{"type": "param", "key": k, "value": v} for k, v in params]
        if end_status:
            records.append({"type": "end", "status": end_status, "reason": reason})
        return write_outbox(self._raw_uri, self.run_id, records)

    # the background thread ------------------------------------------------------------------
    def _work(self) -> None:
        # Every flush_interval (a "tick"), or when a flush or close waits, everything queued
        # by then is sent, in as few batches as MLflow's limits allow; in between, a batch
        # goes as soon as a full one is waiting. One thread, so batches go out in order.
        next_tick = time.monotonic() + self.flush_interval
        drain_metrics = drain_params = 0  # send until this many have been taken
        while True:
            with self._cond:
                while True:
                    now = time.monotonic()
                    if now >= next_tick:
                        next_tick = now + self.flush_interval
                        drain_metrics, drain_params = self._metrics_queued, self._params_queued
                    elif self._flush_waiters or self._stopping:
                        drain_metrics, drain_params = self._metrics_queued, self._params_queued
                    if (
                        self._metrics_taken < drain_metrics
                        or self._params_taken < drain_params
                        or len(self._metrics) >= MAX_METRICS_PER_BATCH
                        or len(self._params) >= MAX_PARAMS_PER_BATCH
                    ):
                        break
                    if self._stopping and not self._metrics and not self._params:
                        return
                    self._cond.wait(max(next_tick - now, 0.001))
                params = self._take_params()
                metrics = [
                    self._metrics.popleft()
                    for _ in range(min(len(self._metrics), MAX_METRICS_PER_BATCH))
                ]
                self._params_taken += len(params)
                self._metrics_taken += len(metrics)
                self._in_flight = len(params) + len(metrics)
                self._sending = (metrics, params)
            if params:
                self._send_params(params)
            if metrics:
                self._send_metrics(metrics)
            with self._cond:
                self._sending = ([], [])

    def _take_params(self) -> list[tuple[str, str]]:
        taken: list[tuple[str, str]] = []
        size = 0
        while self._params and len(taken) < MAX_PARAMS_PER_BATCH:
            key, value = self._params[0]
            size += len(key) + len(json.dumps(value))
            if taken and size > MAX_PARAM_BATCH_CHARS:
                break
            taken.append(self._params.popleft())
        return taken

    def _send_metrics(self, points: list[tuple[str, float, int, int]]) -> None:
        from mlflow.entities import Metric

        def send(chunk: Sequence[tuple[str, float, int, int]]) -> None:
            entities = [Metric(key, value, stamp, step) for key, value, stamp, step in chunk]
            # synchronous=True: with None, MLFLOW_ENABLE_ASYNC_LOGGING=true would hand the batch
            # to MLflow's async queue, whose failures this thread would never see.
            self.client.log_batch(self.run_id, metrics=entities, synchronous=True)

        self._settle_delivery("metrics", deliver(points, send, self._attempt))

    def _send_params(self, params: list[tuple[str, str]]) -> None:
        from mlflow.entities import Param

        def send(chunk: Sequence[tuple[str, str]]) -> None:
            # One refused param (say, a value that differs from the one `mlpipe run` logged)
            # fails the whole request: deliver() splits it so only that one is lost.
            entities = [Param(key, value) for key, value in chunk]
            self.client.log_batch(self.run_id, params=entities, synchronous=True)

        self._settle_delivery("params", deliver(params, send, self._attempt))

    def _settle_delivery(self, kind: str, delivery: Delivery) -> None:
        if delivery.sent:
            self._settle(kind, delivery.sent, None)
        for chunk, error in delivery.failed:
            self._settle(kind, len(chunk), error)
        if delivery.refused:
            self._drop(kind, delivery.refused)

    def _drop(self, kind: str, refused: list[tuple[tuple, Exception]]) -> None:
        """Report points the store refused, each by name (and step), and count them in a tag.

        They are not raised from flush(): the store answered, so retrying cannot help, and a
        training loop should not die for one point that is named here and in the run's tags.
        """
        shown = refused[:MAX_DROPS_NAMED]
        for item, error in shown:
            what = (
                f"metric {item[0]!r} at step {item[3]} (value {item[1]!r})"
                if kind == "metrics"
                else f"param {item[0]!r}"
            )
            logger.warning(
                "mlpipe: the tracking store (%s) refused %s of run %s, so it was dropped and "
                "the other points of its batch were sent: %s",
                self._uri or "local",
                what,
                self.run_id,
                first_line(error),
            )
        if len(refused) > len(shown):
            logger.warning(
                "mlpipe: %d more %s of run %s were refused by the tracking store and dropped.",
                len(refused) - len(shown),
                kind,
                self.run_id,
            )
        with self._cond:
            self._dropped += len(refused)
            total = self._dropped
        # Tagged before the points count as done, so a flush() that returns sees the tag.
        error = self._attempt(
            lambda: self.client.set_tag(self.run_id, DROPPED_TAG, str(total), synchronous=True)
        )
        if error is not None:
            logger.warning(
                "mlpipe: could not tag run %s with %s: %s",
                self.run_id,
                DROPPED_TAG,
                first_line(error),
            )
        with self._cond:
            if kind == "metrics":
                self._metrics_done += len(refused)
            else:
                self._params_done += len(refused)
            self._in_flight = max(self._in_flight - len(refused), 0)
            self._cond.notify_all()

    def _attempt(self, send: Callable[[], object]) -> Exception | None:
        """Call ``send`` until it succeeds or the retries are spent; returns the last error."""
        attempt = 0
        while True:
            try:
                send()
                return None
            except Exception as exc:  # the store raises MlflowException, requests, OSError
                if attempt >= self.max_retries or not is_retryable(exc) or is_refusal(exc):
                    return exc
                delay = min(self.retry_backoff * 2**attempt, MAX_BACKOFF_S)
                attempt += 1
                logger.debug(
                    "Sending to run %s failed (%s); retry %d of %d in %.1f s",
                    self.run_id,
                    first_line(exc),
                    attempt,
                    self.max_retries,
                    delay,
                )
                time.sleep(delay)

    def _settle(self, kind: str, count: int, error: Exception | None) -> None:
        if error is not None:  # warned before flush() can see it done and raise
            logger.warning(
                "%d %s for run %s were not sent to %s and are lost: %s",
                count,
                "metric points" if kind == "metrics" else "params",
                self.run_id,
                self._uri or "the tracking store",
                first_line(error),
            )
        with self._cond:
            if kind == "metrics":
                self._metrics_done += count
            else:
                self._params_done += count
            self._in_flight = max(self._in_flight - count, 0)
            if error is None:
                self._sent += count
            else:
                self._failed += count
                self._unreported += count
                self._last_error = first_line(error)
            self._cond.notify_all()

    # helpers ---------------------------------------------------------------------------------
    def _pending_locked(self) -> int:
        return len(self._metrics) + len(self._params) + self._in_flight

    def _refuse(self) -> NoReturn:
        raise BatcherClosedError(
            f"Cannot log to run {self.run_id}: its batcher was closed (the run ended). "
            "Start a new run, or get a fresh batcher with get_batcher()."
        )

    def _describe(self, failed: int, pending: int, last_error: str, timeout: float | None) -> str:
        where = self._uri or "the tracking store"
        parts = []
        if failed:
            parts.append(
                f"{failed} points (metrics and params) of run {self.run_id} were not sent to "
                f"{where} (attempts each: up to {self.max_retries + 1}) and are lost (last "
                f"error: {last_error})"
            )
        if pending:
            parts.append(
                f"{pending} points of run {self.run_id} were not sent yet after {timeout} s; "
                "they are still queued and being retried"
            )
        return "; ".join(parts) + (
            ". Check that the tracking server is up and reachable (`mlpipe doctor`)."
        )


# one batcher per (tracking URI, run) per process; all flushed at exit --------------------------
_registry: dict[tuple[str, str], MetricBatcher] = {}


_open: set[MetricBatcher] = set()


_lock = threading.RLock()  # get_batcher holds it while a new batcher registers itself


_exit_hook_registered = False


def get_batcher(client: MlflowClient, run_id: str) -> MetricBatcher:
    """The process's batcher for ``run_id`` on ``client``'s tracking server, made on first use.

    A closed batcher (its run ended) is replaced by a new one. Every batcher is flushed at
    process exit.

    Args:
        client: a client of the run's tracking server; the first one given is kept.
        run_id: the run.

    Returns:
        The batcher; the same object for the same tracking URI and run.
    """
    key = (str(client.tracking_uri), run_id)
    batcher = _registry.get(key)
    if batcher is not None and not batcher.closed:
        return batcher
    with _lock:
        batcher = _registry.get(key)
        if batcher is None or batcher.closed:
            batcher = MetricBatcher(client, run_id)
            _registry[key] = batcher
        return batcher


def flush_all(timeout: float | None = 30.0) -> None:
    """Flush every open batcher of this process within ``timeout`` seconds in all.

    Raises:
        MetricsNotSentError: after trying them all, if any batcher could not send its points;
            the counts are summed and each message kept.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    errors: list[MetricsNotSentError] = []
    with _lock:
        batchers = list(_open)
    for batcher in batchers:
        left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        try:
            batcher.flush(left)
        except MetricsNotSentError as exc:
            errors.append(exc)
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise MetricsNotSentError(
            " | ".join(str(e) for e in errors),
            failed=sum(e.failed for e in errors),
            pending=sum(e.pending for e in errors),
        )


def close_run(run_id: str, timeout: float | None = 30.0) -> None:
    """Send what is queued for ``run_id`` and stop its batchers: called when the run ends.

    Raises:
        MetricsNotSentError: as :meth:`MetricBatcher.close`.
    """
    with _lock:
        batchers = [b for (_, rid), b in _registry.items() if rid == run_id and not b.closed]
    for batcher in batchers:
        batcher.close(timeout)


def close_run_or_spill(run_id: str, timeout: float | None = None) -> bool:
    """Like :func:`close_run`, but what the server has not taken after ``timeout`` (default
    :func:`exit_timeout`) goes to the outbox, with one warning line, instead of staying queued.

    Returns:
        True when points went to the outbox: the server did not answer.

    Raises:
        MetricsNotSentError: points were given up earlier after the retries (they are lost).
    """
    timeout = exit_timeout() if timeout is None else timeout
    with _lock:
        batchers = [b for (_, rid), b in _registry.items() if rid == run_id and not b.closed]
    spilled = False
    for batcher in batchers:
        try:
            batcher.close(timeout)
        except MetricsNotSentError as exc:
            if not exc.pending:
                raise
            _spill_unsent(batcher, exc, timeout, "as the run ended")
            spilled = True
    return spilled


def _track(batcher: MetricBatcher) -> None:
    global _exit_hook_registered
    with _lock:
        _open.add(batcher)
        if not _exit_hook_registered:
            # Registered after `import mlflow` ran (a client exists), so it runs before MLflow's
            # own exit hooks (atexit is last-in, first-out): the run is still active.
            atexit.register(_close_all_at_exit)
            _exit_hook_registered = True


def _untrack(batcher: MetricBatcher) -> None:
    with _lock:
        _open.discard(batcher)


def exit_timeout(env: Mapping[str, str] | None = None) -> float:
    """Seconds process exit waits for unsent points: ``$MLPIPE_FLUSH_TIMEOUT``, else 30."""
    env = os.environ if env is None else env
    raw = env.get(FLUSH_TIMEOUT_ENV, "")
    try:
        return max(float(raw), 0.0) if raw else EXIT_TIMEOUT_S
    except ValueError:
        logger.warning(
            "%s=%r is not a number of seconds; using %g", FLUSH_TIMEOUT_ENV, raw, EXIT_TIMEOUT_S
        )
        return EXIT_TIMEOUT_S


def _close_all_at_exit() -> None:
    """Send what is queued before the interpreter ends; keep in the outbox what cannot be.

    When the tracking server does not take the points within :func:`exit_timeout`, they are
    written to the outbox and one line says how many, for which run and server, and how they
    get sent later. Then MLflow's own exit hook (it ends the active run) is made to fail fast:
    left alone, it retries the dead server for about 4 minutes.
    """
    timeout = exit_timeout()
    deadline = time.monotonic() + timeout
    with _lock:
        batchers = list(_open)
    spilled = False
    for batcher in batchers:
        left = max(deadline - time.monotonic(), 0.0)
        try:
            if batcher.closed:  # closed earlier, but its flush timed out: points still queued
                batcher.flush(left)
            else:
                batcher.close(left)
        except MetricsNotSentError as exc:
            if not exc.pending:
                logger.warning("At exit: %s", exc)
                continue
            spilled = True
            _spill_unsent(batcher, exc, timeout, "at exit")
        except Exception as exc:  # an exit hook must not raise
            logger.warning("At exit, sending metrics of run %s failed: %s", batcher.run_id, exc)
    if spilled:
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "3"


def _spill_unsent(
    batcher: MetricBatcher, exc: MetricsNotSentError, timeout: float, when: str
) -> None:
    owned_by_parent = os.environ.get(PARENT_RUN_ENV) == batcher.run_id
    with batcher._cond:
        metrics = len(batcher._sending[0]) + len(batcher._metrics)
        params = len(batcher._sending[1]) + len(batcher._params)
    reason = (
        "the tracking server did not answer when the training process ended; "
        f"{metrics} metric points and {params} params were sent later from the outbox"
    )
    try:
        path = batcher.spill(end_status=None if owned_by_parent else "FAILED", reason=reason)
    except OSError as err:
        logger.warning("At exit: %s (and they could not be saved: %s)", exc, err)
        return
    lost = f" ({exc.failed} more were given up earlier and are lost)" if exc.failed else ""
    after = (
        "`mlpipe run` sends them and ends the run once the server is back"
        if owned_by_parent
        else "`mlpipe doctor` or the next `mlpipe run` against this server sends them and "
        "marks the run FAILED"
    )
    logger.warning(
        "mlpipe: tracking server %s did not answer within %g s %s (%s): %d metric "
        "points and %d params of run %s not sent%s; saved to %s; %s.",
        batcher._uri or "(local store)",
        timeout,
        when,
        FLUSH_TIMEOUT_ENV,
        metrics,
        params,
        batcher.run_id,
        lost,
        path,
        after,
    )


def _forget_after_fork() -> None:
    # A forked child (a DataLoader worker) has no sending threads: its copies of the parent's
    # queues belong to the parent, which sends them. The child starts with no batchers.
    global _lock
    _lock = threading.RLock()
    _registry.clear()
    _open.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)
