"""mlpipe drift: the verdict rules on profiles, the serving file, and the command end to end.

The "trained" model is built once per module without training: a run that profiles a
synthetic seg3d dataset (20 + 2 volumes of about 24^3, seed 0) with ``mlpipe.log.data_profile``
and logs an untrained UNet with ``seg3d.pyfunc.log_model`` into a registered model, so
``models:/seg3d-drift/1`` has a source run holding the training profile. New data comes from
the same generator with other seeds (must give no drift) and from altered copies of it
(intensities shifted, spacing changed, MR-like intensities, another orientation: must give
drift naming exactly the features that moved).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import mlflow
import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from mlflow import MlflowClient

from mlpipe.cli import cli
from mlpipe.core.errors import UsageError
from mlpipe.data.profile import profile_volume
from mlpipe.inference.models import resolve_model
from mlpipe.inference.profile_log import profiles_path
from mlpipe.monitor.features import CHECK, DRIFT, FEATURE_ORDER, OK, Thresholds, compare_profiles
from mlpipe.monitor.new_volumes import find_images, read_serving_profiles
from mlpipe.registry.promotion import connect
from tests.conftest import isolated_env

MODEL = "seg3d-drift"
INTENSITY_LOCATION = ["intensity_p0_5", "intensity_p50", "intensity_p99_5", "intensity_mean"]
INTENSITY = [*INTENSITY_LOCATION, "intensity_std"]
SPACING = ["spacing_x", "spacing_y", "spacing_z"]


# --- the verdict rules on plain profiles ----------------------------------------------------


def volume(spacing=(1.0, 1.0, 2.0), shape=(64, 64, 32), p50=0.0, std=30.0, orientation="RAS"):
    """A profile_volume-shaped dict."""
    return {
        "spacing": list(spacing),
        "shape": list(shape),
        "orientation": orientation,
        "intensity": {
            "p0_5": p50 - 100.0,
            "p50": p50,
            "p99_5": p50 + 200.0,
            "mean": p50 + 5.0,
            "std": std,
        },
    }


def verdicts(results) -> dict[str, str]:
    return {r.feature: r.verdict for r in results}


def test_identical_constant_features_are_ok_not_degenerate():
    same = [volume() for _ in range(10)]
    results = compare_profiles(same, same)
    assert set(verdicts(results).values()) == {OK}
    spacing = results[0]
    assert spacing.statistics["ks_pvalue"] == pytest.approx(1.0)
    assert spacing.statistics["shift"] == 0.0


def test_few_new_volumes_with_an_unseen_spacing_are_drift_through_the_range_rule():
    training = [volume(spacing=(1.0, 1.0, s)) for s in np.linspace(1.8, 2.2, 20)]
    new = [volume(spacing=(1.0, 1.0, 5.0))]  # one volume: KS cannot reach p < 0.01
    result = next(r for r in compare_profiles(training, new) if r.feature == "spacing_z")
    assert result.statistics["ks_pvalue"] > 0.01
    assert result.verdict == DRIFT
    assert "outside the training range" in result.reason


def test_significant_but_small_difference_is_only_check():
    rng = np.random.default_rng(0)
    training = [volume(std=s) for s in rng.normal(30.0, 0.3, 200)]
    new = [volume(std=s) for s in rng.normal(30.9, 0.3, 200)]  # 3% higher, very significant
    result = next(r for r in compare_profiles(training, new) if r.feature == "intensity_std")
    assert result.statistics["ks_pvalue"] < 1e-6
    assert result.verdict == CHECK
    assert "moved only" in result.reason


def test_large_but_unsupported_shift_is_only_check():
    training = [volume(shape=(n, 64, 32)) for n in (40, 60, 80, 100, 120, 140)]
    new = [volume(shape=(n, 64, 32)) for n in (90, 110, 130)]  # median +21%, inside the range
    result = next(r for r in compare_profiles(training, new) if r.feature == "shape_x")
    assert result.statistics["shift"] == pytest.approx(0.2222, abs=1e-3)
    assert result.verdict == CHECK
    assert "too few volumes" in result.reason


def test_intensity_location_shift_is_relative_to_the_training_range():
    """p50 near 0 HU: +10 HU is 3% of a 300 HU range, not +1000% of the median."""
    rng = np.random.default_rng(1)
    training = [volume(p50=v) for v in rng.normal(0.5, 2.0, 30)]
    new = [volume(p50=v) for v in rng.normal(10.5, 2.0, 30)]
    result = next(r for r in compare_profiles(training, new) if r.feature == "intensity_p50")
    assert result.statistics["scale"] == pytest.approx(300.0)
    assert result.verdict == CHECK  # significant, but 3% of the range
    strict = compare_profiles(training, new, Thresholds(shift=0.02))
    assert verdicts(strict)["intensity_p50"] == DRIFT


def test_orientation_share_unseen():
    training = [volume(orientation="LPS") for _ in range(10)]
    one = [volume(orientation="LPS") for _ in range(19)] + [volume(orientation="RAS")]
    assert verdicts(compare_profiles(training, one))["orientation"] == CHECK
    many = [volume(orientation="RAS") for _ in range(5)]
    result = next(r for r in compare_profiles(training, many) if r.feature == "orientation")
    assert result.verdict == DRIFT
    assert result.statistics["unseen_share"] == 1.0
    assert "RAS" in result.reason


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"ks_pvalue": 0.0}, "--ks-pvalue"),
        ({"ks_pvalue": 1.5}, "--ks-pvalue"),
        ({"shift": -0.1}, "--shift"),
        ({"unseen_share": 2.0}, "--unseen-share"),
    ],
)
def test_thresholds_are_checked(kwargs, message):
    with pytest.raises(UsageError, match=message):
        Thresholds(**kwargs)


# --- the serving file and the new folder ----------------------------------------------------


def test_read_serving_profiles_tolerates_a_truncated_last_line(tmp_path):
    path = tmp_path / "profiles.jsonl"
    entries = [
        {**volume(), "received": "2025-03-01T10:00:00+00:00", "model_version": "1"},
        {**volume(p50=5.0), "received": "2025-03-02T10:00:00Z", "model_version": "2"},
    ]
    text = "".join(json.dumps(e) + "\n" for e in entries)
    path.write_text(text + "\n" + json.dumps(entries[0])[:40])  # blank line, cut-off line
    profiles, skipped = read_serving_profiles(path)
    assert [p["model_version"] for p in profiles] == ["1", "2"]
    assert skipped == 1
    recent, _ = read_serving_profiles(path, since="2025-03-02")
    assert [p["model_version"] for p in recent] == ["2"]


def test_read_serving_profiles_skips_entries_that_are_not_profiles(tmp_path):
    path = tmp_path / "profiles.jsonl"
    path.write_text('{"received": "2025-03-01"}\n[1, 2]\n' + json.dumps(volume()) + "\n")
    profiles, skipped = read_serving_profiles(path)
    assert len(profiles) == 1 and skipped == 2


def test_read_serving_profiles_missing_file_and_bad_since(tmp_path):
    with pytest.raises(UsageError, match="--serving-file"):
        read_serving_profiles(tmp_path / "nope.jsonl")
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(volume()) + "\n")
    with pytest.raises(UsageError, match="not an ISO date"):
        read_serving_profiles(path, since="yesterday")


def test_serving_profiles_path_follows_the_cache_dir_rule(tmp_path):
    assert profiles_path("seg3d", {"MLPIPE_CACHE_DIR": str(tmp_path)}) == (
        tmp_path / "serving" / "seg3d" / "profiles.jsonl"
    )
    xdg = profiles_path("seg3d", {"XDG_CACHE_HOME": "/x"})
    assert xdg == Path("/x/mlpipe/serving/seg3d/profiles.jsonl")
    # the default (from the autouse fixture's MLPIPE_CACHE_DIR) is the same rule
    assert profiles_path("m") == Path(os.environ["MLPIPE_CACHE_DIR"]) / ("serving/m/profiles.jsonl")


def test_find_images_skips_labels(tmp_path):
    affine = np.eye(4)
    for rel in (
        "imagesTr/a.nii.gz",
        "labelsTr/a.nii.gz",
        "imagesTs/b.nii",
        "flat/c_image.nii.gz",
        "flat/c_label.nii.gz",
        ".hidden/d.nii.gz",
    ):
        path = tmp_path / "data" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), affine), path)
    found = [p.relative_to(tmp_path / "data").as_posix() for p in find_images(tmp_path / "data")]
    assert found == ["flat/c_image.nii.gz", "imagesTr/a.nii.gz", "imagesTs/b.nii"]
    with pytest.raises(UsageError, match="No NIfTI volumes"):
        find_images(_empty(tmp_path))
    with pytest.raises(UsageError, match="is not a folder"):
        find_images(tmp_path / "missing")


def _empty(tmp_path: Path) -> Path:
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "notes.txt").write_text("no volumes")
    return folder


# --- end to end: a registered model with a training profile ---------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """models:/seg3d-drift/1 (@production): an untrained UNet whose run profiled the data."""
    import mlpipe.log as mlog
    from seg3d.config import TrainConfig
    from seg3d.networks import build_network
    from seg3d.pyfunc import log_model
    from seg3d.synthesize import synthesize

    root = tmp_path_factory.mktemp("drift-model")
    uri = f"sqlite:///{root / 'mlruns.db'}"
    # in root, also as the current folder: the store MLflow caches here gets root/mlruns as
    # its default artifact folder, so the monitoring runs' reports stay out of the repository
    with isolated_env(root):
        data = synthesize(root / "train", count=20, size=24, seed=0, test_count=2)
        config = TrainConfig(model="unet", patch_size=(16, 16, 16), num_classes=3)
        torch.manual_seed(0)
        network = build_network(config).eval()
        mlflow.set_tracking_uri(uri)
        try:
            experiment = mlflow.create_experiment("seg3d", artifact_location=str(root / "art"))
            with mlflow.start_run(experiment_id=experiment) as run:
                info = mlog.dataset(data)
                profile = mlog.data_profile(info)
                log_model(
                    network,
                    config,
                    registered_model_name=MODEL,
                    example_path=data / "imagesTr" / "synth_000.nii.gz",
                )
        finally:
            while mlflow.active_run():
                mlflow.end_run()
            mlflow.set_tracking_uri(None)
    client = MlflowClient(uri)
    client.set_registered_model_alias(MODEL, "production", "1")
    return SimpleNamespace(
        uri=uri, root=root, data=data, run_id=run.info.run_id, profile=profile, client=client
    )


@pytest.fixture(scope="module")
def new_data(trained):
    """Folders of new volumes by kind, made once: same generator (seeds 1-3) and altered ones."""
    from seg3d.synthesize import synthesize

    root = trained.root / "new"
    folders = {}
    for seed in (1, 2, 3):
        folders[f"seed{seed}"] = synthesize(
            root / f"seed{seed}", count=20, size=24, seed=seed, test_count=0
        )
    base = sorted((folders["seed1"] / "imagesTr").glob("*.nii.gz"))

    def altered(kind: str, change) -> Path:
        out = root / kind
        out.mkdir()
        for path in base:  # images only, no labels: what arrives in production
            image = nib.load(path)
            data, affine = change(np.asarray(image.dataobj, dtype=np.float32), image.affine.copy())
            nib.save(nib.Nifti1Image(data.astype(np.float32), affine), out / path.name)
        return out

    def spacing(factor_xy: float, factor_z: float):
        def change(data, affine):
            affine[:3, :3] = affine[:3, :3] @ np.diag([factor_xy, factor_xy, factor_z])
            return data, affine

        return change

    def ras(data, affine):
        affine[:3, :3] = np.abs(affine[:3, :3])
        return data, affine

    def mr_like(data, affine):
        # MR: arbitrary positive units, no air at -1000 or fat at -100; a different contrast.
        return np.clip((data + 200.0) * 3.0, 0.0, None), affine

    folders["shifted"] = altered("shifted", lambda d, a: (d + 150.0, a))
    folders["spacing"] = altered("spacing", spacing(1.25, 1.5))
    folders["spacing_slight"] = altered("spacing_slight", spacing(1.0, 1.08))
    folders["mr"] = altered("mr", mr_like)
    folders["ras"] = altered("ras", ras)
    return folders


def drift(trained, *args: str):
    return CliRunner().invoke(cli, ["drift", *args, "--tracking-uri", trained.uri])


def table_verdicts(output: str) -> dict[str, str]:
    found = {}
    for line in output.splitlines():
        parts = line.split()
        if parts and parts[0] in FEATURE_ORDER and parts[-1].lower() in (DRIFT, CHECK, OK):
            found[parts[0]] = parts[-1].lower()
    return found


def test_model_version_points_at_its_source_run(trained):
    """MLflow 3: the version's source is the LoggedModel (models:/m-...), run_id is the run."""
    mv = trained.client.get_model_version(MODEL, "1")
    assert mv.source.startswith("models:/m-")
    assert mv.run_id == trained.run_id
    ref = resolve_model(connect(trained.uri), f"models:/{MODEL}@production")
    assert (ref.name, ref.version, ref.run_id) == (MODEL, "1", trained.run_id)
    by_run = resolve_model(connect(trained.uri), f"runs:/{trained.run_id}/model")
    assert (by_run.name, by_run.version) == (MODEL, "1")
    # the training profile keeps every volume: enough for a KS test
    assert len(trained.profile["volumes"]) == 22


