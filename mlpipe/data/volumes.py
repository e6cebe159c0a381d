"""Read volumes (NIfTI ``.nii``/``.nii.gz``, and DICOM series through ``mlpipe.data.dicom``)
with errors that name the file and the fix, defensively.

nibabel reports a truncated download as ``EOFError: Compressed file ended before the
end-of-stream marker was reached`` and a file that is not NIfTI as ``Cannot work out file type
of "x.nii.gz"``, without saying which of a thousand files it was or what to do. Every failure
here is a ``DatasetError`` whose message holds the path, what is wrong and how to fix it.

Defensive: a NIfTI header is read first, gunzipping only its first 540 bytes, and decides
before the body is touched: a declared size above ``MAX_VOLUME_BYTES`` (or the caller's
``max_bytes``) is refused in microseconds whatever the body; a ``.nii.gz`` body is inflated at
most to the declared size, and one that holds more is refused rather than decompressed on.

A DICOM series folder, a ``.zip`` of one or a ``.dcm`` file is read by ``mlpipe.data.dicom``
into the same ``VolumeHeader`` and array (RAS affine, NIfTI axis order), so everything that
takes a volume (datasets, profiles, drift, serve) takes a series.

Pure library code: no mlflow, no printing.
"""

from __future__ import annotations

import errno
import gzip
import os
import stat
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from mlpipe.core.errors import DatasetError

if TYPE_CHECKING:
    from numpy.typing import DTypeLike

    from mlpipe.data.dicom import DicomSeries

VOLUME_SUFFIXES = (".nii", ".nii.gz")
"""File names that count as volumes (compared case-insensitively)."""

_GZIP_MAGIC = b"\x1f\x8b"
_NIFTI1_MAGICS = (b"n+1\x00", b"ni1\x00")  # at byte 344 of a NIfTI-1 header
_NIFTI2_MAGIC_PREFIX = b"n+2\x00"  # at byte 4 of a NIfTI-2 header
_NIFTI1_HEADER_BYTES = 348
_NIFTI2_HEADER_BYTES = 540
MAX_VOLUME_BYTES = 16 * 1024**3
"""Absolute limit on the voxel bytes a header may declare (a 2048^3 float32 volume is 32 GiB)."""
_MAX_VOX_OFFSET = 64 * 1024**2  # header extensions beyond this are not a medical volume
_INFLATE_CHUNK = 1 << 20  # compressed bytes per read: small, so unconsumed tails stay small
_INFLATE_OUT = 1 << 26  # most bytes one decompress call may produce
_RECOPY = "Copy or export it again from its source (check the download finished)."
_READ_ERRORS = (ImageFileError, HeaderDataError, OSError, EOFError, zlib.error, ValueError)
"""What nibabel, gzip and zlib raise for a bad file; anything else is a bug and stays one."""


@dataclass(frozen=True)
class VolumeHeader:
    """What a NIfTI header says about a volume, read without loading the voxels.

    Attributes:
        path: the file, as given.
        shape: the full data shape, e.g. ``(240, 240, 155, 4)`` for a 4-channel MRI.
        spatial_shape: the first three dimensions (fewer when the volume has fewer).
        spacing: voxel size along the three spatial axes, from the header's zooms (mm).
        dtype: the stored data type name, e.g. ``"int16"``.
        orientation: axis codes from the affine, e.g. ``"RAS"`` or ``"LPS"``; ``?`` for an
            axis the affine does not determine.
        affine: the 4x4 voxel-to-world matrix, as a tuple of row tuples (hashable).
        ndim: number of data dimensions.
        data_end: bytes the uncompressed file must hold (header, extensions and voxels); a
            shorter file is truncated. For ``.nii`` this is checked here; for ``.nii.gz`` the
            caller compares it with the decompressed length (``mlpipe.data.dataset`` does).
    """

    path: str
    shape: tuple[int, ...]
    spatial_shape: tuple[int, ...]
    spacing: tuple[float, float, float]
    dtype: str
    orientation: str
    affine: tuple[tuple[float, ...], ...]
    ndim: int
    data_end: int


def is_volume(path: str | os.PathLike[str]) -> bool:
    """Whether a file name is a NIfTI volume (``.nii`` or ``.nii.gz``, any case)."""
    return os.fspath(path).lower().endswith(VOLUME_SUFFIXES)


