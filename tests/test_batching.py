"""MetricBatcher against a real SQLite tracking store in tmp_path (and a dead HTTP address).

A ``RecordingClient`` is a real ``MlflowClient`` that also notes what each ``log_batch`` call
carried, so batch sizes and order can be checked; the data still goes to the store.
"""

from __future__ import annotations

import contextlib
import logging
import math
import socket
import threading
import time

import pytest
from mlflow import MlflowClient

from mlpipe.core.errors import BatcherClosedError, MetricsNotSentError, TrackingUnavailableError
from mlpipe.log.batching import MetricBatcher, flush_all, get_batcher
from tests.conftest import free_port


class RecordingClient(MlflowClient):
    """A real client that keeps, per ``log_batch`` call, the metrics and params it sent."""

    def __init__(self, uri: str):
        super().__init__(uri)
        self.calls: list[tuple[list, list]] = []

    def log_batch(self, run_id, metrics=(), params=(), tags=(), synchronous=None):
        self.calls.append((list(metrics), list(params)))
        return super().log_batch(
            run_id, metrics=metrics, params=params, tags=tags, synchronous=synchronous
        )


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory) -> str:
    """One SQLite store for the module: creating its schema costs about a second."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlruns.db'}"
    client = MlflowClient(uri)
    client.create_experiment("batching")
    return uri


@pytest.fixture
def client(store_uri) -> RecordingClient:
    return RecordingClient(store_uri)


@pytest.fixture
def run_id(client) -> str:
    experiment = client.get_experiment_by_name("batching")
    return client.create_run(experiment.experiment_id).info.run_id


@pytest.fixture
def batcher(client, run_id):
    made = MetricBatcher(client, run_id)
    yield made
    made.close(timeout=10)


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, int, float]]:
    return [(m.step, m.timestamp, m.value) for m in client.get_metric_history(run_id, key)]


def test_log_metrics_points_arrive_with_steps_and_timestamps(batcher, client, run_id):
    batcher.log_metrics({"loss": 0.5, "dice": 0.25}, step=3, timestamp_ms=1_700_000_000_000)
    batcher.log_metrics({"loss": 0.4}, step=4, timestamp_ms=1_700_000_000_500)
    before = int(time.time() * 1000)
    batcher.log_metrics({"lr": 1e-4})  # no step, no timestamp: step 0, now
    after = int(time.time() * 1000)
    batcher.flush()

    assert history(client, run_id, "loss") == [
        (3, 1_700_000_000_000, 0.5),
        (4, 1_700_000_000_500, 0.4),
    ]
    assert history(client, run_id, "dice") == [(3, 1_700_000_000_000, 0.25)]
    ((step, stamp, value),) = history(client, run_id, "lr")
    assert (step, value) == (0, 1e-4)
    assert before <= stamp <= after
    assert batcher.pending == 0
    assert batcher.sent == 4


def test_log_metrics_converts_numpy_numbers(batcher, client, run_id):
    np = pytest.importorskip("numpy")
    batcher.log_metrics({"a": np.float32(0.5), "b": np.int64(7), "c": 2}, step=np.int64(1))
    batcher.flush()
    assert client.get_run(run_id).data.metrics == {"a": 0.5, "b": 7.0, "c": 2.0}


def test_log_metrics_order_preserved_per_key(batcher, client, run_id):
    # Steps run backwards so that the store's own sort (timestamp, step) cannot restore order.
    logged = {"loss": [], "dice": []}
    for i in range(2500):
        batcher.log_metrics({"loss": float(i), "dice": float(-i)}, step=2500 - i)
        logged["loss"].append(2500 - i)
        logged["dice"].append(2500 - i)
    batcher.flush()

    sent = {"loss": [], "dice": []}
    for metrics, _ in client.calls:
        for metric in metrics:
            sent[metric.key].append(metric.step)
    assert sent == logged
    assert len(client.get_metric_history(run_id, "loss")) == 2500


def test_log_metrics_splits_more_than_1000_points_into_batches(client, run_id):
    batcher = MetricBatcher(client, run_id, flush_interval=60)  # only size and flush send
    batcher.log_metrics({f"m{i}": float(i) for i in range(2500)}, step=1)
    batcher.flush(timeout=30)

    sizes = [len(metrics) for metrics, _ in client.calls]
    assert sizes == [1000, 1000, 500]
    assert len(client.get_run(run_id).data.metrics) == 2500
    batcher.close()


def test_log_metrics_sent_in_background_without_flush(client, run_id):
    batcher = MetricBatcher(client, run_id, flush_interval=0.2)
    batcher.log_metrics({"loss": 1.0}, step=1)
    deadline = time.monotonic() + 10
    while batcher.pending and time.monotonic() < deadline:
        time.sleep(0.05)
    assert history(client, run_id, "loss")[0][::2] == (1, 1.0)  # there before any flush
    batcher.close()


def test_log_metrics_sends_full_batches_without_waiting_for_interval(client, run_id):
    batcher = MetricBatcher(client, run_id, flush_interval=60)
    for step in range(2500):
        batcher.log_metrics({"loss": float(step)}, step=step)
    deadline = time.monotonic() + 20
    while batcher.sent < 2000 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (batcher.sent, batcher.pending) == (2000, 500)  # the rest waits for the interval
    batcher.close()
    assert len(client.get_metric_history(run_id, "loss")) == 2500


def test_log_metrics_costs_well_under_1ms_per_call(batcher):
    began = time.perf_counter()
    for i in range(5000):
        batcher.log_metrics({"loss": 1.0 / (i + 1), "dice": 0.5}, step=i)
    per_call = (time.perf_counter() - began) / 5000
    assert per_call < 1e-4, f"{per_call * 1e6:.1f} us per call"


def test_log_params_batched_at_most_100_per_request(batcher, client, run_id):
    batcher.log_params({f"p{i:03d}": i for i in range(250)})
    batcher.log_metrics({"loss": 1.0})
    batcher.flush()

    param_calls = [params for metrics, params in client.calls if params]
    assert [len(p) for p in param_calls] == [100, 100, 50]
    assert all(not metrics for metrics, params in client.calls if params)  # never mixed
    assert client.get_run(run_id).data.params == {f"p{i:03d}": str(i) for i in range(250)}


def test_log_params_same_value_again_is_not_resent(batcher, client):
    batcher.log_params({"lr": 0.001, "model": "unet"})
    batcher.flush()
    batcher.log_params({"lr": 0.001})
    batcher.flush()
    assert sum(len(params) for _, params in client.calls) == 2


def test_log_params_changed_value_raises_value_error(batcher):
    batcher.log_params({"lr": 0.001})
    with pytest.raises(ValueError, match=r"param 'lr': already logged as '0.001'.*cannot change"):
        batcher.log_params({"lr": 0.01})


def test_log_params_refused_param_loses_only_itself(batcher, client, run_id, caplog):
    client.log_param(run_id, "lr", "1e-4")  # as `mlpipe run -P lr=1e-4` would have
    batcher.log_params({"lr": 0.0001, "epochs": 10, "model": "unet"})  # str(0.0001) differs
    batcher.flush()  # a refusal is reported by name and counted in a tag, not raised
    assert batcher.dropped == 1 and batcher.failed == 0
    data = client.get_run(run_id).data
    assert data.params == {"lr": "1e-4", "epochs": "10", "model": "unet"}
    assert data.tags["mlpipe.log.dropped_points"] == "1"
    refused = [r.getMessage() for r in caplog.records if "refused param 'lr'" in r.getMessage()]
    assert len(refused) == 1 and "dropped" in refused[0]


def test_flush_idempotent(batcher, client, run_id):
    batcher.log_metrics({"loss": 1.0}, step=1)
    batcher.flush()
    calls = len(client.calls)
    batcher.flush()
    batcher.flush(timeout=0)
    assert len(client.calls) == calls
    assert len(client.get_metric_history(run_id, "loss")) == 1


def test_close_idempotent_and_stops_thread(client, run_id):
    batcher = MetricBatcher(client, run_id)
    batcher.log_metrics({"loss": 2.0}, step=7)
    batcher.close()
    batcher.close()
    assert batcher.closed
    assert history(client, run_id, "loss")[0][::2] == (7, 2.0)
    names = {t.name for t in threading.enumerate()}
    assert f"mlpipe-batcher-{run_id[:12]}" not in names


def test_log_metrics_after_close_raises(client, run_id):
    batcher = MetricBatcher(client, run_id)
    batcher.close()
    with pytest.raises(BatcherClosedError, match=f"run {run_id}: its batcher was closed"):
        batcher.log_metrics({"loss": 1.0})
    with pytest.raises(BatcherClosedError):
        batcher.log_params({"lr": 1})


@pytest.mark.parametrize("value", ["0.5", None, [1.0, 2.0], object(), 10**400])
def test_log_metrics_bad_value_raises_value_error_naming_key(batcher, value):
    with pytest.raises(ValueError, match="metric 'val_dice'"):
        batcher.log_metrics({"loss": 0.5, "val_dice": value}, step=1)
    assert batcher.pending == 0  # nothing of the call was queued, not even the good key


def test_nan_and_infinity_are_logged_as_mlflow_logs_them(client, run_id):
    # A diverged loss is a result: it is recorded, not turned into an exception that would
    # stop the training loop.
    batcher = MetricBatcher(client, run_id)
    batcher.log_metrics({"loss": math.nan, "grad": math.inf}, step=3)
    batcher.close()
    (loss,) = client.get_metric_history(run_id, "loss")
    (grad,) = client.get_metric_history(run_id, "grad")
    assert math.isnan(loss.value) and loss.step == 3
    assert grad.value > 1e308


@pytest.mark.parametrize("key", ["", "a/../b", "/abs", "bad!name", "x" * 251, 3])
def test_log_metrics_bad_name_raises_value_error(batcher, key):
    with pytest.raises(ValueError, match="metric name"):
        batcher.log_metrics({key: 1.0})


def test_log_metrics_bad_step_raises_value_error(batcher):
    with pytest.raises(ValueError, match=r"step of metric\(s\) 'loss': 1\.5 is not an integer"):
        batcher.log_metrics({"loss": 1.0}, step=1.5)


def test_flush_unreachable_server_raises_typed_error_and_warns(monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    uri = f"http://127.0.0.1:{free_port()}"
    batcher = MetricBatcher(MlflowClient(uri), "0" * 32, max_retries=2, retry_backoff=0.01)
    for step in range(7):
        batcher.log_metrics({"loss": 1.0}, step=step)

    with (
        caplog.at_level(logging.WARNING, logger="mlpipe"),
        pytest.raises(MetricsNotSentError, match=r"7 points .* were not sent") as info,
    ):
        batcher.flush(timeout=30)
    assert isinstance(info.value, TrackingUnavailableError)
    assert (info.value.failed, info.value.pending) == (7, 0)
    assert uri in str(info.value)
    assert batcher.failed == 7
    assert any(
        r.levelno == logging.WARNING and "7 metric points" in r.getMessage() for r in caplog.records
    )
    batcher.flush()  # reported once; nothing new failed
    batcher.log_metrics({"loss": 2.0}, step=8)
    with pytest.raises(MetricsNotSentError, match="1 points"):
        batcher.close(timeout=30)


def test_flush_timeout_raises_with_points_still_pending(monkeypatch):
    """A server that accepts connections and never answers: flush gives up waiting, not data."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        uri = f"http://127.0.0.1:{sock.getsockname()[1]}"
        batcher = MetricBatcher(MlflowClient(uri), "0" * 32, max_retries=0)
        batcher.log_metrics({"loss": 1.0, "dice": 0.5}, step=1)
        began = time.monotonic()
        with pytest.raises(MetricsNotSentError, match=r"2 points .* not sent yet") as info:
            batcher.flush(timeout=0.5)
        assert time.monotonic() - began < 3
        assert (info.value.failed, info.value.pending) == (0, 2)
        assert batcher.pending == 2
    # the server goes away: the queued points are given up and reported, not dropped silently
    with pytest.raises(MetricsNotSentError, match=r"2 points .* are lost") as info:
        batcher.close(timeout=30)
    assert (info.value.failed, info.value.pending) == (2, 0)


