"""seg3d's data side on real NIfTI files: the synthetic dataset, the dataset checks, the split,
and the ``preprocess`` entry point logging into a real SQLite tracking store.

Small volumes (24^3, a handful of cases) keep the file fast on two CPU cores.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pytest

from mlpipe.data.dataset import build_manifest
from mlpipe.data.layouts import Pair
from seg3d import synthesize as synth
from seg3d.checks import check_dataset, resolve_data_dir, split_cases
from seg3d.config import Seg3dInputError, TrainConfig
from seg3d.preprocess import preprocess
from seg3d.synthesize import default_dataset, synthesize

SPACING = (1.5, 1.5, 2.0)
WINDOW = (-175.0, 250.0)


@pytest.fixture
def raw(tmp_path) -> Path:
    return synthesize(tmp_path / "raw", 4, 24, 3, 0)


def config(**changes) -> TrainConfig:
    return TrainConfig(**{"patch_size": (16, 16, 16), **changes})


def volumes(root: Path, folder: str) -> list[Path]:
    return sorted((root / folder).glob("*.nii.gz"))


def rewrite(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> None:
    """Replace a volume's voxels (and optionally its affine); mtime moves, so hashes redo."""
    old = nib.load(path)
    nib.save(nib.Nifti1Image(data, old.affine if affine is None else affine), path)


# synthesize ---------------------------------------------------------------------------------------


def test_synthesize_writes_decathlon_layout(tmp_path, capsys):
    out = synthesize(tmp_path / "d", 5, 24, 3, 7)

    assert [len(volumes(out, f)) for f in ("imagesTr", "labelsTr", "imagesTs", "labelsTs")] == [
        5,
        5,
        2,
        2,
    ]
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["name"] == "seg3d-synthetic"
    assert meta["version"] == "synth1-s7-n5-24-c3"
    assert meta["modality"] == {"0": "CT"}
    assert meta["labels"] == {"0": "background", "1": "class1", "2": "class2"}
    assert meta["numTraining"] == 5 and len(meta["training"]) == 5
    for entry in meta["training"]:
        assert (out / entry["image"]).is_file() and (out / entry["label"]).is_file()
    assert [(out / p).is_file() for p in meta["test"]] == [True, True]
    # dataset.json comes last: a folder without it is an interrupted write
    newest_volume = max(p.stat().st_mtime_ns for p in out.glob("*/*.nii.gz"))
    assert (out / "dataset.json").stat().st_mtime_ns >= newest_volume
    info = build_manifest(out)
    assert (info.name, info.version) == ("seg3d-synthetic", "synth1-s7-n5-24-c3")
    assert {p.split for p in info.pairs} == {"train", "test"}
    assert "synthesized 7/7 cases" in capsys.readouterr().err


def test_synthesize_volumes_look_like_ct(tmp_path):
    out = synthesize(tmp_path / "d", 4, 24, 4, 0, test_count=1)
    shapes = set()
    for image_path in volumes(out, "imagesTr") + volumes(out, "imagesTs"):
        image = nib.load(image_path)
        label = nib.load(str(image_path).replace("images", "labels"))
        data, classes = image.get_fdata(dtype=np.float32), np.asarray(label.dataobj)
        assert image.get_data_dtype() == np.float32 and label.get_data_dtype() == np.uint8
        assert all(abs(n - 24) <= 4 for n in image.shape) and image.shape == label.shape
        shapes.add(image.shape)
        assert np.allclose(image.header.get_zooms(), (1.2, 1.2, 2.0))
        assert np.linalg.norm(image.affine[:3, 3]) > 1.0  # a real, non-zero origin
        assert np.array_equal(image.affine, label.affine)
        assert set(np.unique(classes)) == {0, 1, 2, 3}  # every class in every volume
        background = data[classes == 0]
        assert abs(background.mean()) < 10 and 20 < background.std() < 35
        means = [data[classes == c].mean() for c in (1, 2, 3)]
        assert means[0] > 100 and means[1] < -60 and means[2] > 170
        assert all(-175 < m < 250 for m in means)
    assert len(shapes) > 1  # shapes differ between cases


