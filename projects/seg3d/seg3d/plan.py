"""The training plan: every setting a new dataset needs, derived from its fingerprint.

nnU-Net showed that the settings that matter (voxel spacing, intensity normalization, patch
and batch size, network depth) follow from the data; seg3d derives them the same way and
writes down why. :func:`make_plan` is pure: fingerprint summary and ``dataset.json`` in,
``{"values": {...}, "reasons": {...}}`` out. The rules:

* **spacing**: the median spacing; for thick-slice data (one axis more than 3x coarser than the
  finest, nnU-Net's threshold) that axis takes the 10th percentile of its spacings instead, so
  the few finer scans are not blurred, but never finer than the other axes' coarsest.
* **normalization**: by the modality ``dataset.json`` declares. CT intensities are absolute
  (HU), so clip to the foreground's 0.5/99.5 percentiles and z-score with the foreground mean
  and std of the whole training set (one fixed linear map, the same for every scan). Anything
  else (MRI) has arbitrary units: z-score each image on its own, over the non-zero voxels when
  the background is large (skull-stripped or masked data), else over all.
* **patch and batch**: from the median shape after resampling, shrunk along the longest side
  (in mm) until the estimated activation memory fits the budget: 45% of the GPU's memory, or
  on a CPU a budget sized for step time, since there compute and not memory is the limit.
* **network**: MONAI ``DynUNet`` with nnU-Net's rule: pool an axis while its feature map is at
  least 8 voxels and its spacing at most twice the finest; 3-wide kernels on axes within 2x of
  the finest spacing, 1-wide (in-plane only) on thicker ones.
* **sampling**: ``RandCropByLabelClassesd`` with equal weight for every class, so a class
  covering 0.1% of the voxels centres as many patches as one covering 30%.
* **schedule**: AdamW with a polynomial decay (nnU-Net's ``(1 - progress)^0.9``) where
  progress is the share of epochs done, or of ``max_minutes`` spent, whichever is further.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence

import numpy as np

from seg3d.fingerprint import DatasetMeta

FORMAT = "seg3d.plan/1"
ANISO_THRESHOLD = 3.0
"""nnU-Net's: an axis whose spacing is more than this times the finest is "thick-slice"."""
MIN_FEATURE_MAP = 4
MAX_POOLINGS = 5
CPU_BUDGET_BYTES = 0.2 * 2**30
"""On a CPU, step time limits, not memory: this keeps patches near 32^3 voxels, whose
steps take a fraction of a second on two cores (a 48^3 step is about twice as long)."""
GPU_SHARE = 0.45
ACTIVATIONS_PER_FILTER = 12
"""Float tensors kept per voxel and filter: 2 convolutions x (conv, norm, activation) x
(encoder, decoder), forward for backward; a coarse model, checked on the GPU in BENCHMARKS.md."""
NUM_SAMPLES = 2
NONZERO_BELOW = 0.75
"""Normalize over the non-zero region when fewer than this share of voxels are non-zero."""
EPOCHS_WITHOUT_BUDGET = 40
LR = 3e-3
PLANNED = (
    "num_classes", "in_channels", "modality", "window", "norm_mean", "norm_std", "nonzero",
    "spacing", "patch_size", "batch_size", "model", "kernels", "strides", "filters",
    "class_ratios", "lr", "epochs", "val_every",
)  # fmt: skip
"""The config fields a plan sets; a value given on the command line overrides the plan's."""


