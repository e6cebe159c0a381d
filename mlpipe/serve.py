"""``mlpipe serve``: a registered seg3d model behind HTTP, with a page to try it (``/docs``).

The model is resolved in the registry once (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``,
``runs:/RUN_ID/PATH``), pinned to that version, downloaded and loaded once, and reused by every
request. What the service needs to know about it comes from the version's source run: the
``mlpipe.dataset.*`` and ``mlpipe.preprocessing.digest`` tags (shown at ``/model``) and the
training data profile ``mlpipe/data_profile.json`` (the spacing and shape ranges an upload is
checked against).

Each upload goes through :class:`Segmenter`: cheap checks first (empty, not NIfTI, not 3D),
then the profile of the volume (``mlpipe.profile.profile_volume``, the code ``mlpipe drift``
uses too), the geometry check against the training profile, and the pyfunc's ``predict``.
Every readable volume's profile is appended to a bounded JSON-lines file
(:class:`ProfileLog`) for the drift check. Input problems raise :class:`InputRejected` with an
HTTP status and a message for the client that names no server path.

The HTTP layer (FastAPI routes, auth, body limit) is in ``mlpipe.serve_app``; this module is
the library underneath: nothing here prints.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import os
import re
import signal
import socket
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from mlpipe import __version__
from mlpipe.dataset import default_cache_path
from mlpipe.errors import DatasetError, NotFoundError, UsageError
from mlpipe.log import PROFILE_ARTIFACT
from mlpipe.profile import profile_volume
from mlpipe.volumes import read_header

if TYPE_CHECKING:
    from mlpipe.tracking import Tracking

logger = logging.getLogger("mlpipe.serve")

Echo = Callable[[str], None]

DEFAULT_MAX_BYTES = 512 * 1024**2
DEFAULT_RANGE_FACTOR = 3.0
DEFAULT_MAX_PROFILES = 10_000
DEFAULT_MAX_QUEUE = 32
SERVING_DIR = "serving"
PROFILES_FILE = "profiles.jsonl"

_GZIP_MAGIC = b"\x1f\x8b"
_NIFTI1_SINGLE = b"n+1\x00"
_NIFTI1_PAIR = b"ni1\x00"
_NIFTI2_SINGLE = b"n+2\x00"
_NIFTI2_PAIR = b"ni2\x00"
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_MODELS_RE = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<ref>[^/]+))/?$")
_RUNS_RE = re.compile(r"^runs:/(?P<run>[0-9a-zA-Z]+)/(?P<path>.+)$")
_SAFE_NAME_RE = re.compile(r"[^A-Za-z0-9._-]+")


class InputRejected(Exception):
    """An upload the service refuses: the HTTP status and a message for the client.

    The message names the upload by the name the client gave it, never by a server path.
    """

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class ServerBusy(Exception):
    """More requests wait for inference than ``--max-queue`` allows (HTTP 503)."""


# --- options --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServeOptions:
    """What ``mlpipe serve`` was asked for (the command's options, checked by ``check``)."""

    model_uri: str
    host: str = "127.0.0.1"
    port: int = 8080
    token_env: str | None = None
    max_bytes: int = DEFAULT_MAX_BYTES
    range_factor: float = DEFAULT_RANGE_FACTOR
    concurrency: int = 1
    max_queue: int = DEFAULT_MAX_QUEUE
    profile_file: str | None = None
    max_profiles: int = DEFAULT_MAX_PROFILES
    tracking_uri: str | None = None

    def check(self) -> None:
        """Refuse values no server can use, naming the option.

        Raises:
            UsageError: naming the option, the value and what is expected.
        """
        if self.max_bytes < 1:
            raise UsageError(f"--max-bytes {self.max_bytes}: expected a positive size.")
        if self.range_factor != 0 and self.range_factor < 1:
            raise UsageError(
                f"--range-factor {self.range_factor}: expected 1 or more (how many times "
                "outside the training range a spacing or shape may be), or 0 to turn it off."
            )
        if self.concurrency < 1:
            raise UsageError(f"--concurrency {self.concurrency}: expected 1 or more.")
        if self.max_queue < 0:
            raise UsageError(f"--max-queue {self.max_queue}: expected 0 or more.")
        if self.max_profiles < 1:
            raise UsageError(f"--max-profiles {self.max_profiles}: expected 1 or more.")


def parse_size(text: str | int) -> int:
    """``"512M"``, ``"1GiB"``, ``"2048"`` -> bytes (K, M, G, T are powers of 1024).

    Raises:
        UsageError: naming the text and the expected form.
    """
    if isinstance(text, int):
        return text
    match = _SIZE_RE.match(str(text))
    if not match:
        raise UsageError(
            f"--max-bytes {text!r} is not a size; expected a number of bytes, optionally with "
            "K, M, G or T (powers of 1024), e.g. 512M or 2G."
        )
    number, unit = float(match.group(1)), match.group(2).lower()
    return int(number * 1024 ** ("kmgt".index(unit) + 1 if unit else 0))


def token_from_env(name: str | None, env: Mapping[str, str] | None = None) -> str | None:
    """The bearer token from environment variable ``name`` (``None`` when no name is given).

    Raises:
        UsageError: the variable is unset or empty (the server would be open to anyone).
    """
    if not name:
        return None
    env = os.environ if env is None else env
    token = env.get(name, "")
    if not token.strip():
        raise UsageError(
            f"--token-env {name}: the environment variable {name} is unset or empty. Set it "
            f"to the token clients must send (e.g. export {name}=$(openssl rand -hex 32)), or "
            "leave out --token-env to serve without authentication."
        )
    return token.strip()


def profiles_path(model_name: str, env: Mapping[str, str] | None = None) -> Path:
    """``<cache>/serving/<model>/profiles.jsonl``: where served inputs' profiles go.

    ``<cache>`` is ``$MLPIPE_CACHE_DIR``, else ``$XDG_CACHE_HOME/mlpipe``, else
    ``~/.cache/mlpipe`` (the folder of the dataset hash cache). ``mlpipe drift
    --from-serving`` reads the same file.
    """
    return default_cache_path(env).parent / SERVING_DIR / _folder_name(model_name) / PROFILES_FILE


def _folder_name(name: str) -> str:
    """The model name as it is (``mlpipe drift`` looks for it so), unless it would leave the
    serving folder: a name with a path separator, or ``.``/``..``, is made safe."""
    if name and name not in (".", "..") and not re.search(r"[\\/\x00]", name):
        return name
    return _safe_name(name, default="model")


# --- the model ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSource:
    """Where the served model comes from, as the registry and its source run say.

    Attributes:
        uri: the URI as given.
        load_uri: what is loaded: a registered version pinned by number (an alias that moves
            while the server runs does not change what it serves), or the URI as given.
        name, version: the registered model and version (``None`` for an unregistered run).
        alias: the alias the URI named, if any; ``aliases``: every alias on the version.
        run_id: the version's source run; ``tags``: its ``mlpipe.*`` tags.
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
        return f"run-{self.run_id}" if self.run_id else _safe_name(self.uri)


def resolve_model(tracking: Tracking, uri: str) -> ModelSource:
    """Look a model URI up in the registry and read its source run's tags and data profile.

    Args:
        tracking: the connected tracking adapter.
        uri: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``models:/NAME/latest`` or
            ``runs:/RUN_ID/PATH``.

    Returns:
        The resolved source; nothing is downloaded yet.

    Raises:
        UsageError: a URI of another form; NotFoundError: no such model, alias, version or
            run; TrackingUnavailableError: the tracking server does not answer.
    """
    from mlpipe.tracking import translate_errors

    client = tracking.client
    models = _MODELS_RE.match(uri)
    runs = _RUNS_RE.match(uri)
    alias = None
    if models:
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
                raise UsageError(
                    f"MODEL_URI {uri!r}: {ref!r} is neither a version number nor 'latest'. "
                    f"Use models:/{name}@production (an alias) or models:/{name}/3 (a version); "
                    "stages are deprecated."
                )
        version = str(mv.version)
        aliases = tuple(sorted(a for a, v in registered.aliases.items() if str(v) == version))
        run_id = mv.run_id or None
        load_uri = f"models:/{name}/{version}"
    elif runs:
        run_id = runs.group("run")
        with translate_errors(f"run {run_id}"):
            client.get_run(run_id)
            found = client.search_model_versions(f"run_id = '{run_id}'")
        name = str(found[0].name) if len(found) == 1 else None
        version = str(found[0].version) if len(found) == 1 else None
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
    if run_id:
        with translate_errors(f"run {run_id}"):
            run = client.get_run(run_id)
        tags = {k: v for k, v in run.data.tags.items() if k.startswith("mlpipe.")}
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
    )


def _training_profile(tracking: Tracking, run_id: str) -> dict | None:
    """The run's ``mlpipe/data_profile.json``, or ``None`` when it logged none."""
    from mlpipe.tracking import translate_errors

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
    import mlflow.artifacts
    import mlflow.pyfunc

    from mlpipe.tracking import translate_errors

    with translate_errors(f"model {source.uri}"):
        # MLflow resolves models:/ and runs:/ URIs with its global tracking and registry
        # URIs, whatever download_artifacts is told, so the storage location is looked up
        # here with this server's own client.
        artifact_uri = _storage_location(tracking, source)
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=artifact_uri,
            dst_path=str(folder),
            tracking_uri=tracking.uri,
            registry_uri=tracking.settings.registry_uri.value,
        )
    try:
        return mlflow.pyfunc.load_model(local)
    except Exception as exc:
        raise UsageError(
            f"model {source.uri}: it was downloaded but does not load as a pyfunc "
            f"({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}). "
            "Check that it is a seg3d model and that torch, monai and nibabel are installed."
        ) from exc