def test_synthesize_is_deterministic_by_seed(tmp_path):
    a = synthesize(tmp_path / "a", 3, 24, 3, 1)
    b = synthesize(tmp_path / "b", 3, 24, 3, 1)
    c = synthesize(tmp_path / "c", 3, 24, 3, 2)

    for path in a.glob("*/*.nii.gz"):
        other = b / path.relative_to(a)
        assert path.read_bytes() == other.read_bytes()
    assert build_manifest(a, cache=False).digest == build_manifest(b, cache=False).digest
    first = lambda root: np.asarray(nib.load(root / "imagesTr" / "synth_000.nii.gz").dataobj)  # noqa: E731
    assert not np.array_equal(first(a)[:20, :20, :20], first(c)[:20, :20, :20])


def test_synthesize_refuses_bad_parameters_and_foreign_folders(tmp_path):
    with pytest.raises(Seg3dInputError, match="count: 1"):
        synthesize(tmp_path / "x", count=1)
    with pytest.raises(Seg3dInputError, match="size: 8"):
        synthesize(tmp_path / "x", size=8)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(Seg3dInputError, match=f"{foreign} is not empty"):
        synthesize(foreign, 2, 16)
    assert (foreign / "notes.txt").exists()
    # its own earlier output is replaced, stale cases included
    out = synthesize(tmp_path / "d", 4, 16, 2, 0)
    synthesize(out, 2, 16, 2, 0)
    assert len(volumes(out, "imagesTr")) == 2


def test_default_dataset_is_written_once_then_reused(tmp_path, monkeypatch):
    first = default_dataset(seed=3, count=3, size=16)
    assert first == tmp_path / "cache" / "datasets" / "seg3d-synthetic-synth1-s3-n3-16-c3"
    stamp = (first / "dataset.json").stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("the default dataset was written again")

    monkeypatch.setattr(synth, "synthesize", fail)
    assert default_dataset(seed=3, count=3, size=16) == first
    assert (first / "dataset.json").stat().st_mtime_ns == stamp
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary left over


def test_resolve_data_dir_defaults_to_the_synthetic_dataset(tmp_path, capsys):
    assert resolve_data_dir(config(data_dir="some/where")) == Path("some/where")
    path = resolve_data_dir(config(seed=1, num_classes=2))
    assert path.name == "seg3d-synthetic-synth1-s1-n12-48-c2"
    assert (path / "dataset.json").is_file()
    assert f"using the synthetic dataset {path}" in capsys.readouterr().err


# check_dataset ----------------------------------------------------------------------------------


def test_check_dataset_accepts_the_synthetic_dataset(raw):
    info = build_manifest(raw)
    check_dataset(info, config())
    check_dataset(info, config(), split="test")


def test_check_dataset_refuses_mismatched_affines(raw):
    label = volumes(raw, "labelsTr")[1]
    shifted = nib.load(label).affine.copy()
    shifted[:3, 3] += 5.0
    rewrite(label, np.asarray(nib.load(label).dataobj), shifted)

    with pytest.raises(Seg3dInputError) as exc:
        check_dataset(build_manifest(raw), config())
    message = str(exc.value)
    assert str(label) in message and "not on the grid of its image" in message
    assert "Resample the label" in message


def test_check_dataset_refuses_label_values_beyond_num_classes(raw):
    label = volumes(raw, "labelsTr")[2]
    data = np.asarray(nib.load(label).dataobj).copy()
    data[0, 0, 0] = 5
    rewrite(label, data)

    with pytest.raises(Seg3dInputError) as exc:
        check_dataset(build_manifest(raw), config(num_classes=3))
    message = str(exc.value)
    assert f"Label {label} holds values 5 outside 0..2" in message
    assert "-P num_classes=6" in message
    check_dataset(build_manifest(raw), config(num_classes=6))


def test_check_dataset_refuses_a_4d_image_but_not_a_trailing_axis_of_one(raw):
    image = volumes(raw, "imagesTr")[0]
    data = nib.load(image).get_fdata(dtype=np.float32)
    rewrite(image, data[..., None])
    check_dataset(build_manifest(raw), config())

    rewrite(image, np.stack([data, data], axis=-1))
    with pytest.raises(Seg3dInputError) as exc:
        check_dataset(build_manifest(raw), config())
    assert f"Image {image} has shape" in str(exc.value) and "one 3D volume" in str(exc.value)


