"""mlpipe predict in process: a real registered seg3d model, real NIfTI files, a SQLite store.

One untrained UNet is logged and registered per module (``log_served_model``, the helper the
serve tests use: its run logged a dataset and a data profile of three 32x32x24 volumes at
1.5x1.5x3 mm). The command runs through click's CliRunner; the masks, the run and its
artifacts are then read back from disk and from the store.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from mlpipe.cli import cli
from mlpipe.core.errors import UsageError
from mlpipe.predict.inputs import Case, attach_labels, list_cases, parse_shard
from mlpipe.predict.outputs import PART_SUFFIX, LocalStore
from tests.conftest import isolated_env, log_served_model

MODEL = "seg3d-predict"
URI = f"models:/{MODEL}@production"
LPS = np.array([[-1.4, 0, 0, 30.0], [0, -1.6, 0, 40.0], [0, 0, 3.2, -20.0], [0, 0, 0, 1]])
PERMUTED = np.array([[0, 0, 2.5, 5.0], [1.2, 0, 0, -3.0], [0, 1.0, 0, 7.0], [0, 0, 0, 1]])
RAS = np.diag([1.5, 1.5, 3.0, 1.0])
OBLIQUE = np.array(
    [[1.3, -0.3, 0, 1.0], [0.3, 1.3, 0, 2.0], [0, 0, 2.8, 3.0], [0, 0, 0, 1]], dtype=float
)


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict-model")
    with isolated_env(root):
        return log_served_model(root, MODEL)


def volume(path: Path, shape, affine, *, seed: int = 0, dtype=np.float32) -> Path:
    rng = np.random.default_rng(seed)
    data = rng.normal(size=shape).astype(dtype)
    x, y, z = shape[:3]
    data[x // 4 : x // 2, y // 4 : y // 2, z // 4 : z // 2] += 3
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def mixed_folder(root: Path) -> dict[str, Path]:
    """Four good volumes of different shapes, spacings and orientations."""
    return {
        "ras": volume(root / "ras.nii.gz", (30, 28, 20), RAS, seed=1),
        "lps": volume(root / "lps.nii.gz", (34, 30, 22), LPS, seed=2),
        "permuted": volume(root / "permuted.nii", (26, 32, 18), PERMUTED, seed=3),
        "site_b/oblique": volume(root / "site_b" / "oblique.nii.gz", (28, 28, 20), OBLIQUE),
    }


def invoke(logged, *args: str):
    return CliRunner().invoke(cli, ["predict", *args, "--tracking-uri", logged.uri])


def runs_of(logged, experiment: str = f"{MODEL}-inference"):
    client = MlflowClient(logged.uri)
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])


def read_csv(client: MlflowClient, run_id: str, tmp_path: Path) -> list[dict]:
    local = client.download_artifacts(run_id, "predictions.csv", str(tmp_path))
    return list(csv.DictReader(io.StringIO(Path(local).read_text())))


def test_mixed_geometry_bad_files_and_the_inference_run(logged, tmp_path):
    inputs = tmp_path / "in"
    good = mixed_folder(inputs)
    truncated = volume(inputs / "truncated.nii.gz", (30, 30, 20), RAS, seed=5)
    truncated.write_bytes(truncated.read_bytes()[:-400])
    volume(inputs / "fourd.nii.gz", (20, 20, 12, 2), RAS, seed=6)
    out = tmp_path / "out"

    result = invoke(logged, URI, str(inputs), "--out", str(out), "--batch-id", "mixed-1")

    assert result.exit_code == 1, result.output
    assert "2 of 6 case(s) failed" in result.output
    assert "truncated" in result.output and "fourd" in result.output
    for case, path in good.items():
        mask = nib.load(out / f"{case}.nii.gz")
        image = nib.load(path)
        assert mask.shape == image.shape
        np.testing.assert_allclose(mask.affine, image.affine, atol=1e-5)
        assert mask.get_data_dtype() == np.uint8
    assert not (out / "truncated.nii.gz").exists() and not (out / "fourd.nii.gz").exists()
    assert not list(out.rglob(f"*{PART_SUFFIX}"))

    client, runs = runs_of(logged)
    run = runs[0]
    tags, metrics, params = run.data.tags, run.data.metrics, run.data.params
    assert run.info.status == "FINISHED"
    assert tags["mlpipe.predict.model"] == MODEL
    assert tags["mlpipe.predict.model_version"] == "1"
    assert tags["mlpipe.predict.model_alias"] == "production"
    assert tags["mlpipe.predict.batch_id"] == "mixed-1"
    assert tags["mlpipe.predict.shard"] == "0/1"
    assert tags["mlpipe.predict.source_run"] == logged.run_id
    assert tags["mlpipe.dataset.files"] == "5"  # every case whose bytes could be read
    assert len(tags["mlpipe.dataset.digest"]) == 64
    assert tags["mlpipe.drift.verdict"] in ("drift", "no drift")
    assert "mlpipe.drift.check" in tags or "mlpipe.drift.features" in tags
    assert params["model_version"] == "1"
    assert metrics["cases"] == 6 and metrics["failed"] == 2 and metrics["written"] == 4
    assert 0 < metrics["seconds_per_case_p50"] <= metrics["seconds_per_case_p95"]
    assert metrics["cases_per_second"] > 0
    rows = {r["case"]: r for r in read_csv(client, run.info.run_id, tmp_path / "dl")}
    assert set(rows) == {*good, "truncated", "fourd"}
    assert rows["lps"]["status"] == "written" and rows["lps"]["shape"] == "34x30x22"
    assert rows["lps"]["spacing"] == "1.4x1.6x3.2"
    assert float(rows["lps"]["seconds"]) > 0
    assert {"volume_ml_1", "volume_ml_2"} <= set(rows["lps"])
    voxel_ml = 1.4 * 1.6 * 3.2 / 1000
    counts = np.bincount(np.asarray(nib.load(out / "lps.nii.gz").dataobj).ravel(), minlength=3)
    assert float(rows["lps"]["volume_ml_1"]) == pytest.approx(counts[1] * voxel_ml, rel=1e-3)
    assert rows["lps"]["sha256"] == _sha256(good["lps"])
    assert rows["truncated"]["status"] == "failed" and "truncated" in rows["truncated"]["error"]
    assert str(inputs) not in rows["truncated"]["error"]  # no local paths in the run
    assert rows["fourd"]["status"] == "failed" and "3D" in rows["fourd"]["error"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"predictions.csv", "drift", "mlpipe"} <= artifacts
    drift = json.loads(
        Path(
            client.download_artifacts(run.info.run_id, "drift/report.json", str(tmp_path))
        ).read_text()
    )
    assert drift["new"]["volumes"] == 4 and drift["new"]["kind"] == "batch"
    assert run.inputs.dataset_inputs[0].dataset.digest == tags["mlpipe.dataset.digest"][:12]

    # the same command again: the written masks stay, only the failed cases are tried again
    before = {c: (out / f"{c}.nii.gz").stat().st_mtime_ns for c in good}
    again = invoke(logged, URI, str(inputs), "--out", str(out), "--batch-id", "mixed-1")
    assert again.exit_code == 1
    assert {c: (out / f"{c}.nii.gz").stat().st_mtime_ns for c in good} == before
    _, runs = runs_of(logged)
    assert runs[0].data.metrics["skipped"] == 4 and runs[0].data.metrics["written"] == 0
    assert runs[0].data.tags["mlpipe.dataset.digest"] == tags["mlpipe.dataset.digest"]


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_labels_give_the_dice_evaluate_gives(logged, tmp_path):
    from mlpipe.data.layouts import Pair
    from mlpipe.inference.models import load_pyfunc, resolve_model
    from mlpipe.registry.promotion import connect
    from seg3d.evaluate import _score_pair

    inputs, labels = tmp_path / "in", tmp_path / "labels"
    cases = {}
    for i, affine in enumerate((RAS, LPS)):
        image = volume(inputs / f"c{i}.nii.gz", (32, 30, 22), affine, seed=10 + i)
        label = np.zeros((32, 30, 22), dtype=np.uint8)
        label[8:16, 7:15, 5:11] = 1
        label[18:26, 15:25, 10:18] = 2
        labels.mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(label, affine), labels / f"c{i}.nii.gz")
        cases[f"c{i}"] = Pair(f"c{i}", image, labels / f"c{i}.nii.gz", "test")

    result = invoke(
        logged, URI, str(inputs), "--out", str(tmp_path / "out"), "--labels", str(labels)
    )

    assert result.exit_code == 0, result.output
    assert "mean Dice" in result.output
    client, runs = runs_of(logged)
    rows = {r["case"]: r for r in read_csv(client, runs[0].info.run_id, tmp_path / "dl")}
    tracking = connect(logged.uri)
    model = load_pyfunc(resolve_model(tracking, URI), tracking, tmp_path / "model")
    expected = {case: _score_pair(model, pair, 3) for case, pair in cases.items()}
    for case, scores in expected.items():
        for key in ("dice_1", "dice_2", "hd95_1", "hd95_2"):
            assert float(rows[case][key]) == pytest.approx(scores[key], nan_ok=True), (case, key)
    mean = np.nanmean([scores[k] for scores in expected.values() for k in ("dice_1", "dice_2")])
    assert runs[0].data.metrics["mean_dice"] == pytest.approx(mean)


def test_bad_input_stops_before_any_run(logged, tmp_path):
    (tmp_path / "in").mkdir()
    volume(tmp_path / "in" / "a.nii.gz", (20, 20, 12), RAS)
    cases = [
        ([URI, str(tmp_path / "missing"), "--out", "o"], "does not exist"),
        ([URI, str(tmp_path / "in"), "--out", "o", "--shard", "2/2"], "0-based"),
        ([URI, str(tmp_path / "in"), "--out", "o", "--shard", "x"], "is not I/N"),
        ([URI, str(tmp_path / "in")], "--out is required"),
        (["models:/nope@production", str(tmp_path / "in"), "--out", "o"], "nope"),
        ([URI, str(tmp_path / "in"), "--out", "ftp://x/y"], "s3://bucket/prefix"),
        ([URI, str(tmp_path / "in"), "--out", "o", "--labels", str(tmp_path)], "no label for"),
        ([URI, str(tmp_path / "in"), "--out", "o", "--batch-id", "a b"], "--batch-id"),
        ([URI, str(tmp_path / "in"), "--out", "o", "--workers", "0"], "--workers 0"),
    ]
    client = MlflowClient(logged.uri)
    before = len(client.search_runs([e.experiment_id for e in client.search_experiments()]))
    for args, message in cases:
        result = invoke(logged, *args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)
        assert "Traceback" not in result.output
    after = len(client.search_runs([e.experiment_id for e in client.search_experiments()]))
    assert after == before
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_list_cases_names_folders_decathlon_and_manifests(tmp_path):
    volume(tmp_path / "plain" / "a_image.nii.gz", (8, 8, 6), RAS)
    volume(tmp_path / "plain" / "a_label.nii.gz", (8, 8, 6), RAS)
    volume(tmp_path / "plain" / "sub" / "b.nii", (8, 8, 6), RAS)
    deca = tmp_path / "Task01"
    volume(deca / "imagesTr" / "t0.nii.gz", (8, 8, 6), RAS)
    volume(deca / "imagesTs" / "s0.nii.gz", (8, 8, 6), RAS)
    (deca / "dataset.json").write_text(json.dumps({"name": "spleen", "version": "3"}))

    plain = list_cases([str(tmp_path / "plain")])
    assert [c.name for c in plain.cases] == ["a", "sub/b"]
    decathlon = list_cases([str(deca)])
    assert [c.name for c in decathlon.cases] == ["s0"]
    assert (decathlon.name, decathlon.version) == ("spleen", "3")
    other = volume(tmp_path / "other" / "a.nii.gz", (8, 8, 6), RAS)
    with pytest.raises(UsageError, match="both 'a'"):
        list_cases([str(tmp_path / "plain"), str(other)])


def test_shards_cover_every_case_exactly_once():
    cases = [Case(f"c{i:02d}", Path(f"/x/c{i:02d}.nii.gz")) for i in range(11)]
    taken = [c.name for i in range(3) for c in parse_shard(f"{i}/3").take(cases)]
    assert sorted(taken) == [c.name for c in cases]
    assert parse_shard(None).take(cases) == tuple(cases)


def test_labels_are_found_by_case_name(tmp_path):
    volume(tmp_path / "labels" / "a_label.nii.gz", (8, 8, 6), RAS)
    cases = attach_labels([Case("a", tmp_path / "a.nii.gz")], str(tmp_path / "labels"))
    assert cases[0].label == tmp_path / "labels" / "a_label.nii.gz"


def test_local_store_writes_whole_files_and_cleans_leftovers(tmp_path):
    store = LocalStore(tmp_path / "out")
    (tmp_path / "out" / f".x.nii.gz.1234{PART_SUFFIX}").write_bytes(b"half")
    assert store.remove_partials() == 1
    store.put("sub/x.nii.gz", gzip.compress(b"data"))
    assert store.existing() == {"sub/x.nii.gz"}
    assert gzip.decompress((tmp_path / "out" / "sub" / "x.nii.gz").read_bytes()) == b"data"


# --- DICOM series in, DICOM SEG out (issue 19) ---------------------------------------------------


def test_series_inputs_get_a_nifti_mask_and_a_seg_over_their_slices(logged, tmp_path):
    """A folder of DICOM series (one a folder, one a zip) with --format both: a NIfTI mask on
    each series' grid equal to the NIfTI input's mask, and a SEG that reads back onto the
    source slices; neither the SEG nor a patient attribute reaches the tracking store."""
    import highdicom as hd
    import pydicom

    from tests.dicom_factory import PLANTED, ct_volume, write_series, zip_folder

    scans = tmp_path / "scans"
    data, affine = ct_volume((32, 32, 24)), np.diag([1.5, 1.5, 3.0, 1.0])
    write_series(data, affine, scans / "ct_a", identifiers=PLANTED, shuffle=True, rename=True)
    zipped = tmp_path / "export"
    write_series(data, affine, zipped, identifiers=PLANTED)
    zip_folder(zipped, scans / "ct_b.zip")
    nifti = volume(tmp_path / "same" / "ct_n.nii.gz", (32, 32, 24), affine)
    nib.save(nib.Nifti1Image(data, affine), nifti)

    out = tmp_path / "out"
    result = invoke(logged, URI, str(scans), "--out", str(out), "--format", "both")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "ct_a.nii.gz", "ct_a_seg.dcm", "ct_b.nii.gz", "ct_b_seg.dcm",
    ]  # fmt: skip
    reference = invoke(logged, URI, str(nifti), "--out", str(tmp_path / "ref"))
    assert reference.exit_code == 0, reference.output
    expected = nib.load(tmp_path / "ref" / "ct_n.nii.gz")
    for case in ("ct_a", "ct_b"):
        mask = nib.load(out / f"{case}.nii.gz")
        np.testing.assert_allclose(mask.affine, expected.affine, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(mask.dataobj), np.asarray(expected.dataobj))

    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(out / "ct_a_seg.dcm"))
    sources = sorted(
        (pydicom.dcmread(p) for p in (scans / "ct_a").iterdir()),
        key=lambda ds: float(ds.ImagePositionPatient[2]),
    )
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    referenced = {
        item.ReferencedSOPInstanceUID
        for series in seg.ReferencedSeriesSequence
        for item in series.ReferencedInstanceSequence
    }
    assert referenced == {ds.SOPInstanceUID for ds in sources}
    mask = np.asarray(nib.load(out / "ct_a.nii.gz").dataobj)
    present = sorted(int(c) for c in np.unique(mask) if c)
    assert [int(s.SegmentNumber) for s in seg.SegmentSequence] == list(range(1, len(present) + 1))

    # the inference run holds no patient attribute and no SEG
    client, runs = runs_of(logged)
    run = runs[1]  # the series batch (the NIfTI reference ran after it)
    assert run.data.params["formats"] == "nifti,dicom-seg"
    assert run.data.tags["mlpipe.predict.formats"] == "nifti,dicom-seg"
    stored = json.dumps([run.data.params, run.data.tags, run.data.metrics])
    for root, _, files in os.walk(
        client.download_artifacts(run.info.run_id, "", str(tmp_path / "artifacts"))
    ):
        for name in files:
            assert not name.endswith(".dcm"), name
            stored += Path(root, name).read_bytes().decode("utf-8", "replace")
    for value in PLANTED.values():
        assert value not in stored, value


def test_dicom_seg_format_refuses_nifti_inputs_before_any_run(logged, tmp_path):
    nifti = volume(tmp_path / "scans" / "ct_n.nii.gz", (32, 32, 24), RAS)
    before = len(runs_of(logged)[1])
    result = invoke(logged, URI, str(nifti.parent), "--out", str(tmp_path / "o"), "--format",
                    "dicom-seg")  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "--format dicom-seg needs DICOM series inputs" in result.output
    assert "ct_n" in result.output
    assert len(runs_of(logged)[1]) == before
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
