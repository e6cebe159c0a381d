"""``mlpipe sweep`` with real processes: trials are real ``mlpipe run``s of the ``tuner`` fixture
project (it logs ``score`` every step through ``mlpipe.log``), the study is a real Optuna RDB
storage (SQLite beside the local tracking store, or PostgreSQL shared by two workers started
separately), signals are real signals.

``tuner --script DIR`` makes each trial take the next line of ``DIR/scores.txt`` (claimed
atomically): a score it logs at every step, ``crash`` (exit 3) or ``sleep`` (runs ~5 min: a
trial to kill). Heartbeats and polls are short here (1 s, grace 3 s, poll 0.5 s).
These start processes; ``pytest -m 'not integration'`` skips them locally.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow import MlflowClient

from tests.conftest import PROJECTS, fresh_database

pytestmark = pytest.mark.integration

MLPIPE = [sys.executable, "-m", "mlpipe.cli"]
FAST = {"MLPIPE_SWEEP_HEARTBEAT": "1", "MLPIPE_SWEEP_GRACE": "3", "MLPIPE_SWEEP_POLL": "0.5"}


def _script(folder: Path, *lines: str) -> Path:
    folder.mkdir()
    (folder / "scores.txt").write_text("\n".join(lines) + "\n")
    return folder


def _start(args: list[str], cwd: Path, log: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [*MLPIPE, "sweep", *args],
        cwd=cwd,
        env={**os.environ, **FAST, **(env or {})},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )


def _runs(client: MlflowClient, study: str):
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string=f"tags.`mlpipe.sweep.study` = '{study}'")
    parents = [r for r in runs if r.data.tags.get("mlpipe.sweep.role") == "parent"]
    trials = [r for r in runs if r.data.tags.get("mlpipe.sweep.role") == "trial"]
    return parents, trials


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _processes_of(run_ids) -> list[int]:
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.environ().get("MLFLOW_RUN_ID") in run_ids:
                found.append(proc.pid)
        except (psutil.Error, OSError):
            continue
    return found


def _state(run) -> str:
    return run.data.tags.get("mlpipe.sweep.trial_state", "")


def test_sweep_one_worker_crash_prune_then_resume(tmp_path):
    """Default SQLite storage; a crashing trial is FAILED, a hopeless one PRUNED (its run
    KILLED), the study completes; --resume adds the trials still missing; compare --sweep."""
    script = _script(tmp_path / "script", "0.9", "0.8", "crash", "0.1", "0.95")
    common = ["--metric", "score", "--goal", "max", "--study", "s1"]
    log = tmp_path / "sweep.log"
    proc = _start(
        [
            str(PROJECTS / "tuner"),
            "--space",
            "lr=loguniform(1e-4,1e-1)",
            "--space",
            "model=choice(unet,segresnet)",
            "--trials",
            "4",
            "--pruner",
            "median",
            "-P",
            "steps=8",
            "-P",
            "delay=0.3",
            "-P",
            f"script={script}",
            *common,
        ],
        tmp_path,
        log,
    )
    assert proc.wait(timeout=240) == 0, log.read_text()
    output = log.read_text()
    assert (tmp_path / "mlpipe-sweeps.db").is_file()  # beside ./mlruns.db
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    (parent,), trials = _runs(client, "s1")
    by_trial = {int(r.data.tags["mlpipe.sweep.trial"]): r for r in trials}
    assert sorted(by_trial) == [0, 1, 2, 3]
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in trials)
    assert [(_state(by_trial[n]), by_trial[n].info.status) for n in range(4)] == [
        ("COMPLETE", "FINISHED"),
        ("COMPLETE", "FINISHED"),
        ("FAILED", "FAILED"),
        ("PRUNED", "KILLED"),
    ]
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["best_score"] == pytest.approx(0.9)
    assert parent.data.metrics["trials_pruned"] == 1 and parent.data.metrics["trials_failed"] == 1
    assert parent.data.params["best_lr"] == by_trial[0].data.params["lr"]
    tags = parent.data.tags
    assert tags["mlpipe.sweep.metric"] == "score" and tags["mlpipe.sweep.pruner"] == "median"
    assert tags["mlpipe.sweep.best_run_id"] == by_trial[0].info.run_id
    assert '"lr":"loguniform(0.0001,0.1)"' in tags["mlpipe.sweep.space"]
    images = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    assert "sweep/optimization_history.png" in images
    assert {a.path for a in client.list_artifacts(by_trial[2].info.run_id, "mlpipe")} == {
        "mlpipe/trial-002.log"
    }
    assert "FAILED (exit code 3)" in output and "PRUNED (at step" in output
    assert "Best trial 0: score = 0.9" in output

    resumed = _start(["--resume", "--trials", "5", *common], tmp_path, tmp_path / "resume.log")
    assert resumed.wait(timeout=120) == 0, (tmp_path / "resume.log").read_text()
    (parent,), trials = _runs(client, "s1")
    assert len(trials) == 5 and parent.info.status == "FINISHED"
    assert parent.data.metrics["trials_complete"] == 3
    assert parent.data.metrics["best_score"] == pytest.approx(0.95)
    best = json.loads(parent.data.tags["mlpipe.sweep.best_params"])
    assert (
        best["lr"]
        == next(r for r in trials if r.data.tags["mlpipe.sweep.trial"] == "4").data.params["lr"]
    )

    compared = subprocess.run(
        [*MLPIPE, "compare", "--sweep", "s1", "--format", "csv"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ},
    )
    assert compared.returncode == 0, compared.stderr
    header = compared.stdout.splitlines()[0].split(",")
    # completed trials best first, then the crashed and the pruned one by number
    assert header == ["field", "s1-004", "s1-000", "s1-001", "s1-002", "s1-003"]


def test_sweep_ctrl_c_kills_every_trial_and_the_parent(tmp_path):
    """Two trials at a time, one per listed GPU slot (no GPU here: the slots only set
    CUDA_VISIBLE_DEVICES, which the project prints); Ctrl-C stops both."""
    script = _script(tmp_path / "script", "sleep", "sleep", "sleep", "sleep")
    log = tmp_path / "sweep.log"
    proc = _start(
        [
            str(PROJECTS / "tuner"),
            "--space",
            "lr=loguniform(1e-4,1e-1)",
            "--trials",
            "4",
            "--gpus",
            "0,1",
            "--metric",
            "score",
            "--goal",
            "max",
            "--study",
            "s2",
            "-P",
            f"script={script}",
        ],
        tmp_path,
        log,
    )
    store = f"sqlite:///{tmp_path / 'mlruns.db'}"

    def two_running():
        # No client before the sweep made its store: MlflowClient creates a SQLite store as it
        # starts, and two processes creating one store race in MLflow's migrations.
        if "parent run" not in log.read_text():
            return None
        client = MlflowClient(store)
        _, trials = _runs(client, "s2")
        # running and past their start: each logged a step (and printed its GPU slot before)
        running = [r for r in trials if r.info.status == "RUNNING" and "score" in r.data.metrics]
        return (
            running
            if len(running) == 2 and _processes_of({r.info.run_id for r in running})
            else None
        )

    running = _wait_for(two_running, 120, "two running trials that logged a step")
    client = MlflowClient(store)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130, log.read_text()
    assert "Ctrl-C: sweep 's2' stopped" in log.read_text()
    (parent,), trials = _runs(client, "s2")
    assert parent.info.status == "KILLED"
    assert {r.info.status for r in trials} == {"KILLED"}
    assert {_state(r) for r in trials} == {"KILLED"}
    assert _processes_of({r.info.run_id for r in running}) == []
    seen = set()
    for run in trials:
        log = client.download_artifacts(run.info.run_id, "mlpipe", str(tmp_path / run.info.run_id))
        seen |= {
            line for p in Path(log).iterdir() for line in p.read_text().split() if "cuda=" in line
        }
    assert seen == {"cuda=0", "cuda=1"}


def test_two_workers_share_a_postgresql_study_and_survive_a_sigkill(tmp_path):
    """`mlpipe sweep` and `mlpipe sweep --join`, started separately on one PostgreSQL study and
    one PostgreSQL tracking store; the joining worker is SIGKILLed mid-trial: its trial goes
    stale, is queued again and finished by the first worker; N trials exactly, one parent."""
    with fresh_database() as tracking_db, fresh_database() as study_db:
        tracking_uri = f"postgresql://postgres@127.0.0.1:5432/{tracking_db}"
        storage = f"postgresql://postgres@127.0.0.1:5432/{study_db}"
        env = {"MLFLOW_TRACKING_URI": tracking_uri}
        script = _script(tmp_path / "script", *(["0.5", "0.6", "0.7"] * 4))
        log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
        first = _start(
            [
                str(PROJECTS / "tuner"),
                "--space",
                "lr=loguniform(1e-4,1e-1)",
                "--trials",
                "5",
                "--pruner",
                "none",
                "--metric",
                "score",
                "--goal",
                "max",
                "--study",
                "shared",
                "--storage",
                storage,
                "-P",
                "steps=6",
                "-P",
                "delay=0.4",
                "-P",
                f"script={script}",
            ],
            tmp_path,
            log_a,
            env,
        )
        second = None
        try:
            _wait_for(lambda: "parent run" in log_a.read_text(), 120, "the first worker's study")
            second = _start(["--join", "shared", "--storage", storage], tmp_path, log_b, env)
            client = MlflowClient(tracking_uri)

            def second_runs_a_trial():
                _, trials = _runs(client, "shared")
                mine = [
                    r
                    for r in trials
                    if r.data.tags.get("mlpipe.sweep.worker", "").endswith(f":{second.pid}")
                    and r.info.status == "RUNNING"
                ]
                return mine[0] if mine and _processes_of({mine[0].info.run_id}) else None

            victim = _wait_for(second_runs_a_trial, 120, "a trial of the joining worker")
            second.send_signal(signal.SIGKILL)
            second.wait(timeout=10)
            assert first.wait(timeout=240) == 0, log_a.read_text()
        finally:
            for proc in (first, second):
                if proc is not None and proc.poll() is None:
                    proc.kill()
        output = log_a.read_text()
        (parent,), trials = _runs(client, "shared")
        assert parent.info.status == "FINISHED"
        assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in trials)
        numbers = [int(r.data.tags["mlpipe.sweep.trial"]) for r in trials]
        assert len(numbers) == len(set(numbers))
        counted = [r for r in trials if _state(r) == "COMPLETE"]
        assert len(counted) == 5
        victim_number = victim.data.tags["mlpipe.sweep.trial"]
        victim = client.get_run(victim.info.run_id)
        assert _state(victim) == "STALE"
        retries = [r for r in trials if r.data.tags.get("mlpipe.sweep.retry_of") == victim_number]
        assert len(retries) == 1 and _state(retries[0]) == "COMPLETE"
        assert retries[0].data.params["lr"] == victim.data.params["lr"]
        workers = {r.data.tags["mlpipe.sweep.worker"] for r in trials}
        assert len(workers) == 2  # both workers ran trials
        assert f"trial {victim_number} lost its worker" in output
        assert _processes_of({victim.info.run_id}) == []
        assert parent.data.metrics["best_score"] == pytest.approx(0.7)


def test_sweep_timeout_starts_no_trial_after_it_and_closes_the_parent(tmp_path):
    log = tmp_path / "sweep.log"
    proc = _start(
        [
            str(PROJECTS / "tuner"),
            "--space",
            "lr=loguniform(1e-4,1e-1)",
            "--trials",
            "10",
            "--timeout",
            "3s",
            "--metric",
            "score",
            "--goal",
            "max",
            "--study",
            "s4",
            "-P",
            "steps=2",
            "-P",
            "delay=2",
        ],
        tmp_path,
        log,
    )
    assert proc.wait(timeout=180) == 0, log.read_text()
    assert "Stopped at --timeout" in log.read_text()
    (parent,), trials = _runs(MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}"), "s4")
    assert len(trials) == 1  # each trial takes over 4 s: only the first one started
    assert (
        parent.info.status == "FINISHED" and parent.data.tags["mlpipe.sweep.stopped"] == "timeout"
    )
    assert parent.data.metrics["trials_complete"] == 1
