"""Shared fixtures: a clean environment, example projects as folders, real git repositories."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

PROJECTS = Path(__file__).parent / "projects"
REPO_ROOT = Path(__file__).parent.parent


@contextlib.contextmanager
def isolated_env(root: Path, patch: pytest.MonkeyPatch | None = None):
    """No MLFLOW_*/MLPIPE_*/AWS_* from the developer's shell, no user config, cwd in a temp folder.

    The default tracking URI is ./mlruns.db, so every test tracks into its own tmp_path.
    """
    with contextlib.ExitStack() as stack:
        if patch is None:
            patch = stack.enter_context(pytest.MonkeyPatch.context())
        for name in list(os.environ):
            if name.startswith(("MLFLOW_", "MLPIPE_", "AWS_")):
                patch.delenv(name, raising=False)
        patch.setenv("MLPIPE_CONFIG", str(root / "no-user-config.yaml"))
        patch.setenv("MLPIPE_CACHE_DIR", str(root / "cache"))
        patch.chdir(root)
        # In-process code (the runner, a fixture logging a model) may call
        # mlflow.set_tracking_uri/set_registry_uri, which keep the URI in module globals:
        # without this reset, a later test's clients would reach an earlier test's store.
        from mlflow.tracking._model_registry import utils as registry_utils
        from mlflow.tracking._tracking_service import utils as tracking_utils

        patch.setattr(registry_utils, "_registry_uri", None)
        patch.setattr(tracking_utils, "_tracking_uri", None)
        # Those calls also export MLFLOW_TRACKING_URI/MLFLOW_REGISTRY_URI. MonkeyPatch restores
        # only variables it has recorded, and it records none that was absent: set, then
        # delete, so that what the block exports is removed at its end too.
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
            patch.setenv(name, "unset")
            patch.delenv(name)
        yield


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """Every test: :func:`isolated_env` in its own ``tmp_path``."""
    with isolated_env(tmp_path, monkeypatch):
        yield


@pytest.fixture
def tracking(tmp_path):
    """The fluent API pointed at a SQLite store in tmp_path; a client of it; no run left active.

    ``set_tracking_uri`` also sets ``MLFLOW_TRACKING_URI`` in the environment, so it is reset.
    """
    import mlflow
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    mlflow.set_tracking_uri(uri)
    yield MlflowClient(uri)
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


@pytest.fixture
def project_dir(tmp_path):
    """Copy a fixture project from tests/projects/<name> into tmp_path and return its path."""

    def copy(name: str) -> Path:
        dest = tmp_path / "projects" / name
        shutil.copytree(PROJECTS / name, dest)
        return dest

    return copy


def git(*args: str, cwd: Path) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "test",
        "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "test",
        "GIT_COMMITTER_EMAIL": "test@example.com",
    }
    result = subprocess.run(
        ["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True
    )
    return result.stdout.strip()


@pytest.fixture
def git_repo(tmp_path):
    """Make a real git repository holding fixture projects under projects/<name>.

    Returns a function: ``make(*names) -> Path`` of the repository, one commit on ``main``.
    """

    def make(*names: str, path: Path | None = None) -> Path:
        repo = path or tmp_path / "repo"
        repo.mkdir(parents=True)
        git("init", "-q", "-b", "main", cwd=repo)
        for name in names:
            shutil.copytree(PROJECTS / name, repo / "projects" / name)
        git("add", "-A", cwd=repo)
        git("commit", "-q", "-m", "initial", cwd=repo)
        return repo

    return make


@pytest.fixture
def runs_in(tmp_path):
    """All runs of the SQLite store in ./mlruns.db of the test's folder, newest first."""

    def search(db: Path | None = None):
        from mlflow import MlflowClient

        path = db or tmp_path / "mlruns.db"
        if not path.exists():
            return []
        client = MlflowClient(tracking_uri=f"sqlite:///{path}")
        experiments = [e.experiment_id for e in client.search_experiments()]
        return client.search_runs(experiments, order_by=["attributes.start_time DESC"])

    return search


