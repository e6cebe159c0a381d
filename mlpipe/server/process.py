"""The running ``mlflow server`` process: its environment (secrets only there, never in argv),
the basic-auth bootstrap, its output forwarded with secrets masked, and the wait for
``/health``.
"""

from __future__ import annotations

import collections
import contextlib
import secrets
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mlpipe.core.errors import UsageError
from mlpipe.server.plan import (
    AUTH_CONFIG_ENV,
    AUTH_PASSWORD_ENV,
    AUTH_USERNAME_ENV,
    BACKEND_URI_ENV,
    S3_ENDPOINT_ENV,
    SECRET_KEY_ENV,
    STOP_GRACE_S,
    ServerPlan,
    ServerStartError,
)

_SECRET_ENV = (
    AUTH_PASSWORD_ENV,
    SECRET_KEY_ENV,
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)


@dataclass
class ServerHandle:
    """A started server: its URL, its process, and ``stop()`` for the whole tree."""

    url: str
    local_url: str
    process: subprocess.Popen
    marker: tuple[str, str]
    _state_dir: Path
    _tail: collections.deque = field(repr=False)
    _reader: threading.Thread | None = field(default=None, repr=False)
    stopped: bool = False

    @property
    def pid(self) -> int:
        return self.process.pid

    def tail(self) -> str:
        return "".join(self._tail)

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, grace: float = STOP_GRACE_S) -> int:
        """SIGTERM the server's process group and every process of its tree; SIGKILL what
        is left after ``grace`` seconds. Returns how many processes were stopped."""
        from mlpipe.core.processes import stop_tree

        if self.stopped:
            return 0
        try:
            return stop_tree(self.process, grace=grace, marker=self.marker)
        finally:
            self.stopped = True
            if self._reader is not None:
                self._reader.join(timeout=2)
            shutil.rmtree(self._state_dir, ignore_errors=True)


def _server_env(
    server_plan: ServerPlan, env: Mapping[str, str], state_dir: Path, marker: tuple[str, str]
) -> dict[str, str]:
    child = dict(env)
    child[BACKEND_URI_ENV] = server_plan.backend_store_uri
    child.pop("MLFLOW_TRACKING_URI", None)  # the server is the tracking server
    if server_plan.s3_endpoint_url:
        child[S3_ENDPOINT_ENV] = server_plan.s3_endpoint_url
    child[marker[0]] = marker[1]
    child.setdefault("PYTHONUNBUFFERED", "1")
    if server_plan.auth:
        config = state_dir / "basic_auth.ini"
        config.write_text(_auth_ini(server_plan, env), encoding="utf-8")
        config.chmod(0o600)
        child[AUTH_CONFIG_ENV] = str(config)
        if not child.get(SECRET_KEY_ENV):
            # CSRF key of the sign-up form; shared by this server's workers. Set it yourself
            # to keep it across restarts or share it between replicas.
            child[SECRET_KEY_ENV] = secrets.token_hex(32)
    return child


def _auth_ini(server_plan: ServerPlan, env: Mapping[str, str]) -> str:
    """MLflow's basic_auth.ini without a password: MLflow reads it from the environment.

    ``%`` is doubled because MLflow reads the file with configparser's interpolation (a
    URL-encoded password would otherwise break it).
    """
    username = env.get(AUTH_USERNAME_ENV) or "admin"
    db = (server_plan.auth_db_uri or server_plan.backend_store_uri).replace("%", "%%")
    return (
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = {db}\n"
        f"admin_username = {username}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )


def _bootstrap_auth(child_env: dict[str, str], state_dir: Path, mask: Callable[[str], str]):
    try:
        out = subprocess.run(
            [sys.executable, "-m", "mlpipe.server.app"],
            env=child_env,
            cwd=state_dir,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
        )
    except subprocess.TimeoutExpired as exc:
        raise ServerStartError(
            "Setting up basic auth (auth tables, admin user) took over 120 s; "
            "check the auth database."
        ) from exc
    if out.returncode != 0:
        lines = [ln for ln in out.stderr.strip().splitlines() if ln.strip()]
        reason = mask(lines[-1]) if lines else f"exit code {out.returncode}"
        raise UsageError(f"--auth: MLflow refused the basic-auth set-up: {reason}")


def _masker(child_env: Mapping[str, str], server_plan: ServerPlan) -> Callable[[str], str]:
    from mlpipe.core.secrets import scrub

    values = [v for v in (child_env.get(name) for name in _SECRET_ENV) if v and len(v) >= 4]
    uris = (server_plan.backend_store_uri, server_plan.auth_db_uri)

    def mask(line: str) -> str:
        return scrub(line, uris, values)

    return mask


def _forward(stream, tail: collections.deque, mask, echo) -> None:
    for raw in iter(stream.readline, b""):
        line = mask(raw.decode("utf-8", errors="replace"))
        tail.append(line)
        if echo is not None:
            with contextlib.suppress(Exception):
                echo(line.rstrip("\n"))
    stream.close()


def _wait_healthy(handle: ServerHandle, timeout: float) -> None:
    url = handle.local_url + "/health"
    deadline = time.monotonic() + timeout
    while True:
        code = handle.process.poll()
        if code is not None:
            if handle._reader is not None:
                handle._reader.join(timeout=2)
            raise ServerStartError(
                f"mlflow server exited with code {code} before answering /health. "
                "Last lines of its output:\n" + (handle.tail().rstrip() or "(none)")
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise ServerStartError(
                f"mlflow server did not answer {url} within {timeout:.0f} s; stopped it. "
                "Last lines of its output:\n" + (handle.tail().rstrip() or "(none)")
            )
        time.sleep(0.3)