def is_series(path: str | os.PathLike[str]) -> bool:
    """Whether a path is a DICOM series: a folder of DICOM files, a ``.zip`` or a ``.dcm``."""
    from mlpipe.data.dicom import is_dicom_source

    return not is_volume(path) and is_dicom_source(path)


def read_header(path: str | os.PathLike[str], *, max_bytes: int | None = None) -> VolumeHeader:
    """Read a volume's header only: cheap even for a 1 GB CT, since voxels stay on disk.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file, or a DICOM series (folder, ``.zip``, ``.dcm``).
        max_bytes: refuse a volume whose header declares more voxel bytes than this
            [default: ``MAX_VOLUME_BYTES``]; decided from the first 540 bytes alone.

    Returns:
        The header fields mlpipe uses (shape, spacing, orientation, dtype, affine).

    Raises:
        DatasetError: the file is missing, unreadable, empty, not NIfTI, or (``.nii``) shorter
            than its header says, or declaring more than ``max_bytes``; a series refused by
            ``mlpipe.data.dicom`` (several series, missing slices...). The message names the
            file and the fix.
    """
    if is_series(path):
        from mlpipe.data.dicom import open_series

        with open_series(path) as series:
            return series_header(series)
    return _open(path, max_bytes)[1]


def load_volume(
    path: str | os.PathLike[str],
    *,
    dtype: DTypeLike | None = np.float32,
    max_bytes: int | None = None,
) -> tuple[np.ndarray, VolumeHeader]:
    """Read a volume's voxels (scaled by the header's slope and intercept) and its header.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.
        dtype: the array's dtype; ``None`` keeps the scaled data's own dtype (useful for
            integer label maps).
        max_bytes: as for ``read_header``.

    Returns:
        The voxel array, in the file's axis order (channels last for 4D), and the header.

    Raises:
        DatasetError: as ``read_header``, plus a ``.nii.gz`` whose compressed stream is cut
            short or corrupt.
    """
    if is_series(path):
        from mlpipe.data.dicom import load_series, open_series

        with open_series(path) as series:
            return load_series(series, dtype=dtype), series_header(series)
    image, header = _open(path, max_bytes)
    try:
        if header.path.lower().endswith(".gz"):
            data = _scaled(image, _inflate_bounded(header))
        else:
            data = np.asanyarray(image.dataobj)
    except _READ_ERRORS as exc:
        raise _translate(header.path, exc) from exc
    if dtype is not None:
        data = data.astype(dtype, copy=False)
    return data, header


def _open(
    path: str | os.PathLike[str], max_bytes: int | None = None
) -> tuple[nib.Nifti1Image, VolumeHeader]:
    """The lazily loaded image (voxels not read) and its checked header."""
    name = os.fspath(path)
    size = _check_file(name)
    _check_declared(name, max_bytes)
    try:
        image = nib.load(name)
    except _READ_ERRORS as exc:
        raise _translate(name, exc) from exc
    if not isinstance(image, nib.Nifti1Image):  # Nifti2Image is a subclass
        raise DatasetError(
            f"{name} is not a NIfTI volume (nibabel read it as {type(image).__name__}). "
            "Convert it to .nii.gz, e.g. with SimpleITK or nibabel."
        )
    header = _header_of(name, image)
    if not name.lower().endswith(".gz") and size < header.data_end:
        raise DatasetError(
            f"{name} is truncated: its header promises {header.data_end} bytes but the file "
            f"holds {size}. {_RECOPY}"
        )
    return image, header


def declared_size(path: str | os.PathLike[str]) -> tuple[tuple[int, ...], str, int, int] | None:
    """Shape, dtype, voxel offset and voxel bytes a NIfTI header declares, from its first 540
    bytes only.

    For a ``.nii.gz`` only those bytes are inflated, so this costs microseconds whatever the
    body. ``None`` when the bytes are not a NIfTI-1/NIfTI-2 header (``nib.load`` then says why).
    """
    name = os.fspath(path)
    try:
        with open(name, "rb") as raw:
            head = raw.read(_NIFTI2_HEADER_BYTES + 64)
            if head[:2] == _GZIP_MAGIC:
                raw.seek(0)
                inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
                head, chunk = b"", raw.read(4096)
                while chunk and len(head) < _NIFTI2_HEADER_BYTES:
                    head += inflater.decompress(chunk, _NIFTI2_HEADER_BYTES - len(head))
                    chunk = inflater.unconsumed_tail or (b"" if inflater.eof else raw.read(4096))
    except (OSError, zlib.error):
        return None
    return _parse_header(head)


