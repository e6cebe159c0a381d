"""What a training set looks like, measured once: the input of :mod:`seg3d.plan`.

nnU-Net calls this the dataset fingerprint. Per training case: spacing and shape in RAS order
(what ``Orientationd`` gives), the orientation code, the share of non-zero image voxels, the
voxel count of every label value, and a deterministic sample of foreground intensities per
channel (voxels whose label is not background). Aggregated: median spacing and shape,
per-channel foreground percentiles 0.5/99.5, mean and std, per-class voxel fractions and the
share of cases that contain each class.

Cases are read in a few threads, one volume per thread in memory at a time (zlib and numpy
release the GIL). The result is cached as JSON under the dataset's content digest, next to
mlpipe's hash cache, so planning the same data again reads one small file.

``dataset.json`` is read here too (:func:`read_dataset_json`): Decathlon v1 (``modality``,
``labels`` as ``{"0": "background"}``) and nnU-Net v2 (``channel_names``, ``labels`` as
``{"background": 0}``).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from seg3d.config import Seg3dInputError

if TYPE_CHECKING:
    from mlpipe.data.dataset import DatasetInfo, Pair

FORMAT = "seg3d.fingerprint/1"
SAMPLES_PER_CASE = 10_000
"""Foreground voxels kept per case and channel, as nnU-Net does, for the global percentiles."""
PERCENTILES = (0.5, 99.5)
_WORKERS = 4


@dataclass(frozen=True)
class DatasetMeta:
    """What ``dataset.json`` declares; ``None`` fields were not declared.

    Attributes:
        channels: modality name per input channel (``["CT"]``, ``["T1", "T2"]``), or None.
        labels: class index -> name, background included, or None.
        path: the file it came from (for messages), or None when there is none.
    """

    channels: tuple[str, ...] | None = None
    labels: dict[int, str] | None = None
    path: str | None = None

    @property
    def num_classes(self) -> int | None:
        return len(self.labels) if self.labels else None


def read_dataset_json(data_dir: str | os.PathLike[str]) -> DatasetMeta:
    """Read the channels and labels a Decathlon v1 or nnU-Net v2 ``dataset.json`` declares.

    A dataset given as a manifest file (CSV/JSON) or a plain folder has none: every field is
    None and the plan falls back to the data.

    Raises:
        Seg3dInputError: a ``dataset.json`` whose ``labels`` are not class indices 0..n-1
            (nnU-Net v2 region labels, a list of values per name, are not supported).
    """
    path = Path(data_dir) / "dataset.json"
    if not path.is_file():
        return DatasetMeta()
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return DatasetMeta(path=str(path))
    if not isinstance(meta, dict):
        return DatasetMeta(path=str(path))
    block = meta.get("channel_names", meta.get("modality"))
    channels = None
    if isinstance(block, dict) and block:
        ordered = sorted(block.items(), key=lambda kv: int(kv[0]))
        channels = tuple(str(v) for _, v in ordered)
    labels = _labels(meta.get("labels"), path)
    return DatasetMeta(channels=channels, labels=labels, path=str(path))


def _labels(block: object, path: Path) -> dict[int, str] | None:
    if not isinstance(block, dict) or not block:
        return None
    labels: dict[int, str] = {}
    for key, value in block.items():
        if str(key).lstrip("-").isdigit():  # Decathlon v1: {"1": "liver"}
            labels[int(key)] = str(value)
        elif isinstance(value, int) and not isinstance(value, bool):  # nnU-Net v2: {"liver": 1}
            labels[value] = str(key)
        else:
            raise Seg3dInputError(
                f"{path}: label {key!r}: {value!r} is not a class index; seg3d reads labels as "
                '{"0": "background", "1": "liver"} (Decathlon) or {"background": 0, "liver": 1} '
                "(nnU-Net v2); region labels are not supported"
            )
    if sorted(labels) != list(range(len(labels))):
        raise Seg3dInputError(
            f"{path}: labels declare the values {sorted(labels)}; expected the class indices "
            f"0..{len(labels) - 1} with 0 the background"
        )
    return labels


def fingerprint(
    info: DatasetInfo, *, cache: bool | str | os.PathLike[str] = True, workers: int | None = None
) -> dict:
    """The fingerprint of the dataset's training cases (splits ``train`` and ``val``).

    Args:
        info: the checked manifest (``build_manifest``); its digest keys the cache.
        cache: True for the default folder, a folder, or False to compute and store nothing.
        workers: reading threads [default: min(4, CPUs)].

    Returns:
        ``{"format", "digest", "cases": [...], "summary": {...}}`` (see the module docstring).
    """
    path = _cache_file(info.digest, cache)
    if path is not None and path.is_file():
        try:
            cached = json.loads(path.read_text(encoding="utf-8"))
            if cached.get("format") == FORMAT and cached.get("digest") == info.digest:
                return cached
        except (OSError, ValueError):
            pass
    pairs = [p for p in info.pairs if p.split in ("train", "val") and p.label is not None]
    count = workers or min(_WORKERS, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=count, thread_name_prefix="seg3d-fingerprint") as pool:
        results = list(pool.map(_case, pairs, range(len(pairs))))
    cases = [case for case, _ in results]
    samples = [sample for _, sample in results]
    result = {
        "format": FORMAT,
        "digest": info.digest,
        "cases": cases,
        "summary": summarize(cases, samples),
    }
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
        tmp.write_text(json.dumps(result), encoding="utf-8")
        os.replace(tmp, path)
    return result


def summarize(cases: Sequence[dict], samples: Sequence[np.ndarray]) -> dict:
    """Dataset-level figures from the per-case ones and the pooled foreground samples.

    Args:
        cases: per-case entries (``spacing``, ``shape``, ``class_voxels``, ...).
        samples: per case, a ``(channels, n)`` array of foreground intensities.
    """
    spacings = np.array([c["spacing"] for c in cases], dtype=float)
    shapes = np.array([c["shape"] for c in cases], dtype=float)
    channels = max(c["channels"] for c in cases)
    pooled = [
        np.concatenate([s[ch] for s in samples if s.shape[0] > ch and s.shape[1]] or [np.zeros(1)])
        for ch in range(channels)
    ]
    totals: dict[int, int] = {}
    present: dict[int, int] = {}
    for case in cases:
        for value, n in case["class_voxels"].items():
            totals[int(value)] = totals.get(int(value), 0) + n
            present[int(value)] = present.get(int(value), 0) + (n > 0)
    voxels = sum(totals.values()) or 1
    return {
        "cases": len(cases),
        "channels": channels,
        "spacing_median": np.median(spacings, axis=0).tolist(),
        "spacings": spacings.tolist(),
        "shape_median": np.median(shapes, axis=0).tolist(),
        "nonzero_fraction_median": float(np.median([c["nonzero_fraction"] for c in cases])),
        "orientations": sorted({c["orientation"] for c in cases}),
        "intensity": [_stats(values) for values in pooled],
        "label_values": sorted(totals),
        "class_fraction": {str(v): totals[v] / voxels for v in sorted(totals)},
        "class_case_share": {str(v): present[v] / len(cases) for v in sorted(present)},
    }


def _stats(values: np.ndarray) -> dict:
    low, high = np.percentile(values, PERCENTILES)
    return {
        "p0_5": float(low),
        "p99_5": float(high),
        "mean": float(values.mean()),
        "std": float(values.std()),
    }


def _case(pair: Pair, index: int) -> tuple[dict, np.ndarray]:
    """One case: geometry from the header, label counts, a foreground intensity sample."""
    import nibabel as nib

    from mlpipe.data.volumes import load_volume

    label, _ = load_volume(pair.label, dtype=None)
    label = np.rint(label).astype(np.int64) if label.dtype.kind == "f" else label
    flat = label.reshape(-1, order="F")  # NIfTI arrays are Fortran-ordered: a view, no copy
    counts = _counts(flat)
    foreground = _foreground_sample(flat, counts, np.random.default_rng(index))
    del label, flat
    image, header = load_volume(pair.image, dtype=None)  # stored dtype: no float copy
    spatial = int(np.prod(header.spatial_shape))
    data = image.reshape(spatial, -1, order="F")  # (voxel, channel), the label's voxel order
    sample = data[foreground].T.astype(np.float32)
    nonzero = float(np.count_nonzero(data[:, 0])) / max(spatial, 1)
    del image, data
    affine = np.asarray(header.affine, dtype=float)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    ornt = nib.io_orientation(affine)
    spacing, shape = [0.0] * 3, [0] * 3
    for axis in range(3):  # into RAS order, as Orientationd puts them
        ras = int(ornt[axis, 0])
        spacing[ras] = round(float(zooms[axis]), 6)
        shape[ras] = int(header.spatial_shape[axis])
    case = {
        "case": pair.case,
        "spacing": spacing,
        "shape": shape,
        "orientation": header.orientation,
        "channels": int(header.shape[3]) if len(header.shape) > 3 else 1,
        "nonzero_fraction": nonzero,
        "class_voxels": {str(v): int(n) for v, n in enumerate(counts) if n},
    }
    return case, sample


def _counts(flat: np.ndarray) -> np.ndarray:
    """Voxels per label value; a few comparisons beat ``bincount``'s cast to intp for few."""
    if flat.size == 0:
        return np.zeros(1, dtype=np.int64)
    if flat.dtype.kind != "u":
        flat = flat.clip(min=0)  # negative values are refused later (check_dataset)
    top = int(flat.max())
    if top < 16:
        return np.array([np.count_nonzero(flat == v) for v in range(top + 1)], dtype=np.int64)
    return np.bincount(flat)


