"""mlpipe.data.dicom and mlpipe.inference.dicom_seg: real DICOM series written with pydicom
(tests/dicom_factory.py) from NIfTI volumes, and the real series that ship inside pydicom.

The NIfTI of the same data is the reference: the series must read back to the same voxels and
the same affine (nibabel's), whatever the file names, file order and InstanceNumbers.
"""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEGLosslessSV1

from mlpipe.core.errors import DatasetError, UsageError
from mlpipe.data.dicom import (
    open_series,
    read_series,
    scan_series,
    series_key,
    source_datasets,
)
from mlpipe.data.volumes import is_series, load_volume, read_header
from mlpipe.inference.dicom_seg import mask_on_source, write_dicom_seg
from tests.dicom_factory import ct_volume, oblique_affine, write_series

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
CT5N = PYDICOM_FILES / "dicomdirtests" / "98892001" / "CT5N"
CT2_GAP = PYDICOM_FILES / "dicomdirtests" / "77654033" / "CT2"


def _nifti(tmp_path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    path = tmp_path / "reference.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


@pytest.mark.parametrize(
    ("modality", "affine", "intercept"),
    [
        ("CT", np.diag([0.8, 0.8, 2.5, 1.0]), -1024.0),
        ("CT", np.diag([-0.7, -0.75, 3.0, 1.0]), -1024.0),  # LPS-stored, like a scanner's
        ("MR", oblique_affine(), 0.0),
    ],
    ids=["ct-ras", "ct-lps", "mr-oblique"],
)
def test_series_reads_back_equal_to_the_nifti_of_the_same_data(
    tmp_path, modality, affine, intercept
):
    data = ct_volume() if modality == "CT" else np.rint(np.abs(ct_volume()) / 4)
    reference = _nifti(tmp_path, data, affine)
    write_series(
        data,
        affine,
        tmp_path / "series",
        modality=modality,
        intercept=intercept,
        shuffle=True,
        rename=True,
        reverse_instance_numbers=True,
    )

    volume, header = load_volume(tmp_path / "series")
    expected, expected_header = load_volume(reference)

    assert is_series(tmp_path / "series")
    np.testing.assert_array_equal(volume, expected)  # HU: the rescale intercept applied
    np.testing.assert_allclose(header.affine, expected_header.affine, atol=1e-4)
    assert header.orientation == expected_header.orientation
    np.testing.assert_allclose(header.spacing, expected_header.spacing, atol=1e-5)
    assert read_header(tmp_path / "series").shape == expected_header.shape


def test_pydicom_ct_series_is_sorted_by_position_not_instance_number():
    volume, series = read_series(CT5N)
    ordered = [pydicom.dcmread(p) for p in series.files]
    z = [float(ds.ImagePositionPatient[2]) for ds in ordered]
    assert z == sorted(z)  # InstanceNumber runs the other way in this series
    assert [int(ds.InstanceNumber) for ds in ordered] == [10, 9, 8, 7, 6]
    assert series.spacing[2] == pytest.approx(2.5)
    ds0 = ordered[0]
    hu = ds0.pixel_array.T * float(ds0.RescaleSlope) + float(ds0.RescaleIntercept)
    np.testing.assert_array_equal(volume[:, :, 0], hu)


def test_single_dcm_file_is_a_one_slice_volume():
    volume, header = load_volume(PYDICOM_FILES / "CT_small.dcm")
    assert volume.shape == (128, 128, 1)
    assert header.spacing[2] == pytest.approx(5.0)  # SliceThickness when there is no step


def test_zip_of_a_series_reads_like_the_folder(tmp_path):
    data = ct_volume()
    write_series(data, np.diag([1.0, 1.0, 2.0, 1.0]), tmp_path / "s", rename=True)
    archive = tmp_path / "s.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted((tmp_path / "s").iterdir()):
            zf.write(path, f"export/{path.name}")
        zf.writestr("__MACOSX/._junk", b"junk")
    volume, _ = load_volume(archive)
    np.testing.assert_array_equal(volume, data)


def test_zip_with_a_path_leaving_the_folder_is_refused(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../../outside.dcm", b"x" * 10)
    with pytest.raises(DatasetError, match="unsafe path"), open_series(archive):
        pass


# --- refusals, each with its reason ---------------------------------------------------------


def test_two_series_in_one_folder_are_refused_with_their_uids(tmp_path):
    data = ct_volume()
    write_series(data, np.eye(4), tmp_path / "mixed", series_uid="1.2.3.4.1")
    write_series(data[:, :, :4], np.eye(4), tmp_path / "other", series_uid="1.2.3.4.2")
    for path in (tmp_path / "other").iterdir():
        shutil.move(path, tmp_path / "mixed" / f"b_{path.name}")

    with pytest.raises(DatasetError) as info:
        scan_series(tmp_path / "mixed")
    message = str(info.value)
    assert "holds 2 series, expected one" in message
    assert "1.2.3.4.1 (10 slices, CT)" in message and "1.2.3.4.2 (4 slices, CT)" in message
    assert "Move the files of one series into a folder of its own" in message
    picked = scan_series(tmp_path / "mixed", series_uid="1.2.3.4.2")
    assert picked.shape[2] == 4


def test_a_missing_slice_is_refused(tmp_path):
    write_series(ct_volume(), np.diag([1.0, 1.0, 2.0, 1.0]), tmp_path / "s", drop=4)
    with pytest.raises(DatasetError, match=r"missing slices: 1 gap\(s\) .* \(about 1 missing\)"):
        read_series(tmp_path / "s")


def test_pydicom_series_with_a_200_mm_gap_is_refused():
    with pytest.raises(DatasetError, match="missing slices") as info:
        scan_series(CT2_GAP)
    assert "-99.48 to 103.02 mm" in str(info.value)


def test_a_duplicated_slice_is_refused(tmp_path):
    paths = write_series(ct_volume(), np.eye(4), tmp_path / "s")
    ds = pydicom.dcmread(paths[3])
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(tmp_path / "s" / "copy_of_3.dcm")
    with pytest.raises(DatasetError, match=r"duplicated slice: .* are both at 3.000 mm"):
        scan_series(tmp_path / "s")


def test_inconsistent_spacing_and_orientation_are_refused(tmp_path):
    paths = write_series(ct_volume(), np.diag([1.0, 1.0, 2.0, 1.0]), tmp_path / "s")
    ds = pydicom.dcmread(paths[5])
    ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1], 10.6]
    ds.save_as(paths[5])
    with pytest.raises(DatasetError, match="inconsistent slice spacing"):
        scan_series(tmp_path / "s")

    paths = write_series(ct_volume(), np.eye(4), tmp_path / "t")
    ds = pydicom.dcmread(paths[2])
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0.9950042, 0.0998334]
    ds.save_as(paths[2])
    with pytest.raises(DatasetError, match=r"inconsistent orientation: slice_0002\.dcm"):
        scan_series(tmp_path / "t")


