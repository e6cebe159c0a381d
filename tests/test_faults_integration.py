"""Faults with real processes: the tracking server killed during a run (and restarted, or not),
and S3 stopped under an artifact upload through a proxied server.

A small training project logs a metric every step with ``mlpipe.log`` and writes a checkpoint
file every step; ``mlpipe run`` is its parent, as a researcher starts it. The server is a real
``mlflow server`` on SQLite, killed with SIGKILL (as a crash) and started again on the same
port with the same database.
These start processes; ``pytest -m 'not integration'`` skips them locally.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from mlpipe.core.outbox import outbox_files
from tests.conftest import REPO_ROOT
from tests.test_doctor_integration import MlflowServer

pytestmark = pytest.mark.integration

MLPIPE = [sys.executable, "-m", "mlpipe.cli"]

MLPROJECT = """\
name: faulty
entry_points:
  main:
    parameters:
      steps: {type: int, default: 40}
      delay: {type: float, default: 0.25}
      ckpt_dir: {type: string, default: ckpt}
    command: "python train.py --steps {steps} --delay {delay} --ckpt-dir {ckpt_dir}"
"""

TRAIN = textwrap.dedent(
    """
    import argparse, os, pathlib, time
    import mlpipe.log as mlog

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int)
    parser.add_argument("--delay", type=float)
    parser.add_argument("--ckpt-dir")
    args = parser.parse_args()
    ckpt = pathlib.Path(args.ckpt_dir)
    ckpt.mkdir(parents=True, exist_ok=True)
    for step in range(args.steps):
        mlog.metrics({"loss": 1.0 / (step + 1)}, step=step)
        (ckpt / f"epoch_{step:03d}.pt").write_bytes(os.urandom(1000))
        print(f"step {step}", flush=True)
        time.sleep(args.delay)
    print("training done", flush=True)
    """
)


@pytest.fixture
def project(tmp_path) -> Path:
    folder = tmp_path / "faulty"
    folder.mkdir()
    (folder / "MLproject").write_text(MLPROJECT)
    (folder / "train.py").write_text(TRAIN)
    return folder


@pytest.fixture
def server(tmp_path):
    server = MlflowServer(f"sqlite:///{tmp_path / 'server.db'}", str(tmp_path / "artifacts"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def start_run(project: Path, server: MlflowServer, tmp_path: Path, steps: int, delay: float,
              **env: str) -> tuple[subprocess.Popen, Path, Path]:  # fmt: skip
    """``mlpipe run`` in the background; its stdout and stderr go to files (read while it runs)."""
    out, err = tmp_path / "run.out", tmp_path / "run.err"
    process = subprocess.Popen(
        [
            *MLPIPE, "run", str(project),
            "-P", f"steps={steps}", "-P", f"delay={delay}", "-P", f"ckpt_dir={tmp_path / 'ckpt'}",
        ],
        cwd=tmp_path,
        stdout=out.open("w"),
        stderr=err.open("w"),
        env={**os.environ, "MLFLOW_TRACKING_URI": server.url, "PYTHONPATH": str(REPO_ROOT), **env},
    )  # fmt: skip
    return process, out, err


def wait_for(path: Path, needle: str, process: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if needle in path.read_text():
            return
        if process.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"{needle!r} never appeared in {path}:\n{path.read_text()}")


def the_run(server: MlflowServer):
    client = MlflowClient(server.url)
    (run,) = client.search_runs([client.get_experiment_by_name("faulty").experiment_id])
    return client, run


def test_server_killed_and_restarted_during_run_loses_nothing(project, server, tmp_path):
    steps = 60
    process, out, err = start_run(project, server, tmp_path, steps, 0.3)
    wait_for(out, "step 5", process)
    server.stop()  # SIGKILL to the whole server, as a crash
    killed = time.monotonic()
    wait_for(out, "step 15", process)  # training goes on without the server
    time.sleep(max(0.0, 4 - (time.monotonic() - killed)))
    server.start()  # same port, same database
    code = process.wait(timeout=150)

    stdout, stderr = out.read_text(), err.read_text()
    assert code == 0, stdout + stderr
    assert "training done" in stdout
    assert "Traceback" not in stderr
    client, run = the_run(server)
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(steps))  # every queued point arrived
    assert len(list((tmp_path / "ckpt").glob("epoch_*.pt"))) == steps
    assert outbox_files(server.url) == []

    # A researcher's own script (no `mlpipe run` parent) leaves `with mlflow.start_run()`
    # while the server is down: one line, no 4-minute hang, the points and a FAILED end
    # wait in the outbox for the next `mlpipe run` or `mlpipe doctor`.
    script = tmp_path / "own.py"
    script.write_text(OWN_SCRIPT)
    go = tmp_path / "go"
    own = subprocess.Popen(
        [sys.executable, str(script), str(go)],
        cwd=tmp_path,
        env={**os.environ, "MLFLOW_TRACKING_URI": server.url, "PYTHONPATH": str(REPO_ROOT),
             "MLPIPE_FLUSH_TIMEOUT": "2"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    own_run = own.stdout.readline().split()[-1]
    server.stop()
    began = time.monotonic()
    go.touch()
    stdout, stderr = own.communicate(timeout=60)
    assert own.returncode == 0, stdout + stderr
    assert time.monotonic() - began < 30
    assert "Traceback" not in stderr
    (line,) = [s for s in stderr.splitlines() if "did not answer within 2 s as the run ended" in s]
    assert f"10 metric points and 0 params of run {own_run} not sent" in line
    assert "marks the run FAILED" in line
    (kept,) = outbox_files(server.url, own_run)
    records = [json.loads(x) for x in kept.read_text().splitlines()]
    assert sorted(r["step"] for r in records if r["type"] == "metric") == list(range(20, 30))
    assert records[-1]["type"] == "end" and records[-1]["status"] == "FAILED"


OWN_SCRIPT = textwrap.dedent(
    """
    import pathlib, sys, time
    import mlflow
    import mlpipe.log as mlog

    go = pathlib.Path(sys.argv[1])
    with mlflow.start_run() as run:
        for step in range(20):
            mlog.metrics({"loss": 1.0 / (step + 1)}, step=step)
        mlog.flush()
        print("logged", run.info.run_id, flush=True)
        while not go.exists():
            time.sleep(0.05)
        for step in range(20, 30):
            mlog.metrics({"loss": 1.0 / (step + 1)}, step=step)
    print("left the run", flush=True)
    """
)


def test_server_that_never_comes_back_fails_clearly_and_run_ends_failed_later(
    project, server, tmp_path
):
    steps = 30
    began = time.monotonic()
    process, out, err = start_run(
        project, server, tmp_path, steps, 0.2, MLPIPE_FLUSH_TIMEOUT="3", MLPIPE_FINISH_TIMEOUT="8"
    )
    wait_for(out, "step 3", process)
    server.stop()
    code = process.wait(timeout=120)
    elapsed = time.monotonic() - began

    stdout, stderr = out.read_text(), err.read_text()
    assert code == 2, stdout + stderr
    assert "training done" in stdout
    assert "Traceback" not in stderr
    # the parent: progress while it waits, then one error line
    (started,) = [s for s in stderr.splitlines() if s.startswith("mlpipe: run ")]
    run_id = started.split()[2]
    assert f"still trying to mark run {run_id} FINISHED" in stderr
    # the training process: one line naming the unsent points, the run and the server
    (line,) = [s for s in stderr.splitlines() if "did not answer within 3 s at exit" in s]
    assert f"tracking server {server.url}" in line and "metric points" in line
    assert f"of run {run_id} not sent" in line
    (error,) = [s for s in stderr.splitlines() if s.startswith("Error:")]
    assert "did not answer for 8 s" in error and server.url in error
    assert "next `mlpipe run` or `mlpipe doctor`" in error
    assert len(list((tmp_path / "ckpt").glob("epoch_*.pt"))) == steps  # checkpoints kept
    assert elapsed < 90, elapsed
    assert len(outbox_files(server.url)) == 2  # the child's points, the parent's end

    server.start()
    client, run = the_run(server)
    assert run.info.run_id == run_id
    assert run.info.status == "RUNNING"  # nobody could tell the server yet
    doctor = subprocess.run(
        [*MLPIPE, "doctor", "--tracking-uri", server.url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert f"run {run.info.run_id}:" in doctor.stdout and "marked FAILED" in doctor.stdout
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FAILED"
    assert "did not answer for 8 s" in run.data.tags["mlpipe.failure"]
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(steps))  # sent late, not lost
    assert outbox_files(server.url) == []


UPLOAD = textwrap.dedent(
    """
    import os, sys
    import mlflow
    import mlpipe.log as mlog

    path = "checkpoint.pt"
    with open(path, "wb") as fh:
        fh.write(os.urandom(4 * 1024 * 1024))
    mlflow.start_run(run_id=sys.argv[1])
    print("uploading", flush=True)
    print("uploaded", mlog.artifact(path, "checkpoints"), flush=True)
    """
)


def test_s3_stopped_during_upload_is_retried_then_one_clear_error(tmp_path, moto_s3):
    moto_s3.client().create_bucket(Bucket="fault-bucket")
    env = {"MLFLOW_S3_ENDPOINT_URL": moto_s3.endpoint, **moto_s3.credentials}
    server = MlflowServer(
        f"sqlite:///{tmp_path / 's.db'}", "s3://fault-bucket/runs", env=env, cwd=tmp_path
    )
    script = tmp_path / "upload.py"
    script.write_text(UPLOAD)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    with server:
        client = MlflowClient(server.url)
        run_id = client.create_run(client.create_experiment("uploads")).info.run_id
        child_env = {
            **clean,
            "MLFLOW_TRACKING_URI": server.url,
            "PYTHONPATH": str(REPO_ROOT),
            # MLflow's own retries, shortened from ~4 minutes so the test stays short
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4",
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        }

        def upload(**extra: str) -> subprocess.Popen:
            return subprocess.Popen(
                [sys.executable, str(script), run_id],
                cwd=tmp_path,
                env={**child_env, **extra},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )

        # S3 down as the upload starts, back within MLflow's retries: the upload goes through
        moto_s3.stop()
        process = upload()
        assert process.stdout.readline().strip() == "uploading"
        time.sleep(2)
        moto_s3.start()  # same port; moto keeps nothing, so the bucket is made again
        moto_s3.client().create_bucket(Bucket="fault-bucket")
        stdout, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stdout + stderr
        assert "uploaded checkpoints/checkpoint.pt" in stdout
        keys = [
            o["Key"] for o in moto_s3.client().list_objects_v2(Bucket="fault-bucket")["Contents"]
        ]
        assert any(k.endswith(f"{run_id}/artifacts/checkpoints/checkpoint.pt") for k in keys)

        # S3 stays down: after the retries, one clear error and no chain of tracebacks
        moto_s3.stop()
        began = time.monotonic()
        process = upload(MLFLOW_HTTP_REQUEST_MAX_RETRIES="2")
        stdout, stderr = process.communicate(timeout=120)
        elapsed = time.monotonic() - began
    assert process.returncode == 1
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("mlpipe.core.errors.TrackingUnavailableError: Uploading checkpoint.pt")
    assert f"to run {run_id} through {server.url}" in last
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES=2" in last
    assert "artifact store, e.g. S3, may be down" in last
    assert "still at" in last and (tmp_path / "checkpoint.pt").exists()
    assert "urllib3" not in stderr and "During handling" not in stderr
    assert len(stderr.strip().splitlines()) < 12, stderr
    assert elapsed < 60
    assert moto_s3.credentials["AWS_SECRET_ACCESS_KEY"] not in stdout + stderr
