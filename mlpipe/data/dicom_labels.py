"""DICOM SEG files as labels: a segmentation over a DICOM series, read onto that series' grid
(NIfTI axis order), so a dataset's label may be a SEG as well as a NIfTI.

A SEG holds only the frames that have a segment (empty ones are usually omitted) and names
its source slices by SOPInstanceUID: it is placed by those references, not by its own extent,
so it comes out voxel for voxel on the image. Segment numbers become class indices (segment 1
is class 1), as ``mlpipe.inference.dicom_seg.write_dicom_seg`` writes them for classes 1..N.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mlpipe.core.errors import DatasetError

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
"""Segmentation Storage."""

SEG_SUFFIX = ".dcm"


def is_seg_file(path: str | os.PathLike[str]) -> bool:
    """Whether a file is a DICOM SEG (its SOP class, read from the header only)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    p = Path(path)
    if not p.is_file() or not p.name.lower().endswith(SEG_SUFFIX):
        return False
    try:
        ds = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except (InvalidDicomError, OSError, EOFError, ValueError):
        return False
    return str(ds.get("SOPClassUID", "")) == SEG_SOP_CLASS


def load_seg_label(
    seg_path: str | os.PathLike[str], image: str | os.PathLike[str]
) -> tuple[np.ndarray, np.ndarray]:
    """A SEG's class indices on its image series' grid, and that grid's affine.

    Args:
        seg_path: the DICOM SEG file.
        image: its image: a series folder, ``.zip`` or ``.dcm`` (what the SEG references).

    Returns:
        ``(labels, affine)``: uint8 class indices in NIfTI order ``(columns, rows, slices)``
        and the series' RAS affine.

    Raises:
        DatasetError: the file is not a SEG, does not reference this series, or cannot be read.
    """
    import highdicom as hd
    import pydicom

    from mlpipe.data.dicom import open_series

    shown = os.fspath(seg_path)
    try:
        seg = hd.seg.segread(seg_path)
    except (OSError, ValueError, AttributeError, KeyError, TypeError) as exc:
        raise DatasetError(f"{shown} is not a readable DICOM SEG ({exc}).") from exc
    referenced = {str(item.SeriesInstanceUID) for item in seg.get("ReferencedSeriesSequence", [])}
    with open_series(image) as series:
        if series.series_uid not in referenced:
            raise DatasetError(
                f"{shown} segments another series than its image {os.fspath(image)}: its "
                "ReferencedSeriesSequence does not name the image's SeriesInstanceUID. Pair "
                "the SEG with the series it was drawn on."
            )
        uids = [
            str(
                pydicom.dcmread(
                    p, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]
                ).SOPInstanceUID
            )
            for p in series.files
        ]
        try:
            frames = seg.get_pixels_by_source_instance(
                source_sop_instance_uids=uids,
                combine_segments=True,
                skip_overlap_checks=True,
                assert_missing_frames_are_empty=True,
            )
        except (ValueError, KeyError, IndexError, RuntimeError) as exc:
            raise DatasetError(
                f"{shown} cannot be placed on the slices of {os.fspath(image)} ({exc})."
            ) from exc
        return np.asarray(frames, dtype=np.uint8).transpose(2, 1, 0), series.affine
