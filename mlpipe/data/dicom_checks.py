"""The checks a DICOM series passes before its pixels are decoded: one series, a transfer
syntax an installed package decodes, one orientation and pixel grid, slices evenly spaced
along the slice normal with none missing or duplicated.

Each refusal is a ``DatasetError`` that says what is wrong, where, and how to fix it. No
patient or study attribute is read into a message: slices are named by file name and
position, series by SeriesInstanceUID (which the local user needs to pick one).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlpipe.core.errors import DatasetError

GAP_FACTOR = 1.5
"""A step between neighbouring slices above this many median steps means slices are missing."""

SPACING_TOLERANCE = 0.02
"""Steps may differ from the median by this fraction (scanners round positions) ..."""

SPACING_TOLERANCE_MM = 0.01
"""... or by this many millimetres, whichever is larger."""

ORIENTATION_TOLERANCE = 1e-4
"""Direction cosines of two slices of one series may differ by this much."""

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

_INSTALL = {
    "gdcm": "pip install python-gdcm",
    "pylibjpeg": "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle",
}


@dataclass(frozen=True)
class SliceInfo:
    """What one image file's header says, for the checks; no pixel data."""

    path: Path
    series_uid: str
    modality: str
    sop_class: str
    transfer_syntax: str
    position: np.ndarray  # ImagePositionPatient, LPS mm
    orientation: np.ndarray  # ImageOrientationPatient: row direction, column direction
    pixel_spacing: tuple[float, float]  # (between rows, between columns)
    rows: int
    columns: int
    frames: int
    samples: int
    dtype: str
    slope: float
    intercept: float
    thickness: float | None
    pixel_offset: int | None = None
    """Where the native little-endian pixel bytes start in the file, when they can be read
    straight into an array (uncompressed, whole bytes, no sign bits to fix); else ``None``
    and pydicom decodes them."""

    @classmethod
    def from_dataset(cls, path: Path, ds: Any, shown: str) -> SliceInfo:
        """The fields of a pydicom dataset, with a clear error for a missing or bad one."""
        try:
            position = np.asarray(_numbers(ds, "ImagePositionPatient"), dtype=float)
            orientation = np.asarray(_numbers(ds, "ImageOrientationPatient"), dtype=float)
            spacing = _numbers(ds, "PixelSpacing")
            bits = int(ds.BitsAllocated)
            signed = int(ds.get("PixelRepresentation", 0)) == 1
            thickness = _numbers(ds, "SpacingBetweenSlices") or _numbers(ds, "SliceThickness")
            info = cls(
                path=path,
                series_uid=_text(ds, "SeriesInstanceUID"),
                modality=_text(ds, "Modality"),
                sop_class=_text(ds, "SOPClassUID"),
                transfer_syntax=str(ds.file_meta.get("TransferSyntaxUID", "1.2.840.10008.1.2")),
                position=position,
                orientation=orientation,
                pixel_spacing=(spacing[0], spacing[1]),
                rows=int(ds.Rows),
                columns=int(ds.Columns),
                frames=int((_numbers(ds, "NumberOfFrames") or [1])[0] or 1),
                samples=int(ds.get("SamplesPerPixel", 1)),
                dtype=f"{'int' if signed else 'uint'}{bits}" if bits in (8, 16, 32) else "float32",
                slope=float((_numbers(ds, "RescaleSlope") or [1.0])[0] or 1.0),
                intercept=float((_numbers(ds, "RescaleIntercept") or [0.0])[0]),
                thickness=float(thickness[0]) if thickness and thickness[0] else None,
                pixel_offset=_native_offset(ds, bits, signed),
            )
        except (AttributeError, KeyError, ValueError, TypeError, IndexError) as exc:
            raise DatasetError(
                f"{shown}: {path.name} lacks the geometry of an image slice ({exc}): "
                "ImagePositionPatient, ImageOrientationPatient, PixelSpacing, Rows, Columns "
                "and BitsAllocated are all needed. Export the series again."
            ) from None
        if position.shape != (3,) or orientation.shape != (6,):
            raise DatasetError(
                f"{shown}: {path.name} has a malformed ImagePositionPatient or "
                "ImageOrientationPatient (expected 3 and 6 numbers)."
            )
        return info


def _numbers(ds: Any, keyword: str) -> list[float] | None:
    """A DS/IS element's numbers. Read from the raw bytes when pydicom has not converted them:
    its conversion validates every value, which was half the time of scanning a series."""
    elem = ds.get_item(keyword, keep_deferred=True)
    if elem is None:
        return None
    value = elem.value
    if isinstance(value, bytes):  # a raw element: backslash-separated decimal strings
        parts = value.decode("ascii", "replace").strip(" \0").split("\\")
        return [float(v) for v in parts if v.strip(" \0")]
    if value is None or value == "":
        return None
    return (
        [float(v) for v in value]
        if isinstance(value, (list, tuple))
        or (hasattr(value, "__iter__") and not isinstance(value, str))
        else [float(value)]
    )