def _parse_header(head: bytes) -> tuple[tuple[int, ...], str, int] | None:
    for order in ("<", ">"):
        sizeof = int(np.frombuffer(head[:4], dtype=f"{order}i4")[0]) if len(head) >= 4 else 0
        if sizeof == _NIFTI1_HEADER_BYTES and len(head) >= 348 and head[344:348] in _NIFTI1_MAGICS:
            dims = np.frombuffer(head[40:56], dtype=f"{order}i2").astype(np.int64)
            code = int(np.frombuffer(head[70:72], dtype=f"{order}i2")[0])
            offset = float(np.frombuffer(head[108:112], dtype=f"{order}f4")[0])
        elif sizeof == _NIFTI2_HEADER_BYTES and len(head) >= 540:
            dims = np.frombuffer(head[16:80], dtype=f"{order}i8")
            code = int(np.frombuffer(head[12:14], dtype=f"{order}i2")[0])
            offset = float(np.frombuffer(head[168:176], dtype=f"{order}i8")[0])
        else:
            continue
        ndim = int(dims[0])
        if not 1 <= ndim <= 7 or (dims[1 : ndim + 1] < 0).any() or not np.isfinite(offset):
            return None
        shape = tuple(int(n) for n in dims[1 : ndim + 1])
        try:
            dtype = np.dtype(nib.nifti1.data_type_codes.dtype[code])
        except KeyError:
            return None
        voxels = 1
        for n in shape:
            voxels *= n  # Python ints: a hostile header cannot overflow this
        return shape, dtype.name, int(max(offset, 0)), voxels * dtype.itemsize
    return None


def _check_declared(name: str, max_bytes: int | None) -> None:
    """Refuse from the header alone a volume larger than the limit; before nibabel reads it."""
    declared = declared_size(name)
    if declared is None:
        return
    shape, dtype, offset, voxel_bytes = declared
    limit = MAX_VOLUME_BYTES if max_bytes is None else max_bytes
    if voxel_bytes > limit:
        raise DatasetError(
            f"{name} declares a {'x'.join(map(str, shape))} {dtype} volume: {voxel_bytes} bytes "
            f"of voxels, more than the limit of {limit} bytes. Crop or downsample it, or check "
            "that the file is what it claims to be."
        )
    if offset > _MAX_VOX_OFFSET:
        raise DatasetError(
            f"{name} declares its voxels start at byte {offset} (vox_offset): header extensions "
            f"of more than {_MAX_VOX_OFFSET} bytes are refused. Re-export the volume."
        )


def _inflate_bounded(header: VolumeHeader) -> memoryview:
    """The ``.nii.gz`` decompressed into one buffer of exactly its declared size, never further.

    nibabel would stop at the declared size too, but would accept a stream that holds more;
    here it is refused after at most one byte beyond the header's promise is inflated (a
    zip-bomb body is cut off at once). Several gzip members and zero padding are accepted, as
    Python's ``gzip`` accepts them. The buffer is allocated once from the declared size (which
    ``_check_declared`` bounded), and the voxels are a view of it: no copy beyond zlib's output.
    """
    name, limit = header.path, header.data_end
    out = bytearray(limit)
    view = memoryview(out)
    filled = 0
    inflater: zlib._Decompress | None = zlib.decompressobj(16 + zlib.MAX_WBITS)
    data = b""
    try:
        with open(name, "rb") as raw:
            while True:
                if not data:
                    data = raw.read(_INFLATE_CHUNK)
                    if not data:
                        break
                if inflater is None:  # between members: zero padding, or another member
                    data = data.lstrip(b"\0")
                    if not data:
                        continue
                    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
                chunk = inflater.decompress(data, min(limit + 1 - filled, _INFLATE_OUT))
                if filled + len(chunk) > limit:
                    raise DatasetError(
                        f"{name} inflates beyond the {limit} bytes its header declares; refused "
                        "(a .nii.gz holds exactly its header and voxels). Re-export it."
                    )
                view[filled : filled + len(chunk)] = chunk
                filled += len(chunk)
                if inflater.eof:
                    data, inflater = inflater.unused_data, None
                else:
                    data = inflater.unconsumed_tail
    except zlib.error as exc:
        raise _translate(name, exc) from exc
    if inflater is not None or filled < limit:
        raise DatasetError(
            f"{name} is truncated or corrupt: its header promises {limit} bytes of NIfTI data but "
            f"the gzip stream ends after {filled}. {_RECOPY}"
        )
    return view


