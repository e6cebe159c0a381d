"""The team tracking server: ``mlflow server`` with PostgreSQL, proxied S3 artifacts and checks.

Three steps, each usable on its own: :func:`plan` checks the options and builds the command
(nothing touched), :func:`preflight` checks that the database and the bucket answer (and
creates the bucket when asked), :func:`start` launches ``python -m mlflow server`` in its own
session, waits for ``/health`` and returns a :class:`ServerHandle` whose ``stop()`` ends the
whole process tree. ``mlpipe server`` is these three plus :func:`serve`, which waits for
Ctrl-C or SIGTERM.

Example::

    from mlpipe.server import launch as server

    p = server.plan(backend_store_uri="postgresql://mlflow@db/mlflow",
                    artifacts_destination="s3://mlflow/artifacts")
    server.preflight(p)
    handle = server.start(p)
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
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mlpipe.core.errors import MlpipeError, UsageError
from mlpipe.core.settings import absolutize_uri, redact_uri

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
DEFAULT_WORKERS = 4
START_TIMEOUT_S = 180.0
"""``mlflow server`` imports MLflow in the CLI, uvicorn and every worker: 15-30 s here."""
PREFLIGHT_TIMEOUT_S = 5.0
STOP_GRACE_S = 4.0

AUTH_PASSWORD_ENV = "MLFLOW_AUTH_ADMIN_PASSWORD"
AUTH_USERNAME_ENV = "MLFLOW_AUTH_ADMIN_USERNAME"
AUTH_CONFIG_ENV = "MLFLOW_AUTH_CONFIG_PATH"
SECRET_KEY_ENV = "MLFLOW_FLASK_SERVER_SECRET_KEY"
S3_ENDPOINT_ENV = "MLFLOW_S3_ENDPOINT_URL"
BACKEND_URI_ENV = "MLFLOW_BACKEND_STORE_URI"
MARKER_ENV = "MLPIPE_SERVER_INSTANCE"
"""Set in the server's environment only; finds its processes wherever they hang at stop time."""

APP = "mlpipe"
AUTH_APP = "mlpipe-basic-auth"
"""``mlflow.app`` entry points (``mlpipe.server_app``): MLflow's app with artifacts proxied only."""

_SECRET_ENV = (
    AUTH_PASSWORD_ENV,
    SECRET_KEY_ENV,
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)
_DB_SCHEMES = ("postgresql", "mysql", "mssql", "sqlite")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class PreflightError(UsageError):
    """The database or S3 is not reachable, or the bucket is missing; nothing was started.

    ``component`` is ``"database"`` or ``"S3"``: the part to fix.
    """

    def __init__(self, component: str, message: str):
        super().__init__(f"{component}: {message}")
        self.component = component


class ServerStartError(MlpipeError):
    """``mlflow server`` exited or did not answer ``/health`` in time; its tree was stopped."""

    exit_code = 2


class ServerExitedError(MlpipeError):
    """The running server exited on its own (not through ``stop()``)."""

    exit_code = 1


class ServerInterruptedError(MlpipeError):
    """A signal arrived while the server was starting; its tree was stopped (exit 128 + N)."""

    def __init__(self, signum: int):
        name = signal.Signals(signum).name
        super().__init__(f"Stopped by {name} before the server was ready; no process is left.")
        self.signum = signum

    @property
    def exit_code(self) -> int:  # type: ignore[override]
        return 128 + self.signum


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