def _text(ds: Any, keyword: str) -> str:
    """A UI/CS element's text, from the raw bytes when not converted (as ``_numbers``)."""
    elem = ds.get_item(keyword, keep_deferred=True)
    if elem is None or elem.value is None:
        return ""
    value = elem.value
    if isinstance(value, bytes):
        return value.decode("ascii", "replace").strip(" \0")
    return str(value)


_NATIVE_LE = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")  # implicit, explicit VR little endian


def _native_offset(ds: Any, bits: int, signed: bool) -> int | None:
    """The pixel data's file offset when pydicom deferred it and it is plain native bytes."""
    syntax = str(ds.file_meta.get("TransferSyntaxUID", "1.2.840.10008.1.2"))
    if syntax not in _NATIVE_LE or bits not in (8, 16, 32):
        return None
    if int(ds.get("SamplesPerPixel", 1)) != 1 or int(ds.get("NumberOfFrames", 1) or 1) != 1:
        return None
    if signed and int(ds.get("BitsStored", bits)) != bits:
        return None  # pydicom sign-extends values stored in fewer bits: let it
    raw = ds.get_item(0x7FE00010, keep_deferred=True)
    tell = getattr(raw, "value_tell", None)
    expected = int(ds.Rows) * int(ds.Columns) * bits // 8
    if raw is None or raw.value is not None or tell is None or raw.length != expected:
        return None
    return int(tell)


def one_series(slices: Sequence[SliceInfo], shown: str, series_uid: str | None) -> list[SliceInfo]:
    """The slices of the one series in the folder (or of ``series_uid``), else a refusal that
    lists every series with its slice count and modality."""
    groups: dict[str, list[SliceInfo]] = defaultdict(list)
    for s in slices:
        groups[s.series_uid].append(s)
    if series_uid is not None:
        if series_uid not in groups:
            raise DatasetError(
                f"{shown} holds no series {series_uid}; it holds {', '.join(sorted(groups))}."
            )
        return groups[series_uid]
    if len(groups) == 1:
        return list(slices)
    ranked = sorted(groups.items(), key=lambda kv: -len(kv[1]))
    listed = "; ".join(
        f"{uid} ({len(group)} slices, {group[0].modality or '?'})" for uid, group in ranked[:10]
    ) + (f"; and {len(ranked) - 10} more" if len(ranked) > 10 else "")
    raise DatasetError(
        f"{shown} holds {len(groups)} series, expected one: {listed}. Move the files of one "
        "series into a folder of its own (each file's SeriesInstanceUID (0020,000E) says which "
        "series it belongs to), or name the series with series_uid=."
    )


