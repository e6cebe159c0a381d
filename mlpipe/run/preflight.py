"""A project's own pre-flight check, run before ``mlpipe run`` creates anything.

mlpipe checks what it can know: the MLproject, each parameter's type and choices, the dataset's
files. Whether ``num_classes=2`` fits a dataset whose ``dataset.json`` lists three labels only
the project knows. A project names an entry point for that (``mlpipe: preflight:``); it is
handed the values of the parameters it declares, and exits 2 to refuse the run. Then
``mlpipe run`` exits 2 with the project's own message and no run is created, where before the
run would have been created, started and ended FAILED.

It runs in mlpipe's own environment, as ``--env-manager local`` runs the project: building a
virtualenv, conda env or docker image only to check parameters would cost minutes before the
first message, so with those the project's entry point checks again inside the run, as it
always does. A check that crashes (any exit other than 0 or 2) does not block the run: its
last lines are shown as a warning and the run goes ahead.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass

from mlpipe.core.errors import ProjectError, UsageError
from mlpipe.run.launcher import ProjectProcess, entry_point_command
from mlpipe.run.params import check_params
from mlpipe.run.project import Project

REFUSED = 2
"""The exit code with which a check refuses the run (the CLI's own code for bad input)."""
PREFLIGHT_ENV = "MLPIPE_PREFLIGHT"
"""Set to 1 in the check's environment, so shared code can tell it is not the run."""
SHOWN_LINES = 15
SAID_LINES = 5
"""A check that passes may say a few lines (what it found, what it warns of); shown under
the note."""


class PreflightRefusedError(UsageError):
    """The project's check refused the run's input; nothing was created."""


@dataclass(frozen=True)
class PreflightOutcome:
    """What the check did; ``note`` is the one line the CLI shows."""

    entry_point: str
    ran: bool
    code: int | None = None
    seconds: float = 0.0
    note: str = ""
    warning: str = ""


def preflight_for(project: Project, entry_point: str) -> str | None:
    """The name of the check guarding ``entry_point``, or None."""
    conv = project.conventions
    check = conv.preflight if conv else None
    if check is None or entry_point not in check.before:
        return None
    return check.entry_point


def run_preflight(
    project: Project,
    entry_point: str,
    values: Mapping[str, str],
    *,
    env_manager: str = "local",
    backend: str = "local",
) -> PreflightOutcome | None:
    """Run the project's check before an ``entry_point`` run with these parameter ``values``;
    None when the project has none for this entry point.

    Raises:
        PreflightRefusedError: the check exited 2; the message is its own, last lines first.
        ProjectError: the check's command cannot be built.
        KeyboardInterrupt: Ctrl-C while it runs (its process group is stopped first).
    """
    name = preflight_for(project, entry_point)
    if name is None:
        return None
    skipped = _skip_reason(project, env_manager, backend)
    if skipped:
        return PreflightOutcome(name, ran=False, note=f"pre-flight {name} skipped: {skipped}")
    entry = project.entry_point(name)
    handed = {k: v for k, v in values.items() if k in entry.params}
    try:
        checked = check_params(entry.params, handed, entry_point=name)
    except UsageError as exc:  # a default of the check that the run's value does not fit
        raise ProjectError(
            f"The pre-flight entry point {name} cannot take the run's values: {exc}"
        ) from exc
    command = entry_point_command(project, entry, checked)
    began = time.perf_counter()
    with open(os.devnull, "wb") as quiet:  # shown through the process's tail, not as it comes
        process = ProjectProcess(command, str(project.directory), _environ(), quiet, quiet)
        try:
            code = process.wait()
        except BaseException:
            process.stop(signal.SIGTERM)
            raise
    seconds = time.perf_counter() - began
    if code == REFUSED:
        raise PreflightRefusedError(_refusal(name, entry_point, process))
    if code != 0:
        tail = "\n".join(f"  {line}" for line in _last_lines(process))
        return PreflightOutcome(
            name, ran=True, code=code, seconds=seconds,
            warning=(
                f"pre-flight {name} exited {code} (not 0, not {REFUSED}): it could not check; "
                f"the run goes ahead and the project checks again inside it. Its last lines:\n"
                f"{tail}"
            ),
        )  # fmt: skip
    said = [line for line in process.tail.lines("out") if line.strip()][-SAID_LINES:]
    return PreflightOutcome(
        name, ran=True, code=0, seconds=seconds,
        note="\n  ".join([f"pre-flight {name} passed in {seconds:.1f} s", *said]),
    )  # fmt: skip


def _skip_reason(project: Project, env_manager: str, backend: str) -> str:
    if backend != "local":
        return f"--backend {backend} checks inside the run"
    if project.env_kind == "docker_env":
        return "a docker_env project checks inside its container, in the run"
    if env_manager != "local":
        return (
            f"it runs in the local environment only; with --env-manager {env_manager} "
            "the project checks inside the run"
        )
    return ""


def _environ() -> dict[str, str]:
    """mlpipe's environment, as ``--env-manager local`` gives the run, minus any run to log to."""
    env = dict(os.environ)
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        env.pop(name, None)
    env[PREFLIGHT_ENV] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


def _refusal(name: str, guarded: str, process: ProjectProcess) -> str:
    lines = [line.removeprefix("Error: ") for line in _last_lines(process)]
    said = "\n  ".join(lines) if lines else "(it printed nothing)"
    return (
        f"The project's pre-flight check ({name}) refused this {guarded} run; nothing was "
        f"created:\n  {said}"
    )


def _last_lines(process: ProjectProcess) -> list[str]:
    """stderr's last non-empty lines, or stdout's when stderr is empty."""
    for stream in ("err", "out"):
        lines = [line for line in process.tail.lines(stream) if line.strip()]
        if lines:
            return lines[-SHOWN_LINES:]
    return []