def _storage_location(tracking: Tracking, source: ModelSource) -> str:
    """Where the model's files are: the version's download URI or the run's logged model."""
    client = tracking.client
    if source.load_uri.startswith("models:/") and source.name and source.version:
        return client.get_model_version_download_uri(source.name, source.version)
    runs = _RUNS_RE.match(source.load_uri)
    if not runs:
        return source.load_uri
    run_id, path = runs.group("run"), runs.group("path").strip("/")
    name, _, rest = path.partition("/")
    run = client.get_run(run_id)
    escaped = name.replace("'", "\\'")
    for model in client.search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"name = '{escaped}'"
    ):
        if model.source_run_id == run_id:  # an MLflow 3 logged model
            return model.artifact_location.rstrip("/") + (f"/{rest}" if rest else "")
    return f"{run.info.artifact_uri.rstrip('/')}/{path}"  # a model among the run's artifacts


# --- geometry ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class GeometryLimits:
    """The spacing and shape ranges of the training data, and how far outside is too far.

    A value is refused when it lies more than ``factor`` times outside the training range on
    any axis: below ``min / factor`` or above ``max * factor``. Axes are compared in the
    training volumes' orientation (an LPS upload's axes are permuted to match RAS training
    data), since a permuted volume is the same scan.
    """

    spacing_min: tuple[float, ...]
    spacing_max: tuple[float, ...]
    shape_min: tuple[float, ...]
    shape_max: tuple[float, ...]
    orientation: str | None
    factor: float
    volumes: int

    @classmethod
    def from_profile(cls, profile: dict | None, factor: float) -> GeometryLimits | None:
        """From a data profile's summary; ``None`` without one or with ``factor`` 0."""
        if not profile or factor == 0:
            return None
        summary = profile.get("summary") or {}
        try:
            spacing, shape = summary["spacing"], summary["shape"]
            orientations = summary.get("orientation") or {}
            orientation = max(orientations, key=orientations.get) if orientations else None
            return cls(
                spacing_min=tuple(float(v) for v in spacing["min"]),
                spacing_max=tuple(float(v) for v in spacing["max"]),
                shape_min=tuple(float(v) for v in shape["min"]),
                shape_max=tuple(float(v) for v in shape["max"]),
                orientation=orientation,
                factor=float(factor),
                volumes=int(summary.get("volumes", 0)),
            )
        except (KeyError, TypeError, ValueError):
            logger.warning("The training profile has no spacing/shape summary; no geometry check")
            return None

    def problems(
        self, spacing: tuple[float, ...], shape: tuple[int, ...], orientation: str
    ) -> list[str]:
        """What lies too far outside the training data; empty when the volume fits."""
        spacing = self._as_training_axes(tuple(spacing), orientation)
        shape = self._as_training_axes(tuple(shape), orientation)
        found = []
        for what, values, low, high, unit in (
            ("spacing", spacing, self.spacing_min, self.spacing_max, " mm"),
            ("shape", shape, self.shape_min, self.shape_max, ""),
        ):
            outside = [
                axis
                for axis, value in enumerate(values)
                if value < low[axis] / self.factor or value > high[axis] * self.factor
            ]
            if outside:
                trained = ", ".join(
                    _range_text(low[a], high[a]) for a in range(min(len(low), len(values)))
                )
                found.append(
                    f"{what} ({', '.join(f'{v:g}' for v in values)}){unit} is far outside the "
                    f"training data ({trained}{unit} per axis, {self.volumes} volumes): axis "
                    f"{', '.join(map(str, outside))} more than {self.factor:g}x outside"
                )
        return found

    def _as_training_axes(self, values: tuple, orientation: str) -> tuple:
        """Permute the upload's per-axis values into the training volumes' axis order."""
        if (
            not self.orientation
            or orientation == self.orientation
            or "?" in orientation + self.orientation
            or len(values) != 3
        ):
            return values
        import nibabel as nib

        try:
            transform = nib.orientations.ornt_transform(
                nib.orientations.axcodes2ornt(tuple(orientation)),
                nib.orientations.axcodes2ornt(tuple(self.orientation)),
            )
        except ValueError:
            return values
        permuted = list(values)
        for axis, (target, _flip) in enumerate(transform):
            permuted[int(target)] = values[axis]
        return tuple(permuted)

    def describe(self) -> dict:
        return {
            "spacing_mm": {"min": list(self.spacing_min), "max": list(self.spacing_max)},
            "shape": {"min": list(self.shape_min), "max": list(self.shape_max)},
            "orientation": self.orientation,
            "range_factor": self.factor,
            "training_volumes": self.volumes,
        }


