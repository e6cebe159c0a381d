"""The dataset checks seg3d needs on top of ``mlpipe.data.dataset.build_manifest``, and the split.

``build_manifest`` already refuses what no pipeline can read (missing or truncated files,
unpaired images, image/label shapes that differ, 4D labels). What is left here is what this
project assumes: one 3D volume per case, image and label on the same grid in the world (an
affine mismatch trains on misaligned masks without any error), labels that fit ``num_classes``
(CrossEntropy/Dice would fail deep in the first epoch, or one-hot silently drop a class) and a
patch that fits the resampled volumes. They run before a run is started, from headers where
possible, and each message names the file and the fix.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from seg3d.config import Seg3dInputError

if TYPE_CHECKING:
    from mlpipe.data.dataset import DatasetInfo, Pair
    from mlpipe.data.volumes import VolumeHeader
    from seg3d.config import TrainConfig

AFFINE_ATOL = 1e-3
"""mm (and direction cosines): what rounding in converters leaves, far below a voxel."""
_MAX_LISTED = 10


def resolve_data_dir(config: TrainConfig) -> Path:
    """The dataset folder: ``config.data_dir``, else the embedded synthetic dataset.

    An empty ``data_dir`` is the MLproject's default, so ``mlpipe run projects/seg3d`` works
    with no data; the folder is printed so the user knows which data the run used.
    """
    if config.data_dir:
        return Path(config.data_dir)
    from seg3d.synthesize import default_dataset

    path = default_dataset(config.seed, num_classes=config.num_classes)
    message = f"seg3d: no data_dir given; using the synthetic dataset {path}"
    print(message, file=sys.stderr, flush=True)
    return path


def check_dataset(info: DatasetInfo, config: TrainConfig, *, split: str = "train") -> None:
    """Refuse a dataset this configuration cannot train (or evaluate) on, before any run.

    Args:
        info: the manifest, from ``build_manifest`` or ``mlog.dataset``.
        config: the settings whose ``num_classes``, ``spacing`` and ``patch_size`` apply.
        split: ``"train"`` checks the cases training uses (splits ``train`` and ``val``);
            ``"test"`` the test cases. Unlabelled test images get the image checks only.

    Raises:
        Seg3dInputError: no case of the split, a 4D image, image/label affines that differ,
            label values outside ``0..num_classes-1``, or a patch larger than every resampled
            volume. The message names the file and the fix.
    """
    wanted = ("train", "val") if split == "train" else (split,)
    pairs = [p for p in info.pairs if p.split in wanted]
    if not pairs:
        folder = "imagesTr/ and labelsTr/" if split == "train" else "imagesTs/ (and labelsTs/)"
        raise Seg3dInputError(
            f"Dataset {info.source} has no {split} cases; put them in {folder} (Decathlon "
            "layout) or mark them with that split in the CSV/JSON manifest"
        )
    headers = check_geometry(pairs, channels=config.in_channels)
    _check_patch(pairs, headers, config)
    _check_labels(pairs, config.num_classes)


def check_geometry(pairs: Iterable[Pair], *, channels: int = 1) -> dict[Path, VolumeHeader]:
    """Each image 3D (a trailing axis of 1 allowed), each label on its image's grid.

    ``channels > 1`` (declared by ``dataset.json``): each image is 4D with that many channels
    last, as the Decathlon's BraTS task stores FLAIR, T1, T1ce and T2.

    Headers only: nothing is decompressed beyond the header. Every problem is reported at
    once, so a user fixes the dataset in one go.

    Returns:
        The image headers, by image path, for further checks.

    Raises:
        Seg3dInputError: a 4D image or an image/label affine mismatch, naming the files.
    """
    from mlpipe.data.volumes import read_header

    problems: list[str] = []
    headers: dict[Path, VolumeHeader] = {}
    for pair in pairs:
        image = headers[pair.image] = read_header(pair.image)
        if channels > 1 and (len(image.shape) != 4 or image.shape[3] != channels):
            problems.append(
                f"Image {pair.image} has shape {_fmt(image.shape)}; dataset.json declares "
                f"{channels} channels, so each image must be 4D with {channels} channels last"
            )
        elif channels == 1 and not _is_3d(image.shape):
            problems.append(
                f"Image {pair.image} has shape {_fmt(image.shape)}; seg3d expects one 3D volume "
                'per case, unless dataset.json declares the channels ("modality": {"0": '
                '"T1", "1": "T2"}). Declare them, save each channel as its own case, or use a '
                "3D image"
            )
        if pair.label is None:
            continue
        label = read_header(pair.label)
        if not np.allclose(image.affine, label.affine, atol=AFFINE_ATOL):
            problems.append(
                f"Label {pair.label} is not on the grid of its image {pair.image}: spacing "
                f"{_fmt(label.spacing)} vs {_fmt(image.spacing)} mm, origin "
                f"{_fmt(_origin(label))} vs {_fmt(_origin(image))} mm, orientation "
                f"{label.orientation} vs {image.orientation}. Resample the label onto the image "
                "(nearest neighbour), or copy the image's affine into the label if only the "
                "header is wrong (nibabel: nib.Nifti1Image(label_data, image.affine))"
            )
    _raise(problems)
    return headers


def split_cases(
    pairs: Sequence[Pair], val_fraction: float, seed: int
) -> tuple[list[Pair], list[Pair]]:
    """Split the training cases into train and held-out validation, the same way every time.

    Cases are sorted by name and shuffled with ``seed``, so the split depends on the data and
    the seed only (not on file-system order); ``round(n * val_fraction)`` cases, at least one
    and at most ``n - 1``, are held out. Cases the manifest marks ``val`` are added to
    validation; test cases are never used.

    Returns:
        ``(train, validation)``, each sorted by case.

    Raises:
        Seg3dInputError: fewer than 2 training cases.
    """
    train = sorted((p for p in pairs if p.split == "train"), key=lambda p: p.case)
    declared_val = sorted((p for p in pairs if p.split == "val"), key=lambda p: p.case)
    if len(train) < 2:
        raise Seg3dInputError(
            f"{len(train)} training case(s); need at least 2 (one to train on, one to validate). "
            "Add labelled cases to imagesTr/ and labelsTr/"
        )
    held = min(max(1, round(len(train) * val_fraction)), len(train) - 1)
    order = np.random.default_rng(seed).permutation(len(train))
    held_out = {int(i) for i in order[:held]}
    kept = [p for i, p in enumerate(train) if i not in held_out]
    val = [p for i, p in enumerate(train) if i in held_out]
    return kept, sorted(val + declared_val, key=lambda p: p.case)


# Checks -------------------------------------------------------------------------------------------


def _check_patch(
    pairs: Sequence[Pair], headers: dict[Path, VolumeHeader], config: TrainConfig
) -> None:
    """Refuse a patch that exceeds, along some axis, every volume after resampling.

    A volume smaller than the patch is padded, which is fine for a few; a patch larger than
    all of them trains mostly on padding. Shapes come from headers: MONAI's ``Spacingd`` gives
    ``round((n - 1) * zoom / spacing) + 1`` voxels along each axis once ``Orientationd`` has put
    the axes in RAS order.
    """
    largest = [0, 0, 0]
    where: list[Path | None] = [None, None, None]
    for pair in pairs:
        for axis, n in enumerate(_resampled_shape(headers[pair.image], config.spacing)):
            if n > largest[axis]:
                largest[axis], where[axis] = n, pair.image
    too_big = [axis for axis in range(3) if config.patch_size[axis] > largest[axis]]
    if not too_big:
        return
    step = 8 if config.model == "segresnet" else 16
    suggestion = tuple(
        max(step, min(p, n // step * step)) for p, n in zip(config.patch_size, largest, strict=True)
    )
    files = ", ".join(dict.fromkeys(str(where[axis]) for axis in too_big))
    raise Seg3dInputError(
        f"patch_size {_fmt(config.patch_size)} is larger than every volume resampled to "
        f"spacing {_fmt(config.spacing)} mm: the largest resampled shape is {_fmt(largest)} "
        f"(RAS order; from {files}). Give a smaller patch_size, e.g. -P patch_size="
        f"{','.join(map(str, suggestion))}, or a finer spacing"
    )


def _check_labels(pairs: Sequence[Pair], num_classes: int) -> None:
    """Label values must be class indices ``0..num_classes-1``; reads one label at a time."""
    from mlpipe.data.volumes import load_volume

    problems = []
    highest = -1
    for pair in pairs:
        if pair.label is None:
            continue
        data, _ = load_volume(pair.label, dtype=None)
        values = _values(data)
        del data
        bad = [v for v in values if v < 0 or v >= num_classes or v != int(v)]
        if bad:
            highest = max(highest, int(max(values)))
            shown = ", ".join(f"{v:g}" for v in bad[:_MAX_LISTED])
            more = f" and {len(bad) - _MAX_LISTED} more" if len(bad) > _MAX_LISTED else ""
            problems.append(
                f"Label {pair.label} holds values {shown}{more} outside 0..{num_classes - 1} "
                f"(num_classes={num_classes})"
            )
    if problems:
        fix = (
            f"If the dataset has {highest + 1} classes (background included), pass "
            f"-P num_classes={highest + 1}; otherwise fix the label files (class indices "
            f"0..{num_classes - 1}, integers)"
        )
        _raise(problems, fix)


def _values(data: np.ndarray) -> list[float]:
    """Distinct values; ``bincount`` for small non-negative integers (10x faster than unique)."""
    if data.size == 0:
        return []
    if np.issubdtype(data.dtype, np.integer):
        low, high = int(data.min()), int(data.max())
        if low >= 0 and high < 1 << 16:
            return [float(v) for v in np.flatnonzero(np.bincount(data.ravel()))]
    return [float(v) for v in np.unique(data)]


# Helpers ------------------------------------------------------------------------------------------


def _resampled_shape(header: VolumeHeader, spacing: Sequence[float]) -> list[int]:
    """Spatial shape after ``Orientationd(RAS)`` and ``Spacingd(spacing)``, from the header."""
    import nibabel as nib

    affine = np.asarray(header.affine, dtype=float)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))  # what MONAI reads, not pixdim
    ornt = nib.io_orientation(affine)
    out = [0, 0, 0]
    for axis, n in enumerate(header.shape[:3]):
        ras = int(ornt[axis, 0])
        out[ras] = round(float((n - 1) * zooms[axis] / spacing[ras])) + 1
    return out


def _is_3d(shape: tuple[int, ...]) -> bool:
    return len(shape) == 3 or (len(shape) > 3 and all(n == 1 for n in shape[3:]))


def _origin(header: VolumeHeader) -> tuple[float, float, float]:
    return tuple(round(row[3], 3) for row in header.affine[:3])  # type: ignore[return-value]


def _fmt(values: Iterable[float]) -> str:
    return "x".join(f"{v:g}" for v in values)


def _raise(problems: Sequence[str], fix: str = "") -> None:
    """One error for every problem, so a dataset is fixed in one go."""
    if not problems:
        return
    tail = f". {fix}" if fix else ""
    if len(problems) == 1:
        raise Seg3dInputError(problems[0] + tail)
    listed = "\n".join(f"  - {p}" for p in problems[:_MAX_LISTED])
    more = len(problems) - _MAX_LISTED
    extra = f"\n  ... and {more} more" if more > 0 else ""
    fix_line = f"\n{fix}" if fix else ""
    raise Seg3dInputError(f"{len(problems)} problems in the dataset:\n{listed}{extra}{fix_line}")
