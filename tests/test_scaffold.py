"""Unit tests of mlpipe.scaffold (`mlpipe init`) and the top-level MLproject.template link."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from mlpipe.cli import cli
from mlpipe.core.errors import UsageError
from mlpipe.run.project import load_project
from mlpipe.run.scaffold import init_project

REPO_ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = REPO_ROOT / "mlpipe" / "run" / "templates" / "project" / "MLproject.template"
EXPECTED_FILES = ["MLproject", "python_env.yaml", "train.py", "README.md"]


def test_init_project_writes_template_files_with_name(tmp_path):
    target = tmp_path / "seg3d"
    written = init_project(target)
    assert written == [target / name for name in EXPECTED_FILES]
    assert sorted(p.name for p in target.iterdir()) == sorted(EXPECTED_FILES)
    for path in written:
        text = path.read_text()
        assert "{{project_name}}" not in text, path
    mlproject = yaml.safe_load((target / "MLproject").read_text())
    assert mlproject["name"] == "seg3d"
    assert mlproject["mlpipe"]["model"] == "seg3d"
    assert (target / "README.md").read_text().startswith("# seg3d\n")
    assert (target / "train.py").read_text().startswith('"""seg3d: ')


def test_init_project_explicit_name_overrides_folder_name(tmp_path):
    target = tmp_path / "folder"
    init_project(target, name="liver-seg.v2")
    mlproject = yaml.safe_load((target / "MLproject").read_text())
    assert mlproject["name"] == "liver-seg.v2"
    assert mlproject["mlpipe"]["model"] == "liver-seg.v2"


def test_init_project_result_validates_cleanly(tmp_path):
    target = tmp_path / "newproj"
    init_project(target)
    project = load_project(target)
    assert project.errors == []
    assert project.warnings == []
    assert project.is_convention
    assert project.name == "newproj"
    assert set(project.entry_points) == {"main", "train", "preprocess", "evaluate"}


def test_init_project_into_existing_empty_folder(tmp_path):
    target = tmp_path / "empty"
    target.mkdir()
    init_project(target)
    assert (target / "MLproject").is_file()


def test_init_project_non_empty_folder_raises_and_keeps_files(tmp_path):
    target = tmp_path / "busy"
    target.mkdir()
    (target / "MLproject").write_text("name: mine\n")
    with pytest.raises(UsageError, match="exists and is not empty"):
        init_project(target)
    assert (target / "MLproject").read_text() == "name: mine\n"
    assert sorted(p.name for p in target.iterdir()) == ["MLproject"]


def test_init_project_target_is_a_file_raises(tmp_path):
    target = tmp_path / "afile"
    target.write_text("data")
    with pytest.raises(UsageError, match="exists and is not empty"):
        init_project(target)
    assert target.read_text() == "data"


@pytest.mark.parametrize("name", ["1abc", "has space", "a/b", "-x", "_x", "x:y"])
def test_init_project_bad_name_raises_and_creates_nothing(tmp_path, name):
    target = tmp_path / "proj"
    with pytest.raises(UsageError, match="must start with a letter"):
        init_project(target, name=name)
    assert not target.exists()


def test_init_project_bad_folder_name_raises(tmp_path):
    with pytest.raises(UsageError, match=r"Project name '2024' must start with a letter"):
        init_project(tmp_path / "2024")


@pytest.mark.parametrize("name", ["null", "yes"])
def test_init_project_yaml_keyword_name_stays_a_string(tmp_path, name):
    target = tmp_path / "p"
    init_project(target, name=name)
    project = load_project(target)
    assert project.errors == []
    assert project.name == name
    assert project.conventions.model == name


def test_init_cli_creates_project_and_lists_files(tmp_path):
    target = tmp_path / "cliproj"
    result = CliRunner().invoke(cli, ["init", str(target)])
    assert result.exit_code == 0, result.output
    assert f"Created 4 files in {target}:" in result.output
    for name in EXPECTED_FILES:
        assert f"  {target / name}\n" in result.output
    assert f"Next: mlpipe validate {target}" in result.output
    assert (target / "MLproject").is_file()


def test_init_cli_non_empty_folder_exits_2(tmp_path):
    target = tmp_path / "busy"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    result = CliRunner().invoke(cli, ["init", str(target)])
    assert result.exit_code == 2
    assert "Error:" in result.output
    assert "is not empty" in result.output


def test_init_cli_then_validate_exits_0(tmp_path):
    target = tmp_path / "roundtrip"
    runner = CliRunner()
    assert runner.invoke(cli, ["init", str(target), "--name", "rt"]).exit_code == 0
    result = runner.invoke(cli, ["validate", str(target)])
    assert result.exit_code == 0, result.output
    assert "OK: 0 error(s), 0 warning(s); convention 1." in result.output


def test_mlproject_template_symlink_matches_packaged_template():
    top = REPO_ROOT / "MLproject.template"
    assert top.is_symlink()
    assert top.resolve() == TEMPLATE.resolve()
    assert top.read_text(encoding="utf-8") == TEMPLATE.read_text(encoding="utf-8")
    assert "{{project_name}}" in top.read_text(encoding="utf-8")
