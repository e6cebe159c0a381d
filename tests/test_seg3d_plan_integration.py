"""seg3d plans a real-anatomy dataset through ``mlpipe run`` as a new user would run it.

Tiny real-anatomy sets (the MNI152 brain warped into subjects, 6 mm voxels) keep each
training to a couple of CPU epochs. Checked: the plan is logged (artifact, params, tag) and
printed; a given value is recorded as an override; the model served through mlpipe's serve
code path (``Segmenter``) gives the mask whose Dice ``evaluate`` reported; contradictions
with ``dataset.json`` stop ``mlpipe run`` (through seg3d's ``check`` pre-flight) and
``python -m seg3d`` with exit 2 before any run exists; a 4D multi-channel set declared by
``dataset.json`` trains and serves.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pytest
from mlflow import MlflowClient

from seg3d.anatomy import make_anatomy
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.integration

PROJECT = REPO_ROOT / "projects" / "seg3d"
MLPIPE = [sys.executable, "-m", "mlpipe.cli"]


@pytest.fixture(scope="module")
def anatomy(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("anatomy")
    return {
        "mri": make_anatomy(root / "mri", variant="mri", count=5, test_count=2, spacing=6.0),
        "multi": make_anatomy(root / "multi", variant="multi", count=4, test_count=1, spacing=6.0),
    }


def run(*args: str, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(
        [*MLPIPE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def the_run(tmp_path: Path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    (found,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return client, found


def serve_mask(model_uri: str, image: Path, tmp_path: Path) -> np.ndarray:
    """The mask mlpipe's serve code path (Segmenter over the loaded pyfunc) returns."""
    from mlpipe.inference.models import ModelSource
    from mlpipe.inference.segmenter import Segmenter

    model = mlflow.pyfunc.load_model(model_uri)
    source = ModelSource(uri=model_uri, load_uri=model_uri, name=None, version=None, alias=None,
                         aliases=(), run_id=None, tags={}, training_profile=None)  # fmt: skip
    out = Segmenter(model=model, source=source).segment_bytes(image.read_bytes(), image.name, "t")
    return np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(out.mask)).dataobj)


def test_mri_plans_trains_and_serves_the_mask_evaluate_scored(anatomy, tmp_path):
    data = anatomy["mri"]
    done = run("run", str(PROJECT), "-P", f"data_dir={data}", "-P", "epochs=2", cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "plan: normalization mri" in done.stdout
    client, found = the_run(tmp_path)
    run_id = found.info.run_id
    tags, params = found.data.tags, found.data.params
    plan = json.loads(Path(client.download_artifacts(run_id, "mlpipe/plan.json", tmp_path))
                      .read_text())  # fmt: skip
    assert tags["mlpipe.plan.digest"] == plan["digest"]
    assert plan["plan"]["modality"] == "mri" and plan["plan"]["model"] == "dynunet"
    assert plan["declared"]["channels"] == ["MRI"]
    assert params["plan.overridden"] == "epochs" and "epochs" in plan["overrides"]
    assert params["plan.patch_size"] == json.dumps(plan["plan"]["patch_size"]).replace(" ", "")
    assert params["seg3d.modality"] == "mri"  # not the CT default of before plans

    model_uri = next(iter(client.search_logged_models([found.info.experiment_id]))).model_uri
    table = json.loads(Path(client.download_artifacts(run_id, "evaluation/per_case.json",
                                                      tmp_path)).read_text())  # fmt: skip
    rows = {row[0]: row for row in table["data"]}
    columns = table["columns"]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlruns.db'}")
    try:
        for image in sorted((data / "imagesTs").iterdir()):
            mask = serve_mask(model_uri, image, tmp_path)
            label = np.asarray(nib.load(data / "labelsTs" / image.name).dataobj)
            assert mask.shape == label.shape
            case = rows[image.name.removesuffix(".nii.gz")]
            for c in (1, 2):
                pred, true = mask == c, label == c
                dice = 2 * (pred & true).sum() / (pred.sum() + true.sum())
                assert dice == pytest.approx(case[columns.index(f"dice_{c}")], abs=1e-6)
    finally:
        mlflow.set_tracking_uri(None)


@pytest.mark.parametrize("way", ["mlpipe run", "python -m seg3d"])
def test_contradictions_with_dataset_json_stop_before_any_run(anatomy, tmp_path, way):
    data = anatomy["mri"]
    if way == "mlpipe run":
        done = run("run", str(PROJECT), "-e", "train", "-P", f"data_dir={data}",
                   "-P", "num_classes=2", cwd=tmp_path, timeout=300)  # fmt: skip
        assert "refused this train run; nothing was created" in done.stderr
    else:
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlruns.db'}"}
        done = subprocess.run(
            [sys.executable, "-m", "seg3d", "train", "--data-dir", str(data), "--num-classes", "2"],
            cwd=PROJECT, capture_output=True, text=True, timeout=300, env=env,
        )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert "num_classes=2" in done.stderr and "lists 3 labels" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "mlruns.db").exists()


def test_undeclared_4d_image_is_refused_naming_the_file(anatomy, tmp_path):
    import shutil

    data = tmp_path / "undeclared"
    shutil.copytree(anatomy["multi"], data)
    meta = json.loads((data / "dataset.json").read_text())
    meta["modality"] = {"0": "MRI"}
    (data / "dataset.json").write_text(json.dumps(meta))
    done = subprocess.run(
        [sys.executable, "-m", "seg3d", "train", "--data-dir", str(data)],
        cwd=PROJECT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlruns.db'}"},
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert "brain_000.nii.gz has shape" in done.stderr and "Traceback" not in done.stderr


def test_multi_channel_set_trains_and_serves(anatomy, tmp_path):
    data = anatomy["multi"]
    done = run("run", str(PROJECT), "-e", "train", "-P", f"data_dir={data}", "-P", "epochs=1",
               cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "3 channel(s)" in done.stdout
    client, found = the_run(tmp_path)
    assert found.data.params["plan.in_channels"] == "3"
    model_uri = next(iter(client.search_logged_models([found.info.experiment_id]))).model_uri
    image = next((data / "imagesTs").iterdir())
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlruns.db'}")
    try:
        mask = serve_mask(model_uri, image, tmp_path)
    finally:
        mlflow.set_tracking_uri(None)
    assert mask.shape == nib.load(image).shape[:3]


def test_plan_entry_point_prints_and_logs_the_plan_without_training(anatomy, tmp_path):
    done = run("run", str(PROJECT), "-e", "plan", "-P", f"data_dir={anatomy['mri']}",
               cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("seg3d: plan:")]
    assert 4 <= len(lines) <= 6 and "spacing 6x6x6 mm" in done.stdout
    client, found = the_run(tmp_path)
    assert found.data.tags["mlpipe.plan.digest"]
    assert found.data.params["plan.overridden"] == "none"
    assert "train_loss" not in found.data.metrics
    artifacts = {a.path for a in client.list_artifacts(found.info.run_id, "mlpipe")}
    assert "mlpipe/plan.json" in artifacts
