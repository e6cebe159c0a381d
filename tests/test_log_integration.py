"""The README's researcher example, run as a user runs it, against a real ``mlflow server``.

The example is read out of README.md, so the documentation cannot drift from what works.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.integration


def readme_blocks(language: str) -> list[str]:
    text = (REPO_ROOT / "README.md").read_text()
    section = text.split("## For researchers", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


def test_readme_researcher_example_against_live_server(mlflow_server, tmp_path):
    (setup,) = readme_blocks("bash")
    (example,) = readme_blocks("python")
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "PYTHONPATH": str(REPO_ROOT)}
    bin_dir = os.path.dirname(sys.executable)
    env["PATH"] = bin_dir + os.pathsep + env["PATH"]
    setup = setup.replace("examples/", f"{REPO_ROOT}/examples/")
    subprocess.run(["bash", "-c", setup], cwd=tmp_path, env=env, check=True, capture_output=True)
    (tmp_path / "example.py").write_text(example)
    done = subprocess.run(
        [sys.executable, "example.py"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr

    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs(["0"], filter_string="attributes.run_name = 'readme-example'")
    run_id, tags = run.info.run_id, run.data.tags
    assert run.info.status == "FINISHED"
    assert tags["mlpipe.dataset.name"] == "quickstart-synthetic"
    assert tags["mlpipe.dataset.version"] == "seed0-n8-s32"
    assert re.fullmatch(r"[0-9a-f]{64}", tags["mlpipe.dataset.digest"])
    assert re.fullmatch(r"[0-9a-f]{64}", tags["mlpipe.preprocessing.digest"])
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.digest == tags["mlpipe.dataset.digest"][:12]
    artifacts = {a.path for a in client.list_artifacts(run_id, "mlpipe")}
    assert {"mlpipe/dataset_manifest.json", "mlpipe/data_profile.json"} <= artifacts
    assert [a.path for a in client.list_artifacts(run_id, "mlpipe/preprocessing")] == [
        "mlpipe/preprocessing/train.json"
    ]
    overlays = [a.path for a in client.list_artifacts(run_id, "overlays")]
    assert overlays == ["overlays/overlay_step000009.png"]
    history = client.get_metric_history(run_id, "train_loss")
    assert sorted(m.step for m in history) == list(range(80))  # 10 epochs x 8 cases, none lost
    assert history[-1].value < history[0].value  # it trained
