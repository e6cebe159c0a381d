"""Every command, on a table of bad inputs: exit 2, one ``Error:`` line, no traceback, no secret.

The table is keyed by command path and checked against ``cli.commands`` (groups walked), so a
new command without rows fails :func:`test_every_command_has_bad_input_rows`: the next command
added is held to the same rule. Secrets are planted where users put them: passwords in URIs
(tracking, database, git), tokens and passwords in the environment. (Issue 20.)
"""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from mlpipe.cli import cli

URI_PASSWORD = "uriPW-planted-7731"
DB_PASSWORD = "dbPW-planted-4402"
QUERY_PASSWORD = "qPW-planted-9915"
GIT_TOKEN = "ghp_plantedTOKEN5521"
ENV_SECRETS = {
    "MLFLOW_TRACKING_PASSWORD": "envPW-planted-1188",
    "MLFLOW_TRACKING_TOKEN": "envTOKEN-planted-2299",
    "AWS_SECRET_ACCESS_KEY": "envAWS-planted-3377",
    "MLFLOW_AUTH_ADMIN_PASSWORD": "envADMIN-planted-4466",
    "PGPASSWORD": "envPG-planted-5544",
}
SECRETS = (URI_PASSWORD, DB_PASSWORD, QUERY_PASSWORD, GIT_TOKEN, *ENV_SECRETS.values(), "planted")

DEAD = f"http://alice:{URI_PASSWORD}@127.0.0.1:9"
"""A tracking server URI with a password, where nothing listens."""

PG_USERINFO = f"postgresql://mlflow:{DB_PASSWORD}@127.0.0.1:1/mlflow"
PG_QUERY = f"postgresql://127.0.0.1:1/mlflow?user=mlflow&password={QUERY_PASSWORD}"
PG_AT = f"postgresql://mlflow:x@{DB_PASSWORD}@127.0.0.1:1/mlflow"
S3 = ["--artifacts-destination", "s3://bucket/prefix", "--s3-endpoint-url", "http://127.0.0.1:9"]
FAST_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"}

# {missing} a path that does not exist; {good} a convention project; {nonempty} a folder with a
# file; {mlproject_dir} a project whose MLproject is a folder; {binary} a binary MLproject;
# {secret_yaml} a project whose mlpipe.yaml holds a URI with a password.
BAD_INPUTS: dict[str, list[list[str]]] = {
    "compare": [
        ["compare", "--tracking-uri", DEAD],
        ["compare", "--top", "0"],
    ],
    "config show": [
        ["config", "show", "--project", "{secret_yaml}"],
    ],
    "doctor": [
        ["doctor", "--timeout", "0"],
    ],
    "drift": [
        ["drift", "models:/m/1", "{missing}", "--tracking-uri", DEAD],
        ["drift", "models:/m/1"],
    ],
    "history": [
        ["history", ""],
        ["history", "m", "--tracking-uri", DEAD],
    ],
    "init": [
        ["init", "{nonempty}"],
    ],
    "models": [
        ["models", "--tracking-uri", DEAD],
        ["models", "\t"],
    ],
    "promote": [
        ["promote", "m", "notanumber"],
        ["promote", "m", "1", "--reason", "two\nlines"],
        ["promote", "m", "1", "--tracking-uri", DEAD],
    ],
    "rollback": [
        ["rollback", "m", "--reason", "a\nb"],
        ["rollback", "m", "--reason", "why", "--tracking-uri", DEAD],
    ],
    "run": [
        ["run", "{missing}"],
        ["run", f"https://oauth2:{GIT_TOKEN}@127.0.0.1:9/team/repo.git"],
        ["run", "{good}", "-P", "alpha=abc"],
        ["run", "{good}", "--experiment", ""],
        ["run", "{good}", "--tracking-uri", DEAD],
        ["run", "{mlproject_dir}"],
        ["--debug", "run", "{binary}"],
    ],
    "sweep": [
        ["sweep", "{missing}", "--space", "alpha=uniform(0,1)", "--trials", "2"],
        ["sweep", "{good}", "--space", "alhpa=uniform(0,1)", "--trials", "2"],
        ["sweep", "{good}", "--space", "epochs=loguniform(1e-4,1e-2)", "--trials", "2"],
        ["sweep", "{good}", "--space", "model=choice(unet,vnet)", "--trials", "2"],
        ["sweep", "{good}", "--space", "alpha=uniform(0,1)", "--trials", "0"],
        ["sweep", "{good}", "--space", "alpha=uniform(0,1)", "--tracking-uri", DEAD],
        ["sweep", "--join", "nope", "--storage", PG_USERINFO],
        ["sweep", "{good}", "--space", "alpha=uniform(0,1)", "--storage", PG_QUERY],
    ],
    "predict": [
        ["predict", "models:/m/1", "{missing}", "--out", "{nonempty}"],
        ["predict", "models:/m/1", "{nonempty}", "--out", "{nonempty}", "--shard", "3/2"],
        ["predict", "models:/m/1", "{nonempty}", "--out", "{nonempty}", "--workers", "0"],
        ["predict", "seg3d", "{nonempty}", "--out", "{nonempty}"],
        ["predict", "models:/m/1", "{nonempty}", "--out", "{nonempty}", "--tracking-uri", DEAD],
        ["predict", "--summary", "b1", "--tracking-uri", DEAD],
    ],
    "serve": [
        ["serve", "models:/m/1", "--tracking-uri", DEAD],
    ],
    "server": [
        ["server", "--backend-store-uri", PG_USERINFO, *S3],
        ["server", "--backend-store-uri", PG_QUERY, *S3],
        ["server", "--backend-store-uri", PG_AT, *S3],
        ["server", "--backend-store-uri", PG_QUERY, "--artifacts-destination", "file:///x"],
    ],
    "validate": [
        ["validate", "{missing}"],
        ["validate", "{binary}"],
    ],
}