def test_logged_model_uri_resolves_to_its_run_and_registered_version(trained, monkeypatch):
    client = trained.client
    source = client.get_model_version(MODEL, "1").source
    ref = resolve_model(connect(trained.uri), source)
    assert (ref.name, ref.version, ref.run_id) == (MODEL, "1", trained.run_id)
    # The SQLite registry resolves a models:/m-... source with a default MlflowClient(), i.e.
    # through the environment's tracking URI, not this client's; it then fills in run_id from
    # the LoggedModel's source run, so a version always knows its run.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained.uri)
    client.create_registered_model("seg3d-drift-copy")
    try:
        client.create_model_version("seg3d-drift-copy", source=source)
        assert client.get_model_version("seg3d-drift-copy", "1").run_id == trained.run_id
        # the same LoggedModel under two names: the newest registration names it
        assert resolve_model(connect(trained.uri), source).name == "seg3d-drift-copy"
    finally:
        client.delete_registered_model("seg3d-drift-copy")


@pytest.mark.parametrize("seed", ["seed1", "seed2", "seed3"])
def test_same_generator_other_seed_is_no_drift(trained, new_data, seed, tmp_path):
    result = drift(trained, f"models:/{MODEL}/1", str(new_data[seed]))
    assert result.exit_code == 0, result.output
    assert "No drift." in result.output
    found = table_verdicts(result.output)
    assert len(found) == 12 and DRIFT not in found.values()
    report = json.loads((tmp_path / "drift-report" / "report.json").read_text())
    assert report["verdict"] == "no drift" and report["drifted"] == []
    assert report["new"]["volumes"] == 20 and report["training"]["volumes"] == 22
    assert report["training"]["dataset"]["name"] == "seg3d-synthetic"


