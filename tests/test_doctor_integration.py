"""``mlpipe doctor`` against real ``mlflow server`` processes: S3 artifacts on moto, a server
that stops, basic auth with a wrong password.

The server gets the S3 endpoint and keys; the doctor's process gets none of them (proxied
artifacts), and its output is scanned for them.
These start processes; ``pytest -m 'not integration'`` skips them locally.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from mlpipe.core.settings import resolve_settings
from mlpipe.server.doctor import FAIL, PASS, SKIP, exit_code, run_checks
from tests.conftest import S3_CREDENTIALS, free_port

pytestmark = pytest.mark.integration

MLPIPE = [sys.executable, "-m", "mlpipe.cli"]
BUCKET = "doctor-bucket"


class MlflowServer:
    """A real ``mlflow server`` on a fixed port that a test can kill and start again.

    The job runner (huey consumers for GenAI jobs, which tracking does not use) is switched
    off: it doubles the start-up time on a 2-core machine and adds processes to kill.
    """

    def __init__(self, backend_uri: str, artifacts: str, *, env=None, args=(), cwd=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", backend_uri,
            "--artifacts-destination", artifacts,
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1", *args,
        ]  # fmt: skip
        self.env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})}
        self.cwd = cwd
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> None:
        self.process = subprocess.Popen(
            self.command,
            env=self.env,
            cwd=self.cwd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.stop()
                raise RuntimeError(f"mlflow server {self.command} did not start")
            time.sleep(0.3)

    def stop(self, sig: int = signal.SIGKILL) -> None:
        """Stop the whole process group (uvicorn runs in a child); SIGKILL by default, as a
        crash would."""
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=5)
        # the group's other processes (uvicorn) must be gone before the port is reused
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.killpg(self.process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)

    def __enter__(self) -> MlflowServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def doctor(
    url: str, *args: str, env: dict | None = None
) -> tuple[subprocess.CompletedProcess, float]:
    """``mlpipe doctor`` as a user types it, in an environment without any AWS variable."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    began = time.monotonic()
    done = subprocess.run(
        [*MLPIPE, "doctor", "--tracking-uri", url, "--json", *args],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done, time.monotonic() - began


def statuses(done: subprocess.CompletedProcess) -> dict[str, str]:
    return {r["name"]: r["status"] for r in json.loads(done.stdout)}


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        for secret in (
            S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        ):
            assert secret not in text


@pytest.fixture
def s3_server(tmp_path, moto_s3):
    """A tracking server storing artifacts in s3://doctor-bucket/doctor on moto, proxied."""
    moto_s3.client().create_bucket(Bucket=BUCKET)
    env = {"MLFLOW_S3_ENDPOINT_URL": moto_s3.endpoint, **moto_s3.credentials}
    server = MlflowServer(
        f"sqlite:///{tmp_path / 'server.db'}", f"s3://{BUCKET}/doctor", env=env, cwd=tmp_path
    )
    with server:
        yield server, moto_s3


def test_doctor_passes_through_s3_then_fails_fast_when_s3_and_server_stop(s3_server):
    server, moto = s3_server
    s3 = moto.client()

    done, _ = doctor(server.url, "--keep-artifact")
    assert done.returncode == 0, done.stdout + done.stderr
    found = statuses(done)
    for name in (
        "tracking server",
        "credentials",
        "server version",
        "experiment and run",
        "artifact round trip",
        "model registry",
        "packages",
    ):
        assert found[name] == PASS, (name, done.stdout)
    assert found["GPU"] in (PASS, "INFO")
    results = json.loads(done.stdout)
    artifact = next(r for r in results if r["name"] == "artifact round trip")
    assert "proxied" in artifact["detail"]
    run_id = next(r for r in results if r["name"] == "experiment and run")["detail"].split()[1]
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])]
    (probe,) = [k for k in keys if run_id in k]
    assert probe.startswith("doctor/") and probe.endswith("/mlpipe-doctor/probe.bin")
    assert s3.head_object(Bucket=BUCKET, Key=probe)["ContentLength"] == 1024 * 1024
    assert_no_secret(done.stdout, done.stderr)

    # without --keep-artifact the probe is deleted through the server once it came back
    done, _ = doctor(server.url)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(done.stdout)
    run_id = next(r for r in results if r["name"] == "experiment and run")["detail"].split()[1]
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])]
    assert not [k for k in keys if run_id in k]

    # S3 stops: the server answers, the artifact check fails and names the server side
    moto.stop()
    done, elapsed = doctor(server.url)
    assert done.returncode == 2, done.stdout + done.stderr
    results = {r["name"]: r for r in json.loads(done.stdout)}
    assert results["tracking server"]["status"] == PASS
    assert results["artifact round trip"]["status"] == FAIL
    assert "--artifacts-destination" in results["artifact round trip"]["fix"]
    assert elapsed < 60, elapsed

    # the server stops: the doctor says so within 15 s, and skips what needs it
    server.stop()
    done, elapsed = doctor(server.url)
    assert done.returncode == 2
    found = statuses(done)
    assert found["tracking server"] == FAIL
    assert found["experiment and run"] == SKIP
    assert elapsed < 15, f"doctor took {elapsed:.1f} s with the server down"
    print(f"doctor with the server down: {elapsed:.1f} s")


