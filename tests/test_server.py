"""``mlpipe server`` without processes: option checks, the command, secrets, the proxy-only app.

The real server, PostgreSQL and moto are in ``test_server_integration.py``.
"""

from __future__ import annotations

import asyncio
import configparser
import json
import socket
import stat

import pytest
from click.testing import CliRunner

from mlpipe.cli import cli
from mlpipe.core.errors import UsageError
from mlpipe.server.app import ProxiedArtifactsOnly
from mlpipe.server.plan import APP, AUTH_APP
from mlpipe.server.plan import plan as plan_server
from mlpipe.server.preflight import PreflightError, preflight
from mlpipe.server.process import _masker, _server_env

PG_URI = "postgresql://mlflow:pa%25ss-w0rd@db.example:5432/mlflow"
S3 = "s3://team-artifacts/mlflow"


def make_plan(**overrides):
    args = {"backend_store_uri": PG_URI, "artifacts_destination": S3, "env": {}} | overrides
    return plan_server(**args)


# plan: every option checked, nothing touched ------------------------------------------------


def test_plan_parses_bucket_and_prefix_and_defaults():
    p = make_plan()
    assert (p.bucket, p.prefix) == ("team-artifacts", "mlflow")
    assert (p.host, p.port, p.workers) == ("127.0.0.1", 5000, 4)
    assert p.url == "http://127.0.0.1:5000"
    assert p.export_line == "export MLFLOW_TRACKING_URI=http://127.0.0.1:5000"
    assert p.warnings == ()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"backend_store_uri": None}, "--backend-store-uri is required"),
        ({"backend_store_uri": "postgres://u@h/db"}, "use postgresql://"),
        ({"backend_store_uri": "file:///tmp/mlruns"}, "is not a database URI"),
        ({"backend_store_uri": "./mlruns"}, "is not a database URI"),
        ({"artifacts_destination": None}, "--artifacts-destination is required"),
        ({"artifacts_destination": "/srv/artifacts"}, "is not an S3 URI"),
        ({"artifacts_destination": "s3://B"}, "not a valid S3 bucket name"),
        ({"artifacts_destination": "s3://Team_Bucket/x"}, "not a valid S3 bucket name"),
        ({"s3_endpoint_url": "minio:9000"}, "--s3-endpoint-url"),
        ({"s3_endpoint_url": "http://key:secret@minio:9000"}, "must not hold credentials"),
        ({"port": 0}, "--port: 0"),
        ({"port": 70000}, "--port: 70000"),
        ({"workers": 0}, "--workers: 0"),
        ({"host": ""}, "--host must not be empty"),
        ({"auth_db_uri": "sqlite:////tmp/auth.db"}, "--auth-db-uri applies only with --auth"),
    ],
)
def test_plan_refuses_bad_options_naming_them(overrides, message):
    with pytest.raises(UsageError) as info:
        make_plan(**overrides)
    assert message in str(info.value)
    assert "pa%ss-w0rd" not in str(info.value) and "pa%25ss-w0rd" not in str(info.value)


def test_plan_sqlite_made_absolute_and_warned_single_user(tmp_path):
    p = make_plan(backend_store_uri="sqlite:///team.db", cwd=tmp_path)
    assert p.backend_store_uri == f"sqlite:///{tmp_path / 'team.db'}"
    assert any("single-user" in w for w in p.warnings)
    with pytest.raises(UsageError, match="does not exist"):
        make_plan(backend_store_uri="sqlite:///missing/team.db", cwd=tmp_path)


def test_plan_auth_needs_admin_password_from_environment():
    with pytest.raises(UsageError) as info:
        make_plan(auth=True, env={})
    assert "MLFLOW_AUTH_ADMIN_PASSWORD" in str(info.value)
    assert "no default" in str(info.value)
    with pytest.raises(UsageError, match="shorter than 12 characters"):
        make_plan(auth=True, env={"MLFLOW_AUTH_ADMIN_PASSWORD": "short-pw"})
    p = make_plan(auth=True, env={"MLFLOW_AUTH_ADMIN_PASSWORD": "long-enough-pw"})
    assert p.auth_db_uri == PG_URI  # the auth tables live in the tracking database
    assert p.app_name == AUTH_APP
    other = make_plan(auth=True, auth_db_uri="sqlite:////tmp/auth.db", env=p_env())
    assert other.auth_db_uri == "sqlite:////tmp/auth.db"


def p_env():
    return {"MLFLOW_AUTH_ADMIN_PASSWORD": "long-enough-pw"}


