"""The team tracking server: ``mlflow server`` with PostgreSQL, proxied S3 artifacts and checks.

Three steps, each usable on its own: ``plan`` (``mlpipe.server.plan``) checks the options and
builds the command (nothing touched), ``preflight`` (``mlpipe.server.preflight``) checks that
the database and the bucket answer (and creates the bucket when asked), and :func:`start`
launches ``python -m mlflow server`` in its own session, waits for ``/health`` and returns a
``ServerHandle`` (``mlpipe.server.process``) whose ``stop()`` ends the whole process tree.
``mlpipe server`` is these three plus :func:`serve`, which waits for Ctrl-C or SIGTERM.

Example::

    from mlpipe.server.launch import start
    from mlpipe.server.plan import plan
    from mlpipe.server.preflight import preflight

    p = plan(backend_store_uri="postgresql://mlflow@db/mlflow",
             artifacts_destination="s3://mlflow/artifacts")
    preflight(p)
    handle = start(p)
    ...  # MLFLOW_TRACKING_URI=handle.url
    handle.stop()

Secrets (database password, AWS keys, the admin password) go to the server process through
its environment only: never on its command line, never printed; the server's own output is
forwarded with them masked.
"""

from __future__ import annotations

import collections
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from mlpipe.server.plan import (
    MARKER_ENV,
    START_TIMEOUT_S,
    ServerExitedError,
    ServerInterruptedError,
    ServerPlan,
)
from mlpipe.server.process import (
    ServerHandle,
    _bootstrap_auth,
    _forward,
    _masker,
    _server_env,
    _wait_healthy,
)


class _Signalled(BaseException):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _raise_on(*signals: int):
    """Turn ``signals`` into a ``_Signalled`` exception in the main thread for the block."""

    def handler(signum, _frame):
        raise _Signalled(signum)

    previous = {}
    for signum in signals:
        with contextlib.suppress(ValueError):  # not the main thread: nothing to install
            previous[signum] = signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def start(
    server_plan: ServerPlan,
    *,
    env: Mapping[str, str] | None = None,
    echo: Callable[[str], None] | None = None,
    timeout: float = START_TIMEOUT_S,
) -> ServerHandle:
    """Start ``python -m mlflow server`` in its own session and wait for ``/health``.

    The server's output (stdout and stderr) goes line by line to ``echo``, with every secret
    of its environment masked; the last lines are kept for error messages.

    Raises:
        UsageError: --auth set up refused by MLflow (password too short, ...).
        ServerStartError: the server exited, or did not answer within ``timeout``; the tail of
            its output is in the message and no process of it is left.
    """
    env = dict(os.environ if env is None else env)
    state_dir = Path(tempfile.mkdtemp(prefix="mlpipe-server-"))
    marker = (MARKER_ENV, uuid.uuid4().hex)
    child_env = _server_env(server_plan, env, state_dir, marker)
    mask = _masker(child_env, server_plan)
    try:
        if server_plan.auth:
            _bootstrap_auth(child_env, state_dir, mask)
        process = subprocess.Popen(
            server_plan.command(),
            env=child_env,
            cwd=state_dir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except BaseException:
        shutil.rmtree(state_dir, ignore_errors=True)
        raise
    tail: collections.deque = collections.deque(maxlen=40)
    reader = threading.Thread(target=_forward, args=(process.stdout, tail, mask, echo), daemon=True)
    reader.start()
    handle = ServerHandle(
        url=server_plan.url,
        local_url=server_plan.local_url,
        process=process,
        marker=marker,
        _state_dir=state_dir,
        _tail=tail,
        _reader=reader,
    )
    try:
        with _raise_on(signal.SIGTERM, signal.SIGHUP):  # Ctrl-C is a KeyboardInterrupt
            _wait_healthy(handle, timeout)
    except _Signalled as exc:
        handle.stop()
        raise ServerInterruptedError(exc.signum) from None
    except BaseException:
        handle.stop()
        raise
    return handle


def serve(
    handle: ServerHandle,
    *,
    signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP),
) -> int:
    """Block until one of ``signals`` arrives, then stop the server's whole tree.

    Returns:
        The signal that stopped it (the CLI exits with 128 + it).

    Raises:
        ServerExitedError: the server exited by itself; the tail of its output is included.
    """
    received: list[int] = []
    previous = {}
    for signum in signals:
        with contextlib.suppress(ValueError):  # not the main thread: rely on KeyboardInterrupt
            previous[signum] = signal.signal(signum, lambda s, _f: received.append(s))
    try:
        while not received:
            if handle.process.poll() is not None:
                code = handle.process.returncode
                handle.stop()
                raise ServerExitedError(
                    f"mlflow server exited by itself (code {code}). Last lines of its output:\n"
                    + handle.tail().rstrip()
                )
            time.sleep(0.2)
    except KeyboardInterrupt:
        received.append(signal.SIGINT)
    finally:
        handle.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return received[0]
