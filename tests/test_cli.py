"""The CLI shell: lazy imports, help on every command, errors and exit codes in one place."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from mlpipe import __version__
from mlpipe.cli import cli

HEAVY = ("mlflow", "torch", "monai")


def _loaded_modules(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_import_cli_leaves_heavy_libraries_out():
    loaded = _loaded_modules("import mlpipe.cli")
    assert not [m for m in loaded if m.split(".")[0] in HEAVY]


@pytest.mark.parametrize(
    "args", [["--help"], ["run", "--help"], ["validate", "--help"], ["promote", "--help"]]
)
def test_help_does_not_import_heavy_libraries(args):
    code = (
        "import sys\nfrom mlpipe.cli import cli\n"
        f"try:\n    cli.main({args!r}, prog_name='mlpipe')\nexcept SystemExit:\n    pass"
    )
    loaded = _loaded_modules(code)
    assert not [m for m in loaded if m.split(".")[0] in HEAVY]


def test_every_command_has_help():
    runner = CliRunner()
    for name in cli.commands:
        result = runner.invoke(cli, [name, "--help"])
        assert result.exit_code == 0, (name, result.output)
        assert "Usage: " in result.output


def test_version_prints_package_version():
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output


def test_console_script_runs_help():
    out = subprocess.run(
        [sys.executable, "-m", "mlpipe.cli", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0
    assert "run" in out.stdout and "validate" in out.stdout


def test_user_error_is_one_line_without_traceback(tmp_path):
    result = CliRunner().invoke(cli, ["run", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert result.output.startswith("Error: ")
    assert "Traceback" not in result.output


def test_debug_prints_traceback_and_keeps_exit_code(tmp_path):
    """Issue 20: --debug used to re-raise, turning an exit 2 into exit 1."""
    result = CliRunner().invoke(cli, ["--debug", "run", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert "Traceback" in result.output and "SourceError" in result.output
    assert result.output.rstrip().splitlines()[-1].startswith("Error: ")


@pytest.mark.parametrize("debug", [[], ["--debug"]])
@pytest.mark.parametrize("command", ["run", "validate"])
@pytest.mark.parametrize("broken", ["directory", "binary"])
def test_unreadable_mlproject_is_exit_2(tmp_path, broken, command, debug):
    """Issue 20: an MLproject that is a folder or not UTF-8 crashed with exit 1."""
    project = tmp_path / "proj"
    project.mkdir()
    if broken == "directory":
        (project / "MLproject").mkdir()
    else:
        (project / "MLproject").write_bytes(b"name: x\n\xff\xfe\x00binary\x89PNG")
    result = CliRunner().invoke(cli, [*debug, command, str(project)])
    assert result.exit_code == 2, result.output
    assert "MLproject" in result.output
    assert ("Traceback" in result.output) == bool(debug)
    expected = "is a folder" if broken == "directory" else "is not UTF-8 text"
    assert expected in result.output
