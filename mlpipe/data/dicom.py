"""Read a DICOM series (a folder, a ``.zip`` of one, or a single ``.dcm``) into a volume and
the affine nibabel would hold for the same data.

Why not MONAI's ``PydicomReader`` or ``ITKReader``: the first sorts slices by InstanceNumber and
takes the slice spacing from z alone, so an oblique or gapped series comes out wrong without a
word; the second reads the first series of a folder and warns. Here pydicom parses the files
(no parser of ours), and the geometry is checked before a pixel is decoded
(``mlpipe.data.dicom_checks``): one series, image objects only, a decodable transfer syntax,
slices sorted by their position along the slice normal (row x column direction), spacing from
those positions, orientation from ImageOrientationPatient, no missing or duplicated slice.

Axis order and affine follow NIfTI: ``data[i, j, k]`` is column ``i``, row ``j`` of the
``k``-th slice along the normal; the affine maps ``(i, j, k)`` to RAS millimetres (DICOM's
patient coordinates are LPS, so x and y change sign). A NIfTI whose third axis runs along the
normal (any right-handed affine: RAS, LPS, oblique) reads back equal, voxel for voxel.

Patient data: nothing here logs or returns a patient or study attribute; a series is named
outside this machine by ``series_key`` (a salted hash of its SeriesInstanceUID).

Pure library code: no mlflow, no printing.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import stat
import tempfile
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mlpipe.core.errors import DatasetError
from mlpipe.data.dicom_checks import (
    SliceInfo,
    check_decodable,
    check_geometry,
    one_series,
)

SALT_ENV = "MLPIPE_DICOM_SALT"
"""A team-wide salt for ``series_key`` (else a random one kept in the user's cache folder)."""

ZIP_MAX_MEMBERS = 5000
"""A zipped series holds at most this many files (a CT has a few hundred to a thousand)."""


@dataclass(frozen=True)
class DicomSeries:
    """A checked series: its files in slice order and its geometry; no pixels read yet.

    ``pixel_offsets`` (where each file's native pixel bytes start, as pydicom found them while
    reading the headers) lets ``load_series`` read the pixels straight into one array
    instead of parsing every file a second time; ``None`` for compressed or unusual data,
    which pydicom decodes slice by slice.

    Attributes:
        source: the folder, zip or file as given.
        files: the image files, sorted by position along the slice normal (lowest first).
        series_uid: the SeriesInstanceUID (local use only; outside, use ``series_key``).
        modality: e.g. ``"CT"``, ``"MR"``.
        shape: ``(columns, rows, slices)``, NIfTI's axis order.
        affine: the 4x4 voxel-to-RAS matrix.
        dtype: the stored pixel type (``int16``, ``uint16``, ...), before rescaling.
        transfer_syntax: the transfer syntax UID of the first file.
        rescale: ``(slope, intercept)`` per slice, in slice order.
    """

    source: str
    files: tuple[Path, ...]
    series_uid: str
    modality: str
    shape: tuple[int, int, int]
    affine: np.ndarray = field(repr=False)
    dtype: str
    transfer_syntax: str
    rescale: tuple[tuple[float, float], ...] = field(repr=False)
    pixel_offsets: tuple[int, ...] | None = field(default=None, repr=False)

    @property
    def spacing(self) -> tuple[float, float, float]:
        norms = np.linalg.norm(self.affine[:3, :3], axis=0)
        return (float(norms[0]), float(norms[1]), float(norms[2]))


def is_dicom_source(path: str | os.PathLike[str]) -> bool:
    """Whether a path is something this module reads: a ``.zip``, a ``.dcm`` file, or a folder
    whose first file (directly in it, not in a subfolder: a folder of series folders is not
    a series) is DICOM (``DICM`` at byte 128, or a ``.dcm`` name)."""
    p = Path(path)
    name = p.name.lower()
    if p.is_file():
        return name.endswith((".zip", ".dcm")) or _has_dicm(p)
    if not p.is_dir():
        return False
    try:
        entries = sorted(os.scandir(p), key=lambda e: e.name)
    except OSError:
        return False
    for entry in entries:
        if entry.name.startswith(".") or entry.name.upper() == "DICOMDIR" or not entry.is_file():
            continue
        return entry.name.lower().endswith(".dcm") or _has_dicm(Path(entry.path))
    return False


def scan_series(
    path: str | os.PathLike[str], *, series_uid: str | None = None, _shown: str | None = None
) -> DicomSeries:
    """Read the headers of a series and check it; no pixel data is decoded.

    Args:
        path: a series folder (searched recursively; hidden files, ``DICOMDIR`` and non-DICOM
            files are skipped) or one ``.dcm`` file. A ``.zip`` goes through ``open_series``.
        series_uid: pick this series when the folder holds several.

    Returns:
        The series: files in slice order, affine, shape.

    Raises:
        DatasetError: no DICOM files; non-image objects only; several series (their UIDs are
            listed); a transfer syntax no installed package decodes (named, with the package
            that would); inconsistent orientation, pixel spacing or size; missing or
            duplicated slices; positions not on one line.
    """
    shown = _shown or os.fspath(path)
    root = Path(path)
    if root.is_file():
        files = [root]
    elif root.is_dir():
        files = list(_candidate_files(root))
    else:
        raise DatasetError(f"{shown} does not exist. Give a DICOM series folder or a .zip of one.")
    slices, others = _read_headers(files, shown)
    if not slices:
        if others:
            kinds = ", ".join(sorted(others))
            raise DatasetError(
                f"{shown} holds no image slices, only non-image DICOM objects ({kinds}). Give "
                "the folder of the CT/MR image series itself."
            )
        raise DatasetError(
            f"{shown} holds no DICOM files (none starts with the DICM marker). Give a folder of "
            "one series' .dcm files, or a .zip of it."
        )
    slices = one_series(slices, shown, series_uid)
    check_decodable(slices, shown)
    ordered, affine = check_geometry(slices, shown)
    first = ordered[0]
    return DicomSeries(
        source=shown,
        files=tuple(s.path for s in ordered),
        series_uid=first.series_uid,
        modality=first.modality,
        shape=(first.columns, first.rows, len(ordered)),
        affine=affine,
        dtype=first.dtype,
        transfer_syntax=first.transfer_syntax,
        rescale=tuple((s.slope, s.intercept) for s in ordered),
        pixel_offsets=(
            tuple(s.pixel_offset for s in ordered)  # type: ignore[misc]
            if all(s.pixel_offset is not None for s in ordered)
            and len({s.dtype for s in ordered}) == 1
            else None
        ),
    )


def load_series(series: DicomSeries, *, dtype: np.dtype | type | None = np.float32) -> np.ndarray:
    """The voxels of a scanned series, rescaled (CT in HU), in NIfTI axis order.

    Args:
        series: from ``scan_series``.
        dtype: the array's dtype; ``None`` keeps float32 when a slice is rescaled, else the
            stored type.

    Raises:
        DatasetError: a file changed since the scan or its pixel data does not decode.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    columns, rows, count = series.shape
    rescaled = any(r != (1.0, 0.0) for r in series.rescale)
    kind = np.dtype(dtype if dtype is not None else np.float32 if rescaled else series.dtype)
    if series.pixel_offsets is not None:
        stored = _read_native(series)
        if not rescaled:
            stack = stored.astype(kind, copy=False)
        elif len(set(series.rescale)) == 1:  # one slope and intercept: one vectorised pass
            slope, intercept = series.rescale[0]
            if slope == 1.0:  # CT: HU = stored + intercept, one pass over the voxels
                stack = np.add(stored, np.float32(intercept), dtype=np.float32)
            else:
                stack = np.multiply(stored, np.float32(slope), dtype=np.float32)
                stack += np.float32(intercept)
            stack = stack.astype(kind, copy=False)
        else:
            stack = np.empty((count, rows, columns), dtype=kind)
            for k, (slope, intercept) in enumerate(series.rescale):
                np.multiply(stored[k], np.float32(slope), out=stack[k], casting="unsafe")
                stack[k] += np.asarray(intercept, dtype=kind)
        return stack.transpose(2, 1, 0)
    stack = np.empty((count, rows, columns), dtype=kind)
    for k, (path, (slope, intercept)) in enumerate(zip(series.files, series.rescale, strict=True)):
        try:
            ds = pydicom.dcmread(path)
            pixels = ds.pixel_array
        except (InvalidDicomError, OSError, ValueError, AttributeError, RuntimeError) as exc:
            raise DatasetError(
                f"{series.source}: slice {k + 1} ({path.name}) cannot be decoded ({exc}). "
                "Export the series again."
            ) from exc
        if pixels.shape != (rows, columns):
            raise DatasetError(
                f"{series.source}: slice {k + 1} ({path.name}) is {pixels.shape[1]}x"
                f"{pixels.shape[0]} pixels, not {columns}x{rows} like the others."
            )
        if "ModalityLUTSequence" in ds:
            from pydicom.pixels import apply_rescale

            stack[k] = apply_rescale(pixels, ds)
        elif slope != 1.0 or intercept != 0.0:
            np.multiply(pixels, np.float32(slope), out=stack[k], casting="unsafe")
            stack[k] += np.asarray(intercept, dtype=kind)
        else:
            stack[k] = pixels
    return stack.transpose(2, 1, 0)  # (slices, rows, columns) -> (columns, rows, slices)


@contextmanager
def open_series(
    path: str | os.PathLike[str],
    *,
    shown: str | None = None,
    max_unpacked: int | None = None,
    series_uid: str | None = None,
) -> Iterator[DicomSeries]:
    """``scan_series`` for a folder, a ``.dcm`` file or a ``.zip`` (unpacked into a temporary
    folder, removed on exit: read the pixels inside the ``with``).

    Args:
        path: the folder, file or zip.
        shown: the name used in messages (an upload's own name rather than a server path).
        max_unpacked: refuse a zip whose members add up to more bytes than this (declared and
            actual); default 8 GiB.
        series_uid: pick this series when there are several.

    Raises:
        DatasetError: as ``scan_series``, plus a zip that is corrupt, too large, or has
            members with absolute or ``..`` paths.
    """
    shown = shown or os.fspath(path)
    p = Path(path)
    if p.is_file() and _is_zip(p):
        folder = Path(tempfile.mkdtemp(prefix="mlpipe-dicom-"))
        try:
            _unzip(p, folder, shown, max_unpacked or 8 * 1024**3)
            yield scan_series(folder, series_uid=series_uid, _shown=shown)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    else:
        yield scan_series(p, series_uid=series_uid, _shown=shown)


def read_series(
    path: str | os.PathLike[str], *, dtype: np.dtype | type | None = np.float32
) -> tuple[np.ndarray, DicomSeries]:
    """Scan and load a series (folder, ``.dcm`` or ``.zip``) in one call."""
    with open_series(path) as series:
        return load_series(series, dtype=dtype), series


def _read_native(series: DicomSeries) -> np.ndarray:
    """Every slice's stored values, read from the offsets the header scan found."""
    columns, rows, count = series.shape
    stored = np.empty((count, rows, columns), dtype=np.dtype(series.dtype).newbyteorder("<"))
    offsets = series.pixel_offsets or ()
    for k, (path, offset) in enumerate(zip(series.files, offsets, strict=True)):
        target = memoryview(stored[k]).cast("B")
        try:
            with open(path, "rb") as stream:
                stream.seek(offset)
                got = stream.readinto(target)
        except OSError as exc:
            raise DatasetError(f"{series.source}: {path.name} cannot be read ({exc}).") from exc
        if got != target.nbytes:
            raise DatasetError(
                f"{series.source}: slice {k + 1} ({path.name}) is truncated ({got} of "
                f"{target.nbytes} pixel bytes). Export the series again."
            )
    return stored


def source_datasets(series: DicomSeries) -> list:
    """The series' datasets in slice order, without pixel data (what DICOM SEG references)."""
    import pydicom

    return [pydicom.dcmread(p, stop_before_pixels=True) for p in series.files]


def series_key(series_uid: str, salt: str | None = None) -> str:
    """The name a series has outside this machine: sha256 of salt + SeriesInstanceUID, 16 hex.

    A UID can be looked up in the PACS it came from, so it is never logged as is. The salt is
    ``$MLPIPE_DICOM_SALT`` when set (the same on every machine of a team, so keys compare),
    else a random salt kept in ``salt_path()``.
    """
    salt = salt if salt is not None else dicom_salt()
    return hashlib.sha256(f"{salt}\0{series_uid}".encode()).hexdigest()[:16]


def dicom_salt(env: Mapping[str, str] | None = None) -> str:
    """The salt ``series_key`` uses (see there); created on first use when none is set."""
    env = os.environ if env is None else env
    if env.get(SALT_ENV):
        return env[SALT_ENV]
    path = salt_path(env)
    try:
        return path.read_text(encoding="ascii").strip()
    except OSError:
        pass
    salt = secrets.token_hex(16)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as out:
            out.write(salt)
    except FileExistsError:
        return path.read_text(encoding="ascii").strip()
    except OSError:
        pass  # a read-only home: the key is still salted, only not stable across processes
    return salt


def salt_path(env: Mapping[str, str] | None = None) -> Path:
    """``dicom_salt`` beside the hash cache (``$MLPIPE_CACHE_DIR`` or ``~/.cache/mlpipe``)."""
    from mlpipe.data.hash_cache import default_cache_path

    return default_cache_path(env).parent / "dicom_salt"


def series_file_digest(file_hashes: Sequence[str]) -> str:
    """One sha256 over a series' file hashes, sorted: stable across copies and renames."""
    return hashlib.sha256("\n".join(sorted(file_hashes)).encode("ascii")).hexdigest()


def series_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The files of a series folder that count (not hidden, not ``DICOMDIR``), sorted."""
    return sorted(_candidate_files(Path(folder)))


def _candidate_files(root: Path) -> Iterator[Path]:
    for here, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or name.upper() == "DICOMDIR":
                continue
            path = Path(here) / name
            try:
                mode = os.stat(path).st_mode  # follows links; a link loop raises ELOOP
            except OSError as exc:
                raise DatasetError(
                    f"{path} cannot be read: {exc.strerror or exc}. Remove it from the series "
                    "folder, or restore what it points at."
                ) from None
            if not stat.S_ISREG(mode):
                # opening a named pipe would block forever: refuse it by name, unopened
                raise DatasetError(
                    f"{path} is not a regular file (a named pipe, socket or device); a series "
                    "folder holds only DICOM files. Remove it."
                )
            yield path


def _has_dicm(path: Path) -> bool:
    try:
        with open(path, "rb") as stream:
            stream.seek(128)
            return stream.read(4) == b"DICM"
    except OSError:
        return False


def _is_zip(path: Path) -> bool:
    try:
        with open(path, "rb") as stream:
            return stream.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def _read_headers(files: Sequence[Path], shown: str) -> tuple[list[SliceInfo], set[str]]:
    """Headers of the DICOM files (pixel data not read); non-image objects by SOP class name."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    slices: list[SliceInfo] = []
    others: set[str] = set()
    for path in files:
        # A file without the DICM preamble is read only when named .dcm (old exports).
        force = path.name.lower().endswith(".dcm")
        try:
            ds = pydicom.dcmread(path, defer_size=256, force=force)
            if "SOPClassUID" not in ds:
                raise InvalidDicomError("no SOP class")
        except (InvalidDicomError, OSError, EOFError, ValueError):
            continue  # not DICOM (a README, Thumbs.db): not part of the series
        except (TypeError, AttributeError, KeyError) as exc:
            raise DatasetError(
                f"{shown}: {path.name} is a damaged DICOM file ({type(exc).__name__}). "
                "Export the series again."
            ) from exc
        if "PixelData" not in ds or "ImagePositionPatient" not in ds:
            sop = ds.get("SOPClassUID")
            others.add(getattr(sop, "name", None) or str(sop or "unknown SOP class"))
            continue
        slices.append(SliceInfo.from_dataset(path, ds, shown))
    return slices, others


def _unzip(archive: Path, folder: Path, shown: str, limit: int) -> None:
    """Unpack a zip safely: bounded member count and bytes, no path leaves ``folder``."""
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.infolist() if not m.is_dir()]
            if len(members) > ZIP_MAX_MEMBERS:
                raise DatasetError(
                    f"{shown} holds {len(members)} files; a series zip may hold at most "
                    f"{ZIP_MAX_MEMBERS}. Zip one series."
                )
            declared = sum(m.file_size for m in members)
            if declared > limit:
                raise DatasetError(
                    f"{shown} unpacks to {declared} bytes, more than the limit of {limit}."
                )
            written = 0
            for number, member in enumerate(members):
                name = member.filename.replace("\\", "/")
                if name.startswith("/") or ".." in name.split("/"):
                    raise DatasetError(
                        f"{shown} has a member with an unsafe path ({name!r}); zip the series "
                        "folder with relative paths."
                    )
                if any(part.startswith(".") for part in name.split("/")):
                    continue  # __MACOSX/._x, .DS_Store
                if name.startswith("__MACOSX/"):
                    continue
                target = folder / f"{number:05d}.dcm"
                with zf.open(member) as source, open(target, "wb") as out:
                    while chunk := source.read(1 << 20):
                        written += len(chunk)
                        if written > limit or written > declared:
                            raise DatasetError(
                                f"{shown} unpacks to more bytes than its directory declares; "
                                "refused as a possible zip bomb."
                            )
                        out.write(chunk)
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        OSError,
        EOFError,
        NotImplementedError,
    ) as exc:
        raise DatasetError(f"{shown} is not a readable zip ({exc}). Zip the series again.") from exc
