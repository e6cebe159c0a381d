"""Unit tests of mlpipe.project: loading an MLproject and linting it, with line numbers."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlpipe.cli import cli
from mlpipe.core.errors import ProjectError
from mlpipe.run.project import Finding, iter_findings, load_project

# A convention-1 project with no findings; tests change one thing in it. Line numbers:
BASE = """\
name: demo
python_env: python_env.yaml
mlpipe:
  convention: 1
  model: demo
  dataset_param: data_dir
  primary_metric: val_loss
  primary_metric_goal: min
entry_points:
  main:
    parameters:
      data_dir: {type: string, default: ""}
      epochs: {type: int, default: 3}
    command: "python t.py {data_dir} {epochs}"
  train:
    parameters:
      data_dir: {type: path}
    command: "python t.py {data_dir}"
  preprocess:
    command: "python p.py"
  evaluate:
    command: "python e.py"
"""
MLPIPE_LINE = 3
ENTRY_POINTS_LINE = 9
MAIN_COMMAND_LINE = 14


def write_project(folder: Path, mlproject: str, *, env_file: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "MLproject").write_text(textwrap.dedent(mlproject), encoding="utf-8")
    if env_file:
        (folder / "python_env.yaml").write_text('python: "3.11"\n', encoding="utf-8")
    return folder


def variant(old: str, new: str, text: str = BASE) -> str:
    assert old in text, f"{old!r} is not in the base MLproject"
    return text.replace(old, new, 1)


def messages(findings: list[Finding]) -> list[str]:
    return [f.message for f in findings]


def only(findings: list[Finding], needle: str) -> Finding:
    hits = [f for f in findings if needle in f.message]
    assert len(hits) == 1, f"expected one finding with {needle!r}, got {findings}"
    return hits[0]


# load_project ---------------------------------------------------------------------------------


def test_load_project_good_fixture_has_no_findings(project_dir):
    project = load_project(project_dir("good"))
    assert project.errors == []
    assert project.warnings == []
    assert project.is_convention
    assert project.name == "good"
    assert set(project.entry_points) == {"main", "train", "preprocess", "evaluate"}
    assert project.conventions.primary_metric_goal == "max"
    assert project.env_kind == "python_env"


def test_load_project_reads_parameter_specs(project_dir):
    project = load_project(project_dir("good"))
    main = project.entry_point("main")
    assert main.params["epochs"].type == "int"
    assert main.params["epochs"].default == 2
    assert main.params["model"].choices == ("unet", "segresnet")
    assert project.entry_point("train").params["alpha"].required


def test_load_project_base_variant_is_clean(tmp_path):
    project = load_project(write_project(tmp_path / "p", BASE))
    assert project.findings == ()


def test_load_project_missing_folder_raises(tmp_path):
    with pytest.raises(ProjectError, match="does not exist"):
        load_project(tmp_path / "nowhere")


def test_load_project_missing_mlpipe_keys_one_error_each(tmp_path):
    text = """\
    name: demo
    python_env: python_env.yaml
    mlpipe:
      convention: 1
    entry_points:
      main:
        command: "python t.py"
      train:
        command: "python t.py"
    """
    project = load_project(write_project(tmp_path / "p", text))
    missing = [f for f in project.errors if f.message.endswith(" is missing")]
    assert sorted(messages(missing)) == [
        "mlpipe.dataset_param is missing",
        "mlpipe.model is missing",
        "mlpipe.primary_metric is missing",
        "mlpipe.primary_metric_goal is missing",
    ]
    assert {f.line for f in missing} == {3}


def test_load_project_unknown_mlpipe_key_suggests_close_key(tmp_path):
    text = variant("  primary_metric_goal: min\n", "  primary_metric_goal: min\n  modle: x\n")
    project = load_project(write_project(tmp_path / "p", text))
    finding = only(project.errors, "unknown key mlpipe.modle")
    assert finding.message == "unknown key mlpipe.modle (did you mean model?)"
    assert finding.line == 9
    assert finding.file == str(tmp_path / "p" / "MLproject")


CHECK_ENTRY = """  check:
    parameters:
      data_dir: {type: string, default: ""}
    command: "python c.py {data_dir}"