def test_shifted_intensities_are_drift_naming_those_features(trained, new_data):
    result = drift(trained, f"models:/{MODEL}@production", str(new_data["shifted"]))
    assert result.exit_code == 4, result.output
    drifted = {f for f, v in table_verdicts(result.output).items() if v == DRIFT}
    assert drifted == set(INTENSITY_LOCATION)  # a constant shift leaves std alone
    assert "Error: Drift found in 4 feature(s): " + ", ".join(INTENSITY_LOCATION) in result.output


def test_changed_spacing_is_drift_naming_the_axes(trained, new_data):
    result = drift(trained, f"models:/{MODEL}/1", str(new_data["spacing"]))
    assert result.exit_code == 4, result.output
    drifted = {f for f, v in table_verdicts(result.output).items() if v == DRIFT}
    assert drifted == set(SPACING)
    assert "spacing_z: median moved +50%" in result.output


def test_mr_like_volumes_are_drift_in_every_intensity_feature(trained, new_data):
    result = drift(trained, f"models:/{MODEL}/1", str(new_data["mr"]))
    assert result.exit_code == 4, result.output
    drifted = {f for f, v in table_verdicts(result.output).items() if v == DRIFT}
    assert drifted == set(INTENSITY)


def test_other_orientation_is_drift(trained, new_data):
    result = drift(trained, f"models:/{MODEL}/1", str(new_data["ras"]))
    assert result.exit_code == 4, result.output
    assert {f for f, v in table_verdicts(result.output).items() if v == DRIFT} == {"orientation"}
    assert "unseen in training (RAS)" in result.output