def test_doctor_plain_output_with_server_down_is_short(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    began = time.monotonic()
    done = subprocess.run(
        [*MLPIPE, "doctor", "--tracking-uri", dead], capture_output=True, text=True, timeout=60
    )
    elapsed = time.monotonic() - began
    assert done.returncode == 2
    assert "FAIL  tracking server" in done.stdout
    assert "FAIL tracking server: Start it" in done.stdout
    assert "Traceback" not in done.stderr
    assert elapsed < 15


@pytest.fixture
def auth_server(tmp_path):
    pytest.importorskip("flask_wtf", reason="mlflow[auth] is not installed")
    config = tmp_path / "auth.ini"
    config.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{tmp_path / 'auth.db'}\n"
        "admin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    env = {
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        "MLFLOW_AUTH_ADMIN_PASSWORD": "right-pw-123",
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-csrf-key",  # the auth app refuses to start without
    }
    server = MlflowServer(
        f"sqlite:///{tmp_path / 'server.db'}",
        str(tmp_path / "artifacts"),
        env=env,
        args=("--app-name", "basic-auth"),
        cwd=tmp_path,
    )
    with server:
        yield server


def test_doctor_reports_401_for_wrong_or_missing_credentials(auth_server, monkeypatch):
    settings = resolve_settings(tracking_uri=auth_server.url)

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong-pw-DO-NOT-PRINT")
    results = {r.name: r for r in run_checks(settings)}
    login = results["credentials"]
    assert login.status == FAIL
    assert "HTTP 401" in login.detail and "'admin'" in login.detail
    assert "MLFLOW_TRACKING_USERNAME" in login.fix and "MLFLOW_TRACKING_PASSWORD" in login.fix
    assert results["tracking server"].status == PASS  # /health needs no login
    assert results["experiment and run"].status == SKIP
    assert "wrong-pw-DO-NOT-PRINT" not in repr(list(results.values()))
    assert exit_code(list(results.values())) == 2
    # the command as a user types it prints the 401 and never the password
    done, _ = doctor(
        auth_server.url,
        env={
            "MLFLOW_TRACKING_USERNAME": "admin",
            "MLFLOW_TRACKING_PASSWORD": "wrong-pw-DO-NOT-PRINT",
        },
    )
    assert done.returncode == 2
    assert statuses(done)["credentials"] == FAIL
    assert "wrong-pw-DO-NOT-PRINT" not in done.stdout + done.stderr

    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    login = {r.name: r for r in run_checks(settings)}["credentials"]
    assert login.status == FAIL
    assert "HTTP 401" in login.detail and "no credentials are set" in login.detail

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "right-pw-123")
    results = run_checks(settings)
    found = {r.name: r.status for r in results}
    assert found["credentials"] == PASS
    assert found["server version"] == PASS  # /version needs the login
    assert found["experiment and run"] == PASS
    assert found["artifact round trip"] == PASS
    assert exit_code(results) == 0
