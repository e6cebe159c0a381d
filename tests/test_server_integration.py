"""``mlpipe server`` as an operator starts it: real PostgreSQL, real moto S3, real processes.

One module-wide stack: moto_server on a free port, two fresh PostgreSQL databases, and two
``mlpipe server`` processes started through the CLI (``python -m mlpipe.cli server``): a plain
one and one with ``--auth``. Only the server processes get S3 credentials
(``S3_CREDENTIALS``); the clients (``mlpipe run``, ``MlflowClient``) have no ``AWS_*``
variable. The last two tests stop the servers with SIGINT and SIGTERM and look for leftovers.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import types
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import psutil
import pytest

from tests.conftest import (
    PG,
    S3_CREDENTIALS,
    free_port,
    fresh_database,
    git,
    running_moto_server,
)

pytestmark = pytest.mark.integration

MLPIPE = [sys.executable, "-m", "mlpipe.cli"]
BUCKET = "mlpipe-artifacts"
PREFIX = "team"
ADMIN_PASSWORD = "admin-Pa55word-DO-NOT-LOG"
DB_PASSWORD = "db-pa55word-DO-NOT-LOG"  # trust auth ignores it; it must still stay hidden
GIT_TOKEN = "ghp_tokenDOnotLOG1234567890"
SECRETS = (
    S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
    ADMIN_PASSWORD,
    DB_PASSWORD,
    GIT_TOKEN,
)


def server_cli_args(
    backend_uri: str, s3_endpoint: str, port: int, *, auth: bool = False, workers: int = 1
) -> list[str]:
    """The ``mlpipe server`` arguments of the native stack (``test_docker_compose`` compares
    the compose file's tracking-server command with these)."""
    args = [
        "server",
        "--backend-store-uri", backend_uri,
        "--artifacts-destination", f"s3://{BUCKET}/{PREFIX}",
        "--s3-endpoint-url", s3_endpoint,
        "--create-bucket",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", str(workers),
    ]  # fmt: skip
    return [*args, "--auth"] if auth else args


def client_env(**extra: str) -> dict[str, str]:
    """This process's environment without any MLFLOW_/MLPIPE_/AWS_ variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MLPIPE_", "AWS_"))}
    return {**env, **extra}


@contextlib.contextmanager
def database():
    """A fresh PostgreSQL database (module-wide, unlike conftest's ``postgres_db``)."""
    with fresh_database() as name:
        yield PG.replace("postgres@", f"postgres:{DB_PASSWORD}@") + f"/{name}"


def launch(args: list[str], folder: Path, env: dict[str, str]) -> types.SimpleNamespace:
    folder.mkdir(parents=True, exist_ok=True)
    out, err = folder / "stdout.txt", folder / "stderr.txt"
    with out.open("w") as fout, err.open("w") as ferr:
        proc = subprocess.Popen(
            [*MLPIPE, *args], cwd=folder, env=env, stdout=fout, stderr=ferr, text=True
        )
    return types.SimpleNamespace(proc=proc, out=out, err=err, url=None)


def wait_ready(server: types.SimpleNamespace, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in server.out.read_text().splitlines():
            if line.strip().startswith("export MLFLOW_TRACKING_URI="):
                server.url = line.split("=", 1)[1].strip()
                return
        if server.proc.poll() is not None:
            break
        time.sleep(0.3)
    server.proc.kill()
    raise AssertionError(
        f"mlpipe server did not become ready (rc={server.proc.poll()}):\n"
        + server.out.read_text()
        + server.err.read_text()[-4000:]
    )


def stop(server: types.SimpleNamespace, signum: int = signal.SIGTERM) -> None:
    if server.proc.poll() is None:
        server.proc.send_signal(signum)
        try:
            server.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """moto S3, two databases, and two ``mlpipe server`` processes (plain, --auth), started
    side by side; S3 credentials and the admin password only in the servers' environment."""
    pytest.importorskip("boto3")
    root = tmp_path_factory.mktemp("server-stack")
    with running_moto_server() as moto, database() as db, database() as auth_db:
        server_env = client_env(**S3_CREDENTIALS, MLFLOW_AUTH_ADMIN_PASSWORD=ADMIN_PASSWORD)
        plain = launch(server_cli_args(db, moto.endpoint, free_port()), root / "plain", server_env)
        # MLflow's job runner (a runner and seven huey consumers, each importing MLflow) is
        # left on in the plain server, whose SIGTERM test must find and stop them, and off
        # here to spare the CPU while both start
        secured = launch(
            server_cli_args(auth_db, moto.endpoint, free_port(), auth=True),
            root / "auth",
            {**server_env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
        try:
            wait_ready(plain)
            wait_ready(secured)
            import boto3

            s3 = boto3.client(
                "s3",
                endpoint_url=moto.endpoint,
                aws_access_key_id=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                aws_secret_access_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                region_name=S3_CREDENTIALS["AWS_DEFAULT_REGION"],
            )
            yield types.SimpleNamespace(
                plain=plain, auth=secured, moto=moto, s3=s3, root=root, db=db
            )
        finally:
            for server in (plain, secured):  # both at once: each takes a few seconds
                if server.proc.poll() is None:
                    server.proc.send_signal(signal.SIGTERM)
            stop(plain)
            stop(secured)


TRAIN = '''\
"""Logs a checkpoint-like artifact and a pyfunc model, as a training script does."""
import os

import mlflow


class Identity(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input):
        return model_input


with mlflow.start_run():
    os.makedirs("out", exist_ok=True)
    with open("out/checkpoint.pt", "wb") as fh:
        fh.write(os.urandom(300_000))
    mlflow.log_artifact("out/checkpoint.pt", "checkpoints")
    mlflow.log_metric("score", 0.75)
    mlflow.pyfunc.log_model(name="model", python_model=Identity(), pip_requirements=["mlflow"])
print("trained")
'''

MLPROJECT = """\
name: tiny
mlpipe:
  convention: 1
  model: tiny
  dataset_param: data_dir
  primary_metric: score
  primary_metric_goal: max
entry_points:
  main:
    parameters:
      lr: {type: float, default: 0.1}
      data_dir: {type: string, default: ""}
    command: "python train.py"
  train:
    parameters:
      lr: {type: float, default: 0.1}
      data_dir: {type: string, default: ""}
    command: "python train.py"
  preprocess:
    command: "python -c 'print(1)'"
  evaluate:
    command: "python -c 'print(2)'"
"""


@pytest.fixture(scope="module")
def tracked_run(stack, tmp_path_factory):
    """One ``mlpipe run`` of a convention project, cloned from a git URL with a token in it,
    against the plain server. The URL is rewritten by git (``insteadOf``) to a local repo, so
    the token travels through mlpipe and MLflow as it would with a real host."""
    root = tmp_path_factory.mktemp("tracked-run")
    repo = root / "repo"
    (repo / "tiny").mkdir(parents=True)
    (repo / "tiny" / "MLproject").write_text(MLPROJECT)
    (repo / "tiny" / "train.py").write_text(TRAIN)
    git("init", "-q", "-b", "main", cwd=repo)
    git("add", "-A", cwd=repo)
    git("commit", "-q", "-m", "tiny project", cwd=repo)
    url = f"https://oauth2:{GIT_TOKEN}@git.example.com/team/tiny.git"
    env = client_env(
        MLFLOW_TRACKING_URI=stack.plain.url,
        MLPIPE_CONFIG=str(root / "no-config.yaml"),
        MLPIPE_CACHE_DIR=str(root / "cache"),
        GIT_CONFIG_COUNT="1",
        GIT_CONFIG_KEY_0=f"url.{repo.as_uri()}.insteadOf",
        GIT_CONFIG_VALUE_0=url,
    )
    assert not [k for k in env if k.startswith("AWS_")]
    out = subprocess.run(
        [*MLPIPE, "run", f"{url}#tiny", "-P", "lr=0.2", "--experiment", "server-it"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    from mlflow import MlflowClient

    client = MlflowClient(stack.plain.url)
    experiment = client.get_experiment_by_name("server-it")
    (run,) = client.search_runs([experiment.experiment_id])
    return types.SimpleNamespace(run=run, experiment=experiment, output=out.stdout + out.stderr)


def _s3_keys(stack) -> list[str]:
    pages = stack.s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


def test_run_lands_artifacts_and_model_in_s3_through_server(
    stack, tracked_run, tmp_path, monkeypatch
):
    """(a) The project's artifacts and its model are in the bucket; the client had no AWS_*."""
    from mlflow import MlflowClient

    run = tracked_run.run
    assert not [k for k in os.environ if k.startswith("AWS_")]  # nor has this test process
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")  # proxied, not s3://
    assert run.data.params["lr"] == "0.2"
    assert run.data.tags["mlpipe.convention"] == "1"

    client = MlflowClient(stack.plain.url)
    (model,) = client.search_logged_models([tracked_run.experiment.experiment_id])
    assert model.source_run_id == run.info.run_id
    assert model.artifact_location.startswith("mlflow-artifacts:/")
    keys = _s3_keys(stack)
    base = f"{PREFIX}/{tracked_run.experiment.experiment_id}"
    checkpoint = f"{base}/{run.info.run_id}/artifacts/checkpoints/checkpoint.pt"
    assert checkpoint in keys
    assert f"{base}/models/{model.model_id}/artifacts/MLmodel" in keys

    # and it comes back intact through the server, to a client without S3 credentials
    local = client.download_artifacts(run.info.run_id, "checkpoints/checkpoint.pt", tmp_path)
    s3_bytes = stack.s3.get_object(Bucket=BUCKET, Key=checkpoint)["Body"].read()
    assert Path(local).read_bytes() == s3_bytes and len(s3_bytes) == 300_000
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack.plain.url)
    loaded = mlflow.pyfunc.load_model(f"models:/{model.model_id}")
    assert list(loaded.predict([1, 2, 3])) == [1, 2, 3]


def test_server_hands_out_no_presigned_s3_links(stack, tracked_run):
    """(a) MLflow 3.17 would send clients straight to S3; mlpipe's app keeps them proxied."""
    base = stack.plain.url
    with urllib.request.urlopen(f"{base}/api/3.0/mlflow/server-info", timeout=10) as resp:
        info = json.load(resp)
    assert info["multipart_downloads_enabled"] is False
    assert info["multipart_uploads_enabled"] is False
    run = tracked_run.run
    path = f"{tracked_run.experiment.experiment_id}/{run.info.run_id}/artifacts/checkpoints"
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(
            f"{base}/api/2.0/mlflow-artifacts/presigned/{path}/checkpoint.pt", timeout=10
        )
    assert info.value.code == 501
    log = stack.plain.err.read_text().splitlines()
    assert any("GET /api/2.0/mlflow-artifacts/artifacts/" in line for line in log)
    # the only presigned request is the probe above, refused
    assert all(" 501" in line for line in log if "/mlflow-artifacts/presigned/" in line)


def test_auth_refuses_anonymous_and_accepts_credentials(stack, monkeypatch, tmp_path):
    """(b) --auth: 401 without or with wrong credentials; the admin works end to end."""
    from mlflow import MlflowClient

    url = stack.auth.url
    search = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
    with pytest.raises(urllib.error.HTTPError) as anonymous:
        urllib.request.urlopen(search, timeout=10)
    assert anonymous.value.code == 401
    wrong = urllib.request.Request(search, headers={"Authorization": "Basic YWRtaW46bm9wZQ=="})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(wrong, timeout=10)
    assert refused.value.code == 401

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
    client = MlflowClient(url)
    run = client.create_run(client.create_experiment("auth-it"))
    (tmp_path / "note.txt").write_text("through auth")
    client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))
    client.set_terminated(run.info.run_id)
    back = client.download_artifacts(run.info.run_id, "note.txt", str(tmp_path / "dl"))
    assert Path(back).read_text() == "through auth"
    assert any(k.endswith(f"{run.info.run_id}/artifacts/note.txt") for k in _s3_keys(stack))


def test_no_secret_in_params_tags_artifacts_or_output(stack, tracked_run):
    """(c) Not the AWS keys, the admin or database password, nor the git token: anywhere."""
    from mlflow import MlflowClient

    seen: list[str] = [tracked_run.output]
    for server in (stack.plain, stack.auth):
        seen += [server.out.read_text(), server.err.read_text()]
    client = MlflowClient(stack.plain.url)
    experiments = client.search_experiments()
    seen += [json.dumps(e.tags) + e.artifact_location for e in experiments]
    runs = client.search_runs([e.experiment_id for e in experiments])
    assert runs
    for run in runs:
        seen += [json.dumps(run.data.params), json.dumps(run.data.tags), run.info.run_name]
        seen += _artifact_paths(client, run.info.run_id)
    for model in client.search_logged_models([e.experiment_id for e in experiments]):
        seen += [json.dumps(model.tags), json.dumps(model.params), model.artifact_location]
    seen += _s3_keys(stack)
    text = "\n".join(seen)
    assert tracked_run.run.data.tags["mlpipe.git.url"] == "https://git.example.com/team/tiny.git"
    leaked = [s for s in SECRETS if s in text]
    assert not leaked, leaked
    assert "oauth2:" not in text


# issue 20: the database password stays off the screen and out of every process's cmdline ----
def _tree_cmdlines(pid: int) -> dict[int, bytes]:
    """Raw /proc/<pid>/cmdline of a process and all its descendants (what `ps` shows)."""
    pids = [pid] + [p.pid for p in _descendants(pid)]
    out = {}
    for each in pids:
        with contextlib.suppress(OSError):
            out[each] = Path(f"/proc/{each}/cmdline").read_bytes()
    return out


def _wait_for_tree(server: types.SimpleNamespace, *wanted: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        names = b" ".join(_tree_cmdlines(server.proc.pid).values()).decode(errors="replace")
        if all(w in names for w in wanted):
            return
        time.sleep(0.5)
    raise AssertionError(f"server tree never showed {wanted}")


def test_running_servers_cmdlines_hold_no_password(stack):  # before the signal tests stop them
    """Both stack servers were started with postgresql://postgres:PASSWORD@... on their
    command line; after the re-exec no process of either tree shows it, and the warning
    says how to pass it safely."""
    for server in (stack.plain, stack.auth):
        _wait_for_tree(server, "uvicorn")
        cmdlines = _tree_cmdlines(server.proc.pid)
        assert len(cmdlines) >= 3  # mlpipe server, mlflow server, uvicorn (and workers)
        leaked = {pid: c for pid, c in cmdlines.items() if DB_PASSWORD.encode() in c}
        assert not leaked, leaked
        err = server.err.read_text()
        assert "Warning: a password was given on the command line" in err
        assert "PGPASSWORD" in err and DB_PASSWORD not in err + server.out.read_text()


def _artifact_paths(client, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for item in client.list_artifacts(run_id, path):
        out.append(item.path)
        if item.is_dir:
            out += _artifact_paths(client, run_id, item.path)
    return out


def _cmdline(proc: psutil.Process) -> str:
    with contextlib.suppress(psutil.Error):
        return " ".join(proc.cmdline())
    return ""


def _descendants(pid: int) -> list[psutil.Process]:
    with contextlib.suppress(psutil.Error):
        return psutil.Process(pid).children(recursive=True)
    return []


def _listening(url: str) -> bool:
    port = int(url.rsplit(":", 1)[1])
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return False
    return True


@pytest.mark.parametrize(("which", "signum"), [("auth", signal.SIGINT), ("plain", signal.SIGTERM)])
def test_signal_stops_whole_process_tree(stack, which, signum):
    """(d) Ctrl-C / SIGTERM: uvicorn, its workers, the job runner and huey consumers all go."""
    server = getattr(stack, which)
    wanted = ["uvicorn"] + (["huey_consumer"] if which == "plain" else [])
    deadline = time.monotonic() + 90  # the job runner starts its consumers after /health
    while True:
        tree = _descendants(server.proc.pid)
        names = " ".join(_cmdline(p) for p in tree)
        if all(w in names for w in wanted) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert all(w in names for w in wanted), names
    began = time.monotonic()
    server.proc.send_signal(signum)
    server.proc.wait(timeout=30)
    elapsed = time.monotonic() - began
    assert server.proc.returncode == 128 + signum
    assert elapsed < 10, elapsed
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(p.is_running() for p in tree):
        time.sleep(0.1)
    from mlpipe.core.processes import alive

    left = alive(p.pid for p in tree if p.is_running())
    assert not left, left
    assert not _listening(server.url)
    assert "Stopped the tracking server." in server.err.read_text()


def run_cli(
    args: list[str], env: dict[str, str], cwd: Path
) -> tuple[subprocess.CompletedProcess, float]:
    began = time.monotonic()
    out = subprocess.run(
        [*MLPIPE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )
    return out, time.monotonic() - began


def test_unreachable_database_named_fast(tmp_path):
    """(e) Nothing listens on the database port: exit 2 within seconds, 'database', no secret."""
    dead = f"postgresql://postgres:{DB_PASSWORD}@127.0.0.1:{free_port()}/mlflow"
    out, elapsed = run_cli(
        server_cli_args(dead, "http://127.0.0.1:9", free_port()),
        client_env(**S3_CREDENTIALS),
        tmp_path,
    )
    assert out.returncode == 2, out.stderr
    assert elapsed < 10
    assert "\nError: database: cannot connect to postgresql://***@127.0.0.1:" in out.stderr
    assert out.stderr.startswith("Warning: a password was given on the command line")
    assert DB_PASSWORD not in out.stdout + out.stderr
    assert "Traceback" not in out.stderr


def test_unreachable_s3_and_missing_bucket_named_fast(stack, tmp_path):
    """(e) S3 down: exit 2 naming S3; bucket missing without --create-bucket: says so."""
    env = client_env(**S3_CREDENTIALS)
    args = server_cli_args(stack.db, f"http://127.0.0.1:{free_port()}", free_port())
    out, elapsed = run_cli(args, env, tmp_path)
    assert out.returncode == 2, out.stderr
    assert elapsed < 15
    assert "\nError: S3: cannot reach http://127.0.0.1:" in out.stderr  # after the argv warning

    args = server_cli_args(stack.db, stack.moto.endpoint, free_port())
    args[args.index("--artifacts-destination") + 1] = "s3://no-such-bucket/x"
    args.remove("--create-bucket")
    out, elapsed = run_cli(args, env, tmp_path)
    assert out.returncode == 2, out.stderr
    assert elapsed < 10
    assert "Error: S3: bucket 'no-such-bucket' does not exist" in out.stderr
    assert "--create-bucket" in out.stderr
    assert "no-such-bucket" not in [b["Name"] for b in stack.s3.list_buckets()["Buckets"]]
    for secret in SECRETS:
        assert secret not in out.stdout + out.stderr


def test_auth_without_admin_password_refused(tmp_path):
    """(f) --auth and no MLFLOW_AUTH_ADMIN_PASSWORD: exit 2 before any check or start."""
    args = server_cli_args(f"{PG}/test", "http://127.0.0.1:9", free_port(), auth=True)
    out, elapsed = run_cli(args, client_env(**S3_CREDENTIALS), tmp_path)
    assert out.returncode == 2
    assert elapsed < 10
    assert "MLFLOW_AUTH_ADMIN_PASSWORD" in out.stderr
    assert "no default" in out.stderr


def test_sigterm_while_starting_leaves_nothing(moto_s3, tmp_path):
    """SIGTERM before /health answers: exit 143 and the half-started tree is gone too."""
    args = server_cli_args(f"sqlite:///{tmp_path / 'one.db'}", moto_s3.endpoint, free_port())
    server = launch(args, tmp_path / "srv", client_env(**moto_s3.credentials))
    deadline = time.monotonic() + 60
    while "Starting mlflow server" not in server.err.read_text():
        assert time.monotonic() < deadline and server.proc.poll() is None, server.err.read_text()
        time.sleep(0.1)
    time.sleep(1.0)  # mlflow server is importing
    tree = _descendants(server.proc.pid)
    assert tree
    server.proc.send_signal(signal.SIGTERM)
    server.proc.wait(timeout=20)
    from mlpipe.core.processes import alive

    assert server.proc.returncode == 143
    err = server.err.read_text()
    assert "SQLite is single-user" in err
    assert "Stopped by SIGTERM before the server was ready" in err
    assert alive(p.pid for p in tree) == []


def test_auth_password_refused_by_mlflow_is_reported_not_printed(moto_s3, tmp_path):
    """MLflow's own checks, before any worker starts: exit 2, its reason, no secret. (MLflow
    refuses the default password that its older versions shipped.)"""
    legacy = "password1234"
    args = server_cli_args(
        f"sqlite:///{tmp_path / 'one.db'}", moto_s3.endpoint, free_port(), auth=True
    )
    env = client_env(**moto_s3.credentials, MLFLOW_AUTH_ADMIN_PASSWORD=legacy)
    out, _ = run_cli(args, env, tmp_path)
    assert out.returncode == 2, out.stderr
    assert "--auth: MLflow refused the basic-auth set-up" in out.stderr
    assert "MLFLOW_AUTH_ADMIN_PASSWORD" in out.stderr
    assert legacy not in out.stdout + out.stderr
    assert "Traceback" not in out.stderr


# processes.stop_tree on a tree built to resist a plain kill ---------------------------------

_STUBBORN = r"""
import os, signal, subprocess, sys, time
# a child that ignores SIGTERM, and a grandchild that leaves the process group (setsid)
child = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                          start_new_session=True)
print(child.pid, orphan.pid, flush=True)
time.sleep(600)
"""


def test_stop_tree_kills_stubborn_and_escaped_processes():
    from mlpipe.core.processes import alive, stop_tree

    marker = ("MLPIPE_TEST_MARKER", uuid.uuid4().hex)
    proc = subprocess.Popen(
        [sys.executable, "-c", _STUBBORN],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, marker[0]: marker[1]},
    )
    pids = [proc.pid, *map(int, proc.stdout.readline().split())]
    began = time.monotonic()
    stopped = stop_tree(proc, grace=1.0, marker=marker)
    assert time.monotonic() - began < 6
    assert stopped == 3
    assert alive(pids) == []


# the server's streaming S3 uploads, against moto ---------------------------------------------


def _repository(moto_s3, monkeypatch, bucket: str):
    from mlpipe.server.app import StreamingS3ArtifactRepository

    for name, value in moto_s3.credentials.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", moto_s3.endpoint)
    moto_s3.client().create_bucket(Bucket=bucket)
    return StreamingS3ArtifactRepository(f"s3://{bucket}/exp/run/artifacts")


async def _chunks(data: bytes, sizes=(65536, 1, 100_000, 7)):
    i = k = 0
    while i < len(data):
        n = sizes[k % len(sizes)]
        yield data[i : i + n]
        i, k = i + n, k + 1


def test_streaming_upload_writes_exact_object_with_content_type(moto_s3, monkeypatch):
    """Multipart (20 MB in uneven chunks), small and empty bodies: the bytes S3 holds."""
    import asyncio

    repo = _repository(moto_s3, monkeypatch, "stream-ok")
    s3 = moto_s3.client()
    big = os.urandom(20 * 1024 * 1024 + 123)
    for name, data in (("model.pt", big), ("meta.json", b'{"a": 1}'), ("empty.txt", b"")):
        asyncio.run(repo.log_artifact_from_async_stream(_chunks(data), name, "ckpt"))
        obj = s3.get_object(Bucket="stream-ok", Key=f"exp/run/artifacts/ckpt/{name}")
        assert obj["Body"].read() == data, name
    assert obj["ContentType"] == "text/plain"
    meta = s3.head_object(Bucket="stream-ok", Key="exp/run/artifacts/ckpt/meta.json")
    assert meta["ContentType"] == "application/json"
    assert repo.list_artifacts("ckpt")  # the rest is MLflow's S3 repository


def test_streaming_upload_interrupted_leaves_nothing(moto_s3, monkeypatch):
    """The client goes away mid-body: the error propagates and the multipart upload is
    aborted, so no object and no dangling parts stay in the bucket."""
    import asyncio

    repo = _repository(moto_s3, monkeypatch, "stream-cut")

    async def cut():
        async for chunk in _chunks(os.urandom(12 * 1024 * 1024)):
            yield chunk
        raise ConnectionResetError("client disconnected")

    with pytest.raises(ConnectionResetError):
        asyncio.run(repo.log_artifact_from_async_stream(cut(), "model.pt"))
    s3 = moto_s3.client()
    assert "Contents" not in s3.list_objects_v2(Bucket="stream-cut")
    assert not s3.list_multipart_uploads(Bucket="stream-cut").get("Uploads")


QUERY_PASSWORD = "q-Pa55word-DO-NOT-LOG"
AT_PASSWORD = "at@Pa55word-DO-NOT-LOG"


def test_query_string_password_hidden_while_running(stack, tmp_path):
    """postgresql://HOST/DB?user=U&password=X: X is neither printed nor in any cmdline."""
    with fresh_database() as name:
        uri = f"postgresql://127.0.0.1:5432/{name}?user=postgres&password={QUERY_PASSWORD}"
        args = server_cli_args(uri, stack.moto.endpoint, free_port())
        env = client_env(**S3_CREDENTIALS, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        server = launch(args, tmp_path / "query", env)
        try:
            wait_ready(server)
            _wait_for_tree(server, "uvicorn")
            cmdlines = _tree_cmdlines(server.proc.pid)
        finally:
            stop(server)
        assert not [c for c in cmdlines.values() if QUERY_PASSWORD.encode() in c], cmdlines
        assert QUERY_PASSWORD not in server.out.read_text() + server.err.read_text()


@pytest.mark.parametrize(
    "uri",
    [
        f"postgresql://postgres:{DB_PASSWORD}@127.0.0.1:1/mlflow",
        f"postgresql://127.0.0.1:1/mlflow?user=postgres&password={QUERY_PASSWORD}",
        f"postgresql://postgres:{AT_PASSWORD}@127.0.0.1:1/mlflow",
    ],
)
def test_password_forms_not_printed_by_refusal_or_dry_run(uri, tmp_path):
    """The three URI forms, refused (nothing listens) and with --dry-run: no password."""
    env = client_env(**S3_CREDENTIALS)
    args = server_cli_args(uri, "http://127.0.0.1:9", free_port())
    refused, _ = run_cli(args, env, tmp_path)
    dry, _ = run_cli([*args, "--dry-run"], env, tmp_path)
    assert refused.returncode == 2, refused.stderr
    assert "Traceback" not in refused.stderr
    assert dry.returncode == (2 if "@Pa55" in uri else 0), dry.stderr
    text = refused.stdout + refused.stderr + dry.stdout + dry.stderr
    for secret in (DB_PASSWORD, QUERY_PASSWORD, AT_PASSWORD, "Pa55word", "DO-NOT-LOG"):
        assert secret not in text, text
