"""The launcher: output tails per stream, and a stop that reaches the whole process group."""

from __future__ import annotations

import io
import os
import signal
import sys
import time

import psutil

from mlpipe.run.launcher import OutputTail, ProjectProcess


def test_output_tail_keeps_last_lines_per_stream():
    tail = OutputTail(lines=3)
    tail.feed("err", b"boom\n")
    tail.feed("out", b"".join(f"line {i}\n".encode() for i in range(10)))
    assert tail.lines("out") == ["line 7", "line 8", "line 9"]
    assert tail.lines("err") == ["boom"]


def test_output_tail_joins_chunks_and_keeps_last_progress_state():
    tail = OutputTail(lines=5)
    tail.feed("out", b"epoch 1 10%\repoch 1 5")
    tail.feed("out", b"0%\repoch 1 100%\nnext")
    assert tail.lines("out") == ["epoch 1 100%", "next"]


def test_project_process_streams_output_and_exit_code(tmp_path):
    out, err = io.BytesIO(), io.BytesIO()
    proc = ProjectProcess("echo hello; echo oops >&2; exit 4", str(tmp_path), os.environ, out, err)
    assert proc.wait(timeout=10) == 4
    assert out.getvalue() == b"hello\n"
    assert err.getvalue() == b"oops\n"


def test_project_process_stop_kills_the_group_even_if_sigterm_is_ignored(tmp_path):
    script = (
        f"{sys.executable} -c 'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
        ' print("ready", flush=True); time.sleep(60)\' & wait'
    )
    out = io.BytesIO()
    proc = ProjectProcess(script, str(tmp_path), os.environ, out, io.BytesIO())
    deadline = time.monotonic() + 10
    while b"ready" not in out.getvalue() and time.monotonic() < deadline:
        time.sleep(0.05)
    began = time.monotonic()
    proc.stop(signal.SIGTERM, grace=1.0)
    assert time.monotonic() - began < 5
    assert proc.poll() is not None
    deadline = time.monotonic() + 3
    while _live_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _live_members(proc.pid) == []


def _live_members(pgid: int) -> list[int]:
    """Processes of the group that still run (zombies wait only to be reaped)."""
    members = []
    for p in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(p.pid)
        except (ProcessLookupError, psutil.Error):
            pass
    return members