def test_thresholds_decide_a_slight_spacing_change(trained, new_data):
    """z spacing 2.0 -> 2.16 (+8%): KS is certain, the shift is under 10% -> check, exit 0."""
    default = drift(trained, f"models:/{MODEL}/1", str(new_data["spacing_slight"]))
    assert default.exit_code == 0, default.output
    assert table_verdicts(default.output)["spacing_z"] == CHECK
    strict = drift(
        trained, f"models:/{MODEL}/1", str(new_data["spacing_slight"]), "--shift", "0.05"
    )
    assert strict.exit_code == 4, strict.output
    assert "Drift found in 1 feature(s): spacing_z." in strict.output


def test_check_is_logged_as_a_monitoring_run(trained, new_data, tmp_path):
    result = drift(trained, f"models:/{MODEL}/1", str(new_data["spacing"]))
    assert result.exit_code == 4
    run_id = result.output.split("Logged as run ")[1].split()[0]
    client = trained.client
    run = client.get_run(run_id)
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == f"{MODEL}-monitoring"
    assert run.info.status == "FINISHED"
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    assert tags["mlpipe.drift.verdict"] == "drift"
    assert tags["mlpipe.drift.features"] == "spacing_x,spacing_y,spacing_z"
    assert tags["mlpipe.drift.source_run"] == trained.run_id
    assert tags["mlpipe.drift.model_version"] == "1"
    assert params["model_uri"] == f"models:/{MODEL}/1"
    assert params["n_volumes"] == "20" and params["model_version"] == "1"
    assert metrics["n_drifted_features"] == 3.0
    assert metrics["shift.spacing_z"] == pytest.approx(0.5)
    files = {a.path for a in client.list_artifacts(run_id, "drift")}
    assert files == {"drift/report.json", "drift/report.png", "drift/new_profile.json"}
    png = Path(client.download_artifacts(run_id, "drift/report.png", str(tmp_path / "dl")))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # issue 20: report.json said run_id null although it logged this run
    logged = client.download_artifacts(run_id, "drift/report.json", str(tmp_path / "dl"))
    assert json.loads(Path(logged).read_text())["run_id"] == run_id
    local = json.loads((tmp_path / "drift-report" / "report.json").read_text())
    assert local["run_id"] == run_id
    assert f"mlflow ui --backend-store-uri {trained.uri}" in result.output


