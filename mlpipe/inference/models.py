"""Which model a URI means, and loading it once.

``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` and ``runs:/RUN_ID/PATH`` are resolved in the
registry once and pinned to a version, so a later alias move does not change what a running
service or a batch uses. The version's source run supplies what inference must know: the
``mlpipe.dataset.*``/``mlpipe.preprocessing.digest`` tags and the training data profile.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlpipe.core.errors import NotFoundError, UsageError
from mlpipe.inference.inputs import safe_name
from mlpipe.log import PROFILE_ARTIFACT

if TYPE_CHECKING:
    from mlpipe.core.tracking import Tracking

logger = logging.getLogger("mlpipe.serve")


_MODELS_RE = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<ref>[^/]+))?/?$")


_RUNS_RE = re.compile(r"^runs:/(?P<run>[0-9a-zA-Z]+)(?:/(?P<path>.+))?$")


@dataclass(frozen=True)
class ModelSource:
    """Where the served model comes from, as the registry and its source run say.

    Attributes:
        uri: the URI as given.
        load_uri: what is loaded: a registered version pinned by number (an alias that moves
            while the server runs does not change what it serves), or the URI as given.
        name, version: the registered model and version (``None`` for an unregistered run).
        alias: the alias the URI named, if any; ``aliases``: every alias on the version.
        run_id: the version's source run; ``tags``: its ``mlpipe.*`` tags;
            ``experiment_id``: the run's experiment.
        training_profile: its ``mlpipe/data_profile.json``, or ``None`` if it logged none.
    """

    uri: str
    load_uri: str
    name: str | None
    version: str | None
    alias: str | None
    aliases: tuple[str, ...]
    run_id: str | None
    tags: dict[str, str]
    training_profile: dict | None
    experiment_id: str | None = None

    @property
    def label(self) -> str:
        """``seg3d v3`` or the URI: how logs and titles name the model."""
        if self.name and self.version:
            return f"{self.name} v{self.version}"
        return self.uri

    @property
    def profile_key(self) -> str:
        """The folder name of this model's profiles: the registered name, else ``run-<id>``."""
        if self.name:
            return self.name
        return f"run-{self.run_id}" if self.run_id else safe_name(self.uri)


def resolve_model(tracking: Tracking, uri: str) -> ModelSource:
    """Look a model URI up in the registry and read its source run's tags and data profile.

    Args:
        tracking: the connected tracking adapter.
        uri: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``models:/NAME/latest``,
            ``runs:/RUN_ID/PATH`` or a LoggedModel's ``models:/m-ID`` (MLflow 3 registers
            those: a version's ``source``).

    Returns:
        The resolved source; nothing is downloaded yet.

    Raises:
        UsageError: a URI of another form; NotFoundError: no such model, alias, version or
            run; TrackingUnavailableError: the tracking server does not answer.
    """
    from mlpipe.core.tracking import translate_errors

    client = tracking.client
    models = _MODELS_RE.match(uri)
    runs = _RUNS_RE.match(uri)
    alias = None
    if models and models.group("name").startswith("m-") and not any(models.group("alias", "ref")):
        # MLflow 3's LoggedModel id: the model a version's `source` names
        model_id = models.group("name")
        with translate_errors(f"logged model {model_id}"):
            run_id = client.get_logged_model(model_id).source_run_id
        name, version = _registered_for_run(tracking, run_id, uri) if run_id else (None, None)
        aliases = ()
        load_uri = uri
    elif models:
        name, alias, ref = models.group("name"), models.group("alias"), models.group("ref")
        with translate_errors(f"model {uri}"):
            registered = client.get_registered_model(name)
            if alias:
                if alias not in registered.aliases:
                    held = ", ".join(f"@{a} -> v{v}" for a, v in sorted(registered.aliases.items()))
                    raise NotFoundError(
                        f"model {uri}: {name!r} has no alias {alias!r} (aliases: "
                        f"{held or 'none'}). Promote a version first (mlpipe promote {name} "
                        f"VERSION --alias {alias}) or serve a version: models:/{name}/VERSION."
                    )
                mv = client.get_model_version_by_alias(name, alias)
            elif ref and ref.isdigit():
                mv = client.get_model_version(name, ref)
            elif ref and ref.lower() == "latest":
                escaped = name.replace("'", "\\'")
                found = client.search_model_versions(f"name = '{escaped}'")
                if not found:
                    raise NotFoundError(f"model {uri}: {name!r} has no versions.")
                mv = max(found, key=lambda v: int(v.version))
            else:
                what = f"{ref!r} is neither a version number nor 'latest'" if ref else "no version"
                raise UsageError(
                    f"MODEL_URI {uri!r}: {what}. Use models:/{name}@production (an alias) or "
                    f"models:/{name}/3 (a version); stages are deprecated."
                )
        version = str(mv.version)
        aliases = tuple(sorted(a for a, v in registered.aliases.items() if str(v) == version))
        # a version registered from a LoggedModel alone may lack run_id: follow its source
        run_id = mv.run_id or _logged_model_run(tracking, mv.source)
        load_uri = f"models:/{name}/{version}"
    elif runs:
        run_id = runs.group("run")
        with translate_errors(f"run {run_id}"):
            client.get_run(run_id)
        name, version = _registered_for_run(tracking, run_id)
        aliases = ()
        load_uri = uri
    else:
        raise UsageError(
            f"MODEL_URI {uri!r} is not a model URI. Give models:/NAME@ALIAS (e.g. "
            "models:/seg3d@production), models:/NAME/VERSION or runs:/RUN_ID/PATH; "
            "`mlpipe models NAME` lists the versions."
        )
    tags: dict[str, str] = {}
    profile = None
    experiment_id = None
    if run_id:
        with translate_errors(f"run {run_id}"):
            run = client.get_run(run_id)
        tags = {k: v for k, v in run.data.tags.items() if k.startswith("mlpipe.")}
        experiment_id = run.info.experiment_id
        profile = _training_profile(tracking, run_id)
    return ModelSource(
        uri=uri,
        load_uri=load_uri,
        name=name,
        version=version,
        alias=alias,
        aliases=aliases,
        run_id=run_id,
        tags=tags,
        training_profile=profile,
        experiment_id=experiment_id,
    )