def test_get_batcher_one_per_run_and_replaces_closed(client, run_id, store_uri):
    first = get_batcher(client, run_id)
    assert get_batcher(MlflowClient(store_uri), run_id) is first
    other = client.create_run(client.get_run(run_id).info.experiment_id).info.run_id
    assert get_batcher(client, other) is not first
    first.close()
    again = get_batcher(client, run_id)
    assert again is not first and not again.closed
    again.close()
    get_batcher(client, other).close()


def test_flush_all_flushes_every_open_batcher(client, run_id):
    other = client.create_run(client.get_run(run_id).info.experiment_id).info.run_id
    one, two = get_batcher(client, run_id), get_batcher(client, other)
    one.log_metrics({"loss": 1.0}, step=1)
    two.log_metrics({"loss": 2.0}, step=1)
    flush_all(timeout=30)
    assert (one.pending, two.pending) == (0, 0)
    assert client.get_run(other).data.metrics == {"loss": 2.0}
    one.close()
    two.close()


# issue 20: a point the store cannot hold must not take its batch down -----------------------
@pytest.mark.parametrize("step", [2**63, 10**30, -(2**63) - 1])
def test_log_metrics_step_outside_int64_refused_at_call(batcher, step):
    started = time.perf_counter()
    with pytest.raises(ValueError, match=r"'loss'.*outside the range MLflow stores"):
        batcher.log_metrics({"loss": 0.5}, step=step)
    assert time.perf_counter() - started < 0.01  # checked in the caller's line, not at send
    assert batcher.pending == 0


