"""Data profiles from real NIfTI files: geometry, intensities, label fractions, summary."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from mlpipe.core.errors import DatasetError
from mlpipe.data.dataset import build_manifest
from mlpipe.data.profile import profile_dataset, profile_volume, summarize, summary_params
from tests.conftest import write_nifti_dataset


def test_profile_volume_reads_geometry_intensity_and_labels(tmp_path):
    image = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    label = np.zeros((4, 5, 6), dtype=np.uint8)
    label[:2] = 1
    label[3, 0, 0] = 2
    affine = np.diag([-0.8, -0.8, 2.5, 1.0])  # LPS-like: x and y flipped
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "img.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), tmp_path / "lab.nii.gz")
    entry = profile_volume(tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz")
    assert entry["shape"] == [4, 5, 6]
    assert entry["spacing"] == [0.8, 0.8, 2.5]
    assert entry["orientation"] == "LPS"
    assert entry["dtype"] == "float32"
    assert entry["intensity"]["p50"] == pytest.approx(np.percentile(image, 50))
    assert entry["intensity"]["mean"] == pytest.approx(image.mean())
    assert entry["label_fractions"] == pytest.approx({"0": 59 / 120, "1": 60 / 120, "2": 1 / 120})


def test_profile_volume_names_a_truncated_file(tmp_path):
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)), tmp_path / "a.nii.gz")
    data = (tmp_path / "a.nii.gz").read_bytes()
    (tmp_path / "a.nii.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=r"a\.nii\.gz"):
        profile_volume(tmp_path / "a.nii.gz")


def test_profile_dataset_relative_paths_and_summary(tmp_path):
    info = build_manifest(write_nifti_dataset(tmp_path / "data", cases=4))
    profile = profile_dataset(info)
    assert profile["dataset"] == {"name": "toy", "version": "v1", "digest": info.digest}
    assert [v["image"] for v in profile["volumes"]] == [
        f"imagesTr/case_{i}.nii.gz" for i in range(4)
    ]
    summary = profile["summary"]
    assert summary["volumes"] == 4
    assert summary["spacing"]["median"] == [1.5, 1.5, 3.0]
    assert summary["orientation"] == {"RAS": 4}
    assert 0 < summary["label_fractions"]["1"] < 0.2
    json.dumps(profile)  # what is logged must be JSON


def test_profile_dataset_max_volumes_spreads_evenly(tmp_path):
    info = build_manifest(write_nifti_dataset(tmp_path / "data", cases=6))
    calls = []
    profile = profile_dataset(info, max_volumes=3, progress=lambda d, t: calls.append((d, t)))
    assert [v["case"] for v in profile["volumes"]] == ["case_0", "case_2", "case_4"]
    assert calls == [(1, 3), (2, 3), (3, 3)]


def test_summary_params_are_short_strings(tmp_path):
    profile = profile_dataset(build_manifest(write_nifti_dataset(tmp_path / "data")))
    params = summary_params(profile)
    assert params["profile.volumes"] == "3"
    assert params["profile.spacing_median"] == "1.5x1.5x3"
    assert params["profile.shape_median"] == "8x8x6"
    assert all(isinstance(v, str) and len(v) < 250 for v in params.values())


def test_summarize_empty():
    assert summarize([]) == {"volumes": 0}
