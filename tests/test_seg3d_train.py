"""seg3d trains for real on tiny synthetic volumes (CPU): through ``mlpipe run`` as a user
runs it, resumed from a checkpoint, stopped by ``max_minutes``, and as 2 DDP processes
(gloo). No GPU here: the CUDA branches (AMP, GPU cache, nccl) run only on the lent device
(see BENCHMARKS.md); on CPU the same code runs with them off.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from seg3d.pyfunc import decode_nifti
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.integration

PROJECT = REPO_ROOT / "projects" / "seg3d"
MLPIPE = [sys.executable, "-m", "mlpipe.cli"]
TINY = [
    "-P",
    "epochs=2",
    "-P",
    "val_every=1",
    "-P",
    "patch_size=32",
    "-P",
    "spacing=1.2,1.2,2.0",
    "-P",
    "batch_size=2",
]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    from seg3d.synthesize import synthesize

    return synthesize(tmp_path_factory.mktemp("seg3d") / "data", 8, 40, 3, 0)


def mlpipe(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(
        [*MLPIPE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def only_run(tmp_path: Path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


def test_mlpipe_run_trains_registers_and_model_segments_any_shape(tiny_data, tmp_path):
    done = mlpipe("run", str(PROJECT), "-e", "main", "-P", f"data_dir={tiny_data}", *TINY,
                  "-P", "register=true", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "registered seg3d version 1" in done.stdout
    client, run = only_run(tmp_path)
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    for key in ("train_loss", "val_dice", "val_dice_1", "val_dice_2", "lr", "epoch_seconds",
                "samples_per_s", "mean_dice", "mean_hd95", "mean_volume_error"):  # fmt: skip
        assert key in metrics, key
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [0, 1]
    overlays = [a.path for a in client.list_artifacts(run.info.run_id, "overlays")]
    assert overlays == ["overlays/val_step000000.png", "overlays/val_step000001.png"]
    ckpts = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert "checkpoints/last.pt" in ckpts and "checkpoints/best.pt" in ckpts
    assert run.data.tags["mlpipe.dataset.name"] == "seg3d-synthetic"

    version = client.get_model_version("seg3d", "1")
    assert version.run_id == run.info.run_id
    assert version.tags["mlpipe.dataset.digest"] == run.data.tags["mlpipe.dataset.digest"]
    assert version.tags["mlpipe.preprocessing.digest"]
    assert version.tags["mlpipe.plan.digest"] == run.data.tags["mlpipe.plan.digest"]

    # a volume of another shape, in LPS orientation: the mask comes back in its own space
    affine = np.diag([-0.9, -0.9, 2.5, 1.0])
    affine[:3, 3] = [30.0, -12.0, 5.0]
    volume = np.random.default_rng(1).normal(0, 25, (50, 61, 37)).astype(np.float32)
    volume[10:30, 20:40, 10:25] = 150.0
    path = tmp_path / "other.nii.gz"
    nib.save(nib.Nifti1Image(volume, affine), path)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlruns.db'}")
    try:
        model = mlflow.pyfunc.load_model("models:/seg3d/1")
        out = model.predict(pd.DataFrame({"path": [str(path)]}))
    finally:
        mlflow.set_tracking_uri(None)
    mask = decode_nifti(out["mask"][0])
    assert mask.shape == (50, 61, 37)
    assert np.allclose(mask.affine, affine, atol=1e-4)


def test_resume_continues_at_the_next_epoch_with_optimizer_state(tiny_data, tmp_path):
    first = mlpipe("run", str(PROJECT), "-e", "train", "-P", f"data_dir={tiny_data}", *TINY,
                   cwd=tmp_path)  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    _, run = only_run(tmp_path)
    uri = f"runs:/{run.info.run_id}/checkpoints/last.pt"
    more = [a if a != "epochs=2" else "epochs=3" for a in TINY]
    second = mlpipe("run", str(PROJECT), "-e", "train", "-P", f"data_dir={tiny_data}",
                    *more, "-P", f"resume_from={uri}",
                    "--experiment", "resumed", cwd=tmp_path)  # fmt: skip
    assert second.returncode == 0, second.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    (resumed,) = client.search_runs([client.get_experiment_by_name("resumed").experiment_id])
    steps = [m.step for m in client.get_metric_history(resumed.info.run_id, "train_loss")]
    assert steps == [2]  # epochs 0 and 1 were done by the first run
    assert resumed.data.tags["seg3d.resumed_from"] == uri
    assert "epoch 3/3" in second.stdout


def test_max_minutes_stops_cleanly_and_keeps_the_best_model(tiny_data, tmp_path):
    from seg3d.config import TrainConfig
    from seg3d.train import train

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlruns.db'}")
    config = TrainConfig(data_dir=str(tiny_data), epochs=50, patch_size=(32, 32, 32),
                         spacing=(1.2, 1.2, 2.0), max_minutes=0.001)  # fmt: skip
    try:
        with mlflow.start_run() as run:
            result = train(config)
    finally:
        mlflow.set_tracking_uri(None)
    assert result.stopped_early and result.epochs_done == 1
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    tags = client.get_run(run.info.run_id).data.tags
    assert tags["seg3d.stopped"] == "max_minutes"
    assert "checkpoints" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert result.model_uri  # the best model was still logged


def test_bad_dataset_stops_before_any_run_with_exit_2(tiny_data, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_data, broken)
    (broken / "labelsTr" / sorted(os.listdir(broken / "labelsTr"))[0]).unlink()
    done = mlpipe("run", str(PROJECT), "-P", f"data_dir={broken}", cwd=tmp_path)
    assert done.returncode == 2
    assert "Error:" in done.stderr and "Traceback" not in done.stderr
    assert "label" in done.stderr
    assert not (tmp_path / "mlruns.db").exists() or not only_run_exists(tmp_path)


def only_run_exists(tmp_path: Path) -> bool:
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    return bool(client.search_runs([e.experiment_id for e in client.search_experiments()]))


def test_label_values_outside_num_classes_are_refused_by_the_project(tiny_data, tmp_path):
    # plain `python -m seg3d` (as `mlflow run` would start it): the project checks too
    done = subprocess.run(
        [sys.executable, "-m", "seg3d", "train", "--data-dir", str(tiny_data), "--num-classes",
         "2", "--patch-size", "32"],
        cwd=PROJECT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlruns.db'}"},
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert "num_classes" in done.stderr and "Traceback" not in done.stderr


def test_ddp_two_gloo_processes_log_once(tiny_data, tmp_path):
    done = mlpipe("run", str(PROJECT), "-e", "train", "-P", f"data_dir={tiny_data}", *TINY,
                  "-P", "nproc=2", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    client, run = only_run(tmp_path)
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history] == [0, 1]  # one point per epoch: rank 0 alone logged
    assert len(client.list_artifacts(run.info.run_id, "overlays")) == 2
    assert run.data.params["seg3d.nproc"] == "2"


def test_ctrl_c_marks_the_run_killed_and_keeps_the_last_checkpoint(tiny_data, tmp_path):
    import signal
    import time

    import torch

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    args = [a if a != "epochs=2" else "epochs=200" for a in TINY]
    args += ["-P", "checkpoint_every_s=0"]  # every epoch: the test checks the last one is kept
    proc = subprocess.Popen(
        [*MLPIPE, "run", str(PROJECT), "-e", "train", "-P", f"data_dir={tiny_data}", *args],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    seen = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        seen.append(line)
        if line.startswith("epoch 3/200") or not line:
            break
    assert any(s.startswith("epoch 3/200") for s in seen), "".join(seen)[-3000:]
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    assert proc.returncode == 130
    client, run = only_run(tmp_path)
    assert run.info.status == "KILLED"
    path = client.download_artifacts(run.info.run_id, "checkpoints/last.pt", str(tmp_path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert state["epoch"] >= 1  # epochs finished before Ctrl-C are kept


def test_checkpoint_due_first_better_last_and_by_time():
    from seg3d.train import checkpoint_due

    # the first epoch, a better val_dice and the last epoch always write one
    assert checkpoint_due(30, None, improved=False, last=False, now=0.0)
    assert checkpoint_due(30, 100.0, improved=True, last=False, now=101.0)
    assert checkpoint_due(30, 100.0, improved=False, last=True, now=101.0)
    # between them, once the interval has passed
    assert not checkpoint_due(30, 100.0, improved=False, last=False, now=129.9)
    assert checkpoint_due(30, 100.0, improved=False, last=False, now=130.0)
    # 0: every epoch
    assert checkpoint_due(0, 100.0, improved=False, last=False, now=100.1)


def test_an_epoch_cut_short_by_a_failing_transform_stops_training():
    """MONAI's ThreadDataLoader really does end early without raising; the guard catches it."""
    from monai.data import Dataset, ThreadDataLoader

    from seg3d.train import check_epoch_complete

    def fails_on_case_2(case: int) -> int:
        if case == 2:
            raise ValueError("case 2 is corrupt")
        return case

    loader = ThreadDataLoader(Dataset(list(range(5)), transform=fails_on_case_2), batch_size=1)
    seen = [int(b) for b in loader]
    assert seen == [0, 1]  # the loader's own behaviour: no exception, two of five batches
    with pytest.raises(RuntimeError, match="stopped after 2 of 5 batches"):
        check_epoch_complete(0, len(seen), len(loader))
    check_epoch_complete(0, 5, 5)


def test_negative_checkpoint_interval_is_refused_naming_it():
    from seg3d.config import Seg3dInputError, TrainConfig

    with pytest.raises(Seg3dInputError, match="checkpoint_every_s: -1"):
        TrainConfig(data_dir="x", checkpoint_every_s=-1).check()