def _range_text(low: float, high: float) -> str:
    return f"{low:g}" if low == high else f"{low:g}-{high:g}"


# --- the profile log --------------------------------------------------------------------------


class ProfileLog:
    """Served inputs' profiles, one JSON line each, at most ``max_lines`` (oldest dropped).

    Appends are one ``write`` in append mode under a thread lock and an ``flock`` on a side
    ``.lock`` file, so two servers of one model on one host do not interleave lines. When the
    next line would exceed ``max_lines``, the file is rewritten (to a temporary file, then
    ``os.replace``) keeping the newest ``max_lines - max_lines // 10`` lines, so the rewrite
    happens once every tenth of the bound rather than on every request. A reader (``mlpipe
    drift``) sees whole lines, except possibly a last line being written.
    """

    def __init__(self, path: str | os.PathLike[str], max_lines: int = DEFAULT_MAX_PROFILES):
        self.path = Path(path)
        self.max_lines = max_lines
        self._lock = threading.Lock()
        self._count: int | None = None
        self._size: int | None = None

    def append(self, entry: dict) -> None:
        """Append one entry; failures are logged, never raised (serving goes on)."""
        line = (json.dumps(entry, separators=(",", ":"), default=str) + "\n").encode()
        try:
            with self._lock, self._file_lock():
                size = self.path.stat().st_size if self.path.exists() else 0
                if self._count is None or size != self._size:  # first use, or another writer
                    self._count = self._count_lines()
                if self._count + 1 > self.max_lines:
                    self._count = self._trim(self.max_lines - max(1, self.max_lines // 10))
                with open(self.path, "ab") as out:
                    out.write(line)
                self._count += 1
                self._size = self.path.stat().st_size
        except OSError as exc:
            logger.warning("Could not record the input profile in %s: %s", self.path, exc)

    def read(self) -> list[dict]:
        """Every entry (for tests and ``mlpipe drift``); a torn last line is skipped."""
        if not self.path.exists():
            return []
        entries = []
        for text in self.path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                entries.append(json.loads(text))
        return entries

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _count_lines(self) -> int:
        if not self.path.exists():
            return 0
        with open(self.path, "rb") as handle:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))

    def _trim(self, keep: int) -> int:
        lines = self.path.read_bytes().splitlines(keepends=True)[-keep:] if keep > 0 else []
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_bytes(b"".join(lines))
        os.replace(tmp, self.path)
        return len(lines)


