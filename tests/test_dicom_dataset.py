"""Datasets whose images are DICOM series folders: layouts, the content digest, the manifest and
profiles (mlpipe.data.layouts, dataset, profile), with real series written by pydicom."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pydicom
import pytest

from mlpipe.core.errors import DatasetError
from mlpipe.data.dataset import build_manifest
from mlpipe.data.profile import profile_dataset
from mlpipe.monitor.new_volumes import find_images
from tests.dicom_factory import PLANTED, ct_volume, write_dicom_dataset, write_series


@pytest.fixture
def dicom_data(tmp_path, monkeypatch):
    monkeypatch.setenv("MLPIPE_DICOM_SALT", "test-salt")
    return write_dicom_dataset(tmp_path / "data", cases=2, identifiers=PLANTED)


def test_series_folder_is_one_image_with_its_nifti_label(dicom_data):
    info = build_manifest(dicom_data, cache=False)
    assert [(p.case, p.image.name, p.label.name) for p in info.pairs] == [
        ("case_0", "case_0", "case_0.nii.gz"),
        ("case_1", "case_1", "case_1.nii.gz"),
    ]
    images = [e for e in info.files if e.role == "image"]
    assert [e.path for e in images] == ["imagesTr/case_0", "imagesTr/case_1"]
    assert images[0].series["slices"] == 10 and len(images[0].series["files"]) == 10
    assert images[0].size == sum(
        f.stat().st_size for f in (dicom_data / "imagesTr/case_0").iterdir()
    )
    manifest = json.dumps(info.manifest())
    uid = pydicom.dcmread(next((dicom_data / "imagesTr/case_0").iterdir())).SeriesInstanceUID
    assert uid not in manifest and images[0].series["key"] in manifest
    for value in PLANTED.values():
        assert value not in manifest


def test_digest_is_stable_across_copies_and_renames_and_follows_pixel_data(dicom_data, tmp_path):
    digest = build_manifest(dicom_data, cache=False).digest

    copy = tmp_path / "copy"
    shutil.copytree(dicom_data, copy)
    for number, path in enumerate(sorted((copy / "imagesTr/case_1").iterdir())):
        path.rename(path.with_name(f"IM{number * 7:05d}"))
    assert build_manifest(copy, cache=False).digest == digest

    victim = sorted((copy / "imagesTr/case_1").iterdir())[4]
    ds = pydicom.dcmread(victim)
    pixels = ds.pixel_array.copy()
    pixels[3, 3] += 1
    ds.PixelData = pixels.tobytes()
    ds.save_as(victim)
    assert build_manifest(copy, cache=False).digest != digest


def test_a_bad_series_in_a_dataset_is_named(dicom_data):
    write_series(ct_volume()[:, :, :3], np.eye(4), dicom_data / "imagesTr/case_1", series_uid="9.9")
    with pytest.raises(DatasetError, match=r"case_1 holds 2 series, expected one"):
        build_manifest(dicom_data, cache=False)


def test_a_named_pipe_in_a_series_folder_is_refused_unopened(dicom_data):
    """Opening a FIFO blocks until a writer comes: it must be refused by name, never read."""
    import os
    import threading

    os.mkfifo(dicom_data / "imagesTr/case_1/zz-pipe.dcm")
    outcome: list[BaseException | None] = []

    def scan() -> None:
        try:
            build_manifest(dicom_data, cache=False)
            outcome.append(None)
        except BaseException as exc:  # handed to the test thread
            outcome.append(exc)

    worker = threading.Thread(target=scan, daemon=True)  # a hang fails instead of blocking
    worker.start()
    worker.join(timeout=10)
    assert outcome, "build_manifest hung on a named pipe in a series folder"
    assert isinstance(outcome[0], DatasetError)
    assert "zz-pipe.dcm is not a regular file" in str(outcome[0])


def test_label_on_another_grid_than_its_series_is_refused(tmp_path):
    root = write_dicom_dataset(tmp_path / "d", cases=1)
    shutil.rmtree(root / "imagesTr/case_0")
    write_series(ct_volume((24, 20, 8)), np.eye(4), root / "imagesTr/case_0")
    with pytest.raises(DatasetError, match="spatial shape 24x20x8 but its label"):
        build_manifest(root, cache=False)


def test_plain_layout_series_folder_and_profile(tmp_path):
    root = tmp_path / "plain"
    data = ct_volume()
    write_series(data, np.diag([1.5, 1.5, 3.0, 1.0]), root / "a_image", rename=True)
    import nibabel as nib

    nib.save(
        nib.Nifti1Image((data > 200).astype(np.uint8), np.diag([1.5, 1.5, 3.0, 1.0])),
        root / "a_label.nii.gz",
    )
    info = build_manifest(root, cache=False)
    assert [(p.case, p.image.name) for p in info.pairs] == [("a", "a_image")]
    profile = profile_dataset(info)
    volume = profile["volumes"][0]
    assert volume["shape"] == [24, 20, 10] and volume["spacing"] == [1.5, 1.5, 3.0]
    assert volume["orientation"] == "RAS" and volume["intensity"]["p0_5"] == -1000.0
    assert volume["label_fractions"]["1"] > 0


def test_drift_finds_series_folders_not_their_parents(dicom_data):
    found = find_images(dicom_data)
    assert [p.name for p in found] == ["case_0", "case_1"]
    assert find_images(dicom_data / "imagesTr/case_0") == [dicom_data / "imagesTr/case_0"]


def _seg_label(image_folder, path, *, mask_from=None):
    """A DICOM SEG drawn on ``image_folder`` (class 1 where the volume is > 200 HU)."""
    from mlpipe.data.dicom import load_series, open_series, source_datasets
    from mlpipe.inference.dicom_seg import mask_on_source, write_dicom_seg

    with open_series(image_folder) as series:
        volume = load_series(series) if mask_from is None else mask_from
        mask = (volume > 200).astype(np.uint8)
        frames = mask_on_source(mask, series.affine, series.affine)
        write_dicom_seg(frames, source_datasets(series), {1: "bone"}, path)
    return mask


def test_dicom_seg_labels_are_placed_on_their_series(dicom_data):
    nifti_profile = profile_dataset(build_manifest(dicom_data, cache=False))
    for case in ("case_0", "case_1"):
        (dicom_data / "labelsTr" / f"{case}.nii.gz").unlink()
        _seg_label(dicom_data / "imagesTr" / case, dicom_data / "labelsTr" / f"{case}.dcm")

    info = build_manifest(dicom_data, cache=False)
    assert [p.label.name for p in info.pairs] == ["case_0.dcm", "case_1.dcm"]
    seg_profile = profile_dataset(info)
    for nifti, seg in zip(nifti_profile["volumes"], seg_profile["volumes"], strict=True):
        assert seg["label_fractions"] == nifti["label_fractions"]
    manifest = json.dumps(info.manifest())
    for value in PLANTED.values():  # the SEG carries them; the manifest must not
        assert value not in manifest


def test_a_dicom_seg_of_another_series_is_refused(dicom_data):
    (dicom_data / "labelsTr" / "case_0.nii.gz").unlink()
    _seg_label(dicom_data / "imagesTr" / "case_1", dicom_data / "labelsTr" / "case_0.dcm")
    with pytest.raises(DatasetError, match="segments another series than its image"):
        build_manifest(dicom_data, cache=False)


def test_series_facts_come_from_the_hash_cache_until_a_slice_changes(
    dicom_data, tmp_path, monkeypatch
):
    import os
    import time

    import mlpipe.data.dataset as dataset

    hour_ago = time.time_ns() - 3_600 * 10**9
    for path in sorted(dicom_data.rglob("*"), reverse=True):  # files before their folders
        os.utime(path, ns=(hour_ago, hour_ago))
    cache = tmp_path / "cache" / "hashes.sqlite"
    first = build_manifest(dicom_data, cache=cache)

    def not_again(folder):
        raise AssertionError(f"{folder} was read again although unchanged")

    monkeypatch.setattr(dataset, "_examine_series", not_again)
    second = build_manifest(dicom_data, cache=cache)
    assert second.digest == first.digest and second.manifest() == first.manifest()

    monkeypatch.undo()
    victim = sorted((dicom_data / "imagesTr/case_0").iterdir())[2]
    ds = pydicom.dcmread(victim)
    ds.PixelData = (ds.pixel_array + 1).astype(ds.pixel_array.dtype).tobytes()
    ds.save_as(victim)
    assert build_manifest(dicom_data, cache=cache).digest != first.digest
