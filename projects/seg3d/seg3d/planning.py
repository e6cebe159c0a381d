"""Plan a training run: fingerprint, ``dataset.json``, command-line values, in that order.

:func:`plan_run` is what ``train``/``main`` call before anything is logged: it reads what the
dataset declares, fingerprints it (cached by digest), refuses a command-line value that
contradicts the data (exit 2, naming both sides), fills every setting the user left out from
:func:`seg3d.plan.make_plan`, and records which given values overrode the plan.
:func:`log_plan` then writes ``mlpipe/plan.json``, params ``plan.*`` and the tag
``mlpipe.plan.digest`` into the run. The ``plan`` entry point (:func:`plan_entry`) does the
same without training, for review.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from seg3d.config import Seg3dInputError, TrainConfig
from seg3d.fingerprint import DatasetMeta, fingerprint, read_dataset_json
from seg3d.plan import PLANNED, digest, make_plan, summary_lines

if TYPE_CHECKING:
    from mlpipe.data.dataset import DatasetInfo

ARTIFACT = "mlpipe/plan.json"
DIGEST_TAG = "mlpipe.plan.digest"
MISMATCH_TAG = "mlpipe.plan.modality_mismatch"
OVERRIDES_TAG = "mlpipe.plan.overridden"
USER_FIELDS = ("num_classes", "modality", "window", "spacing", "patch_size", "batch_size",
               "model", "lr", "epochs", "val_every")  # fmt: skip
"""Plannable settings that are also command-line parameters (the ones a user overrides)."""
_TUPLES = {"patch_size": int, "spacing": float, "window": float}


@dataclass
class PlannedRun:
    """A plan applied to a config: the document logged as ``mlpipe/plan.json``, and notes."""

    plan: dict
    meta: DatasetMeta
    summary: dict
    overrides: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    dataset: dict = field(default_factory=dict)

    @property
    def digest(self) -> str:
        return digest(self.plan)

    def document(self) -> dict:
        return {
            "format": self.plan["format"],
            "digest": self.digest,
            "dataset": self.dataset,
            "declared": {
                "channels": list(self.meta.channels) if self.meta.channels else None,
                "labels": {str(k): v for k, v in (self.meta.labels or {}).items()} or None,
                "file": self.meta.path,
            },
            "plan": self.plan["values"],
            "reasons": self.plan["reasons"],
            "overrides": self.overrides,
            "warnings": self.warnings,
            "fingerprint": self.summary,
        }

    def lines(self) -> list[str]:
        given = {k: v["plan"] for k, v in self.overrides.items()}
        return summary_lines(self.plan, given)


def plan_run(config: TrainConfig, info: DatasetInfo, data_dir: Path) -> PlannedRun:
    """Fingerprint and plan; check given values against the data; fill ``config`` in place.

    Fields listed in ``config.auto`` (left out on the command line) take the plan's value; the
    others are kept, and recorded as overrides where the plan would have chosen otherwise. A
    config built in code (``auto`` empty) is planned and logged but not changed.

    Raises:
        Seg3dInputError: ``num_classes`` other than the labels ``dataset.json`` lists, label
            values outside them, or images whose channel count differs from the declared one.
    """
    meta = read_dataset_json(data_dir)
    fp = fingerprint(info)
    summary = fp["summary"]
    _check_declared(config, meta, fp, info)
    warnings = []
    auto = set(config.auto)
    given = {k: _plain(getattr(config, k)) for k in USER_FIELDS if k not in auto}
    planned_here = bool(auto)
    if not planned_here:
        given = {}
    declared = _declared_modality(meta)
    if "modality" in given and declared and given["modality"] != declared:
        warnings.append(
            f"modality={given['modality']} given, but {meta.path} declares "
            f"{', '.join(meta.channels or ())}: normalizing as {given['modality']}"
        )
    preprocessed = _preprocessed(data_dir)
    if preprocessed and planned_here:  # already resampled and windowed: keep what was done
        for key in ("spacing", "modality", "window"):
            if key in auto and preprocessed.get(key) is not None:
                given[key] = preprocessed[key]
    gpu = _gpu_memory()
    plan = make_plan(summary, meta, gpu_memory_bytes=gpu, max_minutes=config.max_minutes,
                     given=given)  # fmt: skip
    if preprocessed and planned_here:
        plan["values"].update(norm_mean=0.0, norm_std=0.0, nonzero=True)
    base = make_plan(summary, meta, gpu_memory_bytes=gpu, max_minutes=config.max_minutes)
    overrides = {
        k: {"given": v, "plan": base["values"].get(k)}
        for k, v in given.items()
        if k in USER_FIELDS and base["values"].get(k) != v and k in config.__dataclass_fields__
        and not (preprocessed and k in ("spacing", "modality", "window") and k in auto)
    }  # fmt: skip
    if planned_here:
        for key in PLANNED:
            value = plan["values"].get(key)
            if key in _TUPLES:
                if value is None:
                    continue
                value = tuple(_TUPLES[key](v) for v in value)
            setattr(config, key, value)
        config.check()
    return PlannedRun(
        plan, meta, summary, overrides, warnings,
        {"name": info.name, "version": info.version, "digest": info.digest},
    )  # fmt: skip


def log_plan(planned: PlannedRun) -> None:
    """``mlpipe/plan.json``, params ``plan.*``, tags in the active run; warnings printed."""
    import mlflow

    import mlpipe.log as mlog

    for line in planned.warnings:
        print(f"seg3d: warning: {line}", file=sys.stderr, flush=True)
    mlflow.log_dict(planned.document(), ARTIFACT)
    params = {f"plan.{k}": _param(v) for k, v in planned.plan["values"].items()}
    params["plan.overridden"] = ",".join(sorted(planned.overrides)) or "none"
    mlog.params(params)
    tags = {DIGEST_TAG: planned.digest}
    if planned.overrides:
        tags[OVERRIDES_TAG] = ",".join(sorted(planned.overrides))
    if planned.warnings and any("modality=" in w for w in planned.warnings):
        declared = ", ".join(planned.meta.channels or ())
        given = planned.plan["values"]["modality"]
        tags[MISMATCH_TAG] = f"given {given}; dataset.json {declared}"
    mlflow.set_tags(tags)


def print_plan(planned: PlannedRun) -> None:
    for line in planned.lines():
        print(f"seg3d: {line}", flush=True)


def plan_entry(data_dir: str, max_minutes: float = 0.0) -> PlannedRun:
    """The ``plan`` entry point: plan the dataset, print the plan, log it (no training)."""
    import mlflow

    import mlpipe.log as mlog
    from mlpipe.data.dataset import build_manifest
    from seg3d.checks import check_geometry, resolve_data_dir

    config = TrainConfig(data_dir=data_dir, max_minutes=max_minutes, auto=list(USER_FIELDS))
    path = resolve_data_dir(config)
    info = build_manifest(path)
    check_geometry(
        [p for p in info.pairs if p.split in ("train", "val")],
        channels=len(read_dataset_json(path).channels or ()) or 1,
    )
    planned = plan_run(config, info, path)
    print_plan(planned)
    if not mlflow.active_run():
        mlflow.start_run()
    mlog.dataset(path)
    log_plan(planned)
    return planned


# checks ---------------------------------------------------------------------------------------


def _check_declared(config: TrainConfig, meta: DatasetMeta, fp: dict, info) -> None:
    """Given values and label files against ``dataset.json``: both sides named."""
    summary = fp["summary"]
    if meta.labels:
        listed = ", ".join(f"{k} {v}" for k, v in sorted(meta.labels.items()))
        if "num_classes" not in config.auto and config.num_classes != meta.num_classes:
            raise Seg3dInputError(
                f"num_classes={config.num_classes} contradicts {meta.path}, which lists "
                f"{meta.num_classes} labels ({listed}); drop -P num_classes (the plan takes "
                "it from dataset.json) or fix the labels in dataset.json"
            )
        outside = [v for v in summary["label_values"] if v not in meta.labels]
        if outside:
            case = next(
                c["case"] for c in fp["cases"] if any(int(v) in outside for v in c["class_voxels"])
            )
            pair = next(p for p in info.pairs if p.case == case)
            raise Seg3dInputError(
                f"label {pair.label} holds value {outside[0]}, outside the labels {meta.path} "
                f"lists ({listed}); fix the label file or add the class to dataset.json"
            )
    found = summary["channels"]
    declared = len(meta.channels) if meta.channels else None
    if declared is not None and found != declared:
        case = next(c for c in fp["cases"] if c["channels"] != declared)
        raise Seg3dInputError(
            f"{meta.path} declares {declared} channel(s) ({', '.join(meta.channels or ())}) but "
            f"case {case['case']} has {case['channels']}; fix dataset.json or the image"
        )


def _declared_modality(meta: DatasetMeta) -> str | None:
    if not meta.channels:
        return None
    return "ct" if [c.strip().upper() for c in meta.channels] == ["CT"] else "mri"


def _preprocessed(data_dir: Path) -> dict | None:
    try:
        meta = json.loads((Path(data_dir) / "dataset.json").read_text())
    except (OSError, ValueError):
        return None
    block = meta.get("preprocessing") if isinstance(meta, dict) else None
    if isinstance(block, dict) and block.get("by") == "seg3d.preprocess":
        return block
    return None


def _gpu_memory() -> int | None:
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(0).total_memory)
    return None


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def _param(value) -> str:
    if isinstance(value, list):
        return json.dumps(value, separators=(",", ":"))
    return str(value)