def check_decodable(slices: Sequence[SliceInfo], shown: str) -> None:
    """Refuse, before decoding, a transfer syntax that no installed pydicom plugin decodes,
    naming it and the packages that would; also multi-frame and colour images."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    for syntax in sorted({s.transfer_syntax for s in slices}):
        uid = UID(syntax)
        try:
            decoder = get_decoder(uid)
        except NotImplementedError:
            raise DatasetError(
                f"{shown} uses the transfer syntax {uid.name} ({uid}), which pydicom cannot "
                "decode with any plugin. Export the series uncompressed (Explicit VR Little "
                "Endian), e.g. with dcmtk's dcmdjpeg or gdcmconv --raw."
            ) from None
        if not decoder.is_available:
            options = "; or ".join(
                _INSTALL.get(item.split(" ")[0], item) for item in decoder.missing_dependencies
            )
            raise DatasetError(
                f"{shown} is compressed with {uid.name} ({uid}), which no installed package "
                f"decodes. Install one that does ({options}), or export the series uncompressed."
            )
    multi = [s for s in slices if s.frames > 1]
    if multi:
        raise DatasetError(
            f"{shown}: {multi[0].path.name} is a multi-frame ({multi[0].frames} frames) "
            "enhanced image; only classic one-slice-per-file series are read. Convert it "
            "(e.g. dcm2niix, or highdicom's legacy conversion) first."
        )
    colour = [s for s in slices if s.samples != 1]
    if colour:
        raise DatasetError(
            f"{shown}: {colour[0].path.name} has {colour[0].samples} samples per pixel (a colour "
            "image); a CT/MR series has one."
        )


def check_geometry(slices: Sequence[SliceInfo], shown: str) -> tuple[list[SliceInfo], np.ndarray]:
    """Sort along the slice normal, check spacing and consistency, build the RAS affine.

    Returns:
        The slices in order and the 4x4 voxel-to-RAS affine.
    """
    first = slices[0]
    orientations = np.array([s.orientation for s in slices])
    spacings = np.array([s.pixel_spacing for s in slices])
    sizes = np.array([(s.rows, s.columns) for s in slices])
    odd_orientation = np.abs(orientations - first.orientation).max(axis=1) > ORIENTATION_TOLERANCE
    odd_size = (sizes != sizes[0]).any(axis=1)
    odd_spacing = ~np.isclose(spacings, spacings[0], rtol=1e-4, atol=1e-5).all(axis=1)
    if odd_orientation.any():
        s = slices[int(np.argmax(odd_orientation))]
        raise DatasetError(
            f"{shown}: inconsistent orientation: {s.path.name} has ImageOrientationPatient "
            f"{_fmt(s.orientation)} but {first.path.name} has {_fmt(first.orientation)}. "
            "A series has one orientation; split it, or export it again."
        )
    if odd_size.any():
        s = slices[int(np.argmax(odd_size))]
        raise DatasetError(
            f"{shown}: {s.path.name} is {s.columns}x{s.rows} pixels but {first.path.name} "
            f"is {first.columns}x{first.rows}; all slices of a series have one size."
        )
    if odd_spacing.any():
        s = slices[int(np.argmax(odd_spacing))]
        raise DatasetError(
            f"{shown}: inconsistent pixel spacing: {s.path.name} has {s.pixel_spacing} mm, "
            f"{first.path.name} has {first.pixel_spacing} mm."
        )
    row_dir, col_dir = first.orientation[:3], first.orientation[3:]
    normal = np.cross(row_dir, col_dir)
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-3):
        raise DatasetError(
            f"{shown}: ImageOrientationPatient {_fmt(first.orientation)} is not two orthogonal "
            "unit vectors."
        )
    ordered = sorted(slices, key=lambda s: float(s.position @ normal))
    where = np.array([float(s.position @ normal) for s in ordered])
    if len(ordered) == 1:
        step_vector = normal * (first.thickness or 1.0)
    else:
        step_vector = _check_steps(ordered, where, shown)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * first.pixel_spacing[1]  # i: along a row, one column to the next
    lps[:3, 1] = col_dir * first.pixel_spacing[0]  # j: down a column, one row to the next
    lps[:3, 2] = step_vector
    lps[:3, 3] = ordered[0].position
    return ordered, _LPS_TO_RAS @ lps


def _check_steps(ordered: Sequence[SliceInfo], where: np.ndarray, shown: str) -> np.ndarray:
    steps = np.diff(where)
    median = float(np.median(steps))
    duplicates = [k for k, step in enumerate(steps) if step < max(0.01 * median, 1e-3)]
    if duplicates or median <= 0:
        k = duplicates[0] if duplicates else 0
        raise DatasetError(
            f"{shown}: duplicated slice: {ordered[k].path.name} and {ordered[k + 1].path.name} "
            f"are both at {where[k]:.3f} mm along the slice normal. Remove the duplicate, or "
            "split the series if it holds two acquisitions."
        )
    gaps = [k for k, step in enumerate(steps) if step > GAP_FACTOR * median]
    if gaps:
        described = ", ".join(
            f"{where[k]:.2f} to {where[k + 1]:.2f} mm (about {round(steps[k] / median) - 1} "
            "missing)"
            for k in gaps[:5]
        )
        raise DatasetError(
            f"{shown}: missing slices: {len(gaps)} gap(s) wider than {GAP_FACTOR}x the "
            f"{median:.3f} mm slice step, between {described}. Export the complete series."
        )
    tolerance = max(SPACING_TOLERANCE * median, SPACING_TOLERANCE_MM)
    uneven = [k for k, step in enumerate(steps) if abs(step - median) > tolerance]
    if uneven:
        k = uneven[0]
        raise DatasetError(
            f"{shown}: inconsistent slice spacing: {steps[k]:.3f} mm between "
            f"{ordered[k].path.name} and {ordered[k + 1].path.name}, {median:.3f} mm elsewhere. "
            "A volume needs evenly spaced slices; resample it or export it again."
        )
    origin, last = ordered[0].position, ordered[-1].position
    step_vector = (last - origin) / (len(ordered) - 1)
    for k, s in enumerate(ordered):
        off = float(np.linalg.norm(s.position - (origin + k * step_vector)))
        if off > tolerance:
            raise DatasetError(
                f"{shown}: inconsistent slice positions: {s.path.name} lies {off:.3f} mm off the "
                "line through the first and last slices. Export the series again."
            )
    return step_vector


def _fmt(values: np.ndarray) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"
