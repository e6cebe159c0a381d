"""Unit tests of mlpipe.settings: precedence, relative SQLite paths, config files, redaction."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlpipe.core.errors import ConfigError
from mlpipe.core.settings import (
    Setting,
    absolutize_uri,
    client_environ,
    is_http_uri,
    redact_uri,
    resolve_settings,
    user_config_path,
)


@pytest.fixture
def layers(tmp_path):
    """A project folder with mlpipe.yaml and a user config file, each naming its own URI."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "mlpipe.yaml").write_text("tracking_uri: http://project:5000\n")
    user = tmp_path / "home" / "config.yaml"
    user.parent.mkdir()
    user.write_text("tracking_uri: http://user:5000\nexperiment: from-user\n")
    return project, user


def test_resolve_settings_flag_wins_over_everything(layers, tmp_path):
    project, user = layers
    env = {"MLFLOW_TRACKING_URI": "http://env:5000", "MLPIPE_CONFIG": str(user)}
    settings = resolve_settings(
        tracking_uri="http://flag:5000", project_dir=project, env=env, cwd=tmp_path
    )
    assert settings.tracking_uri.value == "http://flag:5000"
    assert settings.tracking_uri.source == "flag"


def test_resolve_settings_environment_beats_project_file(layers, tmp_path):
    project, user = layers
    env = {"MLFLOW_TRACKING_URI": "http://env:5000", "MLPIPE_CONFIG": str(user)}
    settings = resolve_settings(project_dir=project, env=env, cwd=tmp_path)
    assert settings.tracking_uri.value == "http://env:5000"
    assert settings.tracking_uri.source == "environment"


def test_resolve_settings_project_file_beats_user_config(layers, tmp_path):
    project, user = layers
    settings = resolve_settings(project_dir=project, env={"MLPIPE_CONFIG": str(user)}, cwd=tmp_path)
    assert settings.tracking_uri.value == "http://project:5000"
    assert settings.tracking_uri.source == str(project / "mlpipe.yaml")
    # a key the project file leaves out still comes from the user config
    assert settings.experiment.value == "from-user"
    assert settings.experiment.source == str(user)


def test_resolve_settings_user_config_beats_default(layers, tmp_path):
    _, user = layers
    settings = resolve_settings(env={"MLPIPE_CONFIG": str(user)}, cwd=tmp_path)
    assert settings.tracking_uri.value == "http://user:5000"
    assert settings.tracking_uri.source == str(user)


def test_resolve_settings_default_is_sqlite_in_cwd(tmp_path):
    env = {"MLPIPE_CONFIG": str(tmp_path / "absent.yaml")}
    settings = resolve_settings(env=env, cwd=tmp_path)
    assert settings.tracking_uri.value == f"sqlite:///{(tmp_path / 'mlruns.db').resolve()}"
    assert settings.tracking_uri.source == "default"
    assert settings.experiment.value is None
    assert settings.experiment.source == "unset"
    assert not settings.is_server


