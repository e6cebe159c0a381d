"""mlpipe.log against a real SQLite tracking store in tmp_path, with real NIfTI files.

What a researcher sees after a run: tags, the dataset in the run's inputs, the manifest, the
preprocessing JSON that rebuilds the chain, the profile, overlays and metrics; and bad input
refused before any run or artifact exists.
"""

from __future__ import annotations

import json
import logging
import math

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, ScaleIntensityd

import mlpipe.log as mlog
from mlpipe.core.errors import DatasetError, PreprocessingError
from mlpipe.data import preprocessing as prep
from tests.conftest import write_nifti_dataset

KEYS = ["image", "label"]


def chain() -> Compose:
    return Compose(
        [
            LoadImaged(keys=KEYS, image_only=True),
            EnsureChannelFirstd(keys=KEYS),
            ScaleIntensityd(keys="image", minv=0.0, maxv=1.0),
        ]
    )


def artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    found = []
    for item in client.list_artifacts(run_id, path):
        found += artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return found


def all_runs(client: MlflowClient) -> list:
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids) if ids else []


def test_researcher_run_holds_data_preprocessing_profile_metrics_overlay(tracking, tmp_path):
    data_dir = write_nifti_dataset(tmp_path / "data", cases=3, version="2024.1", name="toy")
    with mlflow.start_run() as run:
        data = mlog.dataset(data_dir)
        mlog.preprocessing(chain(), name="train")
        profile = mlog.data_profile(data)
        mlog.params({"lr": 0.01})
        for step in range(50):
            mlog.metrics({"loss": 1.0 / (step + 1)}, step=step)
        image = np.random.default_rng(0).normal(size=(8, 8, 6))
        label = np.zeros((8, 8, 6), dtype=np.uint8)
        label[2:5, 2:5, 1:4] = 1
        path = mlog.overlay(image, label=label, prediction=label, step=7, name="val")
    # leaving the `with` ended the run: everything queued must be there now, no flush called
    got = tracking.get_run(run.info.run_id)
    tags, params = got.data.tags, got.data.params

    assert got.info.status == "FINISHED"
    assert tags["mlpipe.dataset.name"] == "toy"
    assert tags["mlpipe.dataset.version"] == "2024.1"
    assert tags["mlpipe.dataset.digest"] == data.digest and len(data.digest) == 64
    assert tags["mlpipe.dataset.files"] == "6"
    assert tags["mlpipe.env.mlflow"] == mlflow.__version__
    assert tags["mlpipe.preprocessing.digest"] == prep.digest(prep.describe(chain()))

    (dataset_input,) = got.inputs.dataset_inputs
    assert dataset_input.dataset.name == "toy"
    assert dataset_input.dataset.digest == data.digest[:12]
    assert data_dir.resolve().as_uri() in dataset_input.dataset.source
    input_tags = {t.key: t.value for t in dataset_input.tags}
    assert input_tags["mlflow.data.context"] == "train"
    assert input_tags["version"] == "2024.1"

    assert params["lr"] == "0.01"
    assert params["prep.train.2.ScaleIntensityd.maxv"] == "1.0"
    assert params["profile.volumes"] == "3"
    history = tracking.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(50))

    assert path == "overlays/val_step000007.png"
    assert set(artifacts(tracking, run.info.run_id)) == {
        "mlpipe/dataset_manifest.json",
        "mlpipe/preprocessing/train.json",
        "mlpipe/data_profile.json",
        "overlays/val_step000007.png",
    }
    manifest = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/mlpipe/dataset_manifest.json")
    assert (manifest["name"], manifest["version"], manifest["digest"]) == (
        "toy",
        "2024.1",
        data.digest,
    )
    first = manifest["files"][0]
    assert set(first) >= {"path", "size", "sha256", "role", "case"}
    assert not first["path"].startswith("/")
    logged_profile = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/mlpipe/data_profile.json")
    assert logged_profile == json.loads(json.dumps(profile))


def test_preprocessing_round_trip_rebuilds_the_logged_chain(tracking, tmp_path):
    data_dir = write_nifti_dataset(tmp_path / "data", cases=2)
    with mlflow.start_run() as run:
        mlog.preprocessing(chain(), name="infer")
    rebuilt = prep.load(run.info.run_id, "infer")
    item = {
        "image": str(data_dir / "imagesTr" / "case_0.nii.gz"),
        "label": str(data_dir / "labelsTr" / "case_0.nii.gz"),
    }
    expected, actual = chain()(dict(item)), rebuilt(dict(item))
    assert np.array_equal(np.asarray(expected["image"]), np.asarray(actual["image"]))
    assert float(np.asarray(actual["image"]).max()) == pytest.approx(1.0)
    tags = tracking.get_run(run.info.run_id).data.tags
    assert "mlpipe.preprocessing.infer.digest" in tags


def test_helpers_start_a_run_when_none_is_active(tracking, tmp_path):
    assert mlflow.active_run() is None
    mlog.params({"a": 1})
    run = mlflow.active_run()
    assert run is not None
    mlog.flush()
    assert tracking.get_run(run.info.run_id).data.params == {"a": "1"}


