"""The docker compose stack, checked without Docker: it must run what the native stack runs.

No Docker engine runs on these machines. The tests parse ``docker/docker-compose.yml``, fill
its variables from ``docker/.env.example``, and compare the tracking server's command with
the one the integration tests start (``server_cli_args``) by parsing both with the real
``mlpipe server`` options and planning both with :func:`mlpipe.server.plan`.
"""

from __future__ import annotations

import re

import pytest
import tomllib
import yaml

from mlpipe.cli import cli
from mlpipe.server.plan import AUTH_APP, AUTH_PASSWORD_ENV, BACKEND_URI_ENV, ServerPlan
from mlpipe.server.plan import plan as make_plan
from tests.conftest import REPO_ROOT, S3_CREDENTIALS
from tests.test_server_integration import server_cli_args

DOCKER = REPO_ROOT / "docker"
SERVICES = {"postgres", "minio", "create-bucket", "mlflow"}
_VAR = re.compile(r"(?<!\$)\$\{(\w+)(?:(:?[-?])([^}]*))?\}")
FAKE_SECRETS = {
    "POSTGRES_PASSWORD": "pg-pass-1234",
    "MINIO_ROOT_PASSWORD": "minio-pass-1234",
    "MLFLOW_AUTH_ADMIN_PASSWORD": "admin-pass-1234",
    "MLFLOW_TRACKING_PASSWORD": "admin-pass-1234",
}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    out = {}
    for line in (DOCKER / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def interpolate(value, env: dict[str, str]):
    """Compose's variable substitution: ${VAR}, ${VAR:-default}, ${VAR:?error}; $$ is $."""
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if not isinstance(value, str):
        return value

    def sub(match: re.Match) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        if env.get(name):
            return env[name]
        if op and op.endswith("?"):
            raise AssertionError(f"compose would refuse to start: {arg}")
        return arg if op and op.endswith("-") else env.get(name, "")

    return _VAR.sub(sub, value).replace("$$", "$")


def referenced(node) -> set[str]:
    if isinstance(node, dict):
        return set().union(*(referenced(v) for v in node.values()), set())
    if isinstance(node, list):
        return set().union(*(referenced(v) for v in node), set())
    return {m.group(1) for m in _VAR.finditer(node)} if isinstance(node, str) else set()


def filled(env_example: dict[str, str]) -> dict[str, str]:
    return {**env_example, **FAKE_SECRETS}


def parse_server_args(args: list[str]) -> dict:
    """The parameters ``mlpipe server`` would get: click refuses an unknown option."""
    command = cli.commands["server"]
    return command.make_context("server", list(args), resilient_parsing=False).params


def plan_from(params: dict, env: dict[str, str]) -> ServerPlan:
    keys = [
        "backend_store_uri",
        "artifacts_destination",
        "host",
        "port",
        "workers",
        "s3_endpoint_url",
        "create_bucket",
        "auth",
        "auth_db_uri",
        "allowed_hosts",
    ]
    return make_plan(**{k: params[k] for k in keys}, env=env)


def native_params() -> dict:
    args = server_cli_args(
        "postgresql://postgres@127.0.0.1:5432/db", "http://127.0.0.1:9000", 5000, auth=True
    )
    return parse_server_args(args[1:])


def compose_server(compose: dict, env_example: dict[str, str]) -> tuple[dict, dict]:
    """The mlflow service's parsed ``mlpipe server`` parameters and its environment."""
    service = interpolate(compose["services"]["mlflow"], filled(env_example))
    command = service["command"]
    assert command[:2] == ["mlpipe", "server"]
    environment = {k: str(v) for k, v in service["environment"].items()}
    backend = cli.commands["server"].params[0]
    assert backend.name == "backend_store_uri"
    # the backend URI (it holds the password) goes through the option's environment variable
    params = (
        cli.commands["server"]
        .make_context("server", command[2:], default_map=None, auto_envvar_prefix=None)
        .params
    )
    if params["backend_store_uri"] is None:
        params["backend_store_uri"] = environment[backend.envvar]
    return params, environment


def test_stack_has_the_services_with_health_checks_and_order(compose):
    services = compose["services"]
    assert set(services) >= SERVICES
    for name in ("postgres", "minio", "mlflow"):
        assert services[name]["healthcheck"]["test"], name
    deps = services["mlflow"]["depends_on"]
    assert deps["postgres"]["condition"] == "service_healthy"
    assert deps["create-bucket"]["condition"] == "service_completed_successfully"
    assert services["create-bucket"]["depends_on"]["minio"]["condition"] == "service_healthy"
    mounts = {
        "postgres": "postgres-data:/var/lib/postgresql/data",
        "minio": "minio-data:/data",
    }
    for name, mount in mounts.items():
        assert mount in services[name]["volumes"]
    assert set(compose["volumes"]) == {"postgres-data", "minio-data"}


def test_every_variable_is_documented_in_env_example_and_used(compose, env_example):
    assert referenced(compose) == set(env_example)
    for name in FAKE_SECRETS:
        assert env_example[name] == "", f"{name} must not ship a value"
    interpolate(compose, filled(env_example))  # no ${VAR:?...} left unset


def test_required_passwords_refuse_to_start_without_them(compose, env_example):
    with pytest.raises(AssertionError, match="MLFLOW_AUTH_ADMIN_PASSWORD"):
        interpolate(compose["services"]["mlflow"], env_example)


def test_tracking_server_command_matches_native_stack(compose, env_example):
    """The same `mlpipe server` options as the integration tests, planned the same way."""
    params, environment = compose_server(compose, env_example)
    native = native_params()
    # every option the native stack passes is in compose, except --create-bucket (the
    # create-bucket service does that) and the backend URI (passed in the environment)
    given = {k for k, v in params.items() if v not in (None, False)}
    native_given = {k for k, v in native.items() if v not in (None, False)}
    assert native_given - {"create_bucket"} <= given
    assert given - native_given <= {"allowed_hosts"}  # containers address it as mlflow:5000

    compose_plan = plan_from(params, environment)
    native_plan = plan_from(native, {AUTH_PASSWORD_ENV: "admin-pass-1234"})

    def flags(p: ServerPlan) -> set[str]:
        return {a for a in p.mlflow_args() if a.startswith("--")}

    assert flags(compose_plan) == flags(native_plan) | {"--allowed-hosts"}
    assert compose_plan.app_name == native_plan.app_name == AUTH_APP
    assert compose_plan.backend_store_uri.startswith("postgresql://mlflow:")
    assert "pg-pass-1234" not in " ".join(compose_plan.command())
    allowed = compose_plan.allowed_hosts.split(",")
    assert "mlflow:*" in allowed and "localhost:*" in allowed


def test_ports_and_addresses_agree(compose, env_example):
    env = filled(env_example)
    params, environment = compose_server(compose, env_example)
    services = interpolate(compose["services"], env)
    mlflow = services["mlflow"]
    published, container = mlflow["ports"][0].rsplit(":", 1)
    assert container == str(params["port"])
    assert published == env["MLFLOW_PORT"]
    assert f"127.0.0.1:{params['port']}/health" in " ".join(mlflow["healthcheck"]["test"])
    plan = plan_from(params, environment)
    # the server reaches PostgreSQL and MinIO by their service names, on their ports
    assert "@postgres:5432/" in plan.backend_store_uri
    assert plan.s3_endpoint_url == "http://minio:9000"
    assert "server /data" in " ".join(services["minio"]["command"])
    bucket_init = " ".join(services["create-bucket"]["command"])
    assert "http://minio:9000" in bucket_init
    assert '"local/${MLFLOW_BUCKET}"' in bucket_init  # the container's variable
    assert services["create-bucket"]["environment"]["MLFLOW_BUCKET"] == plan.bucket
    # S3 is not published: clients go through the tracking server
    assert not [p for p in services["minio"].get("ports", []) if p.endswith(":9000")]
    assert services["train"]["environment"]["MLFLOW_TRACKING_URI"] == (
        f"http://mlflow:{params['port']}"
    )


def test_credentials_only_where_the_native_stack_puts_them(compose, env_example):
    """The server gets the variables the integration tests give the server process; the
    training client gets none of them."""
    services = interpolate(compose["services"], filled(env_example))
    server_env = set(services["mlflow"]["environment"])
    assert set(S3_CREDENTIALS) | {AUTH_PASSWORD_ENV, BACKEND_URI_ENV} <= server_env
    train_env = set(services["train"]["environment"])
    assert not {k for k in train_env if k.startswith("AWS_")}
    assert AUTH_PASSWORD_ENV not in train_env


def test_server_image_installs_the_server_extra():
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    dockerfile = (DOCKER / "Dockerfile.server").read_text()
    for requirement in pyproject["project"]["optional-dependencies"]["server"]:
        name = re.split(r"[<>=\[; ]", requirement, maxsplit=1)[0]
        assert f'"{name}' in dockerfile, requirement
    assert 'CMD ["mlpipe", "server"' in dockerfile
    assert "EXPOSE 5000" in dockerfile and "127.0.0.1:5000/health" in dockerfile


def test_training_image_has_cuda_base_mlpipe_and_seg3d():
    dockerfile = (DOCKER / "Dockerfile.train").read_text()
    assert re.search(r"ARG CUDA_IMAGE=nvidia/cuda:\S+-runtime-", dockerfile)
    assert "COPY projects/seg3d" in dockerfile
    assert "pip install ." in dockerfile
    assert (REPO_ROOT / "projects" / "seg3d" / "MLproject").is_file()
    ignore = (DOCKER / "Dockerfile.train.dockerignore").read_text().split()
    assert "!projects/seg3d/" in ignore and "!mlpipe/" in ignore