def test_non_image_objects_only_are_refused(tmp_path):
    shutil.copy(PYDICOM_FILES / "rtplan.dcm", tmp_path / "plan.dcm")
    shutil.copy(PYDICOM_FILES / "rtstruct.dcm", tmp_path / "struct.dcm")
    with pytest.raises(DatasetError) as info:
        scan_series(tmp_path)
    assert "only non-image DICOM objects (RT Plan Storage, RT Structure Set Storage)" in str(
        info.value
    )


def test_a_folder_without_dicom_is_refused(tmp_path):
    (tmp_path / "README.txt").write_text("not dicom")
    with pytest.raises(DatasetError, match="holds no DICOM files"):
        scan_series(tmp_path)


def test_undecodable_transfer_syntax_is_named_with_the_package_that_decodes_it(tmp_path):
    # JPEG Lossless SV1, the usual CT archive syntax: pydicom needs pylibjpeg or gdcm for it.
    paths = write_series(ct_volume(), np.eye(4), tmp_path / "s")
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
        ds.PixelData = pydicom.encaps.encapsulate([b"\xff\xd8junk\xff\xd9"])
        ds["PixelData"].VR = "OB"
        ds.save_as(path, enforce_file_format=True)
    with pytest.raises(DatasetError) as info:
        scan_series(tmp_path / "s")
    message = str(info.value)
    assert "JPEG Lossless, Non-Hierarchical, First-Order Prediction" in message
    assert "pip install python-gdcm" in message and "pylibjpeg-libjpeg" in message


# --- DICOM SEG ------------------------------------------------------------------------------


def test_dicom_seg_reads_back_onto_the_right_source_slices(tmp_path):
    data = ct_volume()
    affine = oblique_affine()
    write_series(data, affine, tmp_path / "s", shuffle=True, rename=True)
    with open_series(tmp_path / "s") as series:
        volume, _ = load_volume(tmp_path / "s")
        mask = np.zeros(volume.shape, dtype=np.uint8)
        mask[volume > 200] = 1
        mask[:, :, 0][volume[:, :, 0] < -500] = 2  # class 2 on the lowest slice only
        datasets = source_datasets(series)
        frames = mask_on_source(mask, series.affine, series.affine)
        write_dicom_seg(frames, datasets, {1: "bone", 2: "air"}, tmp_path / "seg.dcm")

    seg = hd.seg.segread(tmp_path / "seg.dcm")
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["bone", "air"]
    uids = [ds.SOPInstanceUID for ds in datasets]
    back = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, combine_segments=True, skip_overlap_checks=True
    )
    np.testing.assert_array_equal(back, mask.transpose(2, 1, 0))
    lowest = min(datasets, key=lambda ds: float(np.asarray(ds.ImagePositionPatient) @ [0, 0, 1]))
    frames_with_air = seg.get_source_image_uids()  # the SEG references the source series
    assert any(uid == lowest.SOPInstanceUID for *_, uid in frames_with_air)


