"""Concurrent promotions in separate processes, against SQLite and a PostgreSQL-backed server."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
import warnings

import pytest

from tests.conftest import REPO_ROOT, running_mlflow_server
from tests.test_registry import make_version

pytestmark = pytest.mark.integration

PROCESSES = 6


@pytest.fixture
def postgres_server(postgres_db, tmp_path):
    """A real ``mlflow server`` on a fresh PostgreSQL database; its URL."""
    with running_mlflow_server(postgres_db, tmp_path / "pg-artifacts", workers=2) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres-server"])
def store(request, tmp_path):
    """A tracking URI that separate processes share: a SQLite file, or a server on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'mlruns.db'}"
    return request.getfixturevalue("postgres_server")


def _cli(uri: str, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_TRACKING_URI"] = uri
    env["PYTHONPATH"] = str(REPO_ROOT)
    return subprocess.Popen(
        [sys.executable, "-m", "mlpipe.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )


def test_concurrent_promotions_leave_one_consistent_production_version(store):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=store)
    # Equal metrics: every promotion passes the regression check, so all N must land.
    versions = [make_version(client, "seg3d", metrics={"val_dice": 0.8}) for _ in range(PROCESSES)]

    started = time.monotonic()
    procs = [_cli(store, "promote", "seg3d", v, "--yes", "--reason", f"race {v}") for v in versions]
    outputs = [p.communicate(timeout=240) for p in procs]
    elapsed = time.monotonic() - started
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, (out, err)
    print(f"\n{PROCESSES} concurrent promotions on {store.split(':')[0]}: {elapsed:.1f} s")

    holder = str(client.get_registered_model("seg3d").aliases["production"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stages = {
            str(mv.version): mv.current_stage
            for mv in client.search_model_versions("name = 'seg3d'")
        }
    assert [v for v, stage in stages.items() if stage == "Production"] == [holder]
    assert all(stages[v] == "Archived" for v in versions if v != holder)

    history = _cli(store, "history", "seg3d", "--json")
    out, err = history.communicate(timeout=120)
    assert history.returncode == 0, err
    events = json.loads(out)
    assert [e["seq"] for e in events] == list(range(1, PROCESSES + 1))
    assert sorted(e["to_version"] for e in events) == sorted(versions)
    assert events[0]["from_version"] is None
    for before, after in itertools.pairwise(events):
        assert after["from_version"] == before["to_version"]
    assert events[-1]["to_version"] == holder
    tags = client.get_model_version("seg3d", holder).tags
    assert tags["mlpipe.promotion.previous"] == (events[-2]["to_version"])
    assert not [m for m in client.search_registered_models() if m.name.startswith("mlpipe-lock")]


def test_promote_refuse_and_rollback_through_a_server(postgres_server):
    """The user's path on a real registry: promote, refused (exit 3, unchanged), rollback."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=postgres_server)
    v1 = make_version(client, "seg3d", metrics={"val_dice": 0.80})
    v2 = make_version(client, "seg3d", metrics={"val_dice": 0.85})
    v3 = make_version(client, "seg3d", metrics={"val_dice": 0.70})

    def run(*args: str) -> tuple[int, str]:
        proc = _cli(postgres_server, *args)
        out, err = proc.communicate(timeout=120)
        return proc.returncode, out + err

    started = time.monotonic()
    assert run("promote", "seg3d", v1, "--require", "val_dice>=0.75")[0] == 0
    took = time.monotonic() - started
    print(f"\none promote through a server, process start included: {took:.1f} s")
    assert run("promote", "seg3d", v2, "--reason", "better")[0] == 0
    code, output = run("promote", "seg3d", v3, "--require", "val_dice>=0.75")
    assert code == 3, output
    assert str(client.get_registered_model("seg3d").aliases["production"]) == v2
    code, output = run("rollback", "seg3d", "--reason", "v2 fails on MRI")
    assert code == 0, output
    assert str(client.get_registered_model("seg3d").aliases["production"]) == v1
    code, output = run("history", "seg3d")
    assert code == 0 and "v2 -> v1" in output and "v2 fails on MRI" in output
