"""A project's own pre-flight check (``mlpipe: preflight:``) runs before ``mlpipe run`` creates
anything: a refusal is exit 2 with the project's words and no store at all.

Real processes throughout: the fixture project ``tests/projects/checked`` has a ``check``
entry point that compares ``-P classes`` with the lines of the dataset's ``labels.txt``, run
by mlpipe as a subprocess, and the run itself goes to a real SQLite store.
"""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from mlpipe.cli import cli
from tests.conftest import write_nifti_dataset


def invoke(*args: str):
    return CliRunner().invoke(cli, ["run", *args], catch_exceptions=False)


@pytest.fixture
def data(tmp_path):
    root = write_nifti_dataset(tmp_path / "data")
    (root / "labels.txt").write_text("background\nliver\nspleen\n")
    return root


def test_a_refusal_exits_2_with_the_projects_words_and_creates_nothing(
    project_dir, data, runs_in, tmp_path
):
    proj = project_dir("checked")
    result = invoke(str(proj), "-P", f"data_dir={data}", "-P", "classes=2")
    assert result.exit_code == 2, result.output
    assert "pre-flight check (check) refused this main run; nothing was created" in result.output
    assert f"classes=2 contradicts {data}/labels.txt, which lists 3 labels" in result.output
    assert "Error: Error:" not in result.output  # the project's prefix is not doubled
    assert "Traceback" not in result.output
    assert not (tmp_path / "mlruns.db").exists()
    assert runs_in() == []


def test_a_refusal_stops_a_dry_run_too(project_dir, data, tmp_path):
    proj = project_dir("checked")
    result = invoke(str(proj), "-e", "train", "-P", f"data_dir={data}", "-P", "classes=5",
                    "--dry-run")  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "refused this train run" in result.output and "lists 3 labels" in result.output


def test_a_passing_check_lets_the_run_go_and_says_what_it_saw(project_dir, data, runs_in):
    proj = project_dir("checked")
    result = invoke(str(proj), "-P", f"data_dir={data}", "-P", "classes=3")
    assert result.exit_code == 0, result.output
    assert "pre-flight check passed in" in result.output
    assert "checked: 3 labels" in result.output
    # the check is not the run: it is marked as a pre-flight and has no run to log to
    assert "preflight env: 1, run id: none" in result.output
    (run,) = runs_in()
    assert run.info.status == "FINISHED" and run.data.metrics["score"] == 3.0


def test_a_broken_check_warns_and_the_run_goes_ahead(project_dir, data, runs_in):
    proj = project_dir("checked")
    result = invoke(str(proj), "-P", f"data_dir={data}", "-P", "classes=-1")
    assert result.exit_code == 0, result.output
    assert "Warning: pre-flight check exited 1 (not 0, not 2)" in result.output
    assert "RuntimeError: the check itself is broken" in result.output
    (run,) = runs_in()
    assert run.info.status == "FINISHED"


def test_an_entry_point_it_does_not_guard_runs_without_it(project_dir, data, runs_in):
    proj = project_dir("checked")
    result = invoke(str(proj), "-e", "evaluate", "-P", "classes=2")
    assert result.exit_code == 0, result.output
    assert "pre-flight" not in result.output
    assert len(runs_in()) == 1


def test_another_env_manager_skips_it_and_says_so(project_dir, data):
    proj = project_dir("checked")
    result = invoke(str(proj), "-P", f"data_dir={data}", "-P", "classes=2",
                    "--env-manager", "virtualenv", "--dry-run")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "pre-flight check skipped: it runs in the local environment only" in result.output
    assert "Dry run: nothing was created." in result.output


def test_seg3d_declares_its_check_for_train_and_main():
    from mlpipe.run.project import load_project
    from tests.conftest import REPO_ROOT

    project = load_project(REPO_ROOT / "projects" / "seg3d")
    assert not project.errors
    check = project.conventions.preflight
    assert check.entry_point == "check" and set(check.before) == {"train", "main"}
    # the check is handed every value train gets
    assert project.entry_points["check"].params == project.entry_points["train"].params