def test_monitoring_run_goes_under_the_team_prefix(trained, new_data, monkeypatch):
    monkeypatch.setenv("MLPIPE_EXPERIMENT_PREFIX", "neuro/")
    result = drift(trained, f"models:/{MODEL}/1", str(new_data["spacing"]))
    assert result.exit_code == 4, result.output
    run_id = result.output.split("Logged as run ")[1].split()[0]
    run = trained.client.get_run(run_id)
    experiment = trained.client.get_experiment(run.info.experiment_id)
    assert experiment.name == f"neuro/{MODEL}-monitoring"


def test_new_profile_has_the_training_profile_format(trained, new_data, tmp_path):
    result = drift(trained, f"models:/{MODEL}/1", str(new_data["seed1"]), "--no-log")
    assert result.exit_code == 0, result.output
    assert "Logged as run" not in result.output
    profile = json.loads((tmp_path / "drift-report" / "new_profile.json").read_text())
    assert profile["format"] == trained.profile["format"]
    assert profile["summary"]["volumes"] == 20
    assert set(profile["volumes"][0]) >= {"shape", "spacing", "orientation", "intensity"}


def test_json_output(trained, new_data):
    result = CliRunner().invoke(
        cli,
        ["drift", f"models:/{MODEL}/1", str(new_data["ras"]), "--json", "--no-log",
         "--tracking-uri", trained.uri],
    )  # fmt: skip
    assert result.exit_code == 4
    report = json.loads(result.stdout)
    assert report["format"] == "mlpipe.drift_report/1"
    assert report["drifted"] == ["orientation"]
    orientation = next(f for f in report["features"] if f["feature"] == "orientation")
    assert orientation["training"]["counts"] == {"LPS": 22}
    assert orientation["new"]["counts"] == {"RAS": 20}