"""


def with_preflight(section: str, check: str = CHECK_ENTRY) -> str:
    text = variant("  primary_metric_goal: min\n", f"  primary_metric_goal: min\n{section}")
    return variant("  preprocess:\n", check + "  preprocess:\n", text)


@pytest.mark.parametrize(
    "section",
    ["  preflight: check\n", "  preflight: {entry_point: check, before: [main, train]}\n"],
)
def test_load_project_preflight_short_and_long_forms(tmp_path, section):
    project = load_project(write_project(tmp_path / "p", with_preflight(section)))
    assert not project.errors, project.errors
    check = project.conventions.preflight
    assert check.entry_point == "check" and check.before == ("main", "train")


@pytest.mark.parametrize(
    ("section", "check", "needle"),
    [
        ("  preflight: chek\n", CHECK_ENTRY,
         "mlpipe.preflight names entry point 'chek', which is not declared"),
        ("  preflight: {entry_point: check, before: [trian]}\n", CHECK_ENTRY,
         "mlpipe.preflight.before names entry point 'trian', which is not declared"),
        ("  preflight: {entry_point: check, befor: [main]}\n", CHECK_ENTRY,
         "unknown key mlpipe.preflight.befor (did you mean before?)"),
        ("  preflight: [check]\n", CHECK_ENTRY, "mlpipe.preflight must be an entry point name"),
        ("  preflight: {entry_point: check, before: 3}\n", CHECK_ENTRY,
         "mlpipe.preflight.before is 3; expected a list"),
        # the check is handed the run's values: one it requires that main lacks can never come
        ("  preflight: {entry_point: check, before: [main]}\n",
         CHECK_ENTRY.replace("      data_dir", "      fold: {type: int}\n      data_dir"),
         "pre-flight entry point check needs fold, which main does not declare"),
    ],
)  # fmt: skip
def test_load_project_preflight_mistakes_are_errors(tmp_path, section, check, needle):
    project = load_project(write_project(tmp_path / "p", with_preflight(section, check)))
    finding = only(project.errors, needle)
    assert finding.line == MLPIPE_LINE + 6


def test_load_project_convention_2_is_an_error(tmp_path):
    project = load_project(write_project(tmp_path / "p", variant("convention: 1", "convention: 2")))
    finding = only(project.errors, "mlpipe.convention is 2")
    assert "knows convention 1" in finding.message
    assert finding.line == 4


def test_load_project_goal_up_is_an_error(tmp_path):
    text = variant("primary_metric_goal: min", "primary_metric_goal: up")
    project = load_project(write_project(tmp_path / "p", text))
    finding = only(project.errors, "primary_metric_goal")
    assert finding.message == "mlpipe.primary_metric_goal is 'up'; expected max or min"
    assert finding.line == 8


def test_load_project_untyped_parameter_is_error_in_convention_project(tmp_path):
    text = variant("epochs: {type: int, default: 3}", "epochs: {default: 3}")
    project = load_project(write_project(tmp_path / "p", text))
    finding = only(project.errors, "parameter main.epochs has no type")
    assert finding.line == 13
    assert finding.level == "error"


def test_load_project_untyped_parameter_is_warning_in_foreign_project(tmp_path):
    text = """\
    name: tutorial
    python_env: python_env.yaml
    entry_points:
      main:
        parameters:
          alpha: {default: 0.5}
        command: "python train.py {alpha}"
    """
    project = load_project(write_project(tmp_path / "p", text))
    assert project.errors == []
    finding = only(project.warnings, "parameter main.alpha has no type")
    assert finding.line == 6
    assert not project.is_convention


def test_load_project_unknown_type_suggests_int(tmp_path):
    text = variant("epochs: {type: int, default: 3}", "epochs: {type: integer, default: 3}")
    project = load_project(write_project(tmp_path / "p", text))
    finding = only(project.errors, "unknown type 'integer'")
    assert "did you mean int?" in finding.message
    assert finding.line == 13
    assert project.entry_point("main").params["epochs"].type == "string"


def test_load_project_bad_int_default_is_an_error(tmp_path):
    text = variant("epochs: {type: int, default: 3}", "epochs: {type: int, default: three}")
    project = load_project(write_project(tmp_path / "p", text))
    finding = only(project.errors, "parameter main.epochs: default does not fit")
    assert "'three' is not valid for type int" in finding.message
    assert finding.line == 13


def test_load_project_path_default_empty_is_an_error(tmp_path):
    text = variant("data_dir: {type: path}", 'data_dir: {type: path, default: ""}')
    project = load_project(write_project(tmp_path / "p", text))
    finding = only(project.errors, "parameter train.data_dir: a path parameter cannot default")
    assert "''" in finding.message
    assert finding.line == 17


def test_load_project_undeclared_placeholder_is_an_error_on_command_line(tmp_path):
    text = variant(
        'command: "python t.py {data_dir} {epochs}"',
        'command: "python t.py {data_dir} {epochs} {beta}"',
    )
    project = load_project(write_project(tmp_path / "p", text))
    finding = only(project.errors, "{beta}")
    assert finding.message.startswith("command of main uses {beta}, which is not a declared")
    assert finding.line == MAIN_COMMAND_LINE


def test_load_project_undeclared_placeholder_is_an_error_in_foreign_project(tmp_path):
    text = """\
    name: tutorial
    python_env: python_env.yaml
    entry_points:
      main:
        parameters:
          alpha: {type: float, default: 0.5}
        command: "python train.py {alpha} {beta}"
    """
    project = load_project(write_project(tmp_path / "p", text))
    finding = only(project.errors, "{beta}")
    assert finding.line == 7
    assert finding.level == "error"


def test_load_project_unused_parameter_is_a_warning(tmp_path):
    text = variant(
        'command: "python t.py {data_dir} {epochs}"', 'command: "python t.py {data_dir}"'
    )
    project = load_project(write_project(tmp_path / "p", text))
    assert project.errors == []
    finding = only(project.warnings, "main.epochs")
    assert finding.message == "parameter main.epochs is declared but not used in the command"
    assert finding.line == MAIN_COMMAND_LINE


def test_load_project_dataset_param_not_a_parameter_is_an_error(tmp_path):
    text = variant("dataset_param: data_dir", "dataset_param: images")
    project = load_project(write_project(tmp_path / "p", text))
    finding = only(project.errors, "mlpipe.dataset_param 'images'")
    assert finding.message.endswith("is not a parameter of any entry point")
    assert finding.line == 6


def test_load_project_missing_main_and_train_are_errors(tmp_path):
    text = """\
    name: demo
    python_env: python_env.yaml
    mlpipe:
      convention: 1
      model: demo
      dataset_param: data_dir
      primary_metric: val_loss
      primary_metric_goal: min
    entry_points:
      other:
        parameters:
          data_dir: {type: string, default: ""}
        command: "python t.py {data_dir}"
    """
    project = load_project(write_project(tmp_path / "p", text))
    assert "standard entry point main is missing" in messages(project.errors)
    assert "standard entry point train is missing" in messages(project.errors)
    assert "standard entry point preprocess is missing" in messages(project.warnings)
    assert "standard entry point evaluate is missing" in messages(project.warnings)
    assert all(f.line == ENTRY_POINTS_LINE for f in project.findings if "standard" in f.message)


def test_load_project_missing_preprocess_and_evaluate_are_only_warnings(tmp_path):
    text = variant('  preprocess:\n    command: "python p.py"\n', "")
    text = variant('  evaluate:\n    command: "python e.py"\n', "", text)
    project = load_project(write_project(tmp_path / "p", text))
    assert project.errors == []
    assert sorted(messages(project.warnings)) == [
        "standard entry point evaluate is missing",
        "standard entry point preprocess is missing",
    ]


def test_load_project_python_env_file_missing_is_an_error(tmp_path):
    project = load_project(write_project(tmp_path / "p", BASE, env_file=False))
    finding = only(project.errors, "python_env file 'python_env.yaml' does not exist")
    assert finding.line == 2


def test_load_project_two_env_keys_is_an_error(tmp_path):
    text = variant(
        "python_env: python_env.yaml\n", "python_env: python_env.yaml\nconda_env: c.yaml\n"
    )
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "c.yaml").write_text("name: c\n")
    project = load_project(write_project(tmp_path / "p", text))
    finding = only(project.errors, "only one environment may be declared")
    assert "python_env, conda_env" in finding.message
    assert finding.line == 3


def test_load_project_invalid_yaml_reports_line(tmp_path):
    text = """\
    name: demo
    entry_points:
      main:
        command: "python t.py"
       bad: 1
    """
    project = load_project(write_project(tmp_path / "p", text))
    assert len(project.errors) == 1
    finding = project.errors[0]
    assert finding.message.startswith("not valid YAML:")
    assert finding.line == 5
    assert project.entry_points == {}


def test_load_project_invalid_yaml_in_flow_list_reports_line(tmp_path):
    text = "name: demo\nmlpipe: [a\nentry_points: {}\n"
    project = load_project(write_project(tmp_path / "p", text))
    assert [f.line for f in project.errors] == [3]


def test_load_project_non_mapping_is_an_error(tmp_path):
    project = load_project(write_project(tmp_path / "p", "- a\n- b\n"))
    finding = only(project.errors, "must be a mapping")
    assert finding.line == 1


def test_load_project_without_mlproject_only_warns(tmp_path):
    folder = tmp_path / "scripts"
    folder.mkdir()
    (folder / "script.py").write_text("print(1)\n")
    project = load_project(folder)
    assert project.errors == []
    assert len(project.warnings) == 1
    assert "no MLproject file" in project.warnings[0].message
    assert project.entry_points == {}
    assert project.mlproject_path is None


def test_load_project_finds_lowercase_mlproject(tmp_path):
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "mlproject").write_text("name: lower\nentry_points: {}\n")
    project = load_project(folder)
    assert project.name == "lower"
    assert project.mlproject_path == folder / "mlproject"


def test_iter_findings_puts_errors_first(tmp_path):
    text = variant('command: "python t.py {data_dir} {epochs}"', 'command: "python t.py {beta}"')
    project = load_project(write_project(tmp_path / "p", text))
    levels = [f.level for f in iter_findings(project)]
    assert levels[0] == "error"
    assert "warning" in levels
    assert levels == sorted(levels)  # "error" < "warning"


# Project.entry_point --------------------------------------------------------------------------


def test_entry_point_script_file_runs_without_mlproject(tmp_path):
    folder = tmp_path / "scripts"
    folder.mkdir()
    (folder / "script.py").write_text("print(1)\n")
    (folder / "job.sh").write_text("echo 1\n")
    project = load_project(folder)
    entry = project.entry_point("script.py")
    assert entry.script
    assert entry.command == "python script.py"
    assert entry.params == {}
    assert project.entry_point("job.sh").command == "bash job.sh"


def test_entry_point_missing_script_raises(tmp_path):
    folder = tmp_path / "scripts"
    folder.mkdir()
    project = load_project(folder)
    with pytest.raises(ProjectError, match=r"declared: none"):
        project.entry_point("script.py")


def test_entry_point_undeclared_name_lists_declared_and_suggests(project_dir):
    project = load_project(project_dir("good"))
    with pytest.raises(ProjectError) as info:
        project.entry_point("trian")
    message = str(info.value)
    assert "Entry point 'trian' is not declared" in message
    assert "(declared: main, train, preprocess, evaluate)" in message
    assert "Did you mean train?" in message


# mlpipe validate ------------------------------------------------------------------------------


def test_validate_cli_good_project_exits_0(project_dir):
    result = CliRunner().invoke(cli, ["validate", str(project_dir("good"))])
    assert result.exit_code == 0, result.output
    assert "OK: 0 error(s), 0 warning(s); convention 1." in result.output


def test_validate_cli_broken_project_exits_2_with_findings(tmp_path):
    text = variant("convention: 1", "convention: 2")
    text = variant(
        'command: "python t.py {data_dir} {epochs}"', 'command: "python t.py {beta}"', text
    )
    folder = write_project(tmp_path / "p", text)
    result = CliRunner().invoke(cli, ["validate", str(folder)])
    assert result.exit_code == 2, result.output
    assert "Error: 2 error(s)" in result.output
    assert f"{folder / 'MLproject'}:4: error: mlpipe.convention is 2" in result.output
    assert f"MLproject:{MAIN_COMMAND_LINE}: error: command of main uses {{beta}}" in result.output
    assert "OK:" not in result.output


def test_validate_cli_foreign_project_with_warnings_exits_0(project_dir):
    result = CliRunner().invoke(cli, ["validate", str(project_dir("foreign"))])
    assert result.exit_code == 0, result.output
    assert "MLproject:6: warning: standard entry point train is missing" in result.output
    assert "OK: 0 error(s), 2 warning(s); foreign project (no mlpipe: section)." in result.output