def _scaled(image: nib.Nifti1Image, raw: memoryview) -> np.ndarray:
    """The voxels of ``raw`` (the whole uncompressed file) as nibabel's proxy would give them:
    the header's dtype and shape (Fortran order), its slope and intercept applied."""
    proxy = image.dataobj
    shape = tuple(proxy.shape)
    dtype = np.dtype(proxy.dtype)
    count = int(np.prod(shape, dtype=np.int64))
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=int(proxy.offset))
    data = data.reshape(shape, order="F")
    slope, inter = float(proxy.slope), float(proxy.inter)
    if (slope, inter) == (1.0, 0.0) or not (np.isfinite(slope) and np.isfinite(inter)):
        return data
    from nibabel.volumeutils import apply_read_scaling

    return apply_read_scaling(data, slope, inter)


def series_header(series: DicomSeries) -> VolumeHeader:
    """The ``VolumeHeader`` of a scanned DICOM series (no pixel read)."""
    affine = np.asarray(series.affine, dtype=float)
    codes = nib.aff2axcodes(affine)
    return VolumeHeader(
        path=series.source,
        shape=tuple(series.shape),
        spatial_shape=tuple(series.shape),
        spacing=series.spacing,
        dtype=series.dtype,
        orientation="".join(code or "?" for code in codes),
        affine=tuple(tuple(float(v) for v in row) for row in affine),
        ndim=3,
        data_end=0,
    )


def _check_file(name: str) -> int:
    """Size of an existing, non-empty regular file; otherwise a message saying which."""
    kind, info = file_kind(name)
    if kind == "missing":
        raise DatasetError(f"{name} does not exist. Check the path and the current folder.")
    if kind == "dir":
        raise DatasetError(f"{name} is a folder, not a NIfTI file.")
    if kind != "file":
        raise DatasetError(info)
    if info.st_size == 0:
        raise DatasetError(f"{name} is empty (0 bytes). {_RECOPY}")
    return info.st_size


