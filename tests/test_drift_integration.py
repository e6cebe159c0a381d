"""Issue 7's compare and drift against a real ``mlflow server`` (proxied artifacts).

One server per test module: a model is trained-less-ly logged through it (profile + untrained
seg3d UNet), then ``mlpipe drift`` reads the profile through the server, logs its report run
there, and prints a link into the UI; ``mlpipe compare`` prints the UI's compare link.
"""

from __future__ import annotations

import json
import os
import urllib.parse
import urllib.request
from pathlib import Path

import mlflow
import pytest
import torch
from click.testing import CliRunner
from mlflow import MlflowClient

from mlpipe.cli import cli
from tests.conftest import running_mlflow_server

pytestmark = pytest.mark.integration

MODEL = "seg3d-served-drift"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("drift-server")
    with running_mlflow_server(f"sqlite:///{root / 'server.db'}", root / "artifacts") as url:
        yield url, root


@pytest.fixture(scope="module")
def served_model(server):
    """models:/seg3d-served-drift/1 logged through the server, with its training profile."""
    import mlpipe.log as mlog
    from seg3d.config import TrainConfig
    from seg3d.networks import build_network
    from seg3d.pyfunc import log_model
    from seg3d.synthesize import synthesize

    url, root = server
    with pytest.MonkeyPatch.context() as patch:
        for name in list(os.environ):
            if name.startswith(("MLFLOW_", "MLPIPE_")):
                patch.delenv(name)
        patch.setenv("MLPIPE_CACHE_DIR", str(root / "cache"))
        data = synthesize(root / "train", count=16, size=24, seed=0, test_count=0)
        config = TrainConfig(model="unet", patch_size=(16, 16, 16), num_classes=3)
        torch.manual_seed(0)
        network = build_network(config).eval()
        mlflow.set_tracking_uri(url)
        try:
            with mlflow.start_run(experiment_id=mlflow.create_experiment("seg3d")) as run:
                mlog.data_profile(mlog.dataset(data))
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
    return run.info.run_id


def test_drift_through_a_server_logs_the_report_and_links_to_it(server, served_model, tmp_path):
    from seg3d.synthesize import synthesize

    url, _root = server
    new = synthesize(tmp_path / "new", count=16, size=24, seed=7, test_count=0)
    result = CliRunner().invoke(
        cli, ["drift", f"models:/{MODEL}/1", str(new), "--tracking-uri", url]
    )
    assert result.exit_code == 0, result.output
    assert "No drift." in result.output
    line = next(x for x in result.output.splitlines() if x.startswith("Logged as run "))
    run_id = line.split()[3]
    client = MlflowClient(url)
    experiment_id = client.get_run(run_id).info.experiment_id
    assert line.endswith(f"{url}/#/experiments/{experiment_id}/runs/{run_id}")
    assert client.get_experiment(experiment_id).name == f"{MODEL}-monitoring"
    local = client.download_artifacts(run_id, "drift/report.json", str(tmp_path))
    report = json.loads(Path(local).read_text())
    assert report["model"]["source_run"] == served_model
    assert report["verdict"] == "no drift"


def test_compare_prints_the_ui_compare_link(server, served_model):
    url, _root = server
    client = MlflowClient(url)
    experiment_id = client.get_experiment_by_name("seg3d").experiment_id
    other = client.create_run(experiment_id, run_name="other").info.run_id
    client.log_param(other, "lr", "0.1")
    client.set_terminated(other)
    result = CliRunner().invoke(cli, ["compare", served_model, other, "--tracking-uri", url])
    assert result.exit_code == 0, result.output
    link = result.output.split("Compare in the MLflow UI: ")[1].strip()
    base, query = link.split("#/compare-runs?")
    assert base == url + "/"
    parsed = urllib.parse.parse_qs(query)
    assert json.loads(parsed["runs"][0]) == [served_model, other]
    assert json.loads(parsed["experiments"][0]) == [experiment_id]
    with urllib.request.urlopen(base, timeout=10) as page:  # the UI the link opens
        assert page.status == 200 and b"<html" in page.read(2000).lower()