def _logged_model_run(tracking: Tracking, source: str | None) -> str | None:
    """The run that logged the LoggedModel ``models:/m-...`` a version points at."""
    from mlpipe.core.tracking import translate_errors

    if not source or not source.startswith("models:/m-"):
        return None
    model_id = source[len("models:/") :].split("/", 1)[0]
    with translate_errors(f"logged model {model_id}"):
        return tracking.client.get_logged_model(model_id).source_run_id


def _registered_for_run(
    tracking: Tracking, run_id: str, source: str | None = None
) -> tuple[str | None, str | None]:
    """The registered version logged from ``run_id``: the one of ``source`` if given, else the
    newest (a run may register more than one model, or one LoggedModel under two names)."""
    from mlpipe.core.tracking import translate_errors

    with translate_errors(f"model versions of run {run_id}"):
        found = tracking.client.search_model_versions(f"run_id = '{run_id}'")
    exact = [mv for mv in found if source and mv.source == source]
    candidates = exact or found
    if not candidates:
        return None, None
    newest = max(candidates, key=lambda mv: (int(mv.creation_timestamp or 0), int(mv.version)))
    return str(newest.name), str(newest.version)


def _training_profile(tracking: Tracking, run_id: str) -> dict | None:
    """The run's ``mlpipe/data_profile.json``, or ``None`` when it logged none."""
    from mlpipe.core.tracking import translate_errors

    client = tracking.client
    with translate_errors(f"run {run_id}"):
        listed = {a.path for a in client.list_artifacts(run_id, "mlpipe")}
    if PROFILE_ARTIFACT not in listed:
        return None
    with tempfile.TemporaryDirectory(prefix="mlpipe-serve-") as tmp:
        with translate_errors(f"run {run_id} artifact {PROFILE_ARTIFACT}"):
            local = client.download_artifacts(run_id, PROFILE_ARTIFACT, tmp)
        try:
            return json.loads(Path(local).read_text())
        except ValueError:
            logger.warning("%s of run %s is not JSON; no geometry checks", PROFILE_ARTIFACT, run_id)
            return None


def load_pyfunc(source: ModelSource, tracking: Tracking, folder: Path) -> Any:
    """Download the model into ``folder`` and load it as a pyfunc, once.

    Downloading with explicit tracking and registry URIs leaves MLflow's global URIs alone.

    Raises:
        UsageError: the model cannot be downloaded or loaded (the reason is named).
    """
    return load_local(download_model(source, tracking, folder), source)


