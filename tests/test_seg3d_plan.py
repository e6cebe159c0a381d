"""seg3d's fingerprint and plan, checked against the data they came from.

Real-anatomy volumes (the MNI152 brain from nilearn's wheel, warped into subjects by
``seg3d.anatomy``) in three variants: T1 MRI, CT-like with 1x1x3 mm thick slices, and 4D
multi-channel MRI. Each planning decision is compared with what the files hold.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mlpipe.data.dataset import build_manifest
from seg3d.anatomy import make_anatomy
from seg3d.config import Seg3dInputError, TrainConfig
from seg3d.fingerprint import fingerprint, read_dataset_json
from seg3d.plan import (
    CPU_BUDGET_BYTES,
    divisor,
    estimate_bytes,
    make_plan,
    target_spacing,
)
from seg3d.planning import USER_FIELDS, plan_run


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("anatomy")
    return {
        "mri": make_anatomy(root / "mri", variant="mri", count=4, test_count=1, spacing=6.0),
        "ct": make_anatomy(root / "ct", variant="ct", count=3, test_count=0, spacing=2.0),
        "multi": make_anatomy(root / "multi", variant="multi", count=3, test_count=1, spacing=6.0),
    }


def planned(path: Path, **given) -> tuple[dict, dict]:
    info = build_manifest(path, cache=False)
    fp = fingerprint(info, cache=False)
    return fp, make_plan(fp["summary"], read_dataset_json(path), given=given)


def foreground(path: Path, channel: int = 0) -> np.ndarray:
    values = []
    for image in sorted((path / "imagesTr").iterdir()):
        data = np.asarray(nib.load(image).dataobj, dtype=np.float32)
        label = np.asarray(nib.load(path / "labelsTr" / image.name).dataobj)
        data = data[..., channel] if data.ndim == 4 else data
        values.append(data[label > 0])
    return np.concatenate(values)


def test_read_dataset_json_decathlon_and_nnunet_v2(tmp_path):
    (tmp_path / "dataset.json").write_text(
        json.dumps({"modality": {"1": "T2", "0": "FLAIR"}, "labels": {"0": "bg", "1": "tumour"}})
    )
    meta = read_dataset_json(tmp_path)
    assert meta.channels == ("FLAIR", "T2") and meta.labels == {0: "bg", 1: "tumour"}
    (tmp_path / "dataset.json").write_text(
        json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "t": 2}})
    )
    meta = read_dataset_json(tmp_path)
    assert meta.channels == ("CT",) and meta.num_classes == 3 and meta.labels[2] == "t"
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "wt": [1, 2]}}))
    with pytest.raises(Seg3dInputError, match="region labels are not supported"):
        read_dataset_json(tmp_path)


def test_ct_plan_keeps_thick_slices_and_clips_to_foreground_percentiles(sets):
    _fp, plan = planned(sets["ct"])
    v = plan["values"]
    header = nib.load(next((sets["ct"] / "imagesTr").iterdir())).header
    assert v["spacing"] == [float(s) for s in header.get_zooms()]  # 2x2x6 mm: anisotropic
    assert v["spacing"][2] == 3 * v["spacing"][0]
    assert v["kernels"][0] == [3, 3, 1]  # no 3-wide kernel across 6 mm slices at first
    assert v["strides"][1] == [2, 2, 1]  # in-plane pooling first, until the spacings meet
    fg = foreground(sets["ct"])
    assert v["modality"] == "ct" and v["norm_std"] > 0
    low, high = v["window"]
    # sampled, so near the exact percentiles of every foreground voxel; air (-1000) is not in it
    assert abs(low - np.percentile(fg, 0.5)) < 3 and abs(high - np.percentile(fg, 99.5)) < 3
    assert abs(v["norm_mean"] - fg.mean()) < 1.0 and low > -100
    assert all(p % d == 0 for p, d in zip(v["patch_size"], divisor(v["strides"]), strict=True))


def test_ct_plan_normalization_is_clip_then_zscore_with_foreground_stats(sets):
    from monai.transforms import Compose

    from seg3d.transforms import base_transforms

    _, plan = planned(sets["ct"])
    v = plan["values"]
    config = TrainConfig(modality="ct", window=tuple(v["window"]), norm_mean=v["norm_mean"],
                         norm_std=v["norm_std"], spacing=tuple(v["spacing"]))  # fmt: skip
    image = next((sets["ct"] / "imagesTr").iterdir())
    out = Compose(base_transforms(config, keys=("image",)))({"image": str(image)})["image"]
    raw = np.asarray(nib.load(image).dataobj, dtype=np.float32)
    low, high = v["window"]
    expected_min = (low - v["norm_mean"]) / v["norm_std"]
    assert float(out.min()) == pytest.approx(expected_min, abs=1e-4)  # air clipped to low
    assert float(out.max()) <= (high - v["norm_mean"]) / v["norm_std"] + 1e-4
    assert raw.min() < low  # so the clip did something


def test_mri_plan_zscores_each_image_over_the_nonzero_region(sets):
    _fp, plan = planned(sets["mri"])
    v = plan["values"]
    image = np.asarray(nib.load(next((sets["mri"] / "imagesTr").iterdir())).dataobj)
    assert np.count_nonzero(image) / image.size < 0.75  # a large zero background
    assert v["modality"] == "mri" and v["nonzero"] is True and v["norm_std"] == 0
    assert v["num_classes"] == 3 and v["in_channels"] == 1
    assert "MRI: z-score each image" in plan["reasons"]["modality"]


def test_multi_channel_plan_and_geometry_check(sets):
    from seg3d.checks import check_geometry

    fp, plan = planned(sets["multi"])
    assert plan["values"]["in_channels"] == 3
    assert len(fp["summary"]["intensity"]) == 3  # statistics per channel
    t2 = foreground(sets["multi"], channel=1)
    assert fp["summary"]["intensity"][1]["mean"] == pytest.approx(t2.mean(), rel=0.05)
    pairs = build_manifest(sets["multi"], cache=False).pairs
    check_geometry(pairs, channels=3)
    with pytest.raises(Seg3dInputError, match=r"brain_000.nii.gz has shape .*x3; seg3d expects"):
        check_geometry(pairs, channels=1)


def test_a_ct_channel_among_others_is_zscored_and_the_reason_says_so(sets):
    from seg3d.fingerprint import DatasetMeta

    fp = fingerprint(build_manifest(sets["multi"], cache=False), cache=False)
    meta = read_dataset_json(sets["multi"])
    mixed = DatasetMeta(**{**meta.__dict__, "channels": ("CT", "PET", "MRI")})
    plan = make_plan(fp["summary"], mixed)
    assert plan["values"]["modality"] == "mri" and plan["values"]["window"] is None
    assert "HU clipping is planned for single-channel CT only" in plan["reasons"]["modality"]
    _, alone = planned(sets["multi"])
    assert "HU clipping" not in alone["reasons"]["modality"]


def test_thick_slice_axis_takes_its_10th_percentile_not_finer_than_the_others():
    spacings = [[0.8, 0.8, 5.0]] * 8 + [[0.8, 0.8, 2.5]] * 2
    target, why = target_spacing(spacings)
    assert target[:2] == [0.8, 0.8] and target[2] == pytest.approx(2.5)
    assert "thick slices" in why
    target, _ = target_spacing([[1.0, 1.0, 5.0]] * 10 + [[1.0, 1.0, 0.5]])
    assert target[2] == 5.0  # the 10th percentile is 5 mm here
    iso, why = target_spacing([[1.0, 1.0, 1.2], [1.0, 1.0, 1.4]])
    assert iso == [1.0, 1.0, 1.3] and why.startswith("median")


def test_patch_fits_the_budget_and_the_rare_class_is_sampled(sets):
    from seg3d.transforms import _crop

    _fp, plan = planned(sets["mri"])
    v = plan["values"]
    assert estimate_bytes(v["patch_size"], v["batch_size"], v["filters"], v["strides"]) <= (
        CPU_BUDGET_BYTES
    )
    # a volume where class 2 is 0.1% of the voxels: balanced crops centre a third on it
    label = np.zeros((1, 64, 64, 64), np.float32)
    label[0, :, :, :20] = 1
    label[0, 30:36, 30:36, 50:57] = 2
    config = TrainConfig(patch_size=(16, 16, 16), num_classes=3, num_samples=1,
                         class_ratios=v["class_ratios"])  # fmt: skip
    crop = _crop(config, ["image", "label"])
    crop.set_random_state(0)
    hits = sum(
        bool((crop({"image": label.copy(), "label": label.copy()})[0]["label"] == 2).any())
        for _ in range(150)
    )
    assert hits > 0.25 * 150, hits  # positive/negative sampling would hit it about 1 in 20


def test_fingerprint_is_cached_by_digest(sets, tmp_path, monkeypatch):
    import seg3d.fingerprint as module

    info = build_manifest(sets["mri"], cache=False)
    first = fingerprint(info, cache=tmp_path)
    assert (tmp_path / f"{info.digest}.json").is_file()

    def no_reading(*args):
        raise AssertionError("read a volume although the fingerprint was cached")

    monkeypatch.setattr(module, "_case", no_reading)
    assert fingerprint(info, cache=tmp_path) == json.loads(json.dumps(first))


def auto_config(path: Path, **given) -> TrainConfig:
    return TrainConfig(data_dir=str(path), model="dynunet", **given,
                       auto=[k for k in USER_FIELDS if k not in given])  # fmt: skip


def test_plan_run_fills_the_config_and_records_overrides(sets):
    path = sets["mri"]
    config = auto_config(path, patch_size=(16, 16, 16), modality="ct")
    run = plan_run(config, build_manifest(path, cache=False), path)
    assert config.patch_size == (16, 16, 16) and config.model == "dynunet"
    assert config.spacing == tuple(run.plan["values"]["spacing"]) and config.num_classes == 3
    assert divisor(config.strides) == [4, 4, 4]  # 16 -> 8 -> 4: the bottleneck is 4 wide
    assert run.overrides["patch_size"]["given"] == [16, 16, 16]
    assert run.overrides["patch_size"]["plan"] != [16, 16, 16]
    assert set(run.overrides) == {"patch_size", "modality"}
    assert len(run.warnings) == 1 and "modality=ct given" in run.warnings[0]
    assert "declares MRI" in run.warnings[0]
    assert run.document()["plan"]["modality"] == "ct"


def test_plan_run_refuses_num_classes_or_labels_that_contradict_dataset_json(sets, tmp_path):
    path = sets["mri"]
    config = auto_config(path, num_classes=2)
    with pytest.raises(Seg3dInputError) as caught:
        plan_run(config, build_manifest(path, cache=False), path)
    message = str(caught.value)
    assert "num_classes=2" in message and "lists 3 labels" in message and "dataset.json" in message

    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    label = broken / "labelsTr" / "brain_001.nii.gz"
    image = nib.load(label)
    data = np.asarray(image.dataobj).copy()
    data[0, 0, 0] = 5
    nib.save(nib.Nifti1Image(data, image.affine), label)
    with pytest.raises(Seg3dInputError, match=r"brain_001.nii.gz holds value 5, outside"):
        plan_run(auto_config(broken), build_manifest(broken, cache=False), broken)


def test_poly_schedule_ends_when_the_budget_does():
    import torch

    from seg3d.schedule import PolySchedule

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = PolySchedule(optimizer, 0.01)
    schedule.set_progress(0.0)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01)
    schedule.set_progress(0.5)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5**0.9)
    schedule.set_progress(1.3)
    assert optimizer.param_groups[0]["lr"] == 0.0
