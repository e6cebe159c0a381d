"""The new side of a drift check: volumes in a folder profiled with the training profile's own
code, or the profiles ``mlpipe serve`` recorded for the model's inputs.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from mlpipe.core.errors import DatasetError, UsageError
from mlpipe.data.profile import Progress
from mlpipe.inference.models import ModelSource
from mlpipe.inference.profile_log import profiles_path
from mlpipe.monitor.features import _usable

if TYPE_CHECKING:
    pass


def find_images(folder: str | os.PathLike[str]) -> list[Path]:
    """NIfTI images and DICOM series under ``folder``: labels (``*_label.nii*``, ``labels*/``)
    are skipped.

    New data is often images only; when it is a Decathlon or ``<case>_image`` dataset, its
    labels are not part of what the model sees, so they are left out. A folder whose files
    are DICOM is one series (one volume); a ``.zip`` of a series counts too.

    Raises:
        UsageError: the folder does not exist or holds no volumes.
    """
    from mlpipe.data.volumes import is_series, is_volume

    root = Path(folder)
    if root.is_file() and (is_volume(root) or is_series(root)):
        return [root]
    if root.is_dir() and is_series(root):
        return [root]
    if not root.is_dir():
        raise UsageError(
            f"DIR {folder} is not a folder. Give the folder that holds the new .nii/.nii.gz "
            "volumes."
        )
    images = []
    for here, dirs, files in os.walk(root):
        dirs[:] = sorted(
            d for d in dirs if not d.startswith(".") and not d.lower().startswith("labels")
        )
        series = [d for d in dirs if is_series(Path(here) / d)]
        dirs[:] = [d for d in dirs if d not in series]  # a series folder is one volume
        images.extend(Path(here) / d for d in series)
        for name in sorted(files):
            if name.lower().endswith(".zip") and is_series(Path(here) / name):
                images.append(Path(here) / name)
                continue
            if name.startswith(".") or not is_volume(name):
                continue
            if re.search(r"_label\.nii(\.gz)?$", name, re.IGNORECASE):
                continue
            images.append(Path(here) / name)
    if not images:
        raise UsageError(f"No NIfTI volumes (.nii, .nii.gz) or DICOM series found in {folder}.")
    return images


def profile_images(
    paths: Sequence[Path], *, progress: Progress | None = None
) -> tuple[list[dict], list[str]]:
    """``profile_volume`` of each image (as for training); unreadable ones are listed apart.

    Raises:
        DatasetError: none of them can be read (the first error is named).
    """
    from mlpipe.data.profile import profile_volume

    profiles, failed = [], []
    for done, path in enumerate(paths, start=1):
        try:
            profiles.append(profile_volume(path))
        except DatasetError as exc:
            failed.append(str(exc))
        if progress is not None:
            progress(done, len(paths))
    if not profiles:
        raise DatasetError(f"None of the {len(paths)} volume(s) could be read: {failed[0]}")
    return profiles, failed


def read_serving_profiles(
    path: str | os.PathLike[str], *, since: str | None = None
) -> tuple[list[dict], int]:
    """The input profiles in a serving JSON-lines file, and how many lines were unusable.

    A line cut short (the server stopped mid-write) or not a profile is skipped and counted,
    not an error: the rest of the file is still good evidence.

    Args:
        path: the ``profiles.jsonl`` file.
        since: keep only entries whose ``received`` is at or after this ISO time.

    Raises:
        UsageError: the file does not exist, or ``since`` is not an ISO time.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(
            f"No serving profiles at {path}: `mlpipe serve` writes them there as it answers "
            "requests. Give --serving-file PATH if they are elsewhere."
        )
    cutoff = _parse_time(since, "--since") if since else None
    profiles, skipped = [], 0
    with path.open(encoding="utf-8", errors="replace") as lines:
        for line in lines:
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                skipped += 1
                continue
            if isinstance(entry, dict) and entry.get("profiled") is False:
                continue  # refused from its header: geometry only, nothing to compare
            if not isinstance(entry, dict) or not _usable(entry):
                skipped += 1
                continue
            if cutoff is not None:
                try:
                    received = _parse_time(str(entry.get("received", "")), "received")
                except UsageError:
                    skipped += 1
                    continue
                if received < cutoff:
                    continue
            profiles.append(entry)
    return profiles, skipped


def _default_serving(model: ModelSource) -> Path:
    if not model.name:
        raise UsageError(
            f"{model.uri} is not a registered model, so its serving profiles cannot be found "
            "by name. Give --serving-file PATH."
        )
    return profiles_path(model.name)


def _parse_time(text: str, what: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(
            f"{what} {text!r} is not an ISO date or time (e.g. 2025-03-01 or "
            "2025-03-01T12:00:00+00:00)."
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)
