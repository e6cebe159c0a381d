"""What ``mlpipe server`` will run, decided before anything starts: the backend store and the
artifact destination checked for form, the app, the flags and the environment names. Nothing
here touches the network or starts a process.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from mlpipe.core.errors import MlpipeError, UsageError
from mlpipe.core.settings import absolutize_uri, redact_uri

DEFAULT_HOST = "127.0.0.1"


DEFAULT_PORT = 5000


DEFAULT_WORKERS = 4


START_TIMEOUT_S = 180.0
"""``mlflow server`` imports MLflow in the CLI, uvicorn and every worker: 15-30 s here."""


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
"""``mlflow.app`` entry points (``mlpipe.server.app``): MLflow's app with artifacts proxied only."""


_DB_SCHEMES = ("postgresql", "mysql", "mssql", "sqlite")


_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


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
        if not env[AUTH_PASSWORD_ENV].strip():
            raise UsageError(
                f"{AUTH_PASSWORD_ENV} is blank (only whitespace); choose a real admin password "
                "of at least 12 characters."
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


def _check_db_uri(option: str, uri: str, here: Path) -> str:
    try:
        parsed = urllib.parse.urlsplit(uri)
    except ValueError:
        raise UsageError(
            f"{option}: {redact_uri(uri)!r} is not a valid URI; expected "
            "postgresql://USER@HOST:5432/DB."
        ) from None
    scheme = parsed.scheme
    if "@" in parsed.netloc.rpartition("@")[0]:
        # libpq splits at the first '@', SQLAlchemy at the last: the driver would take the
        # password's tail for the host name, and print it in its error.
        raise UsageError(
            f"{option}: the user or password in {redact_uri(uri)} holds an unencoded '@'. "
            "Percent-encode it (@ -> %40), or better leave the password out of the URI and "
            "set PGPASSWORD or a ~/.pgpass file (PGPASSFILE) in the server's environment."
        )
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
