"""One input volume in, its mask out: cheap checks first (empty, not NIfTI or DICOM, not 3D,
declared size, geometry against the training profile: all from the header, before a voxel is
read), then the profile of the volume (``mlpipe.data.profile.profile_volume``, the code
``mlpipe drift`` uses) and the pyfunc's ``predict``.

A DICOM series arrives as a ``.zip`` (or one ``.dcm``): it is unpacked and checked by
``mlpipe.data.dicom`` (one series, slices in order along the normal, rescaled to HU), written
as a NIfTI on the series' own grid for the model, and the mask goes back as NIfTI or as a
DICOM SEG over the source slices (``output="dicom-seg"``). Nothing from the DICOM headers is
logged or recorded: the profile entry holds geometry and intensity statistics only.

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

import numpy as np

from mlpipe.core.errors import DatasetError
from mlpipe.data.profile import profile_volume
from mlpipe.data.volumes import declared_size
from mlpipe.inference.geometry import GeometryLimits
from mlpipe.inference.inputs import (
    DEFAULT_MAX_BYTES,
    InputRejected,
    read_upload_header,
    scrub_path,
    size_text,
    sniff_input,
)
from mlpipe.inference.models import ModelSource
from mlpipe.inference.profile_log import ProfileLog

if TYPE_CHECKING:
    pass

logger = logging.getLogger("mlpipe.serve")


DEFAULT_MAX_QUEUE = 32


DEFAULT_MAX_VOLUME_BYTES = 2 * 1024**3
"""The most voxel bytes an input may declare (a 512x512x1000 int16 CT is 0.5 GiB)."""


OUTPUTS = ("nifti", "dicom-seg")


class ServerBusy(Exception):
    """More requests wait for inference than ``--max-queue`` allows (HTTP 503)."""


def model_channels(model: Any) -> int:
    """Input channels a loaded pyfunc declares (``config.in_channels`` of seg3d's), else 1."""
    try:
        inner = model.unwrap_python_model()
    except Exception:  # not a Python-function model, or an MLflow without unwrap
        return 1
    config = getattr(inner, "config", None)
    channels = getattr(config, "in_channels", 1)
    return channels if isinstance(channels, int) and channels > 0 else 1


@dataclass(frozen=True)
class Segmentation:
    """One served request's result."""

    mask: bytes
    """The mask as ``.nii.gz`` bytes (uint8, the input's shape and affine), or a DICOM SEG's
    bytes when ``output`` is ``"dicom-seg"``."""
    class_volumes_ml: dict[str, float]
    shape: list[int]
    name: str
    output: str = "nifti"


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
    max_volume_bytes: int = DEFAULT_MAX_VOLUME_BYTES
    class_names: dict[str, str] | None = None
    _slots: threading.BoundedSemaphore = field(init=False, repr=False)
    _in_flight: int = field(default=0, init=False, repr=False)
    _in_flight_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        self._slots = threading.BoundedSemaphore(self.concurrency)

    def segment_stream(
        self, stream: IO[bytes], name: str, request_id: str, output: str = "nifti"
    ) -> Segmentation:
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
            return self._segment_file(raw, size, name, request_id, output)

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

    def _segment_file(
        self, raw: Path, size: int, name: str, request_id: str, output: str = "nifti"
    ) -> Segmentation:
        if size == 0:
            raise InputRejected(400, f"{name} is empty (0 bytes); upload a .nii or .nii.gz file.")
        kind = sniff_input(raw, name)
        if kind in (".zip", ".dcm"):
            return self._segment_series(raw, name, request_id, output)
        if output == "dicom-seg":
            raise InputRejected(
                400,
                f"{name} is NIfTI; format=dicom-seg needs a DICOM series to reference. Upload "
                "the series as a .zip, or ask for format=nifti.",
            )
        path = raw.with_name("input" + kind)
        raw.rename(path)
        return self.segment_path(path, name, request_id)

    def segment_path(self, path: Path, name: str, request_id: str) -> Segmentation:
        """Segment a NIfTI file where it lies (its name must end in .nii or .nii.gz).

        The path every input takes: an upload once it is on disk, or a file of a batch
        (``mlpipe predict``). The header checks run before the wait for a slot, so a file the
        header already refuses is answered at once; profiling and inference run inside.
        """
        header = self.read_header(path, name)
        self._check_geometry(header, name, request_id)
        self._admit()
        try:
            with self._slots:
                return self.predict(self.check(path, name, request_id, header=header), request_id)
        finally:
            with self._in_flight_lock:
                self._in_flight -= 1

    def read_header(self, path: Path, name: str) -> Any:
        """The volume's header, refused unless the model can take it; voxels stay on disk.

        Raises:
            InputRejected: 413 for a declared size over ``max_volume_bytes`` (decided from the
                first bytes, before the body is inflated), 400 for an unreadable header, 422
                for a shape the model does not take (4D, 2D, the wrong channel count).
        """
        declared = declared_size(path)
        if declared is not None and declared[3] > self.max_volume_bytes:
            raise InputRejected(413, self._too_many_voxels(name, declared[0], declared[1]))
        header = read_upload_header(path, name)
        channels = model_channels(self.model)
        if channels > 1:  # a multi-channel model (seg3d's plan from dataset.json) takes 4D
            if header.ndim != 4 or header.shape[3] != channels:
                raise InputRejected(
                    422,
                    f"{name} has shape {tuple(header.shape)}: this model takes 4D volumes "
                    f"with {channels} channels last (x, y, z, {channels}).",
                )
        elif header.ndim != 3:
            raise InputRejected(
                422,
                f"{name} has shape {tuple(header.shape)}: expected one 3D volume (x, y, z). "
                "A 4D series or a multi-channel volume is not supported; send each 3D volume "
                "on its own"
                + (" (drop the trailing axis of size 1)." if header.shape[3:] == (1,) else "."),
            )
        return header

    def check(
        self,
        path: Path,
        name: str,
        request_id: str,
        *,
        header: Any | None = None,
        extra: dict | None = None,
    ) -> CheckedVolume:
        """Check the geometry against training, then profile the volume (reads its voxels).

        Separate from :meth:`predict` so a batch can check the next volume while the model
        segments the current one. A volume refused from its header is recorded as
        ``refused`` with its geometry only.

        Raises:
            InputRejected: 422 for a spacing or shape far outside the training data, 400 for
                voxel data that does not read.
        """
        header = header if header is not None else self.read_header(path, name)
        self._check_geometry(header, name, request_id)
        try:
            entry = profile_volume(path)
        except DatasetError as exc:
            raise InputRejected(400, scrub_path(str(exc), path, name)) from None
        entry["image"] = name
        entry.update(extra or {})
        return CheckedVolume(path=path, name=name, header=header, profile=entry)

    def predict(self, checked: CheckedVolume, request_id: str) -> Segmentation:
        """Segment a checked volume with the loaded pyfunc and record its profile as served."""
        out = self._predict(checked.path, checked.name)
        self._record(dict(checked.profile), request_id, "served")
        return out

    def _segment_series(self, raw: Path, name: str, request_id: str, output: str) -> Segmentation:
        """A zipped DICOM series (or one slice): checked, read, segmented as NIfTI on its grid."""
        import nibabel as nib

        from mlpipe.data.dicom import load_series, open_series, source_datasets
        from mlpipe.data.volumes import series_header

        try:
            with open_series(raw, shown=name, max_unpacked=self.max_volume_bytes) as series:
                header = series_header(series)
                columns, rows, count = series.shape
                if columns * rows * count * 4 > self.max_volume_bytes:
                    raise InputRejected(413, self._too_many_voxels(name, series.shape, "float32"))
                self._check_geometry(header, name, request_id)
                self._admit()
                try:
                    with self._slots:
                        path = raw.with_name("series.nii")
                        nib.save(nib.Nifti1Image(load_series(series), series.affine), path)
                        extra = {"series": series_record(series)}
                        result = self.predict(
                            self.check(path, name, request_id, header=header, extra=extra),
                            request_id,
                        )
                        if output != "dicom-seg":
                            return result
                        return self._as_dicom_seg(result, series, source_datasets(series))
                finally:
                    with self._in_flight_lock:
                        self._in_flight -= 1
        except DatasetError as exc:
            raise InputRejected(422, scrub_path(str(exc), raw, name)) from None

    def _as_dicom_seg(self, result: Segmentation, series: Any, datasets: list) -> Segmentation:
        import gzip
        import io

        import nibabel as nib

        from mlpipe.inference.dicom_seg import class_names_for, mask_on_source, write_dicom_seg

        image = nib.Nifti1Image.from_bytes(gzip.decompress(result.mask))
        frames = mask_on_source(np.asarray(image.dataobj), image.affine, series.affine)
        classes = [int(c) for c in result.class_volumes_ml]
        names = class_names_for(sorted({*classes, *np.unique(frames).tolist()}), self.class_names)
        seg = write_dicom_seg(
            frames,
            datasets,
            names,
            algorithm=self.source.name or "mlpipe model",
            algorithm_version=str(self.source.version or ""),
        )
        buffer = io.BytesIO()
        seg.save_as(buffer)
        return Segmentation(
            mask=buffer.getvalue(),
            class_volumes_ml=result.class_volumes_ml,
            shape=result.shape,
            name=result.name,
            output="dicom-seg",
        )

    def _too_many_voxels(self, name: str, shape: Any, dtype: str) -> str:
        return (
            f"{name} declares a {'x'.join(map(str, shape))} {dtype} volume, more than this "
            f"server's limit of {size_text(self.max_volume_bytes)} of voxels; refused from its "
            "header without reading the body. Crop or downsample it."
        )

    def _check_geometry(self, header: Any, name: str, request_id: str) -> None:
        """Spacing and shape against the training profile, from the header alone."""
        problems = (
            self.limits.problems(header.spacing, header.spatial_shape, header.orientation)
            if self.limits
            else []
        )
        if not problems:
            return
        entry = {
            "image": name,
            "shape": list(header.spatial_shape),
            "spacing": [round(float(s), 6) for s in header.spacing],
            "orientation": header.orientation,
            "dtype": header.dtype,
            "profiled": False,  # refused from the header: its voxels were never read
        }
        self._record(entry, request_id, "refused")
        raise InputRejected(
            422,
            f"{name}: {'; '.join(problems)}. The model was not trained on volumes like "
            "this; resample the volume to a spacing and size near the training data.",
        )

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


def series_record(series: Any) -> dict:
    """How a served series is named in the profile record: a salted hash of its
    SeriesInstanceUID and one hash over its files' hashes; never a header attribute."""
    import hashlib

    from mlpipe.data.dicom import series_file_digest, series_key

    hashes = []
    for file in series.files:
        digest = hashlib.sha256()
        with open(file, "rb") as stream:
            while chunk := stream.read(1 << 20):
                digest.update(chunk)
        hashes.append(digest.hexdigest())
    return {
        "key": series_key(series.series_uid),
        "slices": len(series.files),
        "files_sha256": series_file_digest(hashes),
    }