def test_resolve_settings_uses_process_env_and_cwd_by_default(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://from-process-env:5000")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "exp-env")
    settings = resolve_settings()
    assert settings.tracking_uri.value == "http://from-process-env:5000"
    assert settings.experiment.value == "exp-env"
    assert settings.experiment.source == "environment"
    assert settings.is_server


def test_resolve_settings_default_uses_process_cwd(tmp_path):
    # clean_env chdirs into tmp_path and points MLPIPE_CONFIG at a missing file
    settings = resolve_settings()
    assert settings.tracking_uri.value == f"sqlite:///{Path.cwd() / 'mlruns.db'}"
    assert Path.cwd() == tmp_path


def test_resolve_settings_empty_env_value_is_ignored(tmp_path):
    env = {"MLFLOW_TRACKING_URI": "", "MLPIPE_CONFIG": str(tmp_path / "absent.yaml")}
    settings = resolve_settings(env=env, cwd=tmp_path)
    assert settings.tracking_uri.source == "default"


def test_resolve_settings_experiment_flag_beats_environment(tmp_path):
    env = {"MLFLOW_EXPERIMENT_NAME": "env-exp", "MLPIPE_CONFIG": str(tmp_path / "absent.yaml")}
    settings = resolve_settings(experiment="flag-exp", env=env, cwd=tmp_path)
    assert settings.experiment.value == "flag-exp"
    assert settings.experiment.source == "flag"


def test_resolve_settings_relative_sqlite_flag_resolved_against_cwd(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    env = {"MLPIPE_CONFIG": str(tmp_path / "absent.yaml")}
    settings = resolve_settings(tracking_uri="sqlite:///db/runs.db", env=env, cwd=work)
    assert settings.tracking_uri.value == f"sqlite:///{(work / 'db' / 'runs.db').resolve()}"


def test_resolve_settings_relative_sqlite_env_resolved_against_cwd(tmp_path):
    env = {"MLFLOW_TRACKING_URI": "sqlite:///e.db", "MLPIPE_CONFIG": str(tmp_path / "absent.yaml")}
    settings = resolve_settings(env=env, cwd=tmp_path / "sub")
    assert settings.tracking_uri.value == f"sqlite:///{(tmp_path / 'sub' / 'e.db').resolve()}"


def test_resolve_settings_relative_sqlite_in_config_resolved_against_its_folder(tmp_path):
    config_dir = tmp_path / "conf"
    config_dir.mkdir()
    config = config_dir / "config.yaml"
    config.write_text("tracking_uri: sqlite:///runs.db\n")
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    settings = resolve_settings(env={"MLPIPE_CONFIG": str(config)}, cwd=cwd)
    assert settings.tracking_uri.value == f"sqlite:///{(config_dir / 'runs.db').resolve()}"


def test_resolve_settings_relative_sqlite_in_project_file_resolved_against_project(tmp_path):
    project = tmp_path / "proj"
    project.mkdir()
    (project / "mlpipe.yaml").write_text("tracking_uri: sqlite:///p.db\n")
    settings = resolve_settings(
        project_dir=project, env={"MLPIPE_CONFIG": str(tmp_path / "absent.yaml")}, cwd=tmp_path
    )
    assert settings.tracking_uri.value == f"sqlite:///{(project / 'p.db').resolve()}"


def test_resolve_settings_absolute_sqlite_unchanged(tmp_path):
    env = {"MLPIPE_CONFIG": str(tmp_path / "absent.yaml")}
    settings = resolve_settings(tracking_uri="sqlite:////data/x.db", env=env, cwd=tmp_path)
    assert settings.tracking_uri.value == "sqlite:////data/x.db"


def test_resolve_settings_unknown_key_names_key_and_file(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("tracking_uri: http://x\ntraking_uri: http://y\n")
    with pytest.raises(ConfigError) as info:
        resolve_settings(env={"MLPIPE_CONFIG": str(config)}, cwd=tmp_path)
    message = str(info.value)
    assert "traking_uri" in message
    assert str(config) in message
    assert "allowed: tracking_uri, registry_uri, experiment" in message


def test_resolve_settings_unknown_key_in_project_file_is_refused(tmp_path):
    (tmp_path / "mlpipe.yaml").write_text("experimnet: x\n")
    with pytest.raises(ConfigError, match=r"mlpipe\.yaml: unknown key\(s\) experimnet"):
        resolve_settings(
            project_dir=tmp_path, env={"MLPIPE_CONFIG": str(tmp_path / "absent")}, cwd=tmp_path
        )


def test_resolve_settings_invalid_yaml_is_config_error(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("tracking_uri: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML") as info:
        resolve_settings(env={"MLPIPE_CONFIG": str(config)}, cwd=tmp_path)
    assert str(config) in str(info.value)


def test_resolve_settings_non_mapping_config_is_config_error(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("- tracking_uri\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        resolve_settings(env={"MLPIPE_CONFIG": str(config)}, cwd=tmp_path)


def test_resolve_settings_registry_defaults_to_tracking(tmp_path):
    env = {"MLPIPE_CONFIG": str(tmp_path / "absent.yaml")}
    settings = resolve_settings(tracking_uri="http://flag:5000", env=env, cwd=tmp_path)
    assert settings.registry_uri.value == "http://flag:5000"
    assert settings.registry_uri.source == "same as tracking_uri"


def test_resolve_settings_registry_from_environment(tmp_path):
    env = {
        "MLFLOW_REGISTRY_URI": "http://registry:5000",
        "MLPIPE_CONFIG": str(tmp_path / "absent.yaml"),
    }
    settings = resolve_settings(env=env, cwd=tmp_path)
    assert settings.registry_uri.value == "http://registry:5000"
    assert settings.registry_uri.source == "environment"
    assert settings.tracking_uri.source == "default"


def test_resolve_settings_keeps_databricks_uris(tmp_path):
    env = {
        "MLFLOW_TRACKING_URI": "databricks",
        "MLFLOW_REGISTRY_URI": "databricks-uc",
        "MLPIPE_CONFIG": str(tmp_path / "absent.yaml"),
    }
    settings = resolve_settings(env=env, cwd=tmp_path)
    assert settings.tracking_uri.value == "databricks"
    assert settings.registry_uri.value == "databricks-uc"


# helpers --------------------------------------------------------------------------------------


def test_user_config_path_prefers_mlpipe_config(tmp_path):
    env = {"MLPIPE_CONFIG": str(tmp_path / "c.yaml"), "XDG_CONFIG_HOME": "/xdg"}
    assert user_config_path(env) == tmp_path / "c.yaml"


def test_user_config_path_falls_back_to_xdg():
    assert user_config_path({"XDG_CONFIG_HOME": "/xdg"}) == Path("/xdg/mlpipe/config.yaml")


def test_absolutize_uri_bare_path_becomes_file_uri(tmp_path):
    assert absolutize_uri("mlruns", tmp_path) == (tmp_path / "mlruns").resolve().as_uri()


def test_absolutize_uri_keeps_memory_sqlite(tmp_path):
    assert absolutize_uri("sqlite:///:memory:", tmp_path) == "sqlite:///:memory:"


def test_redact_uri_hides_user_and_password():
    redacted = redact_uri("https://alice:hunter2@mlflow.example.com:8443/api?x=1")
    assert redacted == "https://***@mlflow.example.com:8443/api?x=1"
    assert "alice" not in redacted
    assert "hunter2" not in redacted


def test_redact_uri_hides_database_password():
    redacted = redact_uri("postgresql://mlflow:pw123@db/mlflow")
    assert redacted == "postgresql://***@db/mlflow"


def test_redact_uri_leaves_uri_without_credentials():
    assert redact_uri("http://localhost:5000") == "http://localhost:5000"
    assert redact_uri(None) == ""
    assert redact_uri("") == ""


def test_redact_uri_keeps_ipv6_brackets():
    assert redact_uri("http://u:p@[::1]:5000/x") == "http://***@[::1]:5000/x"


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("http://localhost:5000", True),
        ("https://mlflow.example.com", True),
        ("HTTPS://mlflow.example.com", True),
        ("sqlite:///mlruns.db", False),
        ("file:///tmp/mlruns", False),
        ("databricks", False),
        ("", False),
        (None, False),
    ],
)
def test_is_http_uri_only_for_http_schemes(uri, expected):
    assert is_http_uri(uri) is expected


# issue 6: more keys, secrets, prefix, config show ---------------------------------------------


def test_resolve_settings_new_keys_follow_the_same_precedence(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "mlpipe.yaml").write_text(
        "s3_endpoint_url: http://project-s3:9000\nexperiment_prefix: proj-\n"
    )
    user = tmp_path / "config.yaml"
    user.write_text(
        "s3_endpoint_url: http://user-s3:9000\nexperiment_prefix: user-\ntracking_username: bob\n"
    )
    env = {"MLPIPE_CONFIG": str(user), "MLFLOW_S3_ENDPOINT_URL": "http://env-s3:9000"}
    settings = resolve_settings(project_dir=project, env=env, cwd=tmp_path)
    assert settings.s3_endpoint_url == Setting("http://env-s3:9000", "environment")
    assert settings.experiment_prefix == Setting("proj-", str(project / "mlpipe.yaml"))
    assert settings.tracking_username == Setting("bob", str(user))
    flagged = resolve_settings(
        project_dir=project, env=env, cwd=tmp_path, s3_endpoint_url="http://flag-s3:9000"
    )
    assert flagged.s3_endpoint_url == Setting("http://flag-s3:9000", "flag")
    env_prefix = resolve_settings(
        project_dir=project, env={**env, "MLPIPE_EXPERIMENT_PREFIX": "env-"}, cwd=tmp_path
    )
    assert env_prefix.experiment_prefix == Setting("env-", "environment")


@pytest.mark.parametrize(
    ("key", "variable"),
    [
        ("tracking_password", "MLFLOW_TRACKING_PASSWORD"),
        ("password", "MLFLOW_TRACKING_PASSWORD"),
        ("tracking_token", "MLFLOW_TRACKING_TOKEN"),
        ("aws_secret_access_key", "AWS_SECRET_ACCESS_KEY"),
        ("AWS_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID"),
    ],
)
def test_resolve_settings_refuses_secrets_in_files_naming_the_variable(tmp_path, key, variable):
    config = tmp_path / "config.yaml"
    config.write_text(f"tracking_uri: http://x:5000\n{key}: s3cret-value\n")
    with pytest.raises(ConfigError) as info:
        resolve_settings(env={"MLPIPE_CONFIG": str(config)}, cwd=tmp_path)
    message = str(info.value)
    assert key in message and variable in message and str(config) in message
    assert "s3cret-value" not in message


def test_resolve_settings_refuses_password_inside_a_uri_in_a_file(tmp_path):
    (tmp_path / "mlpipe.yaml").write_text("tracking_uri: https://alice:hunter2@mlflow.example\n")
    with pytest.raises(ConfigError, match="holds a password") as info:
        resolve_settings(
            project_dir=tmp_path, env={"MLPIPE_CONFIG": str(tmp_path / "no")}, cwd=tmp_path
        )
    assert "hunter2" not in str(info.value)
    assert "MLFLOW_TRACKING_PASSWORD" in str(info.value)


def test_resolve_settings_keeps_only_whether_secrets_are_set(tmp_path):
    env = {
        "MLPIPE_CONFIG": str(tmp_path / "absent.yaml"),
        "MLFLOW_TRACKING_PASSWORD": "pw-123",
        "AWS_SECRET_ACCESS_KEY": "aws-secret-456",
    }
    settings = resolve_settings(env=env, cwd=tmp_path)
    secrets = {s.name: s.is_set for s in settings.secrets}
    assert secrets == {
        "MLFLOW_TRACKING_PASSWORD": True,
        "MLFLOW_TRACKING_TOKEN": False,
        "AWS_ACCESS_KEY_ID": False,
        "AWS_SECRET_ACCESS_KEY": True,
        "AWS_SESSION_TOKEN": False,
    }
    assert "pw-123" not in repr(settings) and "aws-secret-456" not in repr(settings)


@pytest.mark.parametrize(
    ("prefix", "experiment", "default", "expected"),
    [
        (None, None, "seg3d", "seg3d"),
        ("neuro/", None, "seg3d", "neuro/seg3d"),
        ("neuro/", "trial", "seg3d", "neuro/trial"),
        ("neuro/", "neuro/trial", "seg3d", "neuro/trial"),  # not doubled
        ("team-", "teamx", "seg3d", "team-teamx"),
    ],
)
def test_experiment_name_prepends_prefix_once(tmp_path, prefix, experiment, default, expected):
    env = {"MLPIPE_CONFIG": str(tmp_path / "absent.yaml")}
    if prefix:
        env["MLPIPE_EXPERIMENT_PREFIX"] = prefix
    settings = resolve_settings(experiment=experiment, env=env, cwd=tmp_path)
    assert settings.experiment_name(default) == expected


def test_client_env_exports_file_values_only(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("s3_endpoint_url: http://minio:9000\ntracking_username: carol\n")
    settings = resolve_settings(env={"MLPIPE_CONFIG": str(config)}, cwd=tmp_path)
    assert settings.client_env() == {
        "MLFLOW_S3_ENDPOINT_URL": "http://minio:9000",
        "MLFLOW_TRACKING_USERNAME": "carol",
    }
    from_env = resolve_settings(
        env={"MLPIPE_CONFIG": str(config), "MLFLOW_TRACKING_USERNAME": "dave"}, cwd=tmp_path
    )
    assert from_env.client_env() == {"MLFLOW_S3_ENDPOINT_URL": "http://minio:9000"}


def test_client_environ_sets_and_restores_without_overwriting(tmp_path, monkeypatch):
    import os

    config = tmp_path / "config.yaml"
    config.write_text("s3_endpoint_url: http://minio:9000\ntracking_username: carol\n")
    settings = resolve_settings(env={"MLPIPE_CONFIG": str(config)}, cwd=tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "already-here")
    with client_environ(settings):
        assert os.environ["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
        assert os.environ["MLFLOW_TRACKING_USERNAME"] == "already-here"
    assert "MLFLOW_S3_ENDPOINT_URL" not in os.environ
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "already-here"


def test_run_dry_run_applies_experiment_prefix_from_project_file(project_dir):
    from click.testing import CliRunner

    from mlpipe.cli.group import cli

    proj = project_dir("good")
    (proj / "mlpipe.yaml").write_text("experiment_prefix: neuro/\n")
    result = CliRunner().invoke(cli, ["run", str(proj), "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["experiment"] == "neuro/good"
    flagged = CliRunner().invoke(
        cli, ["run", str(proj), "--dry-run", "--json", "--experiment", "x"]
    )
    assert json.loads(flagged.output)["experiment"] == "neuro/x"


# mlpipe config show ------------------------------------------------------------------------------


@pytest.fixture
def configured(tmp_path, monkeypatch):
    project = tmp_path / "proj"
    project.mkdir()
    (project / "mlpipe.yaml").write_text(
        "tracking_uri: http://project:5000\nexperiment_prefix: neuro/\n"
    )
    user = tmp_path / "user.yaml"
    user.write_text("s3_endpoint_url: http://minio:9000\ntracking_username: erin\n")
    monkeypatch.setenv("MLPIPE_CONFIG", str(user))
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pw-DO-NOT-PRINT")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-DO-NOT-PRINT")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-DO-NOT-PRINT")
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", "https://reg:pw-in-uri-DO-NOT-PRINT@reg.example")
    return project, user


def test_config_show_prints_values_sources_and_masks_secrets(configured):
    from click.testing import CliRunner

    from mlpipe.cli.group import cli

    project, user = configured
    result = CliRunner().invoke(cli, ["config", "show", "--project", str(project)])
    assert result.exit_code == 0, result.output
    assert "DO-NOT-PRINT" not in result.output
    lines = {line.split()[0]: line.split() for line in result.output.splitlines() if line}
    assert lines["tracking_uri"][1:] == ["http://project:5000", str(project / "mlpipe.yaml")]
    assert lines["registry_uri"][1:] == ["https://***@reg.example", "environment"]
    assert lines["experiment_prefix"][1:] == ["neuro/", str(project / "mlpipe.yaml")]
    assert lines["s3_endpoint_url"][1:] == ["http://minio:9000", str(user)]
    assert lines["tracking_username"][1:] == ["erin", str(user)]
    assert lines["MLFLOW_TRACKING_PASSWORD"][1:] == ["set", "(masked)", "environment"]
    assert lines["AWS_ACCESS_KEY_ID"][1:] == ["set", "(masked)", "environment"]
    assert lines["MLFLOW_TRACKING_TOKEN"][1:] == ["unset", "-"]
    assert f"read: {project / 'mlpipe.yaml'}" in result.output


def test_config_show_json_flag_wins(configured):
    from click.testing import CliRunner

    from mlpipe.cli.group import cli

    project, user = configured
    result = CliRunner().invoke(
        cli,
        ["config", "show", "--project", str(project), "--json", "--tracking-uri", "http://f:1"],
    )
    assert result.exit_code == 0, result.output
    assert "DO-NOT-PRINT" not in result.output
    data = json.loads(result.output)
    assert data["settings"]["tracking_uri"] == {"value": "http://f:1", "source": "flag"}
    assert data["settings"]["AWS_SECRET_ACCESS_KEY"]["value"] == "set (masked)"
    assert data["files"] == {str(project / "mlpipe.yaml"): True, str(user): True}


def test_config_show_bad_file_is_an_error_with_exit_2(tmp_path):
    from click.testing import CliRunner

    from mlpipe.cli.group import cli

    (tmp_path / "mlpipe.yaml").write_text("tracking_pasword: x\n")
    result = CliRunner().invoke(cli, ["config", "show"])
    assert result.exit_code == 2
    assert "unknown key(s) tracking_pasword" in result.output


def test_config_show_marks_unset_urls(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from mlpipe.cli.group import cli

    monkeypatch.setenv("MLPIPE_CONFIG", str(tmp_path / "none.yaml"))
    monkeypatch.delenv("MLFLOW_S3_ENDPOINT_URL", raising=False)
    result = CliRunner().invoke(cli, ["config", "show", "--project", str(tmp_path)])
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if line.startswith("s3_endpoint_url"))
    assert row.split()[1:] == ["-", "unset"]
