"""seg3d's served model (seg3d.pyfunc) and its evaluation (seg3d.evaluate).

One untrained UNet is logged once per module (log_model into a SQLite store, registered, with
an input example) and loaded from its downloaded folder by each test. Geometry is checked on a
50x61x37 volume with an LPS, anisotropic affine. To check that masks land on the right input
voxels, independently of training, the loaded model's network is swapped for a fixed
"intensity" network that labels voxels by their (windowed) intensity: the mask must then match
the truth drawn into the input.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from seg3d.config import Seg3dInputError, TrainConfig
from seg3d.evaluate import evaluate, score_case
from seg3d.networks import build_network
from seg3d.pyfunc import decode_nifti, encode_nifti, log_model

SHAPE = (50, 61, 37)
LPS_AFFINE = np.array(
    [
        [-0.8, 0.0, 0.0, 40.0],
        [0.0, -1.2, 0.0, 70.0],
        [0.0, 0.0, 3.0, -50.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
CLASS_HU = (0.0, 100.0, 200.0)
"""Background, class 1, class 2 intensities; the CT window (-175, 250) keeps them apart."""


class IntensityNet(torch.nn.Module):
    """Logits that pick the class whose windowed intensity is nearest: a perfect model here."""

    def __init__(self, low: float = -175.0, high: float = 250.0):
        super().__init__()
        centres = [(hu - low) / (high - low) for hu in CLASS_HU]
        self.register_buffer("centres", torch.tensor(centres).view(1, -1, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -(x - self.centres).abs() * 20.0


def draw_case(shape, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """An image with two boxes (class 1 and 2) placed off-centre, so a flip would show."""
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, dtype=np.uint8)
    x, y, z = shape
    label[2 : x // 2, y // 2 : y - 3, 1 : z // 2] = 1
    label[x // 2 + 3 : x - 2, 3 : y // 3, z // 2 : z - 2] = 2
    image = np.take(CLASS_HU, label).astype(np.float32) + rng.normal(0, 2, shape).astype(np.float32)
    return image, label


def save(array: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), path)
    return path


def write_test_dataset(root: Path, cases: int = 2, shape=(40, 40, 24)) -> Path:
    """Decathlon layout with one training pair and ``cases`` labelled test pairs."""
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    image, label = draw_case(shape, seed=99)
    save(image, affine, root / "imagesTr" / "train_0.nii.gz")
    save(label, affine, root / "labelsTr" / "train_0.nii.gz")
    for i in range(cases):
        image, label = draw_case(shape, seed=i)
        save(image, affine, root / "imagesTs" / f"test_{i}.nii.gz")
        save(label, affine, root / "labelsTs" / f"test_{i}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({"name": "toy-seg", "version": "v1"}))
    return root


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """One UNet logged with log_model (registered, with an input example), downloaded."""
    root = tmp_path_factory.mktemp("seg3d-model")
    image, _ = draw_case(SHAPE, seed=0)
    example = save(image, LPS_AFFINE, root / "example.nii.gz")
    config = TrainConfig(model="unet", patch_size=(32, 32, 32), num_classes=3)
    torch.manual_seed(0)
    network = build_network(config).eval()
    uri = f"sqlite:///{root / 'mlruns.db'}"
    mlflow.set_tracking_uri(uri)
    try:
        experiment = mlflow.create_experiment("seg3d", artifact_location=str(root / "artifacts"))
        with mlflow.start_run(experiment_id=experiment):
            started = time.perf_counter()
            info = log_model(
                network, config, registered_model_name="seg3d-test", example_path=example
            )
            seconds = time.perf_counter() - started
        local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=root / "dl"))
        versions = MlflowClient(uri).search_model_versions("name='seg3d-test'")
    finally:
        while mlflow.active_run():
            mlflow.end_run()
        mlflow.set_tracking_uri(None)
    return SimpleNamespace(
        info=info, path=local, network=network, config=config, seconds=seconds, versions=versions
    )


@pytest.fixture
def lps_volume(tmp_path):
    image, label = draw_case(SHAPE, seed=1)
    return SimpleNamespace(
        path=save(image, LPS_AFFINE, tmp_path / "lps.nii.gz"), image=image, label=label
    )


def load(logged, network: torch.nn.Module | None = None):
    model = mlflow.pyfunc.load_model(str(logged.path))
    if network is not None:
        model.unwrap_python_model().network = network
    return model


# metrics ----------------------------------------------------------------------------------------
def surface_hd95(a: np.ndarray, b: np.ndarray, spacing) -> float:
    """Brute-force reference: 95th percentile of edge-to-edge distances, both directions."""

    def edges(mask):
        padded = np.pad(mask, 1)
        inner = padded.copy()
        for axis in range(3):
            for shift in (1, -1):
                inner &= np.roll(padded, shift, axis=axis)
        return np.argwhere((padded & ~inner)[1:-1, 1:-1, 1:-1]) * np.asarray(spacing)

    ea, eb = edges(a), edges(b)
    distances = np.linalg.norm(ea[:, None, :] - eb[None, :, :], axis=-1)
    return max(np.percentile(distances.min(1), 95), np.percentile(distances.min(0), 95))


def test_score_case_known_pairs():
    shape, spacing = (20, 20, 10), (1.0, 1.0, 2.0)
    truth = np.zeros(shape, np.uint8)
    truth[2:8, 2:8, 2:6] = 1  # 144 voxels
    pred = np.zeros(shape, np.uint8)
    pred[4:10, 2:8, 2:6] = 1  # shifted 2 voxels: 96 in common
    pred[12:16, 12:16, 5:8] = 2  # class 2 predicted, absent from the truth
    scores = score_case(pred, truth, spacing=spacing, num_classes=4)

    assert scores["dice_1"] == pytest.approx(2 * 96 / (144 + 144))
    assert scores["hd95_1"] == pytest.approx(surface_hd95(pred == 1, truth == 1, spacing))
    assert scores["volume_error_1"] == 0.0
    diagonal = math.sqrt(20**2 + 20**2 + 20**2)
    assert scores["dice_2"] == 0.0
    assert scores["hd95_2"] == pytest.approx(diagonal)  # missed/spurious: worst distance
    assert math.isnan(scores["volume_error_2"])
    assert all(math.isnan(scores[f"{m}_3"]) for m in ("dice", "hd95", "volume_error"))


def test_score_case_hd95_is_in_millimetres():
    one, other = np.zeros((8, 4, 4), np.uint8), np.zeros((8, 4, 4), np.uint8)
    one[1, 1, 1] = 1
    other[4, 1, 1] = 1  # 3 voxels apart along an axis of 2 mm voxels
    scores = score_case(other, one, spacing=(2.0, 1.0, 1.0), num_classes=2)
    assert scores["hd95_1"] == pytest.approx(6.0)
    assert scores["dice_1"] == 0.0


# log_model --------------------------------------------------------------------------------------
def test_log_model_stores_a_state_dict_not_a_pickle(logged):
    artifacts = logged.path / "artifacts"
    state = torch.load(artifacts / "weights.pt", weights_only=True)
    assert isinstance(state, dict)
    original = logged.network.state_dict()
    assert state.keys() == original.keys()
    assert all(torch.equal(state[k], original[k]) for k in original)
    assert not list(logged.path.rglob("*.pkl"))  # models-from-code: nothing unpickled at load
    assert TrainConfig.from_dict(json.loads((artifacts / "config.json").read_text())) == (
        logged.config
    )
    assert json.loads((artifacts / "preprocessing.json").read_text())["transforms"]
    requirements = (logged.path / "requirements.txt").read_text().split()
    assert {r.split("==")[0] for r in requirements} >= {"mlflow", "torch", "monai", "nibabel"}
    assert all("==" in r and "+" not in r for r in requirements)


def test_log_model_registers_a_version_with_signature_and_example(logged):
    assert logged.info.registered_model_version == 1
    assert [str(v.version) for v in logged.versions] == ["1"]  # an int in 3.17
    signature = logged.info.signature
    assert [(c.name, c.required) for c in signature.inputs.inputs] == [
        ("path", False),
        ("nifti", False),
    ]
    assert signature.outputs.input_names() == ["mask", "volume_ml_1", "volume_ml_2", "shape"]
    example = json.loads((logged.path / "input_example.json").read_text())
    assert example["columns"] == ["nifti"]
    assert decode_nifti(example["data"][0][0]).shape == (32, 32, 32)  # cropped, kept small
    assert logged.seconds < 30


# predict ----------------------------------------------------------------------------------------
def test_predict_keeps_input_shape_and_affine(logged, lps_volume):
    model = load(logged)
    started = time.perf_counter()
    out = model.predict(pd.DataFrame({"path": [str(lps_volume.path)]}))
    print(f"log_model {logged.seconds:.2f} s, predict {time.perf_counter() - started:.2f} s")
    assert list(out.columns) == ["mask", "volume_ml_1", "volume_ml_2", "shape"]
    mask = decode_nifti(out.loc[0, "mask"])
    assert mask.shape == SHAPE
    assert out.loc[0, "shape"] == "50x61x37"
    np.testing.assert_allclose(mask.affine, LPS_AFFINE, atol=1e-5)
    assert mask.get_data_dtype() == np.uint8
    voxel_ml = 0.8 * 1.2 * 3.0 / 1000
    values = np.asarray(mask.dataobj)
    for c in (1, 2):
        assert out.loc[0, f"volume_ml_{c}"] == pytest.approx((values == c).sum() * voxel_ml)


def test_predict_maps_the_mask_back_onto_the_input_voxels(logged, lps_volume):
    model = load(logged, IntensityNet())
    out = model.predict(pd.DataFrame({"path": [str(lps_volume.path)]}))
    mask = np.asarray(decode_nifti(out.loc[0, "mask"]).dataobj)
    # Resampling to 1.5x1.5x2 mm and back blurs the box edges a little; a flipped or shifted
    # mask would score near 0.
    for c in (1, 2):
        assert dice(mask == c, lps_volume.label == c) > 0.9


def test_predict_nifti_column_matches_path(logged, lps_volume, tmp_path):
    model = load(logged)
    plain = tmp_path / "plain.nii"
    nib.save(nib.load(lps_volume.path), plain)
    frame = pd.DataFrame(
        {
            "path": [str(lps_volume.path), None, None],
            "nifti": [None, encode_nifti(lps_volume.path), encode_nifti(plain)],
        }
    )
    out = model.predict(frame)
    masks = [np.asarray(decode_nifti(text).dataobj) for text in out["mask"]]
    assert all(m.shape == SHAPE for m in masks)
    np.testing.assert_array_equal(masks[0], masks[1])
    np.testing.assert_array_equal(masks[0], masks[2])


def test_predict_uses_the_logged_weights(logged):
    loaded = load(logged).unwrap_python_model().network.state_dict()
    original = logged.network.state_dict()
    assert all(torch.equal(loaded[k].cpu(), original[k]) for k in original)


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (pd.DataFrame({"file": ["x.nii.gz"]}), "neither a 'path' column"),
        (pd.DataFrame({"path": ["/no/such.nii.gz"]}), "row 0, column 'path': /no/such"),
        (pd.DataFrame({"nifti": ["not base64!"]}), "row 0, column 'nifti': not base64"),
        (pd.DataFrame({"path": [None], "nifti": [None]}), "row 0: neither 'path' nor 'nifti'"),
    ],
)
def test_predict_refuses_bad_input_naming_row_and_column(logged, frame, message):
    with pytest.raises(MlflowException, match=message):
        load(logged).predict(frame)


def test_predict_refuses_a_file_that_is_not_nifti(logged, tmp_path, lps_volume):
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"not a volume")
    frame = pd.DataFrame({"path": [str(lps_volume.path), str(junk)]})
    with pytest.raises(MlflowException, match=r"row 1, column 'path': .*junk.nii.gz is not a"):
        load(logged).predict(frame)


# evaluate ---------------------------------------------------------------------------------------
def test_evaluate_logs_metrics_table_csv_and_dataset(logged, tracking, tmp_path, monkeypatch):
    data = write_test_dataset(tmp_path / "data")
    real_load = mlflow.pyfunc.load_model
    monkeypatch.setattr(
        mlflow.pyfunc, "load_model", lambda uri: _with_network(real_load(uri), IntensityNet())
    )
    means = evaluate(str(logged.path), str(data), num_classes=3)

    assert means["mean_dice"] == pytest.approx(1.0)
    assert means["mean_hd95"] == pytest.approx(0.0)
    assert means["mean_volume_error"] == pytest.approx(0.0)
    assert means["mean_dice_1"] == means["mean_dice_2"] == pytest.approx(1.0)
    run = tracking.get_run(mlflow.active_run().info.run_id)
    assert run.data.metrics == pytest.approx(means)
    paths = {a.path for a in tracking.list_artifacts(run.info.run_id, "evaluation")}
    assert paths == {"evaluation/per_case.json", "evaluation/per_case.csv"}
    csv = pd.read_csv(tracking.download_artifacts(run.info.run_id, "evaluation/per_case.csv"))
    assert list(csv["case"]) == ["test_0", "test_1"]
    assert {"dice_1", "hd95_2", "volume_error_1"} <= set(csv.columns)
    assert [i.dataset.name for i in run.inputs.dataset_inputs] == ["toy-seg"]
    assert run.data.tags["mlpipe.dataset.version"] == "v1"


def test_evaluate_scores_the_untrained_network_without_failing(logged, tracking, tmp_path):
    data = write_test_dataset(tmp_path / "data", cases=1)
    means = evaluate(str(logged.path), data, num_classes=3)
    assert 0.0 <= means["mean_dice"] <= 1.0
    assert set(means) == {
        "mean_dice",
        "mean_hd95",
        "mean_volume_error",
        "mean_dice_1",
        "mean_dice_2",
    }


def test_evaluate_refuses_a_dataset_without_test_cases(logged, tracking, tmp_path):
    data = write_test_dataset(tmp_path / "data", cases=0)
    with pytest.raises(Seg3dInputError, match=f"{data}.* no labelled test case"):
        evaluate(str(logged.path), data, num_classes=3)
    assert mlflow.active_run() is None  # refused before anything was logged


def test_evaluate_refuses_another_number_of_classes(logged, tracking, tmp_path):
    data = write_test_dataset(tmp_path / "data", cases=1)
    with pytest.raises(Seg3dInputError, match="segments 3 classes; pass --num-classes 3"):
        evaluate(str(logged.path), data, num_classes=2)


def test_evaluate_refuses_a_model_uri_that_does_not_load(tracking, tmp_path):
    data = write_test_dataset(tmp_path / "data", cases=1)
    with pytest.raises(Seg3dInputError, match="model_uri: cannot load"):
        evaluate(os.fspath(tmp_path / "no-model"), data, num_classes=3)


def _with_network(model, network: torch.nn.Module):
    model.unwrap_python_model().network = network
    return model


def test_predict_refuses_truncated_voxel_data(logged, tmp_path, lps_volume):
    plain = tmp_path / "plain.nii"
    nib.save(nib.load(lps_volume.path), plain)
    truncated = tmp_path / "truncated.nii"
    truncated.write_bytes(plain.read_bytes()[:5000])  # the header reads, the voxels do not
    with pytest.raises(MlflowException, match=r"row 0, column 'nifti': the decoded file is not"):
        load(logged).predict(pd.DataFrame({"nifti": [encode_nifti(truncated)]}))


def test_evaluate_defaults_to_the_synthetic_dataset(logged, tracking, tmp_path, monkeypatch):
    import seg3d.synthesize

    data = write_test_dataset(tmp_path / "data", cases=1)
    asked = []
    monkeypatch.setattr(seg3d.synthesize, "default_dataset", lambda **kw: asked.append(kw) or data)
    evaluate(str(logged.path), "", num_classes=3)
    assert asked == [{"num_classes": 3}]
    assert tracking.get_run(mlflow.active_run().info.run_id).data.metrics["mean_dice"] >= 0