def _foreground_sample(flat: np.ndarray, counts: np.ndarray, rng) -> np.ndarray:
    """Up to ``SAMPLES_PER_CASE`` random foreground voxel indices (with replacement).

    Random voxels are drawn and the foreground ones kept, which costs O(samples / foreground
    share) instead of listing every foreground voxel; a rare foreground is listed instead.
    """
    n_fg = int(flat.size - counts[0])
    if n_fg <= 0:
        return np.zeros(0, dtype=np.int64)
    draws = int(2 * SAMPLES_PER_CASE * flat.size / n_fg)
    if n_fg <= SAMPLES_PER_CASE or draws >= flat.size // 4:
        everything = np.flatnonzero(flat)
        if everything.size <= SAMPLES_PER_CASE:
            return everything
        return everything[rng.integers(0, everything.size, SAMPLES_PER_CASE)]
    picks = rng.integers(0, flat.size, draws)
    picks = picks[flat[picks] != 0]
    return picks[:SAMPLES_PER_CASE]


def _cache_file(digest: str, cache: bool | str | os.PathLike[str]) -> Path | None:
    if cache is False:
        return None
    if cache is True:
        from mlpipe.data.dataset import default_cache_path

        folder = default_cache_path().parent / "fingerprints"
    else:
        folder = Path(cache)
    return folder / f"{digest}.json"