# --- segmenting an upload -----------------------------------------------------------------------


@dataclass(frozen=True)
class Segmentation:
    """One served request's result."""

    mask: bytes
    """The mask as ``.nii.gz`` bytes: uint8, the input's shape and affine."""
    class_volumes_ml: dict[str, float]
    shape: list[int]
    name: str


@dataclass
class Segmenter:
    """Checks an uploaded volume, segments it with the loaded pyfunc, records its profile.

    Thread-safe: ``concurrency`` requests are profiled and segmented at once (a semaphore),
    and at most ``max_queue`` more wait for a turn (beyond that ``ServerBusy``). The cheap
    checks (empty, not NIfTI, not 3D: the header only) run before the wait, so such a file
    is refused at once even while the model is busy; reading the voxels (profile, then
    inference) happens inside, so at most ``concurrency`` volumes are in memory at once.
    """

    model: Any
    source: ModelSource
    max_bytes: int = DEFAULT_MAX_BYTES
    limits: GeometryLimits | None = None
    profiles: ProfileLog | None = None
    concurrency: int = 1
    max_queue: int = DEFAULT_MAX_QUEUE
    _slots: threading.BoundedSemaphore = field(init=False, repr=False)
    _in_flight: int = field(default=0, init=False, repr=False)
    _in_flight_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        self._slots = threading.BoundedSemaphore(self.concurrency)

    def segment_stream(self, stream: IO[bytes], name: str, request_id: str) -> Segmentation:
        """Segment an uploaded file object (read in 1 MiB chunks, at most ``max_bytes``)."""
        with tempfile.TemporaryDirectory(prefix="mlpipe-serve-") as tmp:
            raw = Path(tmp) / "upload"
            size = 0
            with open(raw, "wb") as out:
                for chunk in iter(lambda: stream.read(1 << 20), b""):
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise InputRejected(413, self._too_large(name))
                    out.write(chunk)
            return self._segment_file(raw, size, name, request_id)

    def segment_bytes(self, data: bytes, name: str, request_id: str) -> Segmentation:
        """Segment a volume given as bytes (the JSON endpoint's decoded base64)."""
        if len(data) > self.max_bytes:
            raise InputRejected(413, self._too_large(name))
        with tempfile.TemporaryDirectory(prefix="mlpipe-serve-") as tmp:
            raw = Path(tmp) / "upload"
            raw.write_bytes(data)
            return self._segment_file(raw, len(data), name, request_id)

    def _too_large(self, name: str) -> str:
        return (
            f"{name} is larger than this server's limit of {size_text(self.max_bytes)}. "
            "Crop or downsample the volume, or ask the operator to raise --max-bytes."
        )

    def _segment_file(self, raw: Path, size: int, name: str, request_id: str) -> Segmentation:
        if size == 0:
            raise InputRejected(400, f"{name} is empty (0 bytes); upload a .nii or .nii.gz file.")
        path = raw.with_name("input" + _sniff_nifti(raw, name))
        raw.rename(path)
        header = _read_upload_header(path, name)
        if header.ndim != 3:
            raise InputRejected(
                422,
                f"{name} has shape {tuple(header.shape)}: expected one 3D volume (x, y, z). "
                "A 4D series or a multi-channel volume is not supported; send each 3D volume "
                "on its own"
                + (" (drop the trailing axis of size 1)." if header.shape[3:] == (1,) else "."),
            )
        self._admit()
        try:
            with self._slots:
                return self._profile_and_predict(path, header, name, request_id)
        finally:
            with self._in_flight_lock:
                self._in_flight -= 1

    def _admit(self) -> None:
        """Count the request in, or refuse it when ``max_queue`` already wait."""
        with self._in_flight_lock:
            if self._in_flight >= self.concurrency + self.max_queue:
                raise ServerBusy(
                    f"The server is busy ({self._in_flight} requests in progress or waiting); "
                    "retry in a few seconds."
                )
            self._in_flight += 1

    def _profile_and_predict(
        self, path: Path, header: Any, name: str, request_id: str
    ) -> Segmentation:
        try:
            entry = profile_volume(path)
        except DatasetError as exc:
            raise InputRejected(400, _scrub(str(exc), path, name)) from None
        entry["image"] = name
        problems = (
            self.limits.problems(header.spacing, header.spatial_shape, header.orientation)
            if self.limits
            else []
        )
        if problems:
            self._record(entry, request_id, "refused")
            raise InputRejected(
                422,
                f"{name}: {'; '.join(problems)}. The model was not trained on volumes like "
                "this; resample the volume to a spacing and size near the training data.",
            )
        out = self._predict(path, name)
        self._record(entry, request_id, "served")
        return out

    def _predict(self, path: Path, name: str) -> Segmentation:
        import base64

        import pandas as pd
        from mlflow.exceptions import MlflowException

        started = time.perf_counter()
        try:
            frame = self.model.predict(pd.DataFrame({"path": [str(path)]}))
        except MlflowException as exc:
            if getattr(exc, "error_code", "") == "INVALID_PARAMETER_VALUE":
                raise InputRejected(422, _scrub(exc.message, path, name)) from None
            raise
        row = frame.iloc[0]
        volumes = {
            column.removeprefix("volume_ml_"): round(float(row[column]), 4)
            for column in frame.columns
            if column.startswith("volume_ml_")
        }
        shape = [int(n) for n in str(row["shape"]).split("x")]
        logger.debug("segmented %s in %.2f s", name, time.perf_counter() - started)
        return Segmentation(
            mask=base64.b64decode(row["mask"]), class_volumes_ml=volumes, shape=shape, name=name
        )

    def _record(self, entry: dict, request_id: str, outcome: str) -> None:
        if self.profiles is None:
            return
        entry = {
            **entry,
            "received": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "model_version": self.source.version,
            "request_id": request_id,
            "outcome": outcome,
        }
        self.profiles.append(entry)


