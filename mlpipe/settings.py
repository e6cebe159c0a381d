"""Resolve where runs go, once, with one documented precedence and no side effects.

Precedence (DESIGN.md): command-line flag > environment > ``mlpipe.yaml`` in the project >
the user's config file > the embedded default (SQLite ``mlruns.db`` in the current folder).
Resolving sets no globals and creates nothing; other modules read the returned object rather
than ``os.environ``.
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from mlpipe.errors import ConfigError

PROJECT_FILE = "mlpipe.yaml"
USER_CONFIG_ENV = "MLPIPE_CONFIG"
CONFIG_KEYS = ("tracking_uri", "registry_uri", "experiment")
"""Keys a settings file may hold; anything else is refused, so typos surface."""

DEFAULT_DB = "mlruns.db"


@dataclass(frozen=True)
class Setting:
    value: str | None
    source: str


@dataclass(frozen=True)
class Settings:
    """Resolved settings; every value remembers where it came from (``mlpipe config show``)."""

    tracking_uri: Setting
    registry_uri: Setting
    experiment: Setting

    @property
    def is_server(self) -> bool:
        return is_http_uri(self.tracking_uri.value)


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
) -> Settings:
    """Resolve the tracking URI, registry URI and experiment name.

    Relative SQLite paths are made absolute (against the current folder for flags and the
    environment, against the file's folder for config files), because the project's command
    runs in the project folder and must reach the same database.

    Raises:
        ConfigError: a config file that is not valid YAML or holds unknown keys.
    """
    env = os.environ if env is None else env
    here = Path(cwd or os.getcwd())
    layers: list[tuple[str, dict[str, str], Path]] = []
    layers.append(
        ("flag", _drop_none({"tracking_uri": tracking_uri, "experiment": experiment}), here)
    )
    layers.append(
        (
            "environment",
            _drop_none(
                {
                    "tracking_uri": env.get("MLFLOW_TRACKING_URI") or None,
                    "registry_uri": env.get("MLFLOW_REGISTRY_URI") or None,
                    "experiment": env.get("MLFLOW_EXPERIMENT_NAME") or None,
                }
            ),
            here,
        )
    )
    if project_dir is not None:
        project_file = Path(project_dir) / PROJECT_FILE
        layers.append((str(project_file), _read_config(project_file), project_file.parent))
    user_file = user_config_path(env)
    layers.append((str(user_file), _read_config(user_file), user_file.parent))
    layers.append(("default", {"tracking_uri": f"sqlite:///{DEFAULT_DB}"}, here))

    def pick(key: str) -> Setting:
        for source, values, base in layers:
            if values.get(key):
                value = values[key]
                if key.endswith("_uri"):
                    value = absolutize_uri(value, base)
                return Setting(value, source)
        return Setting(None, "unset")

    tracking = pick("tracking_uri")
    registry = pick("registry_uri")
    if registry.value is None:
        registry = Setting(tracking.value, "same as tracking_uri")
    return Settings(tracking_uri=tracking, registry_uri=registry, experiment=pick("experiment"))


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
    """A URI fit to print or log: any user and password in it replaced by ``***``."""
    if not uri:
        return ""
    parsed = urllib.parse.urlsplit(uri)
    if parsed.username is None and parsed.password is None:
        return uri
    host = parsed.hostname or ""
    if ":" in host:
        host = f"[{host}]"  # IPv6
    if parsed.port:
        host = f"{host}:{parsed.port}"
    return urllib.parse.urlunsplit(parsed._replace(netloc=f"***@{host}"))


def _read_config(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must be a mapping of keys ({', '.join(CONFIG_KEYS)}).")
    unknown = sorted(str(k) for k in data if k not in CONFIG_KEYS)
    if unknown:
        raise ConfigError(
            f"{path}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(CONFIG_KEYS)}."
        )
    return {k: str(v) for k, v in data.items() if v is not None}


def _drop_none(values: dict[str, str | None]) -> dict[str, str]:
    return {k: v for k, v in values.items() if v is not None}