@dataclass(frozen=True)
class ServerPlan:
    """A checked server configuration: what :func:`start` runs. Holds no password itself
    beyond the URIs; print it with :meth:`describe`, which masks them."""

    backend_store_uri: str
    artifacts_destination: str
    bucket: str
    prefix: str
    host: str
    port: int
    workers: int
    s3_endpoint_url: str | None
    create_bucket: bool
    auth: bool
    auth_db_uri: str | None
    allowed_hosts: str | None
    app_name: str | None
    warnings: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        """The URL researchers use: the host as given, or this machine's name for 0.0.0.0."""
        host = self.host
        if host in ("0.0.0.0", "::", ""):
            host = socket.gethostname()
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def local_url(self) -> str:
        """Where this machine reaches the server (loopback when bound to every interface)."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def export_line(self) -> str:
        return f"export MLFLOW_TRACKING_URI={self.url}"

    def mlflow_args(self) -> list[str]:
        """Arguments after ``python -m mlflow server``. The backend URI (which may hold a
        password) is not among them: it goes through ``MLFLOW_BACKEND_STORE_URI``."""
        args = [
            "--serve-artifacts",
            "--artifacts-destination", self.artifacts_destination,
            "--host", self.host,
            "--port", str(self.port),
            "--workers", str(self.workers),
        ]  # fmt: skip
        if self.app_name:
            args += ["--app-name", self.app_name]
        if self.allowed_hosts:
            args += ["--allowed-hosts", self.allowed_hosts]
        return args

    def command(self) -> list[str]:
        return [sys.executable, "-m", "mlflow", "server", *self.mlflow_args()]

    def env_names(self) -> dict[str, str]:
        """The variables :func:`start` sets for the server only, values masked for printing."""
        out = {BACKEND_URI_ENV: redact_uri(self.backend_store_uri)}
        if self.s3_endpoint_url:
            out[S3_ENDPOINT_ENV] = self.s3_endpoint_url
        if self.auth:
            out[AUTH_CONFIG_ENV] = "<temporary basic_auth.ini>"
            out[AUTH_PASSWORD_ENV] = "***"
        return out

    def describe(self) -> dict[str, object]:
        """Everything :func:`start` would do, secrets masked (``--dry-run``)."""
        return {
            "url": self.url,
            "backend_store_uri": redact_uri(self.backend_store_uri),
            "artifacts_destination": self.artifacts_destination,
            "s3_endpoint_url": self.s3_endpoint_url,
            "auth": self.auth,
            "auth_db_uri": redact_uri(self.auth_db_uri) if self.auth_db_uri else None,
            "create_bucket": self.create_bucket,
            "environment": self.env_names(),
            "command": " ".join(_quote(a) for a in ["python", "-m", "mlflow", "server"])
            + " "
            + " ".join(_quote(a) for a in self.mlflow_args()),
            "warnings": list(self.warnings),
        }


def plan(
    *,
    backend_store_uri: str | None,
    artifacts_destination: str | None,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    workers: int = DEFAULT_WORKERS,
    s3_endpoint_url: str | None = None,
    create_bucket: bool = False,
    auth: bool = False,
    auth_db_uri: str | None = None,
    allowed_hosts: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> ServerPlan:
    """Check the server options; touch nothing.

    Args:
        backend_store_uri: SQLAlchemy URI of the tracking database (PostgreSQL for a team;
            SQLite works for one person).
        artifacts_destination: ``s3://bucket[/prefix]`` where the server stores artifacts.
        host, port, workers: what uvicorn binds and how many worker processes it runs.
        s3_endpoint_url: S3 endpoint (MinIO, moto) for the server only.
        create_bucket: create the bucket in :func:`preflight` when it is missing.
        auth: MLflow basic auth; needs ``MLFLOW_AUTH_ADMIN_PASSWORD`` in ``env``.
        auth_db_uri: where the auth tables live [default: the tracking database].
        allowed_hosts: ``Host`` headers the server accepts, passed to ``mlflow server``.
        env: the environment the server starts from [default: ``os.environ``].

    Raises:
        UsageError: naming the option, the value and the fix.
    """
    env = os.environ if env is None else env
    here = Path(cwd or os.getcwd())
    warnings: list[str] = []
    if not backend_store_uri:
        raise UsageError(
            "--backend-store-uri is required: the tracking database, e.g. "
            "postgresql://mlflow@127.0.0.1:5432/mlflow (or set MLFLOW_BACKEND_STORE_URI)."
        )
    backend = _check_db_uri("--backend-store-uri", backend_store_uri, here)
    if backend.startswith("sqlite:"):
        warnings.append(
            "SQLite is single-user: concurrent runs from several people will hit "
            "'database is locked'. Use PostgreSQL for a team server."
        )
    if not artifacts_destination:
        raise UsageError(
            "--artifacts-destination is required: s3://BUCKET/PREFIX where the server stores "
            "artifacts (or set MLFLOW_ARTIFACTS_DESTINATION)."
        )
    bucket, prefix = _parse_s3(artifacts_destination)
    if s3_endpoint_url is not None:
        parsed = urllib.parse.urlsplit(s3_endpoint_url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise UsageError(
                f"--s3-endpoint-url: {s3_endpoint_url!r} is not an http(s) URL; "
                "expected e.g. http://127.0.0.1:9000."
            )
        if parsed.username or parsed.password:
            raise UsageError(
                "--s3-endpoint-url must not hold credentials; set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY in the server's environment."
            )
    if not host:
        raise UsageError("--host must not be empty; 127.0.0.1 (this machine) or 0.0.0.0 (all).")
    if not 1 <= int(port) <= 65535:
        raise UsageError(f"--port: {port} is not a TCP port (1-65535).")
    if int(workers) < 1:
        raise UsageError(f"--workers: {workers} must be at least 1.")
    auth_db = None
    if auth:
        if not env.get(AUTH_PASSWORD_ENV):
            raise UsageError(
                f"--auth needs the admin password in {AUTH_PASSWORD_ENV} (there is no default "
                f"password): export {AUTH_PASSWORD_ENV}=... in the server's environment, "
                "at least 12 characters."
            )
        if len(env[AUTH_PASSWORD_ENV]) < 12:
            raise UsageError(
                f"{AUTH_PASSWORD_ENV} is shorter than 12 characters, MLflow's minimum for the "
                "admin password; choose a longer one."
            )
        auth_db = _check_db_uri("--auth-db-uri", auth_db_uri, here) if auth_db_uri else backend
    elif auth_db_uri:
        raise UsageError("--auth-db-uri applies only with --auth.")
    app_name = _app_name(auth, warnings)
    return ServerPlan(
        backend_store_uri=backend,
        artifacts_destination=artifacts_destination.rstrip("/"),
        bucket=bucket,
        prefix=prefix,
        host=host,
        port=int(port),
        workers=int(workers),
        s3_endpoint_url=s3_endpoint_url,
        create_bucket=create_bucket,
        auth=auth,
        auth_db_uri=auth_db,
        allowed_hosts=allowed_hosts or None,
        app_name=app_name,
        warnings=tuple(warnings),
    )


def preflight(
    server_plan: ServerPlan,
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = PREFLIGHT_TIMEOUT_S,
) -> list[str]:
    """Check that the database answers and the bucket exists, before anything starts.

    Creates the bucket when it is missing and the plan says ``create_bucket``. Answers within
    about ``timeout`` seconds per component when something is down.

    Returns:
        Notes for the user (e.g. that the bucket was created).

    Raises:
        PreflightError: ``component`` "database" or "S3", the URI redacted, and the fix.
    """
    env = os.environ if env is None else env
    notes = []
    _check_port(server_plan)
    _check_database(server_plan.backend_store_uri, timeout)
    if server_plan.auth_db_uri and server_plan.auth_db_uri != server_plan.backend_store_uri:
        _check_database(server_plan.auth_db_uri, timeout)
    if _check_bucket(server_plan, env, timeout):
        notes.append(f"Created bucket {server_plan.bucket!r}.")
    return notes


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


# --- plan helpers ---------------------------------------------------------------------------


def _check_db_uri(option: str, uri: str, here: Path) -> str:
    scheme = urllib.parse.urlsplit(uri).scheme
    base = scheme.split("+", 1)[0]
    if base == "postgres":
        raise UsageError(
            f"{option}: use postgresql://... (SQLAlchemy does not accept postgres://): "
            f"{redact_uri(uri)}"
        )
    if base not in _DB_SCHEMES:
        raise UsageError(
            f"{option}: {redact_uri(uri)!r} is not a database URI; expected "
            "postgresql://USER@HOST:5432/DB (or sqlite:////abs/path/mlflow.db for one user). "
            "MLflow refuses the file store since 3.13."
        )
    if base == "sqlite":
        uri = absolutize_uri(uri, here)
        path = uri[len("sqlite:///") :]
        if path and path != ":memory:" and not Path(path).parent.is_dir():
            raise UsageError(f"{option}: the folder of {path} does not exist; create it first.")
    return uri


def _parse_s3(destination: str) -> tuple[str, str]:
    parsed = urllib.parse.urlsplit(destination)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise UsageError(
            f"--artifacts-destination: {destination!r} is not an S3 URI; expected "
            "s3://BUCKET/PREFIX (proxied: clients need no S3 credentials)."
        )
    bucket = parsed.netloc
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise UsageError(
            f"--artifacts-destination: {bucket!r} is not a valid S3 bucket name "
            "(3-63 characters: lowercase letters, digits, '.' and '-')."
        )
    return bucket, parsed.path.strip("/")


def _app_name(auth: bool, warnings: list[str]) -> str | None:
    from importlib.metadata import distributions

    wanted = AUTH_APP if auth else APP
    # Every installed copy, not only the first by name: a stale mlpipe.egg-info in the source
    # folder (on sys.path under pytest) hides the installed metadata that the server, started
    # in another folder, reads.
    installed = {
        ep.name for dist in distributions() for ep in dist.entry_points if ep.group == "mlflow.app"
    }
    if wanted in installed:
        return wanted
    warnings.append(
        f"mlpipe's server app ({wanted!r}, entry point group mlflow.app) is not installed: "
        "clients will be handed presigned direct-to-S3 download links and need to reach the "
        "S3 endpoint themselves. Reinstall mlpipe (pip install -e .) to keep artifacts proxied."
    )
    return "basic-auth" if auth else None


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


# --- pre-flight -----------------------------------------------------------------------------


def _check_port(server_plan: ServerPlan) -> None:
    # Another server on the port would answer our /health wait while ours fails to bind.
    family = socket.AF_INET6 if ":" in server_plan.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((server_plan.host, server_plan.port))
        except OSError as exc:
            raise PreflightError(
                "port",
                f"cannot listen on {server_plan.host}:{server_plan.port} ({exc.strerror}); "
                "another server may be running there: pick another --port or stop it.",
            ) from exc


def _check_database(uri: str, timeout: float) -> None:
    shown = redact_uri(uri)
    if uri.startswith("sqlite:"):
        return  # checked in plan(); mlflow server creates the file
    try:
        import sqlalchemy
        from sqlalchemy.pool import NullPool
    except ImportError as exc:  # pragma: no cover - mlflow depends on it
        raise PreflightError("database", f"SQLAlchemy is not installed: {exc}") from exc
    connect_args = {}
    if uri.startswith(("postgresql", "mysql")):
        connect_args = {"connect_timeout": max(1, int(timeout))}
    try:
        engine = sqlalchemy.create_engine(uri, poolclass=NullPool, connect_args=connect_args)
    except ModuleNotFoundError as exc:
        raise PreflightError(
            "database",
            f"no driver for {shown}: {exc}. Install the server extra: pip install 'mlpipe[server]' "
            "(psycopg for PostgreSQL).",
        ) from exc
    except Exception as exc:
        raise PreflightError("database", f"{shown} is not a valid URI: {_first_line(exc)}") from exc
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT 1"))
    except Exception as exc:
        reason = _scrub(_first_line(getattr(exc, "orig", None) or exc), uri)
        raise PreflightError(
            "database",
            f"cannot connect to {shown}: {reason}. Check that the database server runs, the "
            "host, port, user and password, and that the database exists "
            "(createdb NAME).",
        ) from exc
    finally:
        engine.dispose()


def _check_bucket(server_plan: ServerPlan, env: Mapping[str, str], timeout: float) -> bool:
    """True when the bucket was created."""
    import boto3
    import botocore.exceptions as bex
    from botocore.config import Config

    endpoint = server_plan.s3_endpoint_url or env.get(S3_ENDPOINT_ENV) or None
    where = endpoint or "AWS S3"
    session = boto3.session.Session(
        aws_access_key_id=env.get("AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY"),
        aws_session_token=env.get("AWS_SESSION_TOKEN"),
        region_name=env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION"),
        profile_name=env.get("AWS_PROFILE") or None,
    )
    config = Config(
        connect_timeout=max(1.0, timeout / 2),
        read_timeout=timeout,
        retries={"max_attempts": 2, "mode": "standard"},
    )
    s3 = session.client("s3", endpoint_url=endpoint, config=config)
    bucket = server_plan.bucket
    try:
        s3.head_bucket(Bucket=bucket)
        return False
    except bex.NoCredentialsError as exc:
        raise PreflightError(
            "S3",
            f"no AWS credentials for {where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or AWS_PROFILE) in the server's environment; clients need none.",
        ) from exc
    except (bex.EndpointConnectionError, bex.ConnectTimeoutError, bex.ReadTimeoutError) as exc:
        raise PreflightError(
            "S3",
            f"cannot reach {where}: {_first_line(exc)}. Check that the S3 service (MinIO, moto) "
            "runs and --s3-endpoint-url.",
        ) from exc
    except bex.ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket", "NotFound"):
            if not server_plan.create_bucket:
                raise PreflightError(
                    "S3",
                    f"bucket {bucket!r} does not exist at {where}; create it, or pass "
                    "--create-bucket to have mlpipe server create it.",
                ) from exc
        elif code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise PreflightError(
                "S3",
                f"access to bucket {bucket!r} at {where} was refused ({code}): check "
                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY and the bucket policy.",
            ) from exc
        else:
            raise PreflightError(
                "S3", f"checking bucket {bucket!r} at {where} failed: {_first_line(exc)}"
            ) from exc
    except bex.BotoCoreError as exc:
        raise PreflightError("S3", f"{where}: {_first_line(exc)}") from exc
    try:
        region = s3.meta.region_name
        if endpoint or region in (None, "us-east-1"):
            s3.create_bucket(Bucket=bucket)
        else:
            s3.create_bucket(
                Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": region}
            )
    except (bex.ClientError, bex.BotoCoreError) as exc:
        raise PreflightError(
            "S3", f"could not create bucket {bucket!r} at {where}: {_first_line(exc)}"
        ) from exc
    return True


def _first_line(exc: object) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _scrub(text: str, uri: str) -> str:
    password = urllib.parse.urlsplit(uri).password
    if password:
        text = text.replace(password, "***").replace(urllib.parse.unquote(password), "***")
    return text


# --- start ----------------------------------------------------------------------------------


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
    values = {child_env.get(name) for name in _SECRET_ENV}
    for uri in (server_plan.backend_store_uri, server_plan.auth_db_uri):
        password = urllib.parse.urlsplit(uri).password if uri else None
        if password:
            values |= {password, urllib.parse.unquote(password)}
    found = sorted((v for v in values if v and len(v) >= 4), key=len, reverse=True)

    def mask(line: str) -> str:
        for value in found:
            line = line.replace(value, "***")
        return line

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
