"""DICOM: reading a 300-slice 512x512 CT series vs the same volume from an uncompressed NIfTI,
and writing a 300-slice DICOM SEG.

Writes one CT series (int16 stored, RescaleIntercept -1024, explicit VR little endian, one file
per slice, written by pydicom as a scanner export would be) and the NIfTI of the same HU
volume (``.nii``, int16, uncompressed) into a temporary folder. Then, round by round
(interleaved, page cache warm for all):

* ``mlpipe``: ``mlpipe.data.volumes.load_volume(series_folder)``: scan the headers, check the
  geometry, decode, rescale to float32 HU (what datasets, profiles, drift and serve call);
* ``nibabel``: ``load_volume(x.nii)``: the same float32 HU array from the NIfTI;
* ``mlpipe_headers_only``: ``scan_series`` alone (parse 300 headers, check the geometry), the
  part of ``mlpipe`` that reading one NIfTI does not have;
* ``monai``: MONAI's ``PydicomReader`` + ``get_data`` on the same folder, for reference (it
  sorts by InstanceNumber; its array is checked for equal shape only).

Then ``write_dicom_seg`` of a two-class 300-slice mask over the series' datasets, to a file
(median of the writes after the first, which also imports highdicom; the first is reported).
Targets: series read <= 1.2x NIfTI; SEG writing < 5 s.
Run: `python benchmarks/dicom_io.py [--repeats N] [--slices N] [--side N]`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from _common import emit, machine, median, summary, versions

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlpipe.data.dicom import open_series, scan_series, source_datasets
from mlpipe.data.volumes import load_volume
from mlpipe.inference.dicom_seg import mask_on_source, write_dicom_seg
from tests.dicom_factory import write_series

TARGET_RATIO = 1.2
TARGET_SEG_S = 5.0


def make_volume(side: int, slices: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    data = np.full((side, side, slices), -1000.0, dtype=np.float32)
    x = np.arange(side) - side / 2
    body = (x[:, None] ** 2 + x[None, :] ** 2) < (0.4 * side) ** 2
    data[body] = 40.0
    data += np.rint(rng.normal(0, 15, data.shape)).astype(np.float32)
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--no-monai", action="store_true")
    args = parser.parse_args()
    affine = np.diag([0.7, 0.7, 1.25, 1.0])
    with tempfile.TemporaryDirectory(prefix="mlpipe-bench-") as tmp:
        data = make_volume(args.side, args.slices)
        series = Path(tmp) / "series"
        write_series(data, affine, series, shuffle=True, rename=True)
        nifti = Path(tmp) / "ct.nii"
        nib.save(nib.Nifti1Image(data.astype(np.int16), affine), nifti)
        reference, _ = load_volume(nifti)
        readers = {
            "mlpipe": lambda: load_volume(series)[0],
            "nibabel": lambda: load_volume(nifti)[0],
            "mlpipe_headers_only": lambda: scan_series(series).shape,
        }
        if not args.no_monai:
            from monai.data import PydicomReader

            def monai_read() -> np.ndarray:
                reader = PydicomReader()
                return reader.get_data(reader.read(str(series)))[0]

            readers["monai"] = monai_read
        for read in readers.values():  # warm the page cache and the imports
            read()
        times: dict[str, list[float]] = {name: [] for name in readers}
        for _ in range(args.repeats):
            for name, read in readers.items():
                began = time.perf_counter()
                array = read()
                times[name].append(time.perf_counter() - began)
                if name == "mlpipe" and not np.array_equal(array, reference):
                    raise SystemExit("the series does not read back equal to its NIfTI")
                if name == "monai" and tuple(array.shape) != reference.shape:  # type: ignore[union-attr]
                    raise SystemExit(f"MONAI read shape {array.shape}")
                del array
        mask = np.zeros(data.shape, dtype=np.uint8)
        mask[data > 20] = 1
        mask[:, :, : args.slices // 3][data[:, :, : args.slices // 3] > 50] = 2
        seg_times = []
        with open_series(series) as scanned:
            datasets = source_datasets(scanned)
            frames = mask_on_source(mask, scanned.affine, scanned.affine)
            for n in range(max(1, args.repeats // 2) + 1):  # the first imports highdicom
                began = time.perf_counter()
                write_dicom_seg(frames, datasets, {1: "body", 2: "dense"}, Path(tmp) / f"s{n}.dcm")
                seg_times.append(time.perf_counter() - began)
            first_seg_s = seg_times.pop(0)
            seg_bytes = (Path(tmp) / "s0.dcm").stat().st_size
    medians = {name: median(t) for name, t in times.items()}
    ratio = medians["mlpipe"] / medians["nibabel"]
    seg_s = median(seg_times)
    emit(
        {
            "name": "dicom_io",
            "repeats": args.repeats,
            "shape": list(data.shape),
            "median_s": {k: round(v, 4) for k, v in medians.items()},
            "ratio": {
                f"{k} / nibabel": round(v / medians["nibabel"], 3) for k, v in medians.items()
            },
            "seg_write_s": round(seg_s, 3),
            "seg_write_first_s": round(first_seg_s, 3),
            "seg_bytes": seg_bytes,
            "target": f"series read <= {TARGET_RATIO}x NIfTI; SEG write < {TARGET_SEG_S:g} s",
            "met": ratio <= TARGET_RATIO and seg_s < TARGET_SEG_S,
            "summary": summary(
                f"series {medians['mlpipe']:.2f} s, SEG write {seg_s:.2f} s",
                f"NIfTI {medians['nibabel']:.2f} s",
                ratio,
                f"<= {TARGET_RATIO}x; SEG < {TARGET_SEG_S:g} s",
                ratio <= TARGET_RATIO and seg_s < TARGET_SEG_S,
            ),
            "versions": versions("mlpipe", "pydicom", "highdicom", "nibabel", "monai", "numpy"),
            "machine": machine(),
        }
    )


if __name__ == "__main__":
    main()
