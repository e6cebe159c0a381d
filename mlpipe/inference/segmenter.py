"""One input volume in, its mask out: cheap checks first (empty, not NIfTI, not 3D), then the
profile of the volume (``mlpipe.data.profile.profile_volume``, the code ``mlpipe drift`` uses),
the geometry check against the training profile, and the pyfunc's ``predict``.

Input problems raise :class:`InputRejected` with an HTTP status and a message that names the
input by the name its sender gave, never by a server path.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from mlpipe.core.errors import DatasetError
from mlpipe.data.profile import profile_volume
from mlpipe.inference.geometry import GeometryLimits
from mlpipe.inference.inputs import (
    DEFAULT_MAX_BYTES,
    InputRejected,
    read_upload_header,
    scrub_path,
    size_text,
    sniff_nifti,
)
from mlpipe.inference.models import ModelSource
from mlpipe.inference.profile_log import ProfileLog

if TYPE_CHECKING:
    pass

logger = logging.getLogger("mlpipe.serve")


DEFAULT_MAX_QUEUE = 32


class ServerBusy(Exception):
    """More requests wait for inference than ``--max-queue`` allows (HTTP 503)."""


@dataclass(frozen=True)
class Segmentation:
    """One served request's result."""

    mask: bytes
    """The mask as ``.nii.gz`` bytes: uint8, the input's shape and affine."""
    class_volumes_ml: dict[str, float]
    shape: list[int]
    name: str


@dataclass(frozen=True)
class CheckedVolume:
    """A volume that passed the checks: its header and profile, ready for the model."""

    path: Path
    name: str
    header: Any
    profile: dict


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
        path = raw.with_name("input" + sniff_nifti(raw, name))
        raw.rename(path)
        return self.segment_path(path, name, request_id)

    def segment_path(self, path: Path, name: str, request_id: str) -> Segmentation:
        """Segment a volume file where it lies (its name must end in .nii or .nii.gz).

        The path every input takes: an upload once it is on disk, or a file of a batch.
        The header checks run before the wait for a slot; profiling and inference inside.
        """
        header = self.read_header(path, name)
        self._admit()
        try:
            with self._slots:
                return self.predict(self.check(path, name, request_id, header=header), request_id)
        finally:
            with self._in_flight_lock:
                self._in_flight -= 1

    def read_header(self, path: Path, name: str) -> Any:
        """The volume's header, refused (422) unless it is one 3D volume; voxels stay on disk.

        Raises:
            InputRejected: 400 for an unreadable header, 422 for a 4D or 2D volume.
        """
        header = read_upload_header(path, name)
        if header.ndim != 3:
            raise InputRejected(
                422,
                f"{name} has shape {tuple(header.shape)}: expected one 3D volume (x, y, z). "
                "A 4D series or a multi-channel volume is not supported; send each 3D volume "
                "on its own"
                + (" (drop the trailing axis of size 1)." if header.shape[3:] == (1,) else "."),
            )
        return header

    def check(
        self, path: Path, name: str, request_id: str, *, header: Any | None = None
    ) -> CheckedVolume:
        """Profile the volume (reads its voxels) and check its geometry against training.

        Separate from :meth:`predict` so a batch can check the next volume while the model
        segments the current one. A refused volume's profile is recorded as ``refused``.

        Raises:
            InputRejected: 400 for voxel data that does not read, 422 for a spacing or shape
                far outside the training data.
        """
        header = header if header is not None else self.read_header(path, name)
        try:
            entry = profile_volume(path)
        except DatasetError as exc:
            raise InputRejected(400, scrub_path(str(exc), path, name)) from None
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
        return CheckedVolume(path=path, name=name, header=header, profile=entry)

    def predict(self, checked: CheckedVolume, request_id: str) -> Segmentation:
        """Segment a checked volume with the loaded pyfunc and record its profile as served."""
        out = self._predict(checked.path, checked.name)
        self._record(dict(checked.profile), request_id, "served")
        return out

    def _admit(self) -> None:
        """Count the request in, or refuse it when ``max_queue`` already wait."""
        with self._in_flight_lock:
            if self._in_flight >= self.concurrency + self.max_queue:
                raise ServerBusy(
                    f"The server is busy ({self._in_flight} requests in progress or waiting); "
                    "retry in a few seconds."
                )
            self._in_flight += 1

    def _predict(self, path: Path, name: str) -> Segmentation:
        import base64

        import pandas as pd
        from mlflow.exceptions import MlflowException

        started = time.perf_counter()
        try:
            frame = self.model.predict(pd.DataFrame({"path": [str(path)]}))
        except MlflowException as exc:
            if getattr(exc, "error_code", "") == "INVALID_PARAMETER_VALUE":
                raise InputRejected(422, scrub_path(exc.message, path, name)) from None
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