def leaf_commands(group: click.Group, prefix: str = "") -> list[str]:
    names = []
    for name, command in sorted(group.commands.items()):
        path = f"{prefix}{name}"
        if isinstance(command, click.Group):
            names += leaf_commands(command, path + " ")
        else:
            names.append(path)
    return names


@pytest.fixture
def places(tmp_path, project_dir) -> dict[str, str]:
    nonempty = tmp_path / "nonempty"
    nonempty.mkdir()
    (nonempty / "keep.txt").write_text("mine\n")
    folder_mlproject = tmp_path / "folder-mlproject"
    (folder_mlproject / "MLproject").mkdir(parents=True)
    binary = tmp_path / "binary"
    binary.mkdir()
    (binary / "MLproject").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe" + bytes(range(256)))
    secret_yaml = tmp_path / "secret-yaml"
    secret_yaml.mkdir()
    (secret_yaml / "mlpipe.yaml").write_text(f"tracking_uri: {DEAD}\n")
    return {
        "{missing}": str(tmp_path / "no-such-thing"),
        "{good}": str(project_dir("good")),
        "{nonempty}": str(nonempty),
        "{mlproject_dir}": str(folder_mlproject),
        "{binary}": str(binary),
        "{secret_yaml}": str(secret_yaml),
    }


def fill(args: list[str], places: dict[str, str]) -> list[str]:
    return [places.get(a, a) for a in args]


def assert_user_error(output: str, exit_code: int, args: list[str]) -> None:
    assert exit_code == 2, f"{args}: exit {exit_code}\n{output}"
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, f"{args}: {len(errors)} Error: lines\n{output}"
    if "--debug" not in args:
        assert "Traceback" not in output, f"{args}:\n{output}"
    leaked = [s for s in SECRETS if s in output]
    assert not leaked, f"{args} printed {leaked}:\n{output}"


def test_every_command_has_bad_input_rows():
    missing = [name for name in leaf_commands(cli) if not BAD_INPUTS.get(name)]
    assert not missing, f"add bad-input rows to BAD_INPUTS for: {missing}"
    stale = sorted(set(BAD_INPUTS) - set(leaf_commands(cli)))
    assert not stale, f"rows for commands that no longer exist: {stale}"


@pytest.mark.parametrize(
    "args",
    [pytest.param(args, id=f"{name}-{i}") for name, rows in BAD_INPUTS.items()
     for i, args in enumerate(rows)],
)  # fmt: skip
def test_bad_input_is_one_error_line_exit_2_no_secret(args, places, runs_in, tmp_path):
    result = CliRunner().invoke(cli, fill(args, places), env={**ENV_SECRETS, **FAST_HTTP})
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{args}: raised {result.exception!r}\n{result.output}"
    )
    assert_user_error(result.output, result.exit_code, args)
    assert runs_in() == []  # nothing was created
    assert sorted(p.name for p in Path(places["{nonempty}"]).iterdir()) == ["keep.txt"]
