"""A dataset folder with a named pipe or a symlink loop, under ``mlpipe run`` as a user types it
(a real process): exit 2 within seconds, one ``Error:`` line, no run (issue 20)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.conftest import write_nifti_dataset

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("odd", ["fifo", "symlink_loop"])
def test_mlpipe_run_odd_dataset_entry_exits_2_without_a_run(odd, project_dir, tmp_path, runs_in):
    project = project_dir("good")
    data = write_nifti_dataset(tmp_path / "data", cases=2)
    bad = data / "imagesTr" / "x.nii.gz"
    if odd == "fifo":
        os.mkfifo(bad)
        os.mkfifo(data / "labelsTr" / "x.nii.gz")
    else:
        os.symlink("y.nii.gz", bad)
        os.symlink("x.nii.gz", data / "imagesTr" / "y.nii.gz")
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "mlpipe.cli", "run", str(project), "-P", f"data_dir={data}",
         "--env-manager", "local"],
        capture_output=True, text=True, timeout=30, cwd=tmp_path,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stderr
    assert elapsed < 10, f"took {elapsed:.1f} s"
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and str(bad) in result.stderr
    assert ("named pipe" if odd == "fifo" else "symbolic link loop") in result.stderr
    assert runs_in() == []
