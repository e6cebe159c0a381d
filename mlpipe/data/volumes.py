"""Read NIfTI volumes (``.nii``, ``.nii.gz``) with errors that name the file and the fix.

nibabel reports a truncated download as ``EOFError: Compressed file ended before the
end-of-stream marker was reached`` and a file that is not NIfTI as ``Cannot work out file type
of "x.nii.gz"``, without saying which of a thousand files it was or what to do. Every failure
here is a ``DatasetError`` whose message holds the path, what is wrong and how to fix it.

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

VOLUME_SUFFIXES = (".nii", ".nii.gz")
"""File names that count as volumes (compared case-insensitively)."""

_GZIP_MAGIC = b"\x1f\x8b"
_NIFTI1_MAGICS = (b"n+1\x00", b"ni1\x00")  # at byte 344 of a NIfTI-1 header
_NIFTI2_MAGIC_PREFIX = b"n+2\x00"  # at byte 4 of a NIfTI-2 header
_NIFTI1_HEADER_BYTES = 348
_NIFTI2_HEADER_BYTES = 540
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


def read_header(path: str | os.PathLike[str]) -> VolumeHeader:
    """Read a volume's header only: cheap even for a 1 GB CT, since voxels stay on disk.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.

    Returns:
        The header fields mlpipe uses (shape, spacing, orientation, dtype, affine).

    Raises:
        DatasetError: the file is missing, unreadable, empty, not NIfTI, or (``.nii``) shorter
            than its header says; the message names the file and the fix.
    """
    return _open(path)[1]


def load_volume(
    path: str | os.PathLike[str], *, dtype: DTypeLike | None = np.float32
) -> tuple[np.ndarray, VolumeHeader]:
    """Read a volume's voxels (scaled by the header's slope and intercept) and its header.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.
        dtype: the array's dtype; ``None`` keeps the scaled data's own dtype (useful for
            integer label maps).

    Returns:
        The voxel array, in the file's axis order (channels last for 4D), and the header.

    Raises:
        DatasetError: as ``read_header``, plus a ``.nii.gz`` whose compressed stream is cut
            short or corrupt.
    """
    image, header = _open(path)
    try:
        data = np.asanyarray(image.dataobj)
    except _READ_ERRORS as exc:
        raise _translate(header.path, exc) from exc
    if dtype is not None:
        data = data.astype(dtype, copy=False)
    return data, header


def _open(path: str | os.PathLike[str]) -> tuple[nib.Nifti1Image, VolumeHeader]:
    """The lazily loaded image (voxels not read) and its checked header."""
    name = os.fspath(path)
    size = _check_file(name)
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
