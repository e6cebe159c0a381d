"""Shared fixtures: a clean environment, example projects as folders, real git repositories."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

PROJECTS = Path(__file__).parent / "projects"
REPO_ROOT = Path(__file__).parent.parent


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No MLFLOW_*/MLPIPE_* from the developer's shell, no user config, cwd in a temp folder.

    The default tracking URI is ./mlruns.db, so every test tracks into its own tmp_path.
    """
    for name in list(os.environ):
        if name.startswith(("MLFLOW_", "MLPIPE_")):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLPIPE_CONFIG", str(tmp_path / "no-user-config.yaml"))
    monkeypatch.chdir(tmp_path)


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