def write_nifti_dataset(
    root: Path, cases: int = 3, *, shape=(8, 8, 6), version: str | None = "v1", name: str = "toy"
) -> Path:
    """A small Decathlon-layout dataset of real NIfTI files (image: noise + a bright box)."""
    import json

    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(0)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    for i in range(cases):
        label = np.zeros(shape, dtype=np.uint8)
        label[2:5, 2:5, 1 + i % 3 : 3 + i % 3] = 1
        image = rng.normal(size=shape).astype(np.float32) + 3 * label
        nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / f"case_{i}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / f"case_{i}.nii.gz")
    meta = {"name": name} | ({"version": version} if version else {})
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def log_served_model(root: Path, model: str = "seg3d-serve", *, shape=(32, 32, 24)):
    """Log, register and alias an untrained seg3d UNet like a training run would.

    The run logs the dataset, the preprocessing and a data profile (so the server has tags
    and a training geometry), then the model with ``registered_model_name``; no training.
    Returns the tracking URI, the run id and the dataset info.
    """
    from types import SimpleNamespace

    import mlflow
    import torch
    from mlflow import MlflowClient

    import mlpipe.log as mlog
    from seg3d.config import TrainConfig
    from seg3d.networks import build_network
    from seg3d.pyfunc import log_model
    from seg3d.transforms import infer_transforms

    data = write_nifti_dataset(root / "data", cases=3, shape=shape, name="toy-ct")
    config = TrainConfig(model="unet", patch_size=(32, 32, 32), num_classes=3)
    torch.manual_seed(0)
    network = build_network(config).eval()
    uri = f"sqlite:///{root / 'mlruns.db'}"
    mlflow.set_tracking_uri(uri)
    try:
        experiment = mlflow.create_experiment("seg3d", artifact_location=str(root / "artifacts"))
        with mlflow.start_run(experiment_id=experiment) as run:
            info = mlog.dataset(data)
            mlog.preprocessing(infer_transforms(config), name="train")
            mlog.data_profile(info)
            example = data / "imagesTr" / "case_0.nii.gz"
            log_model(network, config, registered_model_name=model, example_path=example)
        MlflowClient(uri).set_registered_model_alias(model, "production", "1")
    finally:
        while mlflow.active_run():
            mlflow.end_run()
        mlflow.set_tracking_uri(None)
    return SimpleNamespace(uri=uri, run_id=run.info.run_id, dataset=info, root=root)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (at the time of asking)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_mlflow_server(backend_uri: str, artifacts: Path, *, workers: int = 1, timeout=120):
    """A real ``mlflow server`` process on a free port until the block ends; yields its URL."""
    import signal
    import sys
    import time
    import urllib.request

    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", backend_uri,
            "--artifacts-destination", str(artifacts),
            "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        # MLflow 3 starts a job runner and two huey consumers by default (GenAI jobs that no
        # test uses); they cost 2 cores of start-up time on every server the tests start
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"mlflow server on {backend_uri} did not start") from None
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


@pytest.fixture
def mlflow_server(tmp_path):
    """A real ``mlflow server`` (SQLite backend, local artifacts) on a free port; its URL."""
    with running_mlflow_server(
        f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "server-artifacts"
    ) as url:
        yield url


PG = "postgresql://postgres@127.0.0.1:5432"
S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "mlpipe-test-key-id",
    "AWS_SECRET_ACCESS_KEY": "mlpipe-test-secret-DO-NOT-LOG",
    "AWS_DEFAULT_REGION": "us-east-1",
}
"""What the *server* side gets for moto; tests scan client output and runs for these."""


@contextlib.contextmanager
def fresh_database():
    """A fresh PostgreSQL database on 127.0.0.1:5432 for the block; its name. Dropped after.

    Skipped when PostgreSQL is not reachable, except under CI (``.ci/run`` starts it).
    """
    import uuid

    psycopg = pytest.importorskip("psycopg")
    name = f"mlpipe_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(f"{PG}/test", autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"PostgreSQL not reachable at 127.0.0.1:5432: {exc}")
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture
def postgres_db():
    """A fresh PostgreSQL database (:func:`fresh_database`); its SQLAlchemy URI."""
    with fresh_database() as name:
        yield f"{PG}/{name}"


@contextlib.contextmanager
def running_moto_server(timeout: float = 60):
    """A real ``moto_server`` (S3 emulator) on a free port; yields a namespace with its
    ``endpoint``, a started ``process`` and ``stop()``/``start()`` to simulate an S3 outage
    (the same port; the in-memory buckets are lost on restart, so recreate them).
    """
    import signal
    import sys
    import time
    import types
    import urllib.request

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    moto = str(Path(sys.executable).with_name("moto_server"))
    state = types.SimpleNamespace(endpoint=endpoint, port=port, process=None)

    def start() -> None:
        state.process = subprocess.Popen(
            [moto, "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(endpoint + "/moto-api/", timeout=2):
                    return
            except OSError:
                if time.monotonic() > deadline or state.process.poll() is not None:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.2)

    def stop() -> None:
        if state.process is None or state.process.poll() is not None:
            return
        os.killpg(state.process.pid, signal.SIGTERM)
        try:
            state.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(state.process.pid, signal.SIGKILL)
            state.process.wait(timeout=5)

    state.start, state.stop = start, stop
    start()
    try:
        yield state
    finally:
        stop()


@pytest.fixture
def moto_s3():
    """A moto S3 endpoint; ``.endpoint``, ``.client()`` (boto3 with test credentials),
    ``.stop()``/``.start()``. No AWS variable is put into this test process's environment."""
    boto3 = pytest.importorskip("boto3")
    with running_moto_server() as state:
        state.credentials = dict(S3_CREDENTIALS)
        state.client = lambda: boto3.client(
            "s3",
            endpoint_url=state.endpoint,
            aws_access_key_id=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region_name=S3_CREDENTIALS["AWS_DEFAULT_REGION"],
        )
        yield state