def test_log_metrics_int64_edges_accepted_and_stored(batcher, client, run_id):
    batcher.log_metrics({"edge": 1.0}, step=2**63 - 1)
    batcher.log_metrics({"edge": 2.0}, step=-(2**63))
    batcher.flush()
    assert sorted(step for step, _, _ in history(client, run_id, "edge")) == [-(2**63), 2**63 - 1]


def test_log_metrics_timestamp_outside_int64_refused(batcher):
    with pytest.raises(ValueError, match="timestamp_ms of metric"):
        batcher.log_metrics({"loss": 0.5}, timestamp_ms=2**64)
    with pytest.raises(ValueError, match=r"timestamp_ms.*not an integer"):
        batcher.log_metrics({"loss": 0.5}, timestamp_ms=float("nan"))


def sneak(batcher: MetricBatcher, points: list[tuple[str, float, int, int]]) -> None:
    """Queue points without the call-side check: a store limit mlpipe does not know about yet
    (or another MLflow version's) is what the split-and-resend has to survive."""
    with batcher._cond:
        batcher._metrics.extend(points)
        batcher._metrics_queued += len(points)


def test_refused_batch_is_split_and_only_the_bad_point_dropped(batcher, client, run_id, caplog):
    now = int(time.time() * 1000)
    good = [("loss", 1.0 / (i + 1), now, i) for i in range(110)]
    sneak(batcher, [*good[:50], ("loss", 0.5, now, 2**63), *good[50:]])
    started = time.perf_counter()
    batcher.flush()  # refused points are reported, not raised
    elapsed = time.perf_counter() - started
    assert elapsed < 2.0, f"the refused batch took {elapsed:.1f} s (retried instead of split?)"
    assert [step for step, _, _ in history(client, run_id, "loss")] == list(range(110))
    assert batcher.dropped == 1 and batcher.failed == 0
    assert client.get_run(run_id).data.tags["mlpipe.log.dropped_points"] == "1"
    warned = [r.getMessage() for r in caplog.records if "refused metric" in r.getMessage()]
    assert len(warned) == 1
    assert f"'loss' at step {2**63}" in warned[0] and "dropped" in warned[0]
    assert "too large" in warned[0]  # the store's reason, not "check the tracking server"


def test_store_refusing_every_point_is_bounded_not_one_request_each(client, run_id, caplog):
    """A store that refuses everything (here: a deleted run) must not be bisected point by
    point: the batch is failed and raised, as a refusal of the run, not of its points."""
    client.delete_run(run_id)
    batcher = MetricBatcher(client, run_id, max_retries=0)
    try:
        batcher.log_metrics({f"m{i}": float(i) for i in range(200)}, step=1)
        with pytest.raises(MetricsNotSentError, match="200 points"):
            batcher.flush()
        assert len(client.calls) <= 3 and batcher.dropped == 0
    finally:
        with contextlib.suppress(MetricsNotSentError):
            batcher.close()