def download_model(source: ModelSource, tracking: Tracking, folder: Path) -> str:
    """Download the model's files into ``folder``; returns the local model folder.

    Split from loading so that several worker processes of one batch load the one copy.

    Raises:
        UsageError, NotFoundError, TrackingUnavailableError: the download failed.
    """
    import mlflow.artifacts

    from mlpipe.core.tracking import translate_errors

    with translate_errors(f"model {source.uri}"):
        # MLflow resolves models:/ and runs:/ URIs with its global tracking and registry
        # URIs, whatever download_artifacts is told, so the storage location is looked up
        # here with this server's own client.
        artifact_uri = _storage_location(tracking, source)
        return mlflow.artifacts.download_artifacts(
            artifact_uri=artifact_uri,
            dst_path=str(folder),
            tracking_uri=tracking.uri,
            registry_uri=tracking.settings.registry_uri.value,
        )


def load_local(local: str | Path, source: ModelSource) -> Any:
    """Load a downloaded model folder as a pyfunc.

    Raises:
        UsageError: it does not load (the reason is named).
    """
    import mlflow.pyfunc

    try:
        return mlflow.pyfunc.load_model(str(local))
    except Exception as exc:
        raise UsageError(
            f"model {source.uri}: it was downloaded but does not load as a pyfunc "
            f"({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}). "
            "Check that it is a seg3d model and that torch, monai and nibabel are installed."
        ) from exc


def check_device(device: str | None) -> None:
    """Refuse a ``--device`` this machine does not have, before anything is loaded.

    Raises:
        UsageError: not ``cpu``/``cuda``, or ``cuda`` without a CUDA device.
    """
    if device in (None, "cpu"):
        return
    if device != "cuda":
        raise UsageError(f"--device {device!r}: expected cpu or cuda.")
    import torch

    if not torch.cuda.is_available():
        raise UsageError(
            "--device cuda: torch sees no CUDA device here (torch.cuda.is_available() is "
            "False). Use --device cpu, or run on a machine with a GPU and a CUDA build of torch."
        )


def place_model(model: Any, device: str | None) -> str:
    """Move a loaded seg3d pyfunc's network to ``device`` (``None``: where it loaded).

    The seg3d pyfunc picks CUDA when it sees one; ``--device cpu`` keeps a batch off a GPU
    another job uses. Returns the device the model is on.

    Raises:
        UsageError: the model is not a seg3d pyfunc whose device can be set.
    """
    if device is None:
        return model_device(model)
    import torch

    try:
        inner = model.unwrap_python_model()
        inner.network = inner.network.to(device)
        inner.device = torch.device(device)
    except AttributeError as exc:
        raise UsageError(
            f"--device {device}: this model keeps no network mlpipe can move (not a seg3d "
            "pyfunc); leave out --device."
        ) from exc
    return model_device(model)


def _storage_location(tracking: Tracking, source: ModelSource) -> str:
    """Where the model's files are: the version's download URI or the run's logged model."""
    client = tracking.client
    if source.load_uri.startswith("models:/") and source.name and source.version:
        return client.get_model_version_download_uri(source.name, source.version)
    runs = _RUNS_RE.match(source.load_uri)
    if not runs:
        return source.load_uri
    run_id, path = runs.group("run"), (runs.group("path") or "").strip("/")
    if not path:
        raise UsageError(
            f"{source.uri} names a run but not its model: give runs:/{run_id}/PATH "
            "(seg3d logs it as runs:/RUN_ID/model)."
        )
    name, _, rest = path.partition("/")
    run = client.get_run(run_id)
    escaped = name.replace("'", "\\'")
    for model in client.search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"name = '{escaped}'"
    ):
        if model.source_run_id == run_id:  # an MLflow 3 logged model
            return model.artifact_location.rstrip("/") + (f"/{rest}" if rest else "")
    return f"{run.info.artifact_uri.rstrip('/')}/{path}"  # a model among the run's artifacts


def model_device(model: Any) -> str:
    """``cuda`` or ``cpu``: where the seg3d pyfunc put its network (it picks CUDA if there)."""
    with contextlib.suppress(Exception):
        return str(model.unwrap_python_model().device)
    return "unknown"