def test_undeclared_version_is_digest_prefix_with_warning(tracking, tmp_path, caplog):
    data_dir = write_nifti_dataset(tmp_path / "data", cases=2, version=None)
    with caplog.at_level(logging.WARNING, logger="mlpipe"), mlflow.start_run() as run:
        data = mlog.dataset(data_dir)
    assert data.version == data.digest[:12]
    assert "declares no version" in caplog.text
    assert tracking.get_run(run.info.run_id).data.tags["mlpipe.dataset.version"] == data.version


def test_bad_dataset_is_refused_before_any_run_exists(tracking, tmp_path):
    data_dir = write_nifti_dataset(tmp_path / "data", cases=3)
    (data_dir / "labelsTr" / "case_1.nii.gz").unlink()
    with pytest.raises(DatasetError, match=r"case_1"):
        mlog.dataset(data_dir)
    assert mlflow.active_run() is None
    assert all_runs(tracking) == []


def test_truncated_volume_in_profile_names_the_file(tracking, tmp_path):
    data_dir = write_nifti_dataset(tmp_path / "data", cases=2)
    broken = data_dir / "imagesTr" / "case_0.nii.gz"
    broken.write_bytes(broken.read_bytes()[:200])
    with pytest.raises(DatasetError, match=r"case_0\.nii\.gz"):
        mlog.data_profile(data_dir)
    assert all_runs(tracking) == []


def test_undescribable_transform_is_named_and_nothing_logged(tracking):
    refused = pytest.raises(PreprocessingError, match=r"transform 1 \(function\)")
    with mlflow.start_run() as run, refused:
        mlog.preprocessing([EnsureChannelFirstd(keys=KEYS), lambda d: d], name="train")
    assert artifacts(tracking, run.info.run_id) == []
    assert "mlpipe.preprocessing.digest" not in tracking.get_run(run.info.run_id).data.tags


def test_unsafe_preprocessing_name_is_refused_before_logging(tracking):
    with mlflow.start_run() as run, pytest.raises(PreprocessingError):
        mlog.preprocessing(chain(), name="../escape")
    assert artifacts(tracking, run.info.run_id) == []


def test_environment_tags_logged_once_per_run(tracking, monkeypatch):
    from mlpipe.core import environment

    calls = []
    real = environment.environment_tags
    monkeypatch.setattr(environment, "environment_tags", lambda: calls.append(1) or real())
    with mlflow.start_run():
        mlog.params({"a": 1})
        mlog.params({"b": 2})
        mlog.metrics({"m": 1.0})
    with mlflow.start_run() as second:
        mlog.params({"c": 3})
    assert len(calls) == 2
    assert "mlpipe.env.python" in tracking.get_run(second.info.run_id).data.tags


def test_nan_metric_is_logged_not_raised(tracking):
    with mlflow.start_run() as run:
        mlog.metrics({"loss": math.nan}, step=0)
    (point,) = tracking.get_metric_history(run.info.run_id, "loss")
    assert math.isnan(point.value)


def test_bad_metric_value_raises_naming_key(tracking):
    with mlflow.start_run(), pytest.raises(ValueError, match="'val_dice'"):
        mlog.metrics({"val_dice": "high"})


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: mlog.metrics({"loss": 0.5}, step=2**63), "outside the range"),
        (lambda: mlog.metrics({"loss": 0.5}, step=1.5), "not an integer"),
        (lambda: mlog.metrics({"loss": "abc"}), "not a number"),
        (lambda: mlog.metrics({"bad/../name": 1.0}), "metric name"),
        (lambda: mlog.metrics([("loss", 1.0)]), "mapping"),
        (lambda: mlog.params({"": 1}), "param name"),
        (lambda: mlog.params("lr=1"), "mapping"),
    ],
)
def test_bad_input_outside_a_run_starts_no_run(tracking, call, match):
    """Issue 20: a refused call used to start a run first, so the user's next
    mlflow.start_run() failed with 'already active'."""
    with pytest.raises(ValueError, match=match):
        call()
    assert mlflow.active_run() is None
    assert all_runs(tracking) == []
    with mlflow.start_run() as run:  # the user's own run still starts
        mlog.metrics({"loss": 0.5}, step=1)
    mlog.flush()
    assert [m.step for m in tracking.get_metric_history(run.info.run_id, "loss")] == [1]


def test_dataset_with_a_named_pipe_refused_without_a_run(tracking, tmp_path):
    """Issue 20: a FIFO named x.nii.gz made mlog.dataset hang forever."""
    import os

    data = write_nifti_dataset(tmp_path / "data", cases=2)
    os.mkfifo(data / "imagesTr" / "x.nii.gz")
    os.mkfifo(data / "labelsTr" / "x.nii.gz")
    with pytest.raises(DatasetError, match=r"x\.nii\.gz is a named pipe"):
        mlog.dataset(data)
    assert mlflow.active_run() is None
    assert all_runs(tracking) == []