def _sniff_nifti(path: Path, name: str) -> str:
    """``.nii.gz`` or ``.nii`` from the file's own bytes (gzip magic, NIfTI magic).

    Raises:
        InputRejected: 415 for anything that is not a single-file NIfTI volume.
    """
    with open(path, "rb") as handle:
        gz = handle.read(2) == _GZIP_MAGIC
    try:
        with (gzip.open if gz else open)(path, "rb") as handle:
            head = handle.read(540)
    except (OSError, EOFError, zlib.error):
        raise InputRejected(
            415, f"{name} is gzip data that does not decompress; expected a .nii.gz volume."
        ) from None
    if head[4:8] == _NIFTI2_SINGLE or head[344:348] == _NIFTI1_SINGLE:
        return ".nii.gz" if gz else ".nii"
    if head[4:8] == _NIFTI2_PAIR or head[344:348] == _NIFTI1_PAIR:
        raise InputRejected(
            415,
            f"{name} is the header of a .hdr/.img pair; upload a single-file .nii or .nii.gz "
            "(e.g. nibabel: nib.save(nib.load('x.hdr'), 'x.nii.gz')).",
        )
    kind = "gzip data that is not NIfTI" if gz else "not a NIfTI volume"
    raise InputRejected(
        415,
        f"{name} is {kind} (no NIfTI-1/NIfTI-2 header). Upload a 3D .nii or .nii.gz volume; "
        "convert DICOM series first (e.g. dcm2niix).",
    )