def test_plan_without_mlpipe_app_falls_back_with_warning(monkeypatch):
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "distributions", lambda: [])
    p = make_plan()
    assert p.app_name is None
    assert any("presigned" in w and "pip install -e ." in w for w in p.warnings)
    assert make_plan(auth=True, env=p_env()).app_name == "basic-auth"


# the command and what is printed ------------------------------------------------------------


def test_command_keeps_password_off_the_command_line():
    p = make_plan(host="0.0.0.0", port=5001, workers=2, allowed_hosts="mlflow:*")
    cmd = p.command()
    assert cmd[1:4] == ["-m", "mlflow", "server"]
    assert "--serve-artifacts" in cmd
    assert cmd[cmd.index("--artifacts-destination") + 1] == S3
    assert cmd[cmd.index("--app-name") + 1] == APP
    assert cmd[cmd.index("--allowed-hosts") + 1] == "mlflow:*"
    assert "--default-artifact-root" not in cmd  # new experiments get mlflow-artifacts:/
    assert not [a for a in cmd if "postgresql" in a or "w0rd" in a]
    assert p.local_url == "http://127.0.0.1:5001"
    assert p.url == f"http://{socket.gethostname()}:5001"


def test_describe_masks_every_secret():
    p = make_plan(auth=True, env={"MLFLOW_AUTH_ADMIN_PASSWORD": "admin-secret-xyz"})
    text = json.dumps(p.describe())
    assert "w0rd" not in text and "admin-secret-xyz" not in text
    assert "postgresql://***@db.example:5432/mlflow" in text
    assert p.describe()["environment"]["MLFLOW_AUTH_ADMIN_PASSWORD"] == "***"


def test_server_env_sets_server_only_variables(tmp_path):
    p = make_plan(s3_endpoint_url="http://127.0.0.1:9000")
    env = _server_env(
        p, {"MLFLOW_TRACKING_URI": "http://elsewhere", "PATH": "/bin"}, tmp_path, ("M", "1")
    )
    assert env["MLFLOW_BACKEND_STORE_URI"] == PG_URI
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://127.0.0.1:9000"
    assert "MLFLOW_TRACKING_URI" not in env
    assert env["M"] == "1" and env["PATH"] == "/bin"
    assert "MLFLOW_AUTH_CONFIG_PATH" not in env


def test_auth_config_holds_no_password_and_mlflow_reads_it(tmp_path, monkeypatch):
    """The temporary basic_auth.ini, read by MLflow's own reader: the database URI survives
    configparser's interpolation (a %-encoded password), the password comes from the env."""
    p = make_plan(auth=True, env=p_env())
    env = _server_env(p, p_env(), tmp_path, ("M", "1"))
    path = tmp_path / "basic_auth.ini"
    assert env["MLFLOW_AUTH_CONFIG_PATH"] == str(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "long-enough-pw" not in path.read_text()
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"]  # generated: basic auth refuses to start
    from mlflow.server.auth.config import read_auth_config

    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(path))
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "long-enough-pw")
    config = read_auth_config()
    assert config.database_uri == PG_URI
    assert (config.admin_username, config.admin_password) == ("admin", "long-enough-pw")
    assert configparser.ConfigParser().read(path) == [str(path)]


def test_masker_hides_passwords_and_keys_in_server_output():
    p = make_plan(auth=True, env=p_env())
    env = {
        "MLFLOW_AUTH_ADMIN_PASSWORD": "long-enough-pw",
        "AWS_SECRET_ACCESS_KEY": "aws-secret-value",
    }
    mask = _masker(env, p)
    line = "oops long-enough-pw aws-secret-value pa%ss-w0rd pa%25ss-w0rd end"
    assert mask(line) == "oops *** *** *** *** end"


