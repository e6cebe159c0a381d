"""Pictures for reports: the drift check's histograms, training against new volumes.

Drawn on a bare ``matplotlib.figure.Figure`` (the Agg canvas, no pyplot): no global state, no
display needed, safe in a server or a CI job. matplotlib comes with MLflow.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from mlpipe.monitor.features import FeatureResult

_COLOURS = {"training": "#4C72B0", "new": "#DD8452"}
_VERDICT_COLOURS = {"drift": "#C44E52", "check": "#CC9900", "ok": "#2E7D32"}


def drift_figure(
    features: Sequence[FeatureResult], path: str | Path, *, title: str = "", bins: int = 20
) -> Path:
    """One panel per feature: histograms (share of volumes) of both sides, verdict in the title.

    Args:
        features: results of ``mlpipe.monitor.features.compare_profiles``.
        path: the PNG to write.
        title: a line above the panels (model and sample sizes).
        bins: bins per numeric histogram, shared by both sides so they compare.

    Returns:
        The path written.
    """
    from matplotlib.figure import Figure

    columns = 4
    rows = max(1, math.ceil(len(features) / columns))
    figure = Figure(figsize=(4.2 * columns, 3.0 * rows + 0.6), dpi=100, layout="constrained")
    axes = np.atleast_1d(figure.subplots(rows, columns)).ravel()
    for ax, result in zip(axes, features, strict=False):
        if result.kind == "categorical":
            _bars(ax, result)
        else:
            _histogram(ax, result, bins)
        unit = f" ({result.unit})" if result.unit else ""
        ax.set_title(
            f"{result.feature}{unit}: {result.verdict}",
            color=_VERDICT_COLOURS.get(result.verdict, "black"),
            fontsize=10,
            fontweight="bold" if result.verdict == "drift" else "normal",
        )
        ax.tick_params(labelsize=8)
    for ax in axes[len(features) :]:
        ax.set_visible(False)
    if len(features):
        axes[0].legend(fontsize=8)
    if title:
        figure.suptitle(title, fontsize=12)
    path = Path(path)
    figure.savefig(path, format="png")
    return path


def _histogram(ax, result: FeatureResult, bins: int) -> None:
    training = np.asarray(result.training, dtype=float)
    new = np.asarray(result.new, dtype=float)
    low = float(min(training.min(), new.min()))
    high = float(max(training.max(), new.max()))
    if high <= low:  # one value on both sides (constant spacing): a visible bar around it
        pad = max(abs(low) * 0.05, 0.5)
        low, high = low - pad, high + pad
    edges = np.linspace(low, high, bins + 1)
    for name, values in (("training", training), ("new", new)):
        ax.hist(
            values,
            bins=edges,
            weights=np.full(len(values), 1.0 / len(values)),
            alpha=0.55,
            color=_COLOURS[name],
            label=f"{name} (n={len(values)})",
        )
    ax.set_ylabel("share of volumes", fontsize=8)


def _bars(ax, result: FeatureResult) -> None:
    training, new = Counter(result.training), Counter(result.new)
    names = sorted(set(training) | set(new))
    x = np.arange(len(names))
    for offset, (name, counts, total) in zip(
        (-0.2, 0.2),
        (("training", training, len(result.training)), ("new", new, len(result.new))),
        strict=True,
    ):
        shares = [counts.get(n, 0) / total for n in names]
        ax.bar(x + offset, shares, width=0.4, color=_COLOURS[name], alpha=0.8, label=name)
    ax.set_xticks(x, names)
    ax.set_xlim(-0.8, len(names) - 0.2)
    ax.set_ylabel("share of volumes", fontsize=8)
