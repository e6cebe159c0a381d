"""How long seg3d's planning takes: cold (every volume read) and warm (fingerprint cached).

Writes ``--count`` CT-like cases of ``--size``^3 (int16 image, uint8 label, .nii.gz), then:

* ``read_once``: load every image and label once (nibabel, all voxels), one after the other,
  and with the fingerprint's own thread count (``read_once_threads``): the floor for any
  planner that looks at the voxels;
* ``cold``: ``fingerprint`` + ``make_plan`` with an empty fingerprint cache (the dataset's
  file hashes already cached, as after ``mlpipe run``'s pre-flight);
* ``warm``: the whole planning again: ``build_manifest`` (hashes cached) + cached fingerprint
  + ``make_plan``, what a second run on the same data pays.

Targets (issue 16): warm < 1 s; cold <= 1.2x ``read_once``.

    python benchmarks/seg3d_plan_time.py --count 100 --size 128
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _common import emit, machine, summary, versions

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "projects" / "seg3d"))


def write_cases(root: Path, count: int, size: int) -> None:
    import json

    import nibabel as nib
    import numpy as np

    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    grid = np.indices((size,) * 3).astype(np.float32) - size / 2
    radius = np.sqrt((grid**2).sum(0))
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    training = []
    for i in range(count):
        label = (radius < size * rng.uniform(0.2, 0.3)).astype(np.uint8)
        label[radius < size * 0.08] = 2
        image = rng.normal(0, 20, label.shape) + np.where(label > 0, 60.0, -900.0)
        name = f"case_{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(image.astype(np.int16), affine), root / "imagesTr" / name)
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    labels = {"0": "background", "1": "organ", "2": "core"}
    meta = {"name": "plan-time", "modality": {"0": "CT"}, "labels": labels, "training": training}
    (root / "dataset.json").write_text(json.dumps(meta))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()

    import numpy as np

    from mlpipe.data.dataset import build_manifest
    from mlpipe.data.volumes import load_volume
    from seg3d.fingerprint import _WORKERS, fingerprint, read_dataset_json
    from seg3d.plan import make_plan

    with tempfile.TemporaryDirectory(prefix="seg3d-plan-time-") as tmp:
        root = Path(tmp) / "data"
        write_cases(root, args.count, args.size)
        hashes = Path(tmp) / "hashes.db"
        info = build_manifest(root, cache=hashes)  # the file hashes, as mlpipe run's pre-flight
        pairs = [p for p in info.pairs if p.label is not None]

        def read(pair) -> int:
            image, _ = load_volume(pair.image)
            label, _ = load_volume(pair.label, dtype=None)
            return int(image.size + np.asarray(label).size)

        began = time.perf_counter()
        for pair in pairs:
            read(pair)
        read_once = time.perf_counter() - began
        workers = min(_WORKERS, __import__("os").cpu_count() or 1)
        began = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(read, pairs))
        read_threads = time.perf_counter() - began

        cache = Path(tmp) / "fingerprints"
        began = time.perf_counter()
        fp = fingerprint(info, cache=cache)
        make_plan(fp["summary"], read_dataset_json(root))
        cold = time.perf_counter() - began

        began = time.perf_counter()
        again = build_manifest(root, cache=hashes)
        fp = fingerprint(again, cache=cache)
        make_plan(fp["summary"], read_dataset_json(root))
        warm = time.perf_counter() - began
    emit({
        "benchmark": "seg3d_plan_time",
        "cases": args.count,
        "size": args.size,
        "read_once_s": round(read_once, 3),
        "read_once_threads_s": round(read_threads, 3),
        "cold_s": round(cold, 3),
        "warm_s": round(warm, 3),
        "cold_over_read_once": round(cold / read_once, 3),
        "cold_over_read_once_threads": round(cold / read_threads, 3),
        "met": warm < 1.0 and cold <= 1.2 * read_once,
        "summary": summary(
            mlpipe=f"plan {args.count} cases cold {cold:.2f} s, warm {warm:.2f} s",
            baseline=f"reading them once {read_once:.2f} s",
            ratio=cold / read_once,
            target="cold <= 1.2x one read; warm < 1 s",
            met=warm < 1.0 and cold <= 1.2 * read_once,
        ),
        "machine": machine(),
        "versions": versions("numpy", "nibabel"),
    })  # fmt: skip


if __name__ == "__main__":
    main()