def test_check_dataset_refuses_a_patch_larger_than_every_resampled_volume(raw):
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd, Spacingd

    load = Compose(
        [
            LoadImaged(keys="image", image_only=True),
            EnsureChannelFirstd(keys="image"),
            Orientationd(keys="image", axcodes="RAS", labels=None),
            Spacingd(keys="image", pixdim=SPACING),
        ]
    )
    info = build_manifest(raw)
    train = [p for p in info.pairs if p.split == "train"]  # what split="train" checks
    shapes = [load({"image": str(p.image)})["image"].shape[1:] for p in train]
    largest = tuple(int(n) for n in np.max(shapes, axis=0))
    check_dataset(info, config(patch_size=largest, spacing=SPACING))  # fits exactly: accepted

    too_big = (largest[0], largest[1] + 1, largest[2])
    with pytest.raises(Seg3dInputError) as exc:
        check_dataset(info, config(patch_size=too_big, spacing=SPACING))
    message = str(exc.value)
    assert f"the largest resampled shape is {'x'.join(map(str, largest))}" in message
    assert "Give a smaller patch_size, e.g. -P patch_size=" in message
    assert str(raw / "imagesTr") in message  # names the volume that is largest on that axis


def test_check_dataset_refuses_a_split_without_cases(tmp_path):
    data = synthesize(tmp_path / "d", 2, 16, 2, 0, test_count=0)
    with pytest.raises(Seg3dInputError, match="has no test cases; put them in imagesTs/"):
        check_dataset(build_manifest(data), config(), split="test")


# split_cases ------------------------------------------------------------------------------------


def pairs_of(train: int, val: int = 0, test: int = 0) -> list[Pair]:
    made = [Pair(f"tr{i:02d}", Path(f"tr{i}"), Path(f"l{i}"), "train") for i in range(train)]
    made += [Pair(f"va{i:02d}", Path(f"va{i}"), Path(f"v{i}"), "val") for i in range(val)]
    made += [Pair(f"te{i:02d}", Path(f"te{i}"), None, "test") for i in range(test)]
    return made


def test_split_cases_is_deterministic_disjoint_and_leaves_test_out():
    pairs = pairs_of(10, val=2, test=3)
    train, val = split_cases(pairs, 0.2, seed=0)

    assert split_cases(list(reversed(pairs)), 0.2, seed=0) == (train, val)  # order-free
    assert len(train) == 8 and len(val) == 4  # 2 held out + the 2 declared val cases
    assert not {p.case for p in train} & {p.case for p in val}
    assert {p.case for p in train + val} == {p.case for p in pairs if p.split != "test"}
    assert all(p.split != "test" for p in train + val)
    others = [split_cases(pairs, 0.2, seed=s)[1] for s in range(1, 6)]
    assert any(v != val for v in others)  # the seed matters


def test_split_cases_keeps_at_least_one_case_on_each_side():
    assert [len(part) for part in split_cases(pairs_of(2), 0.01, 0)] == [1, 1]
    assert [len(part) for part in split_cases(pairs_of(3), 0.99, 0)] == [1, 2]
    with pytest.raises(Seg3dInputError, match="1 training case"):
        split_cases(pairs_of(1, val=3, test=2), 0.2, 0)


# preprocess --------------------------------------------------------------------------------------


