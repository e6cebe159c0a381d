"""``mlpipe doctor`` against real local SQLite stores (no server, no network, no subprocess).

The server checks (health, login, version) and the S3 round trip through a real server are
in ``tests/test_doctor_integration.py``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from mlpipe.cli import cli
from mlpipe.core.outbox import outbox_files, write_outbox
from mlpipe.core.settings import resolve_settings
from mlpipe.server.doctor import (
    DOCTOR_EXPERIMENT,
    FAIL,
    INFO,
    PASS,
    SKIP,
    exit_code,
    run_checks,
)


@pytest.fixture
def store(tmp_path):
    """A SQLite tracking store named explicitly (as --tracking-uri would)."""
    return f"sqlite:///{tmp_path / 'store' / 'mlruns.db'}"


def by_name(results) -> dict:
    return {r.name: r for r in results}


def doctor_runs(uri: str):
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(DOCTOR_EXPERIMENT)
    assert experiment is not None
    return client, client.search_runs([experiment.experiment_id])


def test_run_checks_on_sqlite_store_passes_and_skips_server_checks(store, tmp_path):
    (tmp_path / "store").mkdir()
    results = run_checks(resolve_settings(tracking_uri=store))
    checks = by_name(results)
    assert [r.name for r in results] == [
        "tracking server",
        "credentials",
        "server version",
        "unsent data",
        "experiment and run",
        "artifact round trip",
        "model registry",
        "GPU",
        "packages",
    ]
    for name in ("tracking server", "credentials", "server version"):
        assert checks[name].status == SKIP, checks[name]
    for name in ("unsent data", "experiment and run", "artifact round trip", "model registry"):
        assert checks[name].status == PASS, checks[name]
    assert "sha256 identical" in checks["artifact round trip"].detail
    assert checks["GPU"].status in (PASS, INFO)
    assert "mlflow 3." in checks["packages"].detail
    assert exit_code(results) == 0

    client, runs = doctor_runs(store)
    (run,) = runs
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlpipe.doctor"] == "true"
    assert run.info.run_id in checks["experiment and run"].detail
    # the 1 MB probe was deleted once it came back intact
    assert client.list_artifacts(run.info.run_id) == []


def test_run_checks_keep_artifact_leaves_the_probe(store, tmp_path):
    (tmp_path / "store").mkdir()
    results = run_checks(resolve_settings(tracking_uri=store), keep_artifact=True)
    assert exit_code(results) == 0
    client, (run,) = doctor_runs(store)
    (probe,) = client.list_artifacts(run.info.run_id, "mlpipe-doctor")
    assert probe.path == "mlpipe-doctor/probe.bin"
    assert probe.file_size == 1024 * 1024
    assert "kept at" in by_name(results)["artifact round trip"].detail


def test_run_checks_uses_experiment_prefix(store, tmp_path, monkeypatch):
    (tmp_path / "store").mkdir()
    monkeypatch.setenv("MLPIPE_EXPERIMENT_PREFIX", "neuro/")
    results = run_checks(resolve_settings(tracking_uri=store))
    assert exit_code(results) == 0
    assert "'neuro/mlpipe-doctor'" in by_name(results)["experiment and run"].detail
    assert MlflowClient(store).get_experiment_by_name("neuro/mlpipe-doctor") is not None


def test_run_checks_twice_reuses_the_doctor_experiment(store, tmp_path):
    (tmp_path / "store").mkdir()
    settings = resolve_settings(tracking_uri=store)
    assert exit_code(run_checks(settings)) == 0
    assert exit_code(run_checks(settings)) == 0
    _, runs = doctor_runs(store)
    assert [r.info.status for r in runs] == ["FINISHED", "FINISHED"]


def test_run_checks_default_store_absent_creates_nothing(tmp_path):
    results = run_checks(resolve_settings())
    checks = by_name(results)
    for name in ("unsent data", "experiment and run", "artifact round trip", "model registry"):
        assert checks[name].status == SKIP
        assert "no tracking store set" in checks[name].detail
    assert exit_code(results) == 0
    assert not (tmp_path / "mlruns.db").exists()
    assert not (tmp_path / "mlruns").exists()


def test_run_checks_unusable_store_fails_with_fix(tmp_path):
    # A SQLite path under a regular file cannot be created: the store refuses.
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    results = run_checks(resolve_settings(tracking_uri=f"sqlite:///{blocker}/mlruns.db"))
    failed = [r for r in results if r.status == FAIL]
    assert failed, results
    assert failed[0].fix
    assert exit_code(results) == 2


def test_run_checks_replays_the_outbox_and_marks_the_run(store, tmp_path):
    (tmp_path / "store").mkdir()
    client = MlflowClient(store)
    experiment_id = client.create_experiment("training")
    run_id = client.create_run(experiment_id).info.run_id
    now = int(time.time() * 1000)
    records = [
        {"type": "metric", "key": "loss", "value": 1 / (s + 1), "timestamp": now, "step": s}
        for s in range(30)
    ]
    records += [
        {"type": "param", "key": "lr", "value": "0.001"},
        {"type": "end", "status": "FAILED", "reason": "server down at the end"},
    ]
    write_outbox(store, run_id, records)

    results = run_checks(resolve_settings(tracking_uri=store))
    check = by_name(results)["unsent data"]
    assert check.status == PASS
    assert f"run {run_id}: 30 metric points, 1 params sent, marked FAILED" in check.detail
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["mlpipe.failure"] == "server down at the end"
    assert run.data.params == {"lr": "0.001"}
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == list(range(30))
    assert outbox_files(store) == []


def test_outbox_of_deleted_or_unknown_runs_is_dropped(store, tmp_path):
    (tmp_path / "store").mkdir()
    client = MlflowClient(store)
    run_id = client.create_run(client.create_experiment("x")).info.run_id
    client.delete_run(run_id)
    write_outbox(store, run_id, [{"type": "end", "status": "FAILED", "reason": "r"}])
    point = {"type": "metric", "key": "a", "value": 1.0, "timestamp": 1, "step": 0}
    write_outbox(store, "f" * 32, [point])
    # another server (another URI) does not see them
    assert outbox_files(f"sqlite:///{tmp_path / 'other.db'}") == []

    check = by_name(run_checks(resolve_settings(tracking_uri=store)))["unsent data"]
    assert check.status == PASS
    assert f"run {run_id}: dropped" in check.detail
    assert f"run {'f' * 32}: dropped" in check.detail
    assert outbox_files(store) == []


# the command ---------------------------------------------------------------------------------


def test_doctor_command_prints_table_and_exits_0(store, tmp_path):
    (tmp_path / "store").mkdir()
    result = CliRunner().invoke(cli, ["doctor", "--tracking-uri", store])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any(line.startswith("PASS  artifact round trip") for line in lines), result.output
    assert any(line.startswith("SKIP  tracking server") for line in lines)
    assert "View run" not in result.output  # MLflow's run links are kept out


def test_doctor_command_json_is_parseable(store, tmp_path):
    (tmp_path / "store").mkdir()
    result = CliRunner().invoke(cli, ["doctor", "--tracking-uri", store, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert {d["name"]: d["status"] for d in data}["experiment and run"] == PASS
    assert all(set(d) == {"name", "status", "detail", "fix", "seconds"} for d in data)


def test_doctor_command_failure_exits_2_and_prints_fix(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = CliRunner().invoke(cli, ["doctor", "--tracking-uri", f"sqlite:///{blocker}/db"])
    assert result.exit_code == 2, result.output
    assert "FAIL experiment and run:" in result.output
    assert "check(s) failed" in result.output


def test_doctor_command_reads_project_file(tmp_path, store):
    (tmp_path / "store").mkdir()
    project = tmp_path / "proj"
    project.mkdir()
    (project / "mlpipe.yaml").write_text(f"tracking_uri: {store}\n")
    result = CliRunner().invoke(cli, ["doctor", "--project", str(project)])
    assert result.exit_code == 0, result.output
    assert f"Checking {store} (from {project / 'mlpipe.yaml'})" in result.output
    assert Path(store[len("sqlite:///") :]).exists()
