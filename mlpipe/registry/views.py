"""What ``mlpipe history`` and ``mlpipe models`` show: the audit record of alias moves, and
the models and versions with their aliases (``search_model_versions`` returns versions without
them, so they are joined from the registered model).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import TYPE_CHECKING

from mlpipe.core.tracking import Tracking, translate_errors
from mlpipe.registry.audit import HistoryEvent, parse_history
from mlpipe.registry.locks import is_lock_name
from mlpipe.registry.promotion import (
    PRIMARY_METRIC_TAG,
    _aliases,
    _require_model,
    _versions,
    version_info,
)

if TYPE_CHECKING:
    import pandas as pd


def history(tracking: Tracking, model: str, alias: str | None = None) -> list[HistoryEvent]:
    """The recorded alias moves of ``model``, oldest first (only ``alias``'s when given).

    Raises:
        NotFoundError: no such model.
    """
    _require_model(tracking.client, model)
    with translate_errors(f"model {model!r}"):
        tags = tracking.client.get_registered_model(model).tags
    events = parse_history(tags)
    return [e for e in events if alias is None or e.alias == alias]


def list_models(tracking: Tracking) -> pd.DataFrame:
    """Registered models (without mlpipe's lock entries): name, versions, aliases, updated."""
    import pandas as pd

    client = tracking.client
    rows = []
    with translate_errors("registered models"):
        for rm in client.search_registered_models():
            if is_lock_name(rm.name):
                continue
            full = client.get_registered_model(rm.name)
            latest = max((int(v.version) for v in full.latest_versions or []), default=None)
            rows.append(
                {
                    "model": rm.name,
                    "latest version": latest if latest is not None else "-",
                    "aliases": _alias_text(full.aliases),
                    "updated": _time(full.last_updated_timestamp),
                }
            )
    return pd.DataFrame(rows, columns=["model", "latest version", "aliases", "updated"])


def list_versions(tracking: Tracking, model: str) -> pd.DataFrame:
    """One model's versions: aliases, stage, primary metric, dataset version, run, created.

    Raises:
        NotFoundError: no such model.
    """
    import pandas as pd

    client = tracking.client
    _require_model(client, model)
    by_version: dict[str, list[str]] = {}
    for alias, version in _aliases(client, model).items():
        by_version.setdefault(version, []).append(alias)
    rows = []
    for mv in _versions(client, model):
        info = version_info(client, model, str(mv.version))
        metric = info.tags.get(PRIMARY_METRIC_TAG)
        value = info.metrics.get(metric) if metric else None
        rows.append(
            {
                "version": info.version,
                "aliases": ", ".join(sorted(by_version.get(info.version, []))) or "-",
                "stage": info.stage,
                "primary metric": f"{metric}={value:.6g}" if value is not None else "-",
                "dataset version": info.convention("mlpipe.dataset.version") or "-",
                "run id": info.run_id or "-",
                "created": _time(info.created),
            }
        )
    columns = [
        "version",
        "aliases",
        "stage",
        "primary metric",
        "dataset version",
        "run id",
        "created",
    ]
    return pd.DataFrame(rows, columns=columns)


def _alias_text(aliases: dict) -> str:
    return ", ".join(f"@{a}=v{v}" for a, v in sorted(aliases.items())) or "-"


def _time(millis: int | None) -> str:
    if not millis:
        return "-"
    return datetime.fromtimestamp(millis / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
