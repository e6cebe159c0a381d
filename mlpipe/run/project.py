"""Load an MLproject with its ``mlpipe:`` conventions, and lint it against convention 1.

MLflow's own loader (``mlflow.projects._project_spec``) is what runs the project; this
module reads the same file without importing mlflow, so ``mlpipe validate`` is instant and
every finding can name its line. MLflow keeps only ``type`` and ``default`` of a parameter
and ignores ``choices`` and the ``mlpipe:`` section, which are read here.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import string
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mlpipe.core.errors import ParameterError, ProjectError
from mlpipe.run.conventions import ConventionChecks, Conventions, yaml_line
from mlpipe.run.params import PARAM_TYPES, ParamSpec, convert_value

REQUIRED_ENTRY_POINTS = ("main", "train")
RECOMMENDED_ENTRY_POINTS = ("preprocess", "evaluate")
ENV_KEYS = ("python_env", "conda_env", "docker_env")
SCRIPT_SUFFIXES = (".py", ".sh")


@dataclass(frozen=True)
class Finding:
    """One problem in a project, with where it is. ``level`` is ``error`` or ``warning``."""

    level: str
    message: str
    file: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.level}: {self.message}"


@dataclass(frozen=True)
class EntryPoint:
    name: str
    command: str | None
    params: dict[str, ParamSpec]
    script: bool = False
    """True for a ``.py``/``.sh`` file run as an entry point without a declaration."""


@dataclass(frozen=True)
class Project:
    directory: Path
    name: str | None
    entry_points: dict[str, EntryPoint]
    conventions: Conventions | None
    env_kind: str | None
    findings: tuple[Finding, ...] = field(default=())
    mlproject_path: Path | None = None

    @property
    def is_convention(self) -> bool:
        return self.conventions is not None

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "warning"]

    def shown_as(self, folder: Path, label: str) -> Project:
        """The project with its findings' files under ``folder`` named ``label (relative)``.

        For a cloned project: the temporary clone is gone by the time anyone reads a warning,
        and the URL the user gave is what they recognise.
        """

        def relabel(finding: Finding) -> Finding:
            try:
                inside = Path(finding.file).relative_to(folder).as_posix()
            except ValueError:
                return finding
            return dataclasses.replace(finding, file=f"{label} ({inside})")

        return dataclasses.replace(self, findings=tuple(relabel(f) for f in self.findings))

    def entry_point(self, name: str) -> EntryPoint:
        """The declared entry point ``name``, or a script file of that name, as MLflow allows.

        Raises:
            ProjectError: no such entry point, with the declared ones listed.
        """
        if name in self.entry_points:
            return self.entry_points[name]
        if name.endswith(SCRIPT_SUFFIXES) and (self.directory / name).is_file():
            runner = "python" if name.endswith(".py") else "bash"
            return EntryPoint(name=name, command=f"{runner} {name}", params={}, script=True)
        declared = ", ".join(self.entry_points) or "none"
        close = difflib.get_close_matches(name, list(self.entry_points), n=1)
        hint = f" Did you mean {close[0]}?" if close else ""
        raise ProjectError(
            f"Entry point {name!r} is not declared in {self._mlproject_label()} "
            f"(declared: {declared}).{hint} Pick one with -e NAME, or name a .py/.sh file "
            "of the project."
        )

    def _mlproject_label(self) -> str:
        return str(self.mlproject_path) if self.mlproject_path else f"{self.directory}/MLproject"


def find_mlproject(directory: Path) -> Path | None:
    """The MLproject file in ``directory``, matched case-insensitively as MLflow does."""
    try:
        names = os.listdir(directory)
    except OSError:
        return None
    for name in names:
        if name.lower() == "mlproject":
            return directory / name
    return None


def load_project(directory: str | os.PathLike[str]) -> Project:
    """Read a project folder and lint it; findings are attached, not raised.

    Raises:
        ProjectError: the folder does not exist, or its MLproject cannot be read as UTF-8 text
            (a folder, a binary file, no permission).
    """
    folder = Path(directory).resolve()
    if not folder.is_dir():
        raise ProjectError(f"Project folder {directory} does not exist or is not a folder.")
    mlproject = find_mlproject(folder)
    if mlproject is None:
        finding = Finding(
            "warning",
            "no MLproject file: only .py/.sh scripts can run (-e script.py); "
            "`mlpipe init` writes one that follows the conventions",
            str(folder / "MLproject"),
        )
        return Project(folder, None, {}, None, None, (finding,), None)
    return _Linter(folder, mlproject).run()


def _read_mlproject(path: Path) -> str:
    """The MLproject's text; a file that cannot be read as UTF-8 text is a ``ProjectError``.

    Checked with ``stat`` before opening, so a folder or a named pipe called MLproject is
    refused by name instead of raising ``IsADirectoryError`` or blocking on the pipe.
    """
    import stat

    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise ProjectError(f"{path} cannot be read: {exc.strerror or exc}.") from exc
    if not stat.S_ISREG(mode):
        what = "a folder" if stat.S_ISDIR(mode) else "not a regular file"
        raise ProjectError(
            f"{path} is {what}; the MLproject must be a YAML text file. Rename or remove it, "
            "then write the file (`mlpipe init` writes one)."
        )
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ProjectError(
            f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}); the MLproject must be "
            "a YAML text file saved as UTF-8."
        ) from exc
    except OSError as exc:
        raise ProjectError(f"{path} cannot be read: {exc.strerror or exc}.") from exc


class _Linter(ConventionChecks):
    """Builds the Project and its findings from one pass over the YAML node tree."""

    def __init__(self, folder: Path, mlproject: Path):
        self.folder = folder
        self.path = mlproject
        self.findings: list[Finding] = []
        self.convention = False

    def run(self) -> Project:
        text = _read_mlproject(self.path)
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = mark.line + 1 if mark is not None else None
            problem = getattr(exc, "problem", None) or str(exc)
            self._error(f"not valid YAML: {problem}", line, always=True)
            return self._project(None, {}, None, None)
        if data is None:
            data, root = {}, None
        if not isinstance(data, dict):
            self._error(
                "the MLproject must be a mapping of keys (name, entry_points, ...)", 1, True
            )
            return self._project(None, {}, None, None)

        conventions = self._conventions(data, root)
        env_kind = self._env(data, root)
        entry_points = self._entry_points(data, root)
        if conventions is not None:
            self._check_convention_links(conventions, entry_points, root)
        name = data.get("name")
        return self._project(
            str(name) if name is not None else None, entry_points, conventions, env_kind
        )

    def _project(self, name, entry_points, conventions, env_kind) -> Project:
        return Project(
            directory=self.folder,
            name=name,
            entry_points=entry_points,
            conventions=conventions,
            env_kind=env_kind,
            findings=tuple(self.findings),
            mlproject_path=self.path,
        )

    # findings -------------------------------------------------------------------------------
    def _error(self, message: str, line: int | None, always: bool = False) -> None:
        """Record an error; convention errors are warnings in a foreign project."""
        level = "error" if always or self.convention else "warning"
        self.findings.append(Finding(level, message, str(self.path), line))

    def _warn(self, message: str, line: int | None) -> None:
        self.findings.append(Finding("warning", message, str(self.path), line))

    def _env(self, data: dict, root: Any) -> str | None:
        present = [key for key in ENV_KEYS if key in data]
        if len(present) > 1:
            self._error(
                f"only one environment may be declared, found {', '.join(present)}",
                yaml_line(root, present[1]),
                always=True,
            )
        if not present:
            for default in ("python_env.yaml", "conda.yaml"):
                if (self.folder / default).is_file():
                    return "python_env" if default == "python_env.yaml" else "conda_env"
            self._warn(
                "no python_env, conda_env or docker_env: the run depends on whatever is "
                "installed where it starts",
                None,
            )
            return None
        kind = present[0]
        value = data[kind]
        if kind in ("python_env", "conda_env"):
            if not isinstance(value, str) or not (self.folder / value).is_file():
                self._error(
                    f"{kind} file {value!r} does not exist next to the MLproject",
                    yaml_line(root, kind),
                    always=True,
                )
        elif not isinstance(value, dict) or not value.get("image"):
            self._error("docker_env needs an image", yaml_line(root, kind), always=True)
        return kind

    def _entry_points(self, data: dict, root: Any) -> dict[str, EntryPoint]:
        section = data.get("entry_points") or {}
        if not isinstance(section, dict):
            self._error(
                "entry_points must be a mapping of names to {parameters, command}",
                yaml_line(root, "entry_points"),
                always=True,
            )
            return {}
        out: dict[str, EntryPoint] = {}
        for name, body in section.items():
            name = str(name)
            line = yaml_line(root, "entry_points", name)
            if not isinstance(body, dict):
                self._error(f"entry point {name} must be a mapping with a command", line, True)
                continue
            params = self._params(name, body.get("parameters") or {}, root)
            command = body.get("command")
            if not isinstance(command, str) or not command.strip():
                self._error(f"entry point {name} has no command", line, always=True)
                command = None
            else:
                self._check_command(name, command, params, root)
            out[name] = EntryPoint(name=name, command=command, params=params)
        missing_required = [n for n in REQUIRED_ENTRY_POINTS if n not in out]
        for missing in missing_required:
            self._error(
                f"standard entry point {missing} is missing", yaml_line(root, "entry_points")
            )
        for missing in RECOMMENDED_ENTRY_POINTS:
            if missing not in out and self.convention:
                self._warn(
                    f"standard entry point {missing} is missing", yaml_line(root, "entry_points")
                )
        return out

    def _params(self, entry: str, section: Any, root: Any) -> dict[str, ParamSpec]:
        if not isinstance(section, dict):
            self._error(
                f"parameters of {entry} must be a mapping",
                yaml_line(root, "entry_points", entry, "parameters"),
                always=True,
            )
            return {}
        specs: dict[str, ParamSpec] = {}
        for pname, body in section.items():
            pname = str(pname)
            line = yaml_line(root, "entry_points", entry, "parameters", pname)
            specs[pname] = self._param(entry, pname, body, line)
        return specs

    def _param(self, entry: str, pname: str, body: Any, line: int | None) -> ParamSpec:
        label = f"parameter {entry}.{pname}"
        if isinstance(body, str):
            body = {"type": body}
        elif body is None:
            body = {}
        elif not isinstance(body, dict):
            self._error(
                f"{label} must be a type name or a mapping with type and default", line, always=True
            )
            return ParamSpec(pname)
        declared = body.get("type")
        typed = declared is not None
        kind = str(declared) if typed else "string"
        if not typed:
            self._error(f"{label} has no type (one of {', '.join(PARAM_TYPES)})", line)
        elif kind not in PARAM_TYPES:
            close = difflib.get_close_matches(kind, PARAM_TYPES, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            self._error(
                f"{label} has unknown type {kind!r} (one of "
                f"{', '.join(PARAM_TYPES)}){hint}; it is checked as a string",
                line,
            )
            kind = "string"
        choices = body.get("choices")
        if choices is not None:
            if not isinstance(choices, list) or not choices:
                self._error(f"{label}: choices must be a non-empty list", line, always=True)
                choices = None
            else:
                choices = tuple(
                    ("true" if c else "false") if isinstance(c, bool) else str(c) for c in choices
                )
        spec = ParamSpec(pname, kind, body.get("default"), choices, typed)
        self._check_default(spec, label, line)
        return spec

    def _check_default(self, spec: ParamSpec, label: str, line: int | None) -> None:
        if spec.default is None:
            return
        if spec.type == "path":
            if spec.default == "":
                self._error(
                    f"{label}: a path parameter cannot default to '' (mlflow run "
                    "fails on it); use type string for an optional path",
                    line,
                    True,
                )
            return  # a default path need not exist where the project is linted
        try:
            convert_value(spec, spec.default)
        except ParameterError as exc:
            self._error(f"{label}: default does not fit: {exc}", line)

    def _check_command(
        self, entry: str, command: str, params: dict[str, ParamSpec], root: Any
    ) -> None:
        line = yaml_line(root, "entry_points", entry, "command")
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(command) if f}
        except ValueError as exc:
            self._error(f"command of {entry} is not a valid template: {exc}", line, True)
            return
        for placeholder in sorted(fields - set(params)):
            self._error(
                f"command of {entry} uses {{{placeholder}}}, which is not a declared "
                "parameter (mlflow run would fail with a KeyError)",
                line,
                always=True,
            )
        for unused in sorted(set(params) - fields):
            self._warn(f"parameter {entry}.{unused} is declared but not used in the command", line)


def iter_findings(project: Project) -> Iterator[Finding]:
    """Errors first, then warnings, each in file order."""
    yield from sorted(project.findings, key=lambda f: (f.level != "error", f.line or 0))