def _read_upload_header(path: Path, name: str) -> Any:
    try:
        return read_header(path)
    except DatasetError as exc:
        raise InputRejected(400, _scrub(str(exc), path, name)) from None


def _scrub(message: str, path: Path, name: str) -> str:
    """A message for the client: the temporary path replaced by the upload's name."""
    message = message.replace(str(path), name).replace(str(path.parent), "")
    message = re.sub(r"^row 0, column '\w+': ", "", message)
    return message.replace(tempfile.gettempdir(), "")


def _safe_name(text: str | None, default: str = "upload.nii.gz") -> str:
    """A file name safe for logs, headers and folder names: base name, ASCII, 120 chars."""
    if not text:
        return default
    base = re.split(r"[\\/]", str(text))[-1]
    cleaned = _SAFE_NAME_RE.sub("_", base).strip("._") or default
    return cleaned[:120]


def size_text(n: int) -> str:
    """``536870912`` -> ``512 MiB (536870912 bytes)``."""
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:g} {unit} ({n} bytes)"
    return f"{n} bytes"


def safe_upload_name(text: str | None) -> str:
    """The name an upload is reported and recorded under (public for the HTTP layer)."""
    return _safe_name(text)


def mask_file_name(upload_name: str) -> str:
    """``ct_001.nii.gz`` -> ``ct_001_mask.nii.gz``."""
    stem = upload_name
    for suffix in (".nii.gz", ".nii", ".gz"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return f"{stem or 'volume'}_mask.nii.gz"


# --- the server -------------------------------------------------------------------------------


@dataclass
class ServeState:
    """Everything the HTTP layer needs: the loaded model and the checked options."""

    options: ServeOptions
    source: ModelSource
    segmenter: Segmenter
    token: str | None
    device: str
    profile_file: Path
    started: float = field(default_factory=time.time)
    _folder: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    def describe(self) -> dict:
        """What ``GET /model`` answers: the model, its data and preprocessing, the limits."""
        tags = self.source.tags
        limits = self.segmenter.limits
        return {
            "name": self.source.name,
            "version": self.source.version,
            "alias": self.source.alias,
            "aliases": list(self.source.aliases),
            "model_uri": self.source.uri,
            "run_id": self.source.run_id,
            "dataset": {
                "name": tags.get("mlpipe.dataset.name"),
                "version": tags.get("mlpipe.dataset.version"),
                "digest": tags.get("mlpipe.dataset.digest"),
            },
            "preprocessing_digest": tags.get("mlpipe.preprocessing.digest"),
            "git_commit": tags.get("mlpipe.git.commit"),
            "device": self.device,
            "training_geometry": limits.describe() if limits else None,
            "max_bytes": self.options.max_bytes,
            "mlpipe_version": __version__,
        }

    def close(self) -> None:
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None


def prepare(
    options: ServeOptions, *, env: Mapping[str, str] | None = None, echo: Echo | None = None
) -> ServeState:
    """Check the options, resolve and load the model: everything before the first request.

    Raises:
        UsageError: a bad option, an unset token variable, a URI that does not resolve or a
            model that does not load; NotFoundError, TrackingUnavailableError.
    """
    from mlpipe.registry import connect

    echo = echo or (lambda _msg: None)
    options.check()
    token = token_from_env(options.token_env, env)
    tracking = connect(options.tracking_uri)
    source = resolve_model(tracking, options.model_uri)
    echo(f"Loading {source.label} ({source.load_uri}) ...")
    folder = tempfile.TemporaryDirectory(prefix="mlpipe-serve-model-")
    try:
        model = load_pyfunc(source, tracking, Path(folder.name))
    except BaseException:
        folder.cleanup()
        raise
    limits = GeometryLimits.from_profile(source.training_profile, options.range_factor)
    if limits is None and options.range_factor:
        echo(
            f"Warning: run {source.run_id} logged no data profile ({PROFILE_ARTIFACT}); "
            "spacing and shape are not checked against the training data."
        )
    profile_file = (
        Path(options.profile_file).expanduser()
        if options.profile_file
        else profiles_path(source.profile_key, env)
    )
    segmenter = Segmenter(
        model=model,
        source=source,
        max_bytes=options.max_bytes,
        limits=limits,
        profiles=ProfileLog(profile_file, options.max_profiles),
        concurrency=options.concurrency,
        max_queue=options.max_queue,
    )
    return ServeState(
        options=options,
        source=source,
        segmenter=segmenter,
        token=token,
        device=model_device(model),
        profile_file=profile_file,
        _folder=folder,
    )


def model_device(model: Any) -> str:
    """``cuda`` or ``cpu``: where the seg3d pyfunc put its network (it picks CUDA if there)."""
    with contextlib.suppress(Exception):
        return str(model.unwrap_python_model().device)
    return "unknown"


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, bound before the model loads so a busy port fails at once.

    Uvicorn is handed this socket (``Server.run(sockets=...)``), so there is no window
    between checking the port and listening on it.

    Raises:
        UsageError: the address cannot be bound (in use, not an address of this host).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must say TCP: asyncio sets TCP_NODELAY only on sockets whose proto is
    # IPPROTO_TCP, and without it every keep-alive answer waits ~40 ms (Nagle's algorithm
    # against the client's delayed ACK).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        raise UsageError(
            f"Cannot listen on {host}:{port} ({reason}). Pick another port with --port, or "
            "stop what is using it."
        ) from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def run_server(state: ServeState, sock: socket.socket, *, log_level: str = "info") -> None:
    """Serve until Ctrl-C or SIGTERM (uvicorn's graceful shutdown), then clean up.

    Raises:
        KeyboardInterrupt: after Ctrl-C (the CLI exits 130); SystemExit(143) after SIGTERM.
    """
    import uvicorn

    from mlpipe.serve_app import create_app

    _configure_logging()
    config = uvicorn.Config(
        create_app(state),
        log_level=log_level,
        server_header=False,
        timeout_graceful_shutdown=10,
    )
    # Uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again under the
    # handler that was there before. SIGTERM's default would kill the process on the spot,
    # leaving the downloaded model behind; this handler turns it into an exit that runs the
    # clean-up below (SIGINT already becomes KeyboardInterrupt: exit 130).
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        sock.close()
        state.close()


def _exit_on_sigterm(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def _configure_logging() -> None:
    """``mlpipe.serve`` messages on stderr next to uvicorn's, unless logging is set up."""
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


__all__ = [
    "GeometryLimits",
    "InputRejected",
    "ModelSource",
    "ProfileLog",
    "Segmentation",
    "Segmenter",
    "ServeOptions",
    "ServeState",
    "ServerBusy",
    "bind",
    "mask_file_name",
    "parse_size",
    "prepare",
    "profiles_path",
    "resolve_model",
    "run_server",
    "safe_upload_name",
    "token_from_env",
]