def write_serving(path: Path, folder: Path, *, truncate: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for image in sorted(folder.rglob("*.nii.gz")):
        if "labels" in image.parent.name:
            continue
        entry = profile_volume(image) | {"received": "2025-03-01T12:00:00+00:00"}
        lines.append(json.dumps(entry | {"model_version": "1"}))
    text = "\n".join(lines) + "\n"
    if truncate:
        text += lines[0][: len(lines[0]) // 2]  # the server died mid-write
    path.write_text(text)


def test_from_serving_reads_the_default_profiles_file(trained, new_data):
    write_serving(profiles_path(MODEL), new_data["seed2"])
    result = drift(trained, f"models:/{MODEL}@production", "--from-serving")
    assert result.exit_code == 0, result.output
    assert "1 line(s) of" in result.output and "could not be read and were skipped" in result.output
    assert "New: 20 volumes from" in result.output and "profiles.jsonl" in result.output


def test_serving_file_with_shifted_inputs_is_drift(trained, new_data, tmp_path):
    path = tmp_path / "elsewhere.jsonl"
    write_serving(path, new_data["shifted"], truncate=False)
    result = drift(trained, f"models:/{MODEL}/1", "--serving-file", str(path))
    assert result.exit_code == 4, result.output
    assert "intensity_p50" in result.output.split("Error: ")[1]


def test_since_filters_serving_inputs(trained, new_data, tmp_path):
    path = tmp_path / "p.jsonl"
    write_serving(path, new_data["seed1"], truncate=False)
    result = drift(
        trained, f"models:/{MODEL}/1", "--serving-file", str(path), "--since", "2025-04-01"
    )
    assert result.exit_code == 2
    assert "No input profiles received since 2025-04-01" in result.output


def test_few_volumes_say_the_ks_test_cannot_fire(trained, new_data):
    result = drift(trained, f"models:/{MODEL}/1", str(new_data["seed1"]), "--max-volumes", "1")
    assert result.exit_code == 0, result.output
    assert "With 1 new and 22 training volumes the KS test cannot reach" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (("models:/seg3d-drift", "x"), "models:/seg3d-drift': no version"),
        (("models:/seg3d-drift/Production", "x"), "neither a version number"),
        (("s3://bucket/model", "x"), "is not a model URI"),
        (("models:/seg3d-drift/9", "."), "seg3d-drift"),
        (("models:/no-such-model/1", "."), "no-such-model"),
        (("models:/seg3d-drift@nope", "."), "nope"),
        (("runs:/" + "0" * 32 + "/model", "."), "0" * 32),
        (("models:/seg3d-drift/1",), "Nothing to check"),
        (("models:/seg3d-drift/1", ".", "--from-serving"), "not both"),
        (("models:/seg3d-drift/1", "missing-dir"), "is not a folder"),
        (("models:/seg3d-drift/1", ".", "--ks-pvalue", "0"), "--ks-pvalue"),
        (("models:/seg3d-drift/1", ".", "--since", "2025-01-01"), "give --from-serving"),
        (("models:/seg3d-drift/1", "--from-serving", "--since", "soon"), "not an ISO date"),
    ],
)
def test_bad_input_exits_2_and_creates_nothing(trained, args, message, tmp_path):
    before = len(trained.client.search_experiments())
    result = drift(trained, *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "drift-report").exists()
    assert len(trained.client.search_experiments()) == before


def test_model_without_training_profile_exits_2(trained, tmp_path):
    client = trained.client
    experiment = client.get_experiment_by_name("seg3d").experiment_id
    run = client.create_run(experiment)
    client.set_terminated(run.info.run_id)
    client.create_registered_model("no-profile")
    client.create_model_version(
        "no-profile", source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id
    )
    result = drift(trained, "models:/no-profile/1", str(trained.data))
    assert result.exit_code == 2, result.output
    assert "has no readable mlpipe/data_profile.json" in result.output
    assert "mlpipe.log.data_profile" in result.output


def test_from_serving_without_the_file_exits_2(trained):
    result = drift(trained, f"models:/{MODEL}/1", "--from-serving")
    assert result.exit_code == 2
    assert "No serving profiles at" in result.output