def test_preprocess_writes_resampled_ras_dataset_and_logs_both(tmp_path, raw, tracking):
    out = preprocess(raw, tmp_path / "pre", spacing=SPACING, modality="ct", window=WINDOW)
    run_id = mlflow.active_run().info.run_id
    mlflow.end_run()

    assert [len(volumes(out, f)) for f in ("imagesTr", "labelsTr", "imagesTs", "labelsTs")] == [
        4,
        4,
        2,
        2,
    ]
    for image_path in volumes(out, "imagesTr") + volumes(out, "imagesTs"):
        image = nib.load(image_path)
        label = nib.load(str(image_path).replace("images", "labels"))
        assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
        assert np.allclose(image.header.get_zooms(), SPACING, atol=1e-4)
        assert np.allclose(image.affine, label.affine) and image.shape == label.shape
        data = image.get_fdata()
        assert data.min() >= 0.0 and data.max() <= 1.0  # the CT window
        assert set(np.unique(np.asarray(label.dataobj))) == {0, 1, 2}

    raw_info, out_info = build_manifest(raw), build_manifest(out)
    check_dataset(out_info, config(spacing=SPACING))
    run = tracking.get_run(run_id)
    tags = run.data.tags
    digest = tags["mlpipe.preprocessing.preprocess.digest"]
    assert out_info.version == f"synth1-s0-n4-24-c3+pp.{digest[:8]}"
    assert out_info.name == "seg3d-synthetic-preprocessed"
    assert tags["mlpipe.dataset.digest"] == out_info.digest  # the output, not the raw input
    assert tags["mlpipe.dataset.version"] == out_info.version
    assert tags["mlpipe.dataset.raw.digest"] == raw_info.digest
    assert tags["mlpipe.dataset.raw.version"] == "synth1-s0-n4-24-c3"
    inputs = {
        (d.dataset.name, next(t.value for t in d.tags if t.key == "mlflow.data.context"))
        for d in run.inputs.dataset_inputs
    }
    assert inputs == {
        ("seg3d-synthetic", "raw"),
        ("seg3d-synthetic-preprocessed", "preprocessed"),
    }
    chain_json = tracking.download_artifacts(run_id, "mlpipe/preprocessing/preprocess.json")
    chain = json.loads(Path(chain_json).read_text())
    targets = [t["target"].rsplit(".", 1)[-1] for t in chain["transforms"]]
    assert targets[0] == "LoadImaged" and targets[-1] == "CropForegroundd"
    raw_manifest = tracking.download_artifacts(run_id, "mlpipe/dataset_manifest_raw.json")
    assert json.loads(Path(raw_manifest).read_text())["digest"] == raw_info.digest


def test_preprocess_replaces_its_output_and_refuses_foreign_folders(tmp_path, raw, tracking):
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(Seg3dInputError, match="holds no seg3d preprocessed dataset"):
        preprocess(raw, foreign, spacing=SPACING, modality="ct", window=WINDOW)
    with pytest.raises(Seg3dInputError, match="overlaps the raw dataset"):
        preprocess(raw, raw / "pre", spacing=SPACING, modality="ct", window=WINDOW)
    assert mlflow.active_run() is None  # refused before any run was started

    out = preprocess(raw, tmp_path / "pre", spacing=SPACING, modality="mri", window=WINDOW)
    mlflow.end_run()  # one preprocessing per run: MLflow params cannot change
    first = build_manifest(out).version
    (out / "imagesTr" / "stale.nii.gz").write_bytes(b"")
    preprocess(raw, out, spacing=(2.0, 2.0, 2.0), modality="ct", window=WINDOW)
    assert build_manifest(out).version != first
    assert not (out / "imagesTr" / "stale.nii.gz").exists()
    assert [name for name in os.listdir(tmp_path) if name.startswith(".")] == []  # no temporaries


def test_seg3d_chain_reads_a_dicom_series_as_its_nifti(tmp_path):
    """An image that is a DICOM series goes through seg3d's chain as the NIfTI of the same
    data does: same tensor, same affine after RAS and resampling."""
    import nibabel as nib
    from monai.transforms import Compose

    from seg3d.config import TrainConfig
    from seg3d.transforms import base_transforms
    from tests.dicom_factory import ct_volume, write_series

    # LPS-stored like a scanner's, InstanceNumbers reversed: Orientationd must flip x and y.
    data, affine = ct_volume((24, 20, 10)), np.diag([-0.8, -0.9, 2.5, 1.0])
    write_series(data, affine, tmp_path / "series", shuffle=True, reverse_instance_numbers=True)
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "same.nii.gz")
    label = (data > 200).astype(np.uint8)
    nib.save(nib.Nifti1Image(label, affine), tmp_path / "label.nii.gz")
    chain = Compose(base_transforms(TrainConfig(spacing=(1.5, 1.5, 3.0)), ("image", "label")))

    from_series = chain(
        {"image": str(tmp_path / "series"), "label": str(tmp_path / "label.nii.gz")}
    )
    from_nifti = chain(
        {"image": str(tmp_path / "same.nii.gz"), "label": str(tmp_path / "label.nii.gz")}
    )

    np.testing.assert_allclose(
        np.asarray(from_series["image"]), np.asarray(from_nifti["image"]), atol=1e-5
    )
    np.testing.assert_allclose(
        np.asarray(from_series["image"].affine), np.asarray(from_nifti["image"].affine), atol=1e-4
    )
    assert from_series["label"].shape == from_series["image"].shape
