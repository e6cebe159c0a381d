"""Unit tests of mlpipe.volumes: header fields and errors that name the file, on real NIfTI."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mlpipe.core.errors import DatasetError
from mlpipe.data.volumes import is_volume, load_volume, read_header


def _write(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


def _cut(path: Path, keep: float = 0.5) -> Path:
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])
    return path


def _volume(shape=(8, 8, 8), dtype=np.float32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape).astype(dtype)


# is_volume -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ct.nii", "ct.nii.gz", "dir/CT.NII.GZ"])
def test_is_volume_accepts_nifti_names(name):
    assert is_volume(name)


@pytest.mark.parametrize("name", ["ct.gz", "ct.nii.gz.part", "ct.mha", "notes.txt", "nii"])
def test_is_volume_refuses_other_names(name):
    assert not is_volume(name)


# read_header -----------------------------------------------------------------------------------


def test_read_header_reports_shape_spacing_dtype_and_ndim(tmp_path):
    affine = np.diag([0.8, 0.7, 2.5, 1.0])
    path = _write(tmp_path / "ct.nii.gz", _volume((10, 9, 8), np.int16), affine)

    header = read_header(path)

    assert header.path == str(path)
    assert header.shape == (10, 9, 8)
    assert header.spatial_shape == (10, 9, 8)
    assert header.ndim == 3
    assert header.dtype == "int16"
    assert header.spacing == pytest.approx((0.8, 0.7, 2.5))
    assert np.allclose(np.array(header.affine), affine)


def test_read_header_orientation_from_affine_ras_and_lps(tmp_path):
    ras = _write(tmp_path / "ras.nii.gz", _volume(), np.diag([1.0, 1.0, 1.0, 1.0]))
    lps = _write(tmp_path / "lps.nii.gz", _volume(), np.diag([-1.0, -1.0, 1.0, 1.0]))

    assert read_header(ras).orientation == "RAS"
    assert read_header(lps).orientation == "LPS"


def test_read_header_4d_image_keeps_spatial_shape_first_three(tmp_path):
    path = _write(tmp_path / "mri.nii.gz", _volume((8, 7, 6, 4)))

    header = read_header(path)

    assert header.shape == (8, 7, 6, 4)
    assert header.spatial_shape == (8, 7, 6)
    assert header.ndim == 4


def test_read_header_data_end_covers_header_and_voxels(tmp_path):
    path = _write(tmp_path / "ct.nii", _volume((8, 8, 8), np.float32))

    # An uncompressed NIfTI-1 file is exactly header + voxels, so data_end is its size.
    assert read_header(path).data_end == path.stat().st_size == 352 + 8 * 8 * 8 * 4


def test_read_header_truncated_nii_names_file_and_sizes(tmp_path):
    path = _cut(_write(tmp_path / "ct.nii", _volume()))

    with pytest.raises(DatasetError, match=r"ct\.nii is truncated: its header promises 2400 bytes"):
        read_header(path)


def test_read_header_gzip_cut_inside_header_names_file(tmp_path):
    path = _cut(_write(tmp_path / "ct.nii.gz", _volume()), keep=0.02)

    with pytest.raises(DatasetError, match=r"ct\.nii\.gz is a gzip stream cut short"):
        read_header(path)


def test_read_header_text_named_nii_gz_is_not_gzip(tmp_path):
    path = tmp_path / "notes.nii.gz"
    path.write_text("patient list\n" * 50)

    with pytest.raises(DatasetError, match=r"notes\.nii\.gz is not gzip-compressed"):
        read_header(path)


def test_read_header_gzip_of_non_nifti_is_refused(tmp_path):
    path = tmp_path / "blob.nii.gz"
    path.write_bytes(gzip.compress(b"\x01" * 1000))

    with pytest.raises(DatasetError, match=r"blob\.nii\.gz is not a NIfTI file"):
        read_header(path)


def test_read_header_empty_file_is_refused(tmp_path):
    path = tmp_path / "empty.nii.gz"
    path.touch()

    with pytest.raises(DatasetError, match=r"empty\.nii\.gz is empty \(0 bytes\)"):
        read_header(path)


def test_read_header_missing_file_is_refused(tmp_path):
    with pytest.raises(DatasetError, match=r"missing\.nii\.gz does not exist"):
        read_header(tmp_path / "missing.nii.gz")


def test_read_header_error_is_a_usage_error_with_exit_2(tmp_path):
    with pytest.raises(DatasetError) as info:
        read_header(tmp_path / "missing.nii")
    assert info.value.exit_code == 2


# load_volume -----------------------------------------------------------------------------------


def test_load_volume_returns_float32_data_and_header(tmp_path):
    data = _volume((8, 7, 6), np.int16)
    path = _write(tmp_path / "ct.nii.gz", data)

    array, header = load_volume(path)

    assert array.dtype == np.float32
    assert array.shape == (8, 7, 6)
    assert np.array_equal(array, data.astype(np.float32))
    assert header.dtype == "int16"


def test_load_volume_dtype_none_keeps_stored_integers(tmp_path):
    labels = np.random.default_rng(1).integers(0, 3, (8, 8, 8)).astype(np.uint8)
    path = _write(tmp_path / "label.nii.gz", labels)

    array, _ = load_volume(path, dtype=None)

    assert array.dtype == np.uint8
    assert np.array_equal(array, labels)


def test_load_volume_truncated_gzip_names_file_and_fix(tmp_path):
    path = _cut(_write(tmp_path / "ct.nii.gz", _volume((16, 16, 16))))
    read_header(path)  # the header is intact; only the voxels are missing

    with pytest.raises(DatasetError) as info:
        load_volume(path)
    message = str(info.value)
    assert str(path) in message
    assert "truncated or corrupt" in message
    assert "Copy or export it again" in message
    assert "gzip stream ends after" in message  # cut short, and said so


# --- the header decides before the body ------------------------------------------------------


def _declaring(path: Path, shape, body: bytes) -> Path:
    """A .nii.gz whose header declares ``shape`` float32 and whose body is ``body``."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    header.set_data_offset(352)
    path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4 + body, compresslevel=1))
    return path


