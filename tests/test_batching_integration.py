"""MetricBatcher against a real ``mlflow server``, and in processes that exit without flushing.

These start servers and subprocesses; ``pytest -m 'not integration'`` skips them locally.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from mlpipe.log.batching import MetricBatcher
from tests.conftest import free_port

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).parent.parent

# Logs N points through the process's batcher and ends without flush() or close(): only the
# exit hook can send them.
EXIT_SCRIPT = textwrap.dedent(
    """
    import sys
    from mlflow import MlflowClient
    from mlpipe.log.batching import MetricBatcher, get_batcher

    uri, run_id, points = sys.argv[1], sys.argv[2], int(sys.argv[3])
    client = MlflowClient(uri)
    if len(sys.argv) > 4:  # fast give-up, to see the report of a dead server at exit
        batcher = MetricBatcher(client, run_id, max_retries=1, retry_backoff=0.01)
    else:
        batcher = get_batcher(client, run_id)
    for step in range(points):
        batcher.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
    print("logged", points, "pending", batcher.pending, flush=True)
    """
)


def new_run(client: MlflowClient) -> str:
    experiment_id = client.create_experiment(f"batching-{time.time_ns()}")
    return client.create_run(experiment_id).info.run_id


def run_script(tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    script = tmp_path / "log_and_exit.py"
    script.write_text(EXIT_SCRIPT)
    return subprocess.run(
        [sys.executable, str(script), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})},
    )


def test_log_metrics_10000_points_reach_server(mlflow_server):
    client = MlflowClient(mlflow_server)
    run_id = new_run(client)
    batcher = MetricBatcher(client, run_id)
    began = time.perf_counter()
    for step in range(10_000):
        batcher.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
    per_call = (time.perf_counter() - began) / 10_000
    batcher.flush(timeout=120)
    batcher.close()

    points = client.get_metric_history(run_id, "loss")
    assert len(points) == 10_000
    assert [m.step for m in points] == list(range(10_000))
    assert all(m.value == 1.0 / (m.step + 1) for m in points)
    assert per_call < 1e-4, f"{per_call * 1e6:.1f} us per call against a server"


def test_process_exit_sends_queued_points(mlflow_server, tmp_path):
    client = MlflowClient(mlflow_server)
    run_id = new_run(client)
    out = run_script(tmp_path, mlflow_server, run_id, "5000")
    assert out.returncode == 0, out.stdout + out.stderr
    # most points were still queued when the script ended: the exit hook sent them
    logged, pending = out.stdout.split()[1::2]
    assert (logged, int(pending) > 0) == ("5000", True), out.stdout
    points = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in points) == list(range(5000))
    assert "Traceback" not in out.stderr


def test_process_exit_unreachable_server_warns_about_lost_points(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    began = time.monotonic()
    out = run_script(
        tmp_path,
        dead,
        "0" * 32,
        "25",
        "fast",
        env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "1"},
    )
    assert out.returncode == 0, out.stderr
    assert time.monotonic() - began < 60
    assert "25 metric points for run" in out.stderr
    assert "25 points (metrics and params)" in out.stderr and "are lost" in out.stderr
    assert "Traceback" not in out.stderr


def test_refused_point_against_server_drops_only_itself(mlflow_server, caplog):
    """Issue 20: against a real server a step beyond int64 used to fail its whole batch (110
    good points lost) after 15.6 s of retries; now the call refuses it, and a point that
    still reaches the sender is split out of its batch."""
    client = MlflowClient(mlflow_server)
    run_id = new_run(client)
    batcher = MetricBatcher(client, run_id)
    try:
        with pytest.raises(ValueError, match=r"'loss'.*outside the range"):
            batcher.log_metrics({"loss": 0.5}, step=2**63)
        now = int(time.time() * 1000)
        points = [("loss", float(i), now, i) for i in range(110)]
        points.insert(60, ("loss", 0.5, now, 10**30))
        with batcher._cond:  # past the call-side check, as a limit mlpipe does not know
            batcher._metrics.extend(points)
            batcher._metrics_queued += len(points)
        started = time.perf_counter()
        batcher.flush()
        assert time.perf_counter() - started < 2.0
    finally:
        batcher.close()
    steps = [m.step for m in client.get_metric_history(run_id, "loss")]
    assert sorted(steps) == list(range(110))
    assert client.get_run(run_id).data.tags["mlpipe.log.dropped_points"] == "1"
    assert any(f"at step {10**30}" in r.getMessage() for r in caplog.records)
