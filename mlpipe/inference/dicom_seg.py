"""Masks back to DICOM: a DICOM SEG (highdicom ``Segmentation``) over the source series, one
segment per class, so a viewer (OHIF, a PACS) shows the result over the images it came from.

A SEG carries the source's Patient and Study modules by design (highdicom copies them: a
viewer needs them to place it): a SEG file is patient data. It goes back to whoever sent the
series (``serve``) or to the output folder (``predict``), never into tracking: nothing here
logs it, and callers must not log it as an artifact.

``mask_on_source`` puts a mask (NIfTI axis order, on the volume ``mlpipe.data.dicom`` read)
onto the source slices and checks that its affine is the series' own, so a mask from another
grid is refused rather than written over the wrong slices.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mlpipe.core.errors import UsageError

MEDIA_TYPE = "application/dicom"
"""The media type of a DICOM SEG answer (``serve``'s ``/segment?format=dicom-seg``)."""


def mask_on_source(
    mask: np.ndarray, mask_affine: np.ndarray, series_affine: np.ndarray, *, tol: float = 1e-3
) -> np.ndarray:
    """A mask in NIfTI order ``(columns, rows, slices)`` as frames ``(slices, rows, columns)``
    in the series' slice order (what ``Segmentation`` takes with the sorted source datasets).

    Raises:
        UsageError: the mask's affine is not the series' (another grid, or resampled).
    """
    if mask.ndim != 3:
        raise UsageError(f"A mask for DICOM SEG must be 3D; got shape {mask.shape}.")
    if not np.allclose(np.asarray(mask_affine), np.asarray(series_affine), atol=tol):
        raise UsageError(
            "The mask is not on the source series' voxel grid (its affine differs), so it "
            "cannot be written as DICOM SEG over those slices. Resample it onto the series first."
        )
    return np.ascontiguousarray(np.asarray(mask).transpose(2, 1, 0))


def write_dicom_seg(
    mask: np.ndarray,
    source_datasets: Sequence[Any],
    class_names: Mapping[int, str],
    path: str | os.PathLike[str] | None = None,
    *,
    algorithm: str = "mlpipe",
    algorithm_version: str = "",
    series_number: int = 900,
) -> Any:
    """Write a DICOM SEG: one segment per class of ``class_names`` (0 is background).

    Args:
        mask: frames ``(slices, rows, columns)`` of class indices, in the order of
            ``source_datasets`` (``mask_on_source`` gives it from a NIfTI-order mask).
        source_datasets: the source series' datasets in slice order (pixel data not needed:
            ``mlpipe.data.dicom.source_datasets``).
        class_names: class index -> name, e.g. ``{1: "liver", 2: "tumour"}``; every class in
            the mask must have one.
        path: where to save the SEG; ``None`` only builds it.
        algorithm: the segmentation algorithm's name (the model), recorded in each segment.
        algorithm_version: e.g. the registered model version.
        series_number: the SEG series' number.

    Returns:
        The ``highdicom.seg.Segmentation`` dataset.

    Raises:
        UsageError: the mask's shape does not match the source, or a class has no name.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from mlpipe import __version__

    frames = np.asarray(mask)
    if not source_datasets:
        raise UsageError("write_dicom_seg needs the source series' datasets; got none.")
    first = source_datasets[0]
    expected = (len(source_datasets), int(first.Rows), int(first.Columns))
    if frames.shape != expected:
        raise UsageError(
            f"The mask has shape {frames.shape} but the source series is {expected} "
            "(slices, rows, columns); use mask_on_source to put a volume mask on its slices."
        )
    present = sorted(int(c) for c in np.unique(frames) if c != 0)
    numbers = sorted(int(c) for c in class_names if int(c) != 0)
    missing = [c for c in present if c not in numbers]
    if missing:
        raise UsageError(
            f"The mask holds classes {missing} that class_names does not name; name every "
            "foreground class."
        )
    # Segment numbers must run 1..N; class c becomes segment number rank(c).
    if numbers == list(range(1, len(numbers) + 1)) and frames.dtype == np.uint8:
        labels = frames  # already 1..N: no 300-slice copy
    else:
        lookup = np.zeros(max([*numbers, *present, 0]) + 1, dtype=np.uint8)
        for number, cls in enumerate(numbers, start=1):
            lookup[cls] = number
        labels = lookup[frames.astype(np.intp, copy=False)]
    identification = hd.AlgorithmIdentificationSequence(
        name=algorithm[:64] or "mlpipe",
        version=(algorithm_version or __version__)[:64],
        family=codes.cid7162.ArtificialIntelligence,
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=str(class_names[cls])[:64],
            segmented_property_category=codes.cid7150.Tissue,
            segmented_property_type=codes.cid7151.Organ,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=identification,
        )
        for number, cls in enumerate(numbers, start=1)
    ]
    seg = hd.seg.Segmentation(
        source_images=list(source_datasets),
        pixel_array=labels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="mlpipe",
        manufacturer_model_name=algorithm[:64] or "mlpipe",
        software_versions=__version__,
        device_serial_number="0",
        series_description=f"{algorithm} segmentation"[:64],
    )
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        seg.save_as(os.fspath(path))
    return seg


def seg_for_series(
    mask_path: str | os.PathLike[str],
    series_path: str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    class_names: Mapping[int, str] | None = None,
    algorithm: str = "mlpipe",
    algorithm_version: str = "",
) -> Path:
    """A NIfTI mask predicted from a series, written as DICOM SEG over that series: what batch
    inference calls after the model wrote ``<case>_mask.nii.gz`` for a series input.

    Args:
        mask_path: the mask NIfTI, on the grid ``mlpipe.data.dicom`` read the series to.
        series_path: the source series (folder, ``.zip`` or ``.dcm``).
        path: the SEG file to write.
        class_names: class index -> name [default: ``class <c>`` for each class present].
        algorithm, algorithm_version: recorded in each segment (model name and version).

    Returns:
        ``path``.

    Raises:
        UsageError: the mask is not on the series' grid, or a class has no name.
        DatasetError: the series or the mask cannot be read.
    """
    from mlpipe.data.dicom import open_series, source_datasets
    from mlpipe.data.volumes import load_volume

    mask, header = load_volume(mask_path, dtype=np.uint8)
    with open_series(series_path) as series:
        frames = mask_on_source(mask, np.asarray(header.affine), series.affine)
        present = sorted(int(c) for c in np.unique(frames) if c)
        names = dict(class_names) if class_names else class_names_for(present)
        write_dicom_seg(
            frames,
            source_datasets(series),
            names,
            path,
            algorithm=algorithm,
            algorithm_version=algorithm_version,
        )
    return Path(path)


def class_names_for(classes: Sequence[int], names: Mapping[str, str] | None = None) -> dict:
    """Names for foreground classes: given ones (keys as strings, as in a Decathlon
    ``dataset.json`` ``labels``) or ``class <c>``."""
    names = names or {}
    return {int(c): str(names.get(str(c)) or f"class {c}") for c in classes if int(c) != 0}
