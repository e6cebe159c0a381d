"""Dataset digest: `build_manifest` of 1,000 NIfTI files with a cold and with a warm hash cache.

Writes 500 image/label pairs (16^3 float32 images, uint8 labels, .nii.gz) in the Decathlon
layout into a temporary folder, with mtimes an hour in the past as a dataset on disk has (files
modified in the last two seconds are never cached). Then, round by round (interleaved):
cold = a fresh, empty cache file (every file hashed, gzip-checked, header read, then cached);
warm = the same cache file every round (nothing read but a stat per file). Both run in this
process, so the figure is `build_manifest` itself, not interpreter start or imports; the OS
page cache is warm for both. Target: warm under 1 s.
Run: `python benchmarks/dataset_digest.py [--repeats N] [--pairs N]`.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from _common import emit, machine, median, summary, versions

from mlpipe.data.dataset import build_manifest

TARGET_WARM_S = 1.0


def write_dataset(root: Path, pairs: int, side: int) -> None:
    """Decathlon layout: imagesTr/case_N.nii.gz and labelsTr/case_N.nii.gz."""
    rng = np.random.default_rng(0)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    for n in range(pairs):
        image = rng.normal(0.0, 100.0, (side,) * 3).astype(np.float32)
        label = (rng.random((side,) * 3) > 0.9).astype(np.uint8)
        nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / f"case_{n:04d}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / f"case_{n:04d}.nii.gz")
    hour_ago = time.time_ns() - 3_600 * 10**9
    for path in root.rglob("*.nii.gz"):
        os.utime(path, ns=(hour_ago, hour_ago))


def timed(source: Path, cache: Path) -> tuple[float, str]:
    began = time.perf_counter()
    info = build_manifest(source, cache=cache)
    return time.perf_counter() - began, info.digest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=500)
    parser.add_argument("--side", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mlpipe-bench-") as tmp:
        root = Path(tmp) / "Task00_Bench"
        write_dataset(root, args.pairs, args.side)
        files = sorted(root.rglob("*.nii.gz"))
        total_bytes = sum(path.stat().st_size for path in files)
        warm_cache = Path(tmp) / "warm" / "hashes.sqlite"
        _, reference = timed(root, warm_cache)  # fills the warm cache (and the page cache)
        times: dict[str, list[float]] = {"cold": [], "warm": []}
        for n in range(args.repeats):
            cold_s, cold_digest = timed(root, Path(tmp) / f"cold{n}" / "hashes.sqlite")
            warm_s, warm_digest = timed(root, warm_cache)
            if cold_digest != reference or warm_digest != reference:
                raise SystemExit("digest differs between builds of unchanged data")
            times["cold"].append(cold_s)
            times["warm"].append(warm_s)
    medians = {name: median(t) for name, t in times.items()}
    emit(
        {
            "name": "dataset_digest",
            "repeats": args.repeats,
            "files": len(files),
            "bytes": total_bytes,
            "median_s": {k: round(v, 4) for k, v in medians.items()},
            "ratio": {"warm / cold": round(medians["warm"] / medians["cold"], 4)},
            "target": f"warm < {TARGET_WARM_S:g} s",
            "met": medians["warm"] < TARGET_WARM_S,
            "summary": summary(
                f"warm cache {medians['warm']:.3f} s ({len(files)} files)",
                f"cold {medians['cold']:.2f} s",
                medians["warm"] / medians["cold"],
                f"warm < {TARGET_WARM_S:g} s",
                medians["warm"] < TARGET_WARM_S,
            ),
            "versions": versions("mlpipe", "nibabel", "numpy"),
            "machine": machine(),
        }
    )


if __name__ == "__main__":
    main()
