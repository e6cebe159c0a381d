"""Resolve where runs go, once, with one documented precedence and no side effects.

Precedence (DESIGN.md): command-line flag > environment > ``mlpipe.yaml`` in the project >
the user's config file > the embedded default (SQLite ``mlruns.db`` in the current folder).
Resolving sets no globals and creates nothing; other modules read the returned object rather
than ``os.environ``.

A settings file (``mlpipe.yaml`` in a project, the user's ``config.yaml``) holds only values
that are safe in a repository: ``tracking_uri``, ``registry_uri``, ``experiment``,
``experiment_prefix``, ``s3_endpoint_url`` and ``tracking_username``. Passwords, tokens and
AWS keys come only from the environment; a file that holds one is refused, and
:class:`Settings` never keeps their values, only whether they are set.
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from mlpipe.core.errors import ConfigError
from mlpipe.core.secrets import has_secret, mask_uri

PROJECT_FILE = "mlpipe.yaml"
USER_CONFIG_ENV = "MLPIPE_CONFIG"

ENV_VARS = {
    "tracking_uri": "MLFLOW_TRACKING_URI",
    "registry_uri": "MLFLOW_REGISTRY_URI",
    "experiment": "MLFLOW_EXPERIMENT_NAME",
    "experiment_prefix": "MLPIPE_EXPERIMENT_PREFIX",
    "s3_endpoint_url": "MLFLOW_S3_ENDPOINT_URL",
    "tracking_username": "MLFLOW_TRACKING_USERNAME",
}
"""Each setting and the environment variable that sets it (MLflow's own names where it has one)."""

CONFIG_KEYS = tuple(ENV_VARS)
"""Keys a settings file may hold; anything else is refused, so typos surface."""

SECRET_ENV_VARS = (
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
)
"""Read only from the environment; shown as set or unset, never their values."""

_SECRET_FILE_KEYS = {
    "tracking_password": "MLFLOW_TRACKING_PASSWORD",
    "password": "MLFLOW_TRACKING_PASSWORD",
    "tracking_token": "MLFLOW_TRACKING_TOKEN",
    "token": "MLFLOW_TRACKING_TOKEN",
    "aws_access_key_id": "AWS_ACCESS_KEY_ID",
    "aws_secret_access_key": "AWS_SECRET_ACCESS_KEY",
    "aws_session_token": "AWS_SESSION_TOKEN",
}

DEFAULT_DB = "mlruns.db"


@dataclass(frozen=True)
class Setting:
    value: str | None
    source: str


@dataclass(frozen=True)
class Secret:
    """A secret's name and whether the environment sets it; the value is never kept."""

    name: str
    is_set: bool

    @property
    def display(self) -> str:
        return "set (masked)" if self.is_set else "unset"


_UNSET = Setting(None, "unset")


@dataclass(frozen=True)
class Settings:
    """Resolved settings; every value remembers where it came from (``mlpipe config show``)."""

    tracking_uri: Setting
    registry_uri: Setting
    experiment: Setting
    experiment_prefix: Setting = _UNSET
    s3_endpoint_url: Setting = _UNSET
    tracking_username: Setting = _UNSET
    secrets: tuple[Secret, ...] = ()
    files: tuple[tuple[str, bool], ...] = ()
    """The settings files looked at, highest precedence first, and whether each exists."""

    @property
    def is_server(self) -> bool:
        return is_http_uri(self.tracking_uri.value)

    def experiment_name(self, default: str) -> str:
        """The experiment a run goes to: the resolved name, else ``default``, with the prefix.

        ``experiment_prefix`` is prepended as it is written (``neuro/`` gives
        ``neuro/seg3d``) to every name, whichever layer gave it, unless the name already
        starts with it: a team's runs land under its prefix even when someone passes
        ``--experiment``, and passing the full name does not double it.
        """
        return self.prefixed(self.experiment.value or default)

    def prefixed(self, name: str) -> str:
        """``name`` with ``experiment_prefix`` in front, unless it already starts with it."""
        prefix = self.experiment_prefix.value or ""
        return name if name.startswith(prefix) else prefix + name

    def client_env(self) -> dict[str, str]:
        """Variables MLflow clients read, for settings that came from a file or flag.

        MLflow takes the S3 endpoint and the tracking user only from the environment; a
        value from ``mlpipe.yaml`` or the user config reaches a client (the project's
        process, mlpipe's own calls) through these. Values from the environment are
        already there and are left out.
        """
        out = {}
        for key in ("s3_endpoint_url", "tracking_username"):
            setting: Setting = getattr(self, key)
            if setting.value and setting.source != "environment":
                out[ENV_VARS[key]] = setting.value
        return out

    def rows(self) -> list[tuple[str, str, str]]:
        """``(name, value fit to print, source)`` for every setting and secret, in order."""
        rows = []
        for key in CONFIG_KEYS:
            setting: Setting = getattr(self, key)
            value = setting.value
            shown = redact_uri(value) if value and key.endswith(("_uri", "_url")) else value
            source = setting.source
            if key == "experiment" and setting.value is None:
                source = "unset: mlpipe run uses the MLproject's name"
            rows.append((key, shown if shown is not None else "-", source))
        for secret in self.secrets:
            rows.append((secret.name, secret.display, "environment" if secret.is_set else "-"))
        return rows


def user_config_path(env: Mapping[str, str] | None = None) -> Path:
    """``$MLPIPE_CONFIG``, else ``$XDG_CONFIG_HOME/mlpipe/config.yaml`` (``~/.config``)."""
    env = os.environ if env is None else env
    if env.get(USER_CONFIG_ENV):
        return Path(env[USER_CONFIG_ENV]).expanduser()
    base = env.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "mlpipe" / "config.yaml"


def resolve_settings(
    *,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    project_dir: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    s3_endpoint_url: str | None = None,
    experiment_prefix: str | None = None,
) -> Settings:
    """Resolve every setting: flag > environment > project file > user config > default.

    Relative SQLite paths are made absolute (against the current folder for flags and the
    environment, against the file's folder for config files), because the project's command
    runs in the project folder and must reach the same database.

    Args:
        tracking_uri, experiment, s3_endpoint_url, experiment_prefix: command-line flags
            (``None``: not given).
        project_dir: the folder whose ``mlpipe.yaml`` is read [default: none is read].
        env: the environment [default: ``os.environ``].
        cwd: what relative paths of flags and the environment are relative to.

    Raises:
        ConfigError: a config file that is not valid YAML, holds unknown keys, or holds a
            password, token or key (those come only from the environment).
    """
    env = os.environ if env is None else env
    here = Path(cwd or os.getcwd())
    flags = {
        "tracking_uri": tracking_uri,
        "experiment": experiment,
        "s3_endpoint_url": s3_endpoint_url,
        "experiment_prefix": experiment_prefix,
    }
    layers: list[tuple[str, dict[str, str], Path]] = [
        ("flag", _drop_none(flags), here),
        ("environment", {k: env[v] for k, v in ENV_VARS.items() if env.get(v)}, here),
    ]
    files: list[tuple[str, bool]] = []
    if project_dir is not None:
        project_file = Path(project_dir) / PROJECT_FILE
        layers.append((str(project_file), _read_config(project_file), project_file.parent))
        files.append((str(project_file), project_file.is_file()))
    user_file = user_config_path(env)
    layers.append((str(user_file), _read_config(user_file), user_file.parent))
    files.append((str(user_file), user_file.is_file()))
    layers.append(("default", {"tracking_uri": f"sqlite:///{DEFAULT_DB}"}, here))

    def pick(key: str) -> Setting:
        for source, values, base in layers:
            if values.get(key):
                value = values[key]
                if key.endswith("_uri"):
                    value = absolutize_uri(value, base)
                return Setting(value, source)
        return _UNSET

    tracking = pick("tracking_uri")
    registry = pick("registry_uri")
    if registry.value is None:
        registry = Setting(tracking.value, "same as tracking_uri")
    return Settings(
        tracking_uri=tracking,
        registry_uri=registry,
        experiment=pick("experiment"),
        experiment_prefix=pick("experiment_prefix"),
        s3_endpoint_url=pick("s3_endpoint_url"),
        tracking_username=pick("tracking_username"),
        secrets=tuple(Secret(name, bool(env.get(name))) for name in SECRET_ENV_VARS),
        files=tuple(files),
    )


@contextmanager
def client_environ(settings: Settings) -> Iterator[None]:
    """Put :meth:`Settings.client_env` into ``os.environ`` for the block, then restore it.

    For mlpipe's own MLflow calls in this process (MLflow reads these only from the
    environment); nothing is overwritten that the environment already holds.
    """
    added = {k: v for k, v in settings.client_env().items() if not os.environ.get(k)}
    with environ_overlay(added):
        yield


@contextmanager
def environ_overlay(values: Mapping[str, str]) -> Iterator[None]:
    """Set ``values`` in ``os.environ`` for the block, then put back exactly what was there."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def absolutize_uri(uri: str, base: str | os.PathLike[str]) -> str:
    """Make a relative ``sqlite:///`` path or a bare local path absolute against ``base``."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = uri[len("sqlite:///") :]
        if path and path != ":memory:":
            return "sqlite:///" + str((Path(base) / path).resolve())
    if _looks_like_path(uri):
        return (Path(base) / os.path.expanduser(uri)).resolve().as_uri()
    return uri


def _looks_like_path(uri: str) -> bool:
    # As MLflow reads them: a scheme-less value is a local path, except the bare profile
    # names "databricks" and "databricks-uc".
    if not uri or urllib.parse.urlparse(uri).scheme:
        return False
    return uri not in ("databricks", "databricks-uc")


def is_http_uri(uri: str | None) -> bool:
    return bool(uri) and urllib.parse.urlparse(uri).scheme in ("http", "https")


def redact_uri(uri: str | None) -> str:
    """A URI fit to print or log: userinfo and secret query values replaced by ``***``.

    The one masking function (:func:`mlpipe.core.secrets.mask_uri`), under its older name.
    """
    return mask_uri(uri)


def _read_config(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must be a mapping of keys ({', '.join(CONFIG_KEYS)}).")
    secrets = sorted(str(k) for k in data if str(k).lower() in _SECRET_FILE_KEYS)
    if secrets:
        names = ", ".join(_SECRET_FILE_KEYS[k.lower()] for k in secrets)
        raise ConfigError(
            f"{path}: {', '.join(secrets)} cannot be kept in a settings file (it would end "
            f"up in a repository or a backup). Remove it and export {names} instead."
        )
    unknown = sorted(str(k) for k in data if k not in CONFIG_KEYS)
    if unknown:
        raise ConfigError(
            f"{path}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(CONFIG_KEYS)}."
        )
    values = {k: str(v) for k, v in data.items() if v is not None}
    for key, value in values.items():
        if key.endswith(("_uri", "_url")) and has_secret(value):
            raise ConfigError(
                f"{path}: {key} holds a password ({redact_uri(value)}). Keep the URI without "
                "it and export MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD instead."
            )
    return values


def _drop_none(values: dict[str, str | None]) -> dict[str, str]:
    return {k: v for k, v in values.items() if v is not None}