def test_a_header_declaring_more_than_the_limit_is_refused_unread(tmp_path):
    import time

    from mlpipe.data.volumes import declared_size

    path = _declaring(tmp_path / "big.nii.gz", (1024, 1024, 512), bytes(32 << 20))
    assert declared_size(path) == ((1024, 1024, 512), "float32", 352, 2 * 1024**3)
    started = time.perf_counter()
    with pytest.raises(DatasetError, match=r"declares a 1024x1024x512 float32 volume") as info:
        load_volume(path, max_bytes=1024**3)
    assert time.perf_counter() - started < 0.1  # 32 MiB of body never inflated
    assert "more than the limit of 1073741824 bytes" in str(info.value)
    with pytest.raises(DatasetError, match="declares a"):
        read_header(path, max_bytes=1024**3)


def test_a_body_inflating_beyond_its_declared_size_is_refused(tmp_path):
    from mlpipe.data.dataset import build_manifest

    declared = 8 * 8 * 8 * 4
    path = _declaring(tmp_path / "extra.nii.gz", (8, 8, 8), bytes(declared + 64 * 1024))
    with pytest.raises(DatasetError, match="inflates beyond the 2400 bytes its header declares"):
        load_volume(path)

    data = tmp_path / "data"
    (data / "imagesTr").mkdir(parents=True)
    (data / "labelsTr").mkdir()
    path.rename(data / "imagesTr" / "a.nii.gz")
    _write(data / "labelsTr" / "a.nii.gz", np.zeros((8, 8, 8), dtype=np.uint8))
    with pytest.raises(DatasetError, match="inflates beyond the 2400 bytes its NIfTI header"):
        build_manifest(data, cache=False)


def test_bounded_inflate_reads_multi_member_gzip_like_nibabel(tmp_path):
    data = _volume((16, 16, 16))
    path = _write(tmp_path / "v.nii.gz", data)
    raw = gzip.decompress(path.read_bytes())
    half = len(raw) // 2
    path.write_bytes(gzip.compress(raw[:half]) + gzip.compress(raw[half:]) + b"\0" * 16)
    loaded, _ = load_volume(path)
    np.testing.assert_array_equal(loaded, data)
