"""Data profiles: what the volumes of a dataset look like, for the record and the drift check.

A profile holds, per volume, the geometry (shape, spacing, orientation), the dtype, robust
intensity statistics and the label class fractions, plus a dataset summary. ``mlpipe drift``
profiles new volumes with ``profile_volume`` and compares them with the training profile, so
both sides come from the same code. One volume is in memory at a time.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mlpipe.data.dicom_labels import is_seg_file, load_seg_label
from mlpipe.data.volumes import load_volume

if TYPE_CHECKING:
    from mlpipe.data.dataset import DatasetInfo
    from mlpipe.data.layouts import Pair

FORMAT = "mlpipe.data_profile/1"
PERCENTILES = (0.5, 50.0, 99.5)
"""Robust to the odd hot voxel or padding value, unlike min and max."""

Progress = Callable[[int, int], None]


def profile_volume(image_path: str | Path, label_path: str | Path | None = None) -> dict:
    """Geometry, dtype, intensity statistics and label fractions of one image (and label).

    Raises:
        DatasetError: the file cannot be read; the message names it.
    """
    data, header = load_volume(image_path)
    finite = data[np.isfinite(data)]
    if finite.size == 0:
        finite = np.zeros(1, dtype=np.float32)
    p_low, p_mid, p_high = np.percentile(finite, PERCENTILES)
    entry = {
        "image": str(image_path),
        "shape": list(header.spatial_shape),
        "channels": int(header.shape[3]) if len(header.shape) > 3 else 1,
        "spacing": [round(float(s), 6) for s in header.spacing],
        "orientation": header.orientation,
        "dtype": header.dtype,
        "intensity": {
            "p0_5": float(p_low),
            "p50": float(p_mid),
            "p99_5": float(p_high),
            "mean": float(finite.mean()),
            "std": float(finite.std()),
        },
    }
    del data, finite
    if label_path is not None:
        if is_seg_file(label_path):  # a DICOM SEG: read onto its image series
            labels = load_seg_label(label_path, image_path)[0].astype(np.int64)
        else:
            labels, _ = load_volume(label_path, dtype=np.int64)
        counts = np.bincount(labels.ravel().clip(min=0))
        total = max(int(labels.size), 1)
        entry["label"] = str(label_path)
        entry["label_fractions"] = {
            str(cls): float(n) / total for cls, n in enumerate(counts) if n > 0
        }
    return entry


def profile_pairs(
    pairs: Sequence[Pair],
    *,
    root: str | Path | None = None,
    max_volumes: int | None = None,
    progress: Progress | None = None,
) -> dict:
    """Profile image/label pairs (all, or ``max_volumes`` spread evenly over them).

    Paths in the profile are relative to ``root`` when given, so profiles compare across
    machines.
    """
    chosen = _spread(list(pairs), max_volumes)
    volumes = []
    for done, pair in enumerate(chosen, start=1):
        entry = profile_volume(pair.image, pair.label)
        entry["case"] = pair.case
        entry["split"] = pair.split
        if root is not None:
            entry["image"] = _relative(pair.image, root)
            if pair.label is not None:
                entry["label"] = _relative(pair.label, root)
        volumes.append(entry)
        if progress is not None:
            progress(done, len(chosen))
    return {"format": FORMAT, "volumes": volumes, "summary": summarize(volumes)}


def profile_dataset(
    info: DatasetInfo, *, max_volumes: int | None = None, progress: Progress | None = None
) -> dict:
    """The profile of a dataset from ``mlpipe.data.dataset.build_manifest``, tagged with its
    digest."""
    root = Path(info.source)
    root = root if root.is_dir() else root.parent  # a CSV/JSON manifest: its folder
    profile = profile_pairs(info.pairs, root=root, max_volumes=max_volumes, progress=progress)
    profile["dataset"] = {"name": info.name, "version": info.version, "digest": info.digest}
    return profile


def summarize(volumes: Iterable[dict]) -> dict:
    """Medians and ranges over volumes: what a drift check compares against."""
    volumes = list(volumes)
    if not volumes:
        return {"volumes": 0}
    axes = range(3)
    summary: dict = {
        "volumes": len(volumes),
        "spacing": _ranges([[v["spacing"][a] for v in volumes] for a in axes]),
        "shape": _ranges([[v["shape"][a] for v in volumes] for a in axes]),
        "orientation": dict(Counter(v["orientation"] for v in volumes)),
        "dtype": dict(Counter(v["dtype"] for v in volumes)),
        "intensity": {
            key: statistics.median(v["intensity"][key] for v in volumes)
            for key in ("p0_5", "p50", "p99_5", "mean", "std")
        },
    }
    labelled = [v["label_fractions"] for v in volumes if "label_fractions" in v]
    if labelled:
        classes = sorted({c for fr in labelled for c in fr}, key=int)
        summary["label_fractions"] = {
            c: statistics.fmean(fr.get(c, 0.0) for fr in labelled) for c in classes
        }
    return summary


def summary_params(profile: dict) -> dict[str, str]:
    """A few flat params from the summary, for the runs table of the MLflow UI."""
    summary = profile.get("summary", {})
    if not summary.get("volumes"):
        return {"profile.volumes": "0"}
    params = {
        "profile.volumes": str(summary["volumes"]),
        "profile.spacing_median": "x".join(f"{m:g}" for m in summary["spacing"]["median"]),
        "profile.shape_median": "x".join(f"{m:g}" for m in summary["shape"]["median"]),
        "profile.orientation": ",".join(sorted(summary["orientation"])),
        "profile.intensity_p0_5": f"{summary['intensity']['p0_5']:.4g}",
        "profile.intensity_p99_5": f"{summary['intensity']['p99_5']:.4g}",
    }
    if "label_fractions" in summary:
        params["profile.label_classes"] = ",".join(summary["label_fractions"])
    return params


def _ranges(per_axis: list[list[float]]) -> dict:
    return {
        "median": [float(statistics.median(values)) for values in per_axis],
        "min": [float(min(values)) for values in per_axis],
        "max": [float(max(values)) for values in per_axis],
    }


def _spread(items: list, limit: int | None) -> list:
    if limit is None or limit >= len(items):
        return items
    if limit <= 0:
        return []
    step = len(items) / limit
    return [items[int(i * step)] for i in range(limit)]


def _relative(path: str | Path, root: str | Path) -> str:
    try:
        return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return str(path)
