"""``mlpipe run`` as a user types it: real processes, signals, a dead and a live tracking server.

These start subprocesses and servers; ``pytest -m 'not integration'`` skips them locally.
CI (``make test``) runs them all.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import free_port, git

pytestmark = pytest.mark.integration

MLPIPE = [sys.executable, "-m", "mlpipe.cli"]


def start(args: list[str], cwd: Path, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [*MLPIPE, *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def wait_for_line(proc: subprocess.Popen, needle: str, timeout: float = 60) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"{needle!r} never appeared; output:\n{''.join(lines)}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie has exited; only its parent has not reaped it yet
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)]
)
def test_interrupt_stops_process_group_and_marks_killed(
    project_dir, runs_in, tmp_path, signum, code
):
    proj = project_dir("sleeper")
    proc = start(["run", str(proj)], cwd=tmp_path)
    try:
        wait_for_line(proc, "sleeping")
        child_pid, grandchild_pid = map(int, (proj / "pids.txt").read_text().split())
        began = time.monotonic()
        proc.send_signal(signum)
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == code, out
    assert time.monotonic() - began < 15
    (run,) = runs_in()
    assert run.info.status == "KILLED"
    assert "marked KILLED" in out
    assert "Traceback" not in out.split("Error:")[-1]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (alive(child_pid) or alive(grandchild_pid)):
        time.sleep(0.1)
    assert not alive(child_pid) and not alive(grandchild_pid)
    assert (proj / "checkpoint.txt").read_text() == "epoch 1\n"  # what was written is kept


def run_against(uri: str, project: Path, cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    began = time.monotonic()
    out = subprocess.run(
        [*MLPIPE, "run", str(project), "--tracking-uri", uri],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return out, time.monotonic() - began


def test_dead_tracking_server_refused_fast(project_dir, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    out, elapsed = run_against(uri, project_dir("good"), tmp_path)
    assert out.returncode == 2, out.stderr
    assert elapsed < 10
    assert f"Tracking server {uri} does not answer" in out.stderr
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) <= 3


def test_silent_tracking_server_refused_within_10s(project_dir, tmp_path):
    """A host that accepts connections but never answers (a hung server) costs at most 10 s."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        uri = f"http://127.0.0.1:{sock.getsockname()[1]}"
        out, elapsed = run_against(uri, project_dir("good"), tmp_path)
    assert out.returncode == 2, out.stderr
    assert elapsed < 12  # 10 s target plus interpreter start-up
    assert "does not answer" in out.stderr


def test_foreign_project_from_git_url(git_repo, runs_in, tmp_path):
    repo = git_repo("foreign")
    url = f"file://{repo}#projects/foreign"
    out = subprocess.run(
        [*MLPIPE, "run", url, "-P", "alpha=0.05", "-P", "l1_ratio=0.5"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Warning:" in out.stderr and "no mlpipe: section" in out.stderr
    (run,) = runs_in()
    assert run.info.status == "FINISHED"
    assert run.data.params == {"alpha": "0.05", "l1_ratio": "0.5"}
    assert run.data.tags["mlpipe.convention"] == "none"
    assert run.data.tags["mlpipe.git.commit"] == git("rev-parse", "HEAD", cwd=repo)
    assert 0 < run.data.metrics["rmse"] < 1.0
    assert "rmse = " in out.stdout

    bad = subprocess.run(
        [*MLPIPE, "run", url, "-P", "alpha=abc"], cwd=tmp_path, capture_output=True, text=True
    )
    assert bad.returncode == 2
    assert "alpha: 'abc' is not valid for type float" in bad.stderr
    assert len(runs_in()) == 1


def test_run_against_live_server_prints_ui_link(mlflow_server, tmp_path):
    from mlflow import MlflowClient

    repo_root = Path(__file__).parent.parent
    out = subprocess.run(
        [*MLPIPE, "run", str(repo_root / "examples" / "quickstart"), "-P", "epochs=3"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_server},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("quickstart")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert f"{mlflow_server}/#/experiments/{exp.experiment_id}/runs/{run.info.run_id}" in out.stdout
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"model", "overlays"}
    assert not (tmp_path / "mlruns.db").exists()