def test_mask_on_another_grid_is_refused(tmp_path):
    with pytest.raises(UsageError, match="not on the source series' voxel grid"):
        mask_on_source(np.zeros((4, 4, 2)), np.diag([2, 2, 2, 1]), np.eye(4))


def test_series_key_is_salted_and_stable(monkeypatch):
    monkeypatch.setenv("MLPIPE_DICOM_SALT", "team-salt")
    a = series_key("1.2.840.1")
    assert a == series_key("1.2.840.1") and len(a) == 16 and "1.2.840" not in a
    assert a != series_key("1.2.840.1", salt="other")


def test_compressed_slices_decode_through_pydicom_like_native_ones():
    native, native_header = load_volume(PYDICOM_FILES / "MR_small.dcm")
    rle, rle_header = load_volume(PYDICOM_FILES / "MR_small_RLE.dcm")  # decoded by pydicom
    np.testing.assert_array_equal(native, rle)
    assert native_header.affine == rle_header.affine
    with open_series(PYDICOM_FILES / "MR_small.dcm") as series:
        assert series.pixel_offsets is not None  # read straight from the file
    with open_series(PYDICOM_FILES / "MR_small_RLE.dcm") as series:
        assert series.pixel_offsets is None


def test_seg_for_series_writes_a_nifti_mask_over_its_series(tmp_path):
    from mlpipe.inference.dicom_seg import seg_for_series

    data, affine = ct_volume(), oblique_affine()
    write_series(data, affine, tmp_path / "s", shuffle=True)
    volume, header = load_volume(tmp_path / "s")
    mask = (volume > 200).astype(np.uint8)
    nib.save(nib.Nifti1Image(mask, np.asarray(header.affine)), tmp_path / "case_mask.nii.gz")

    out = seg_for_series(
        tmp_path / "case_mask.nii.gz",
        tmp_path / "s",
        tmp_path / "out" / "case_seg.dcm",
        class_names={1: "bone"},
        algorithm="seg3d",
        algorithm_version="7",
    )

    seg = hd.seg.segread(out)
    assert seg.SegmentSequence[0].SegmentLabel == "bone"
    assert seg.SegmentSequence[0].SegmentAlgorithmName == "seg3d"
    with open_series(tmp_path / "s") as series:
        uids = [ds.SOPInstanceUID for ds in source_datasets(series)]
    back = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, combine_segments=True, skip_overlap_checks=True
    )
    np.testing.assert_array_equal(back, mask.transpose(2, 1, 0))
    nib.save(nib.Nifti1Image(mask, np.eye(4)), tmp_path / "other.nii.gz")
    with pytest.raises(UsageError, match="not on the source series' voxel grid"):
        seg_for_series(tmp_path / "other.nii.gz", tmp_path / "s", tmp_path / "x.dcm")


@pytest.mark.parametrize("reader", ["instance", "dotted"])
def test_monai_load_image_reads_a_series_like_its_nifti(tmp_path, reader):
    from monai.transforms import LoadImaged

    from mlpipe.data.monai_reader import DicomSeriesReader

    data, affine = ct_volume(), oblique_affine()
    write_series(data, affine, tmp_path / "s", shuffle=True, reverse_instance_numbers=True)
    label = tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image((data > 200).astype(np.uint8), affine), label)
    chosen = (
        DicomSeriesReader()
        if reader == "instance"
        else "mlpipe.data.monai_reader.DicomSeriesReader"
    )
    load = LoadImaged(keys=["image", "label"], reader=chosen, image_only=True)

    item = load({"image": str(tmp_path / "s"), "label": str(label)})  # label: MONAI's NIfTI reader

    np.testing.assert_array_equal(np.asarray(item["image"]), data)
    np.testing.assert_allclose(np.asarray(item["image"].affine), affine, atol=1e-4)
    np.testing.assert_allclose(np.asarray(item["label"].affine), affine, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(item["label"]) == 1, data > 200)


def test_monai_chain_with_the_series_reader_leaves_nifti_to_monai(tmp_path):
    """LoadImage tries a reader named by the user on every file: a 4D multi-channel NIfTI must
    still come out channels first, exactly as MONAI's own reader gives it (seg3d names the
    series reader in its chain; a 4D image once came out 5D and broke Orientationd)."""
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    image = tmp_path / "multi.nii.gz"
    data = np.random.default_rng(0).normal(size=(12, 10, 8, 3)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 3.0, 1.0])), image)

    def load(**reader):
        chain = Compose(
            [LoadImaged("image", image_only=True, **reader), EnsureChannelFirstd("image")]
        )
        return chain({"image": str(image)})["image"]

    with_reader = load(reader="mlpipe.data.monai_reader.DicomSeriesReader")
    plain = load()
    assert tuple(with_reader.shape) == tuple(plain.shape) == (3, 12, 10, 8)
    np.testing.assert_array_equal(np.asarray(with_reader), np.asarray(plain))
