"""Checking an input file before it is read as a volume: its size, that it is NIfTI at all, and
names that are safe to echo and to write under.
"""

from __future__ import annotations

import gzip
import re
import tempfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlpipe.core.errors import DatasetError, UsageError
from mlpipe.data.volumes import read_header


class InputRejected(Exception):
    """An upload the service refuses: the HTTP status and a message for the client.

    The message names the upload by the name the client gave it, never by a server path.
    """

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


if TYPE_CHECKING:
    pass


DEFAULT_MAX_BYTES = 512 * 1024**2


_GZIP_MAGIC = b"\x1f\x8b"


_NIFTI1_SINGLE = b"n+1\x00"


_NIFTI1_PAIR = b"ni1\x00"


_NIFTI2_SINGLE = b"n+2\x00"


_NIFTI2_PAIR = b"ni2\x00"


_ZIP_MAGIC = b"PK\x03\x04"


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


_SAFE_NAME_RE = re.compile(r"[^A-Za-z0-9._-]+")


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


def sniff_input(path: Path, name: str) -> str:
    """``.zip`` or ``.dcm`` (a DICOM series or slice), else ``sniff_nifti``'s answer.

    Raises:
        InputRejected: 415 for anything that is neither NIfTI nor DICOM.
    """
    with open(path, "rb") as handle:
        head = handle.read(132)
    if head[:4] == _ZIP_MAGIC:
        return ".zip"
    if head[128:132] == b"DICM":
        return ".dcm"
    return sniff_nifti(path, name)


def sniff_nifti(path: Path, name: str) -> str:
    """``.nii.gz`` or ``.nii`` from the file's own bytes (gzip magic, NIfTI magic).

    Only the first 540 bytes are inflated, whatever the body holds.

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
        f"{name} is {kind} (no NIfTI-1/NIfTI-2 header). Upload a 3D .nii or .nii.gz volume, "
        "or a DICOM series as a .zip of its files.",
    )


def read_upload_header(path: Path, name: str) -> Any:
    try:
        return read_header(path)
    except DatasetError as exc:
        raise InputRejected(400, scrub_path(str(exc), path, name)) from None


def scrub_path(message: str, path: Path, name: str) -> str:
    """A message for the client: the temporary path replaced by the upload's name."""
    message = message.replace(str(path), name).replace(str(path.parent), "")
    message = re.sub(r"^row 0, column '\w+': ", "", message)
    return message.replace(tempfile.gettempdir(), "")


def safe_name(text: str | None, default: str = "upload.nii.gz") -> str:
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
    return safe_name(text)


def mask_file_name(upload_name: str, output: str = "nifti") -> str:
    """``ct_001.nii.gz`` -> ``ct_001_mask.nii.gz``; ``ct_001.zip`` -> ``ct_001_seg.dcm`` for a
    DICOM SEG answer."""
    stem = upload_name
    for suffix in (".nii.gz", ".nii", ".gz", ".zip", ".dcm"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    if output == "dicom-seg":
        return f"{stem or 'series'}_seg.dcm"
    return f"{stem or 'volume'}_mask.nii.gz"