def make_plan(
    summary: dict,
    meta: DatasetMeta,
    *,
    gpu_memory_bytes: int | None = None,
    max_minutes: float = 0.0,
    given: dict | None = None,
) -> dict:
    """Derive the training settings from a fingerprint summary and ``dataset.json``.

    Args:
        summary: ``fingerprint(...)["summary"]``.
        meta: what ``dataset.json`` declares (channels, labels).
        gpu_memory_bytes: the GPU's memory; None on a CPU.
        max_minutes: the time budget (0: none), for the epochs and validation rhythm.
        given: values fixed on the command line (``num_classes``, ``modality``, ``spacing``,
            ``patch_size``, ``batch_size``, ``model``, ``window``, ``lr``, ``epochs``,
            ``val_every``); what depends on them is derived from them (a given spacing sets
            the patch, a given patch the topology), and their reason says "given".

    Returns:
        ``{"format", "values": {field: value}, "reasons": {field: why}}``; values are plain
        JSON (lists, not tuples).
    """
    values: dict = {}
    reasons: dict = {}
    given = dict(given or {})

    declared = meta.num_classes
    found = max(summary["label_values"]) + 1 if summary["label_values"] else 2
    values["num_classes"] = int(given.get("num_classes") or declared or max(found, 2))
    reasons["num_classes"] = (
        f"dataset.json lists {declared} labels" if declared
        else f"labels hold values up to {found - 1} (no dataset.json labels)"
    )  # fmt: skip

    channels = meta.channels or ("unknown",) * summary["channels"]
    values["in_channels"] = len(channels)
    reasons["in_channels"] = f"channels {', '.join(channels)}"
    if "modality" in given:
        channels = ("CT",) if given["modality"] == "ct" else ("MRI",) * len(channels)
    values.update(normalization(channels, summary))
    if "window" in given:  # an explicit window: clip to it and map to 0..1, as before plans
        values.update(window=list(given["window"]), norm_mean=0.0, norm_std=0.0)
    reasons["modality"] = _normalization_reason(values, channels)

    if "spacing" in given:
        spacing, why = [float(v) for v in given["spacing"]], "given"
    else:
        spacing, why = target_spacing(summary["spacings"])
    values["spacing"] = spacing
    reasons["spacing"] = why

    median = resampled_shape(summary["shape_median"], summary["spacing_median"], spacing)
    budget = gpu_memory_bytes * GPU_SHARE if gpu_memory_bytes else CPU_BUDGET_BYTES
    filters_base, filters_max = (32, 320) if gpu_memory_bytes else (16, 256)
    batch = int(given.get("batch_size", 2))
    if "patch_size" in given:
        patch = [int(p) for p in given["patch_size"]]
        kernels, strides = topology(patch, spacing)
    else:
        patch, kernels, strides = fit_patch(
            median, spacing, budget, batch, filters_base, filters_max
        )
    filters = [min(filters_base * 2**i, filters_max) for i in range(len(strides))]
    if (
        gpu_memory_bytes and "batch_size" not in given
    ):  # grow the batch while it fits and covers <5% of the data (nnU-Net)
        cap = max(2, int(0.05 * summary["cases"] * np.prod(median) / np.prod(patch)))
        while batch < cap and estimate_bytes(patch, batch + 1, filters, strides) <= budget:
            batch += 1
    model = given.get("model", "dynunet")
    if model != "dynunet":  # the fixed networks: their own divisibility, no planned topology
        step = 16 if model == "unet" else 8
        if "patch_size" not in given:
            patch = [max(step, p // step * step) for p in patch]
        kernels = strides = filters = None
    values.update(patch_size=patch, batch_size=batch, model=model, kernels=kernels,
                  strides=strides, filters=filters)  # fmt: skip
    where = f"{gpu_memory_bytes / 2**30:.0f} GiB GPU x {GPU_SHARE}" if gpu_memory_bytes else "CPU"
    needed = estimate_bytes(patch, batch, filters or [16] * 5, strides or [[2, 2, 2]] * 5) / 2**30
    reasons["patch_size"] = (
        f"median resampled shape {_fmt(median)}, fitted to the {where} budget of "
        f"{budget / 2**30:.2f} GiB (estimate {needed:.2f})"
    )
    reasons["batch_size"] = f"{batch} x {NUM_SAMPLES} patches per volume under the same budget"
    reasons["model"] = (
        f"DynUNet, {len(strides) - 1} poolings: strides {strides[1:]}, kernels from spacing"
        if strides
        else "given"
    )

    values["class_ratios"] = [1.0] * values["num_classes"]
    fractions = summary["class_fraction"]
    rare = min(range(1, values["num_classes"]), key=lambda c: fractions.get(str(c), 0.0))
    reasons["class_ratios"] = (
        f"every class centres 1/{values['num_classes']} of the patches; the rarest, class {rare}, "
        f"covers {100 * fractions.get(str(rare), 0.0):.2f}% of the voxels"
    )

    values["lr"] = LR
    if max_minutes > 0:
        values["epochs"] = 100_000
        values["val_every"] = 0
        reasons["epochs"] = f"until max_minutes={max_minutes:g} is spent; poly LR ends with it"
    else:
        values["epochs"] = EPOCHS_WITHOUT_BUDGET
        values["val_every"] = 5
        reasons["epochs"] = f"{EPOCHS_WITHOUT_BUDGET} (no max_minutes); poly LR over them"
    reasons["lr"] = f"AdamW {LR:g}, poly decay (1 - progress)^0.9"
    for key in ("lr", "epochs", "val_every"):
        if key in given:
            values[key] = given[key]
    for key in given:
        reasons[key] = f"given ({reasons[key]})" if key in reasons and key != "spacing" else "given"
    return {"format": FORMAT, "values": values, "reasons": reasons}


def normalization(channels: Sequence[str], summary: dict) -> dict:
    """CT: clip to foreground percentiles, z-score with foreground stats; else per image."""
    ct = len(channels) == 1 and channels[0].strip().upper() == "CT"
    if ct:
        stats = summary["intensity"][0]
        std = stats["std"] if stats["std"] > 0 else 1.0
        return {
            "modality": "ct",
            "window": [round(stats["p0_5"], 4), round(stats["p99_5"], 4)],
            "norm_mean": round(stats["mean"], 4),
            "norm_std": round(std, 4),
            "nonzero": False,
        }
    return {
        "modality": "mri",
        "window": None,
        "norm_mean": 0.0,
        "norm_std": 0.0,
        "nonzero": summary["nonzero_fraction_median"] < NONZERO_BELOW,
    }


def _normalization_reason(values: dict, channels: Sequence[str]) -> str:
    if values["modality"] == "ct":
        low, high = values["window"]
        if not values["norm_std"]:
            return f"CT: window {low:g}..{high:g} HU mapped to 0..1"
        return (
            f"CT: clip to foreground p0.5..p99.5 = {low:.0f}..{high:.0f} HU, then z-score with "
            f"foreground mean {values['norm_mean']:.1f}, std {values['norm_std']:.1f}"
        )
    region = "the non-zero voxels" if values["nonzero"] else "all voxels"
    reason = f"{', '.join(channels)}: z-score each image (per channel) over {region}"
    if len(channels) > 1 and any(c.strip().upper() == "CT" for c in channels):
        # CT's fixed HU scale is used for one CT channel only; in a mixed set it is z-scored
        reason += " (the CT channel too: HU clipping is planned for single-channel CT only)"
    return reason


def target_spacing(spacings: Sequence[Sequence[float]]) -> tuple[list[float], str]:
    """Median spacing, with nnU-Net's rule for a thick-slice axis; and the reason."""
    array = np.asarray(spacings, dtype=float)
    target = np.median(array, axis=0)
    worst = int(np.argmax(target))
    others = [a for a in range(3) if a != worst]
    if target[worst] > ANISO_THRESHOLD * min(target[others]):
        fine = float(np.percentile(array[:, worst], 10))
        target[worst] = max(fine, float(max(target[others])))
        why = (
            f"median {_fmt(np.median(array, axis=0))} mm; axis {worst} is more than "
            f"{ANISO_THRESHOLD:g}x coarser (thick slices): its 10th percentile {fine:g} mm, kept "
            "anisotropic"
        )
    else:
        why = f"median spacing of {len(array)} cases"
    return [round(float(v), 4) for v in target], why


def resampled_shape(
    shape: Sequence[float], spacing: Sequence[float], target: Sequence[float]
) -> list[int]:
    """Voxels along each axis after resampling ``shape`` at ``spacing`` to ``target``."""
    return [max(1, round(n * s / t)) for n, s, t in zip(shape, spacing, target, strict=True)]


def topology(patch: Sequence[int], spacing: Sequence[float]) -> tuple[list, list]:
    """DynUNet kernels and strides for a patch and spacing (nnU-Net's pooling rule)."""
    size, current = list(patch), [float(s) for s in spacing]
    kernels = [[3 if s <= 2 * min(current) else 1 for s in current]]
    strides = [[1, 1, 1]]
    for _ in range(MAX_POOLINGS):
        stride = [
            2 if size[a] >= 2 * MIN_FEATURE_MAP and current[a] <= 2 * min(current) else 1
            for a in range(3)
        ]
        if all(s == 1 for s in stride):
            break
        size = [n // s for n, s in zip(size, stride, strict=True)]
        current = [c * s for c, s in zip(current, stride, strict=True)]
        kernels.append([3 if c <= 2 * min(current) else 1 for c in current])
        strides.append(stride)
    return kernels, strides


def divisor(strides: Sequence[Sequence[int]]) -> list[int]:
    """What each patch axis must be a multiple of: the product of its strides."""
    return [int(np.prod([s[a] for s in strides])) for a in range(3)]


def estimate_bytes(
    patch: Sequence[int], batch: int, filters: Sequence[int], strides: Sequence[Sequence[int]]
) -> float:
    """Training memory of a DynUNet step: activations per level, plus weights and AdamW state."""
    voxels = float(np.prod(patch))
    total, params = 0.0, 0.0
    previous = 1
    for level, stride in enumerate(strides):
        voxels /= float(np.prod(stride))
        total += voxels * filters[level] * ACTIVATIONS_PER_FILTER
        params += 27 * filters[level] * (filters[level] + previous) * 2
        previous = filters[level]
    return 4.0 * (batch * NUM_SAMPLES * total + 4 * params)


def fit_patch(
    median: Sequence[int],
    spacing: Sequence[float],
    budget: float,
    batch: int,
    filters_base: int,
    filters_max: int,
) -> tuple[list[int], list, list]:
    """The largest patch up to the median shape that fits ``budget``, and its topology."""
    patch = [max(MIN_FEATURE_MAP, int(n)) for n in median]
    while True:
        kernels, strides = topology(patch, spacing)
        step = divisor(strides)
        patch = [max(d, n // d * d) for n, d in zip(patch, step, strict=True)]
        filters = [min(filters_base * 2**i, filters_max) for i in range(len(strides))]
        if estimate_bytes(patch, batch, filters, strides) <= budget:
            break
        longest = [p * s if p > d else -1 for p, s, d in zip(patch, spacing, step, strict=True)]
        axis = int(np.argmax(longest))
        if longest[axis] < 0:
            break  # as small as the topology allows
        patch[axis] -= step[axis]
    kernels, strides = topology(patch, spacing)
    return patch, kernels, strides


def digest(plan: dict) -> str:
    """sha256 of the plan's values, canonical JSON: the ``mlpipe.plan.digest`` tag."""
    text = json.dumps(plan["values"], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def summary_lines(plan: dict, overrides: dict | None = None) -> list[str]:
    """A few lines for the terminal: what was chosen and why, overrides marked."""
    v, r = plan["values"], plan["reasons"]
    given = overrides or {}

    def mark(key: str) -> str:
        return f" (given; plan {given[key]})" if key in given else ""

    lines = [
        f"plan: {v['num_classes']} classes, {v['in_channels']} channel(s): {r['num_classes']}",
        f"plan: spacing {_fmt(v['spacing'])} mm{mark('spacing')}: {r['spacing']}",
        f"plan: normalization {v['modality']}{mark('modality')}: {r['modality']}",
        f"plan: patch {_fmt(v['patch_size'])}{mark('patch_size')}, batch {v['batch_size']}"
        f"{mark('batch_size')}: {r['patch_size']}",
        f"plan: {v['model']}{mark('model')}: {r['model']}; sampling: {r['class_ratios']}",
    ]
    return lines


def _fmt(values: Sequence[float]) -> str:
    return "x".join(f"{v:g}" if isinstance(v, float) and not math.isnan(v) else str(v)
                    for v in values)  # fmt: skip
