"""``mlpipe init``: a new project from ``MLproject.template`` that passes ``mlpipe validate``."""

from __future__ import annotations

import os
import re
from importlib import resources
from pathlib import Path

from mlpipe.core.errors import UsageError

# template file -> file written in the new project
TEMPLATE_FILES = {
    "MLproject.template": "MLproject",
    "python_env.yaml": "python_env.yaml",
    "train.py": "train.py",
    "README.md": "README.md",
}
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")


def init_project(directory: str | os.PathLike[str], *, name: str | None = None) -> list[Path]:
    """Write the template files into ``directory`` (new or empty), named ``name``.

    Returns:
        The files written.

    Raises:
        UsageError: the folder holds files already, or the name is not usable as a
            registered model and experiment name.
    """
    target = Path(directory)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UsageError(
            f"{target} exists and is not empty; `mlpipe init` only writes into a new or "
            "empty folder, so nothing of yours is overwritten."
        )
    project_name = name or target.resolve().name
    if not _NAME.match(project_name):
        raise UsageError(
            f"Project name {project_name!r} must start with a letter and hold only letters, "
            "digits, '_', '-' and '.'; give one with --name."
        )
    source = resources.files("mlpipe.run") / "templates" / "project"
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for template, out in TEMPLATE_FILES.items():
        text = (source / template).read_text(encoding="utf-8")
        path = target / out
        path.write_text(text.replace("{{project_name}}", project_name), encoding="utf-8")
        written.append(path)
    return written
