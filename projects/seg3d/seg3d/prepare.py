"""Everything ``train`` checks and decides before a run exists, in one place.

``train``/``main`` call :func:`prepare` first; the ``check`` entry point calls it alone, so
``mlpipe run`` (its ``mlpipe: preflight:``) refuses a value that contradicts the data with
exit 2 before it creates the run, with the same words training would have used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from seg3d.config import Seg3dInputError, TrainConfig

if TYPE_CHECKING:
    from mlpipe.data.dataset import DatasetInfo
    from seg3d.planning import PlannedRun


@dataclass
class Prepared:
    data_dir: Path
    info: DatasetInfo
    planned: PlannedRun


def prepare(config: TrainConfig) -> Prepared:
    """Read the dataset, check it against ``dataset.json`` and the config, plan; fills
    ``config`` in place (see :func:`seg3d.planning.plan_run`).

    Raises:
        Seg3dInputError, DatasetError: an undeclared 4D image, a value that contradicts
            ``dataset.json``, a dataset this (planned) config cannot train on.
    """
    from mlpipe.data.dataset import build_manifest
    from seg3d.checks import check_dataset, check_geometry, resolve_data_dir
    from seg3d.fingerprint import read_dataset_json
    from seg3d.planning import plan_run

    data_dir = resolve_data_dir(config)
    info = build_manifest(data_dir, version=config.dataset_version or None)
    meta = read_dataset_json(data_dir)
    check_geometry(
        [p for p in info.pairs if p.split in ("train", "val")],
        channels=len(meta.channels) if meta.channels else 1,
    )
    planned = plan_run(config, info, data_dir)
    check_dataset(info, config)
    note_preprocessed(data_dir, config)
    return Prepared(data_dir, info, planned)


def check_entry(config: TrainConfig) -> None:
    """The ``check`` entry point: :func:`prepare`, a line or two, no run, no training."""
    prepared = prepare(config)
    planned = prepared.planned
    for line in planned.warnings:
        print(f"seg3d: warning: {line}")
    print(
        f"seg3d: checks passed: {len(prepared.info.pairs)} cases, plan {planned.digest[:12]}"
        + (f", overriding {', '.join(planned.overrides)}" if planned.overrides else "")
    )


def note_preprocessed(data_dir: Path, config: TrainConfig) -> None:
    """Data written by ``preprocess`` is already windowed: skip that step, check the settings.

    The inference chain stored with the model keeps the full preprocessing, so the service
    applies to raw volumes what ``preprocess`` applied to the training data.
    """
    try:
        meta = json.loads((Path(data_dir) / "dataset.json").read_text())
    except (OSError, ValueError):
        return
    block = meta.get("preprocessing") if isinstance(meta, dict) else None
    if not isinstance(block, dict) or block.get("by") != "seg3d.preprocess":
        return
    wanted = {"spacing": list(config.spacing), "modality": config.modality,
              "window": list(config.window)}  # fmt: skip
    differ = [f"{k} {block.get(k)} (data) vs {v} (parameter)" for k, v in wanted.items()
              if k != "window" or config.modality == "ct" if block.get(k) != v]  # fmt: skip
    if differ:
        raise Seg3dInputError(
            f"data_dir {data_dir} was preprocessed with other settings: {'; '.join(differ)}. "
            "Pass the same -P spacing/modality/window to train, or preprocess again"
        )
    config.extra["preprocessed"] = block
