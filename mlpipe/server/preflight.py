"""Checks before ``mlpipe server`` starts anything: the port, the database (it answers, the user
may log in), and the S3 bucket (reachable, exists, writable). Each failure names what failed
and how to fix it, with secrets masked.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

from mlpipe.core.errors import UsageError
from mlpipe.core.settings import redact_uri
from mlpipe.server.plan import S3_ENDPOINT_ENV, ServerPlan

PREFLIGHT_TIMEOUT_S = 5.0


class PreflightError(UsageError):
    """The database or S3 is not reachable, or the bucket is missing; nothing was started.

    ``component`` is ``"database"`` or ``"S3"``: the part to fix.
    """

    def __init__(self, component: str, message: str):
        super().__init__(f"{component}: {message}")
        self.component = component


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
        raise PreflightError(
            "database", f"{shown} is not a valid URI: {_scrub(_first_line(exc), uri)}"
        ) from exc
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
    from mlpipe.core.secrets import scrub

    return scrub(text, [uri])
