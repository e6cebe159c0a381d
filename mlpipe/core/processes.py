"""Stop a whole process tree, including the processes that a plain kill leaves behind.

``mlflow server`` runs uvicorn, which spawns its workers and a multiprocessing resource
tracker, and a job runner that spawns about seven huey consumers. Killing the ``mlflow server``
process alone leaves them running (holding the port and the database). The tree is found three
ways, so a process that moved to another session or was re-parented to init is found too: the
child's process group, its psutil descendants, and a marker variable in the environment that
every process started from it inherits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterable
from contextlib import suppress

import psutil


def tree(root_pid: int, *, marker: tuple[str, str] | None = None) -> list[psutil.Process]:
    """The processes of ``root_pid``'s tree (root excluded): descendants, group, marker holders.

    Args:
        root_pid: The process whose tree it is; also the process group id when it leads one.
        marker: ``(name, value)`` of an environment variable set only in this tree's
            environment; a process that holds it belongs to the tree wherever it now hangs.
    """
    me = os.getpid()
    found: dict[int, psutil.Process] = {}
    with suppress(psutil.Error):
        for proc in psutil.Process(root_pid).children(recursive=True):
            found[proc.pid] = proc
    for proc in psutil.process_iter(["pid"]):
        if proc.pid in (root_pid, me) or proc.pid in found:
            continue
        with suppress(psutil.Error, OSError):
            if os.getpgid(proc.pid) == root_pid:
                found[proc.pid] = proc
                continue
        if marker is not None:
            with suppress(psutil.Error):
                if proc.environ().get(marker[0]) == marker[1]:
                    found[proc.pid] = proc
    return list(found.values())


def stop_tree(
    process: subprocess.Popen,
    *,
    grace: float = 5.0,
    marker: tuple[str, str] | None = None,
) -> int:
    """SIGTERM a child started with ``start_new_session=True`` and its whole tree; SIGKILL
    whatever still runs after ``grace`` seconds. Returns how many processes were stopped.

    The tree is looked up again after the SIGTERM, since a supervisor may start a replacement
    worker while it shuts down.
    """
    procs = {p.pid: p for p in tree(process.pid, marker=marker)}
    if process.poll() is None:
        with suppress(psutil.Error):
            procs[process.pid] = psutil.Process(process.pid)
    if not procs:
        _reap(process)
        return 0
    _signal_group(process.pid, signal.SIGTERM)
    _send(procs.values(), signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        _reap(process, timeout=0)
        alive = [p for p in procs.values() if _running(p)]
        for proc in tree(process.pid, marker=marker):
            if proc.pid not in procs:  # started during the shutdown
                procs[proc.pid] = proc
                _send([proc], signal.SIGTERM)
                alive.append(proc)
        if not alive:
            break
        psutil.wait_procs(alive, timeout=min(0.2, max(0.0, deadline - time.monotonic())))
    leftover = [p for p in procs.values() if _running(p)]
    leftover += [p for p in tree(process.pid, marker=marker) if p.pid not in procs]
    if leftover:
        _signal_group(process.pid, signal.SIGKILL)
        _send(leftover, signal.SIGKILL)
        psutil.wait_procs(leftover, timeout=3)
    _reap(process, timeout=3)
    return len(procs)


def alive(pids: Iterable[int]) -> list[int]:
    """Those of ``pids`` that still run (zombies count as gone: they have exited)."""
    out = []
    for pid in pids:
        with suppress(psutil.Error):
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
    return out


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _send(procs: Iterable[psutil.Process], signum: int) -> None:
    for proc in procs:
        with suppress(psutil.Error):
            proc.send_signal(signum)


def _signal_group(pgid: int, signum: int) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _reap(process: subprocess.Popen, timeout: float | None = None) -> None:
    with suppress(subprocess.TimeoutExpired):
        if timeout == 0:
            process.poll()
        else:
            process.wait(timeout=timeout)