def test_preflight_port_in_use_is_named(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        p = make_plan(backend_store_uri="sqlite:///x.db", port=port, cwd=tmp_path)
        with pytest.raises(PreflightError) as info:
            preflight(p)
    assert info.value.component == "port"
    assert f"127.0.0.1:{port}" in str(info.value)


# the CLI only parses and delegates ----------------------------------------------------------


def test_cli_dry_run_prints_masked_command():
    result = CliRunner().invoke(
        cli,
        ["server", "--backend-store-uri", PG_URI, "--artifacts-destination", S3, "--dry-run"],
    )
    assert result.exit_code == 0, result.output
    assert "python -m mlflow server --serve-artifacts --artifacts-destination" in result.output
    assert "MLFLOW_BACKEND_STORE_URI=postgresql://***@db.example:5432/mlflow" in result.output
    assert "w0rd" not in result.output


def test_cli_reads_backend_and_destination_from_environment(monkeypatch):
    monkeypatch.setenv("MLFLOW_BACKEND_STORE_URI", PG_URI)
    monkeypatch.setenv("MLFLOW_ARTIFACTS_DESTINATION", S3)
    result = CliRunner().invoke(cli, ["server", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert S3 in result.output


def test_cli_auth_without_password_exits_2():
    result = CliRunner().invoke(
        cli, ["server", "--backend-store-uri", PG_URI, "--artifacts-destination", S3, "--auth"]
    )
    assert result.exit_code == 2
    assert "Error: --auth needs the admin password in MLFLOW_AUTH_ADMIN_PASSWORD" in result.output


# the app inside the server: artifacts proxied only ------------------------------------------


def _call(app, path: str) -> tuple[int, dict, bytes]:
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(app({"type": "http", "path": path, "method": "GET"}, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), body


async def _fake_mlflow(scope, receive, send):
    """Stands for MLflow's app: server-info in two body chunks, anything else echoed."""
    if scope["path"].endswith("/server-info"):
        payload = {
            "store_type": "SqlStore",
            "multipart_uploads_enabled": True,
            "multipart_downloads_enabled": True,
        }
        body = json.dumps(payload).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body[:10], "more_body": True})
        await send({"type": "http.response.body", "body": body[10:]})
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": scope["path"].encode()})


@pytest.mark.parametrize("prefix", ["/api", "/ajax-api", "/mlflow/ajax-api"])
def test_proxied_only_app_turns_multipart_flags_off(prefix):
    status, headers, body = _call(
        ProxiedArtifactsOnly(_fake_mlflow), f"{prefix}/3.0/mlflow/server-info"
    )
    info = json.loads(body)
    assert status == 200
    assert info["multipart_uploads_enabled"] is False
    assert info["multipart_downloads_enabled"] is False
    assert info["store_type"] == "SqlStore"
    assert int(headers[b"content-length"]) == len(body)


@pytest.mark.parametrize(
    "path",
    [
        "/api/2.0/mlflow-artifacts/presigned/1/abc/artifacts/model.pt",
        "/ajax-api/2.0/mlflow-artifacts/presigned/1/abc/artifacts/model.pt",
        "/api/2.0/mlflow-artifacts/mpu/create/1/abc/artifacts/model.pt",
        "/api/2.0/mlflow-artifacts/mpu/complete/1/abc/artifacts/model.pt",
    ],
)
def test_proxied_only_app_refuses_direct_s3_routes_so_clients_fall_back(path):
    from mlflow.exceptions import _UnsupportedMultipartUploadException

    status, _, body = _call(ProxiedArtifactsOnly(_fake_mlflow), path)
    assert status == 501
    # MLflow's client falls back to a proxied upload only on this message prefix
    assert json.loads(body)["message"].startswith(_UnsupportedMultipartUploadException.MESSAGE)


def test_proxied_only_app_passes_everything_else():
    path = "/api/2.0/mlflow-artifacts/artifacts/1/abc/artifacts/presigned/model.pt"
    status, _, body = _call(ProxiedArtifactsOnly(_fake_mlflow), path)
    assert (status, body) == (200, path.encode())


# issue 20 --------------------------------------------------------------------------------------
@pytest.mark.parametrize("blank", [" " * 12, "\t" * 14, " \n" * 8])
def test_plan_blank_admin_password_refused(blank):
    with pytest.raises(UsageError, match="blank"):
        make_plan(auth=True, env={"MLFLOW_AUTH_ADMIN_PASSWORD": blank})


def test_plan_unencoded_at_in_password_refused_without_echoing_it():
    with pytest.raises(UsageError) as info:
        make_plan(backend_store_uri="postgresql://u:sec@ret99@127.0.0.1:5432/db")
    message = str(info.value)
    assert "unencoded '@'" in message and "%40" in message
    assert "sec" not in message.replace("second", "") and "ret99" not in message


@pytest.mark.parametrize(
    "uri",
    [
        "postgresql://db.example/mlflow?user=u&password=X-secret-9",
        "postgresql://mlflow:X-secret-9@db.example:5432/mlflow",
        "postgresql://db.example/mlflow?sslpassword=X-secret-9&sslmode=require",
    ],
)
def test_dry_run_masks_every_password_form(uri):
    result = CliRunner().invoke(
        cli, ["server", "--backend-store-uri", uri, "--artifacts-destination", S3, "--dry-run"]
    )
    assert result.exit_code == 0, result.output
    assert "X-secret-9" not in result.output
    assert "db.example" in result.output  # masked, not dropped