_KINDS = (
    (stat.S_ISFIFO, "named pipe (FIFO)"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
)


def file_kind(path: str | os.PathLike[str]) -> tuple[str, os.stat_result | str]:
    """What a path is, found with ``lstat``/``stat`` only: nothing is ever opened.

    Opening a named pipe blocks until a writer appears (forever, in a dataset folder), and a
    device or socket is no volume: such entries are refused by name. Symbolic links are
    followed; the kernel's ``ELOOP`` detects a loop, and a dangling link is named as one.

    Returns:
        ``("file", stat)`` for a regular file (through links), ``("dir", stat)`` for a folder,
        ``("missing", message)`` when nothing is there, else ``("bad", message)`` where the
        message names the path, what it is and what to do.
    """
    name = os.fspath(path)
    try:
        info = os.lstat(name)
    except FileNotFoundError:
        return "missing", f"{name} does not exist. Check the path."
    except OSError as exc:
        return "bad", f"{name} cannot be read: {exc.strerror or exc}."
    if stat.S_ISLNK(info.st_mode):
        target = _link_target(name)
        try:
            info = os.stat(name)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return "bad", (
                    f"{name} is a symbolic link loop (-> {target}): following it never reaches "
                    "a file. Point the link at the volume, or remove it."
                )
            if isinstance(exc, FileNotFoundError):
                return "bad", (
                    f"{name} is a dangling symbolic link: its target {target} does not exist. "
                    "Restore the target (a moved or unmounted folder?) or remove the link."
                )
            return "bad", f"{name} cannot be read ({target}): {exc.strerror or exc}."
    if stat.S_ISREG(info.st_mode):
        return "file", info
    if stat.S_ISDIR(info.st_mode):
        return "dir", info
    what = next((label for test, label in _KINDS if test(info.st_mode)), "special file")
    return "bad", (
        f"{name} is a {what}, not a regular file; mlpipe does not open it (reading it could "
        "wait forever). Replace it with the volume file, or move it out of the dataset folder."
    )


def _link_target(name: str) -> str:
    try:
        return os.readlink(name)
    except OSError:
        return "?"


def _header_of(name: str, image: nib.Nifti1Image) -> VolumeHeader:
    hdr = image.header
    try:
        shape = tuple(int(n) for n in hdr.get_data_shape())
        zooms = [float(z) for z in hdr.get_zooms()[:3]]
        dtype = np.dtype(hdr.get_data_dtype())
        # nibabel zeroes the header's vox_offset after loading; the proxy keeps the real one.
        offset = int(getattr(image.dataobj, "offset", hdr.get_data_offset()))
        affine = np.asarray(image.affine, dtype=float)
        codes = nib.aff2axcodes(affine)
    except (HeaderDataError, ValueError, TypeError) as exc:
        raise DatasetError(
            f"{name} has a NIfTI header that cannot be interpreted ({exc}). {_RECOPY}"
        ) from exc
    zooms += [1.0] * (3 - len(zooms))
    return VolumeHeader(
        path=name,
        shape=shape,
        spatial_shape=shape[:3],
        spacing=(zooms[0], zooms[1], zooms[2]),
        dtype=dtype.name,
        orientation="".join(code or "?" for code in codes),
        affine=tuple(tuple(float(v) for v in row) for row in affine),
        ndim=len(shape),
        data_end=offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize,
    )


def _translate(name: str, exc: BaseException) -> DatasetError:
    """The message for a nibabel/gzip/zlib failure, diagnosed from the file's first bytes."""
    if isinstance(exc, FileNotFoundError):
        return DatasetError(f"{name} does not exist. Check the path and the current folder.")
    if isinstance(exc, (EOFError, zlib.error, gzip.BadGzipFile)) or "damaged" in str(exc):
        return DatasetError(
            f"{name} is truncated or corrupt: its data ends early or does not decompress "
            f"({exc}). {_RECOPY}"
        )
    if isinstance(exc, (ImageFileError, HeaderDataError)):
        return DatasetError(_diagnose(name) or f"{name} is not a NIfTI file ({exc}).")
    if isinstance(exc, OSError):
        return DatasetError(f"{name} cannot be read: {exc.strerror or exc}.")
    return DatasetError(f"{name} is truncated or corrupt ({exc}). {_RECOPY}")


def _diagnose(name: str) -> str | None:
    """Why nibabel refused a file: not gzip, cut inside the header, or not NIfTI at all.

    Runs only after a failure, so the common path opens each file once.
    """
    gz = name.lower().endswith(".gz")
    try:
        with open(name, "rb") as raw:
            magic = raw.read(2)
            raw.seek(0)
            if gz and magic != _GZIP_MAGIC:
                return (
                    f"{name} is not gzip-compressed although its name ends in .gz, so it is not "
                    "a .nii.gz volume. Rename it (.nii) if it is uncompressed NIfTI, or replace it."
                )
            stream = gzip.GzipFile(fileobj=raw) if gz else raw
            head = stream.read(_NIFTI2_HEADER_BYTES)
    except (OSError, EOFError, zlib.error):
        head = b""
        if gz:
            return f"{name} is a gzip stream cut short inside the NIfTI header. {_RECOPY}"
    if head[4:8] == _NIFTI2_MAGIC_PREFIX or head[344:348] in _NIFTI1_MAGICS:
        needed = _NIFTI2_HEADER_BYTES if head[4:8] == _NIFTI2_MAGIC_PREFIX else _NIFTI1_HEADER_BYTES
        if len(head) < needed:
            return f"{name} is truncated inside its NIfTI header. {_RECOPY}"
        return None  # a NIfTI header that nibabel still refused: keep nibabel's reason
    if len(head) < _NIFTI1_HEADER_BYTES:
        return (
            f"{name} is too short to be NIfTI ({len(head)} bytes of header; a NIfTI header is "
            f"{_NIFTI1_HEADER_BYTES}): truncated, or not a volume. {_RECOPY}"
        )
    return (
        f"{name} is not a NIfTI file (no NIfTI-1/NIfTI-2 magic in its header). Replace it with "
        "the .nii/.nii.gz volume, or move the file out of the dataset folder."
    )
