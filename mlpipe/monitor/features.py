"""The drift statistics: which profile features are compared (spacing, shape, intensities,
orientation), how (a two-sample Kolmogorov-Smirnov test and a shift in training spreads), and
the verdict per feature, with a note when too few volumes make the test weak.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mlpipe.core.errors import UsageError

if TYPE_CHECKING:
    pass


@dataclass(frozen=True)
class Feature:
    """A numeric feature of a volume profile and how its median shift is scaled."""

    name: str
    unit: str
    get: Callable[[dict], float]
    scale: str  # "median": |training median|; "range": training intensity range


def _axis(key: str, axis: int) -> Callable[[dict], float]:
    return lambda v: float(v[key][axis])


def _intensity(key: str) -> Callable[[dict], float]:
    return lambda v: float(v["intensity"][key])


NUMERIC_FEATURES: tuple[Feature, ...] = (
    *(Feature(f"spacing_{a}", "mm", _axis("spacing", i), "median") for i, a in enumerate("xyz")),
    *(Feature(f"shape_{a}", "voxels", _axis("shape", i), "median") for i, a in enumerate("xyz")),
    *(Feature(f"intensity_{k}", "", _intensity(k), "range") for k in ("p0_5", "p50", "p99_5")),
    Feature("intensity_mean", "", _intensity("mean"), "range"),
    Feature("intensity_std", "", _intensity("std"), "median"),
)


ORIENTATION = "orientation"


FEATURE_ORDER = (
    [f.name for f in NUMERIC_FEATURES[:6]] + [ORIENTATION] + [f.name for f in NUMERIC_FEATURES[6:]]
)


DRIFT, CHECK, OK = "drift", "check", "ok"


@dataclass(frozen=True)
class Thresholds:
    """When a feature has drifted; see the module docstring for the rules.

    Attributes:
        ks_pvalue: KS p-value below which two samples count as different.
        shift: relative median shift above which the difference counts as large.
        unseen_share: share of new volumes with an orientation unseen in training above
            which orientation has drifted.
    """

    ks_pvalue: float = 0.01
    shift: float = 0.1
    unseen_share: float = 0.1

    def __post_init__(self) -> None:
        problems = []
        if not 0.0 < self.ks_pvalue <= 1.0:
            problems.append(f"--ks-pvalue must be in (0, 1], not {self.ks_pvalue:g}.")
        if not (self.shift >= 0.0 and math.isfinite(self.shift)):
            problems.append(f"--shift must be a share >= 0 (0.1 = 10%), not {self.shift:g}.")
        if not 0.0 <= self.unseen_share <= 1.0:
            problems.append(f"--unseen-share must be in [0, 1], not {self.unseen_share:g}.")
        if problems:
            raise UsageError(" ".join(problems))


@dataclass
class FeatureResult:
    """One feature's two samples, test statistics and verdict."""

    feature: str
    kind: str  # numeric | categorical
    test: str
    training: list
    new: list
    verdict: str
    reason: str
    statistics: dict[str, float | None] = field(default_factory=dict)
    unit: str = ""

    def describe(self, values: list) -> dict:
        """Summary of one side: quantiles for numbers, shares for categories."""
        if self.kind == "categorical":
            counts = Counter(values)
            return {"n": len(values), "counts": dict(counts.most_common())}
        ordered = sorted(values)
        return {
            "n": len(values),
            "median": statistics.median(ordered),
            "p25": _quantile(ordered, 0.25),
            "p75": _quantile(ordered, 0.75),
            "min": ordered[0],
            "max": ordered[-1],
        }

    def to_json(self) -> dict:
        return {
            "feature": self.feature,
            "kind": self.kind,
            "unit": self.unit,
            "test": self.test,
            "training": self.describe(self.training),
            "new": self.describe(self.new),
            "statistics": self.statistics,
            "verdict": self.verdict,
            "reason": self.reason,
        }


def compare_profiles(
    training: Sequence[dict], new: Sequence[dict], thresholds: Thresholds | None = None
) -> list[FeatureResult]:
    """Test every feature of the new volume profiles against the training ones.

    Args:
        training: ``profile_volume`` dicts of the training volumes.
        new: ``profile_volume`` dicts of the new volumes.
        thresholds: the verdict rules' thresholds.

    Returns:
        One result per feature, in ``FEATURE_ORDER``.

    Raises:
        UsageError: either side is empty.
    """
    if not training or not new:
        raise UsageError("Drift needs at least one training and one new volume profile.")
    thresholds = thresholds or Thresholds()
    # Intensity location features are scaled by the training intensity range, as they may
    # sit near 0 (HU of soft tissue) where a relative shift would explode.
    spans = [v["intensity"]["p99_5"] - v["intensity"]["p0_5"] for v in training]
    intensity_range = statistics.median(spans)
    results = {}
    for feature in NUMERIC_FEATURES:
        results[feature.name] = _numeric(
            feature,
            [feature.get(v) for v in training],
            [feature.get(v) for v in new],
            intensity_range,
            thresholds,
        )
    results[ORIENTATION] = _orientation(
        [str(v["orientation"]) for v in training], [str(v["orientation"]) for v in new], thresholds
    )
    return [results[name] for name in FEATURE_ORDER]


def _numeric(
    feature: Feature,
    training: list[float],
    new: list[float],
    intensity_range: float,
    thresholds: Thresholds,
) -> FeatureResult:
    from scipy.stats import ks_2samp

    med_t, med_n = statistics.median(training), statistics.median(new)
    scale = abs(med_t) if feature.scale == "median" else abs(intensity_range)
    if scale > 0:
        shift = (med_n - med_t) / scale
    else:
        shift = 0.0 if med_n == med_t else math.copysign(math.inf, med_n - med_t)
    ks = ks_2samp(training, new)
    d, p = float(ks.statistic), float(ks.pvalue)
    significant = p < thresholds.ks_pvalue
    large = abs(shift) > thresholds.shift
    outside = med_n < min(training) or med_n > max(training)
    moved = f"median moved {_percent(shift)} (> {_percent(thresholds.shift, signed=False)})"
    if large and significant:
        verdict, reason = DRIFT, f"{moved} and KS p={p:.2g} < {thresholds.ks_pvalue:g}"
    elif large and outside:
        verdict, reason = DRIFT, f"{moved} and the new median is outside the training range"
    elif large:
        verdict, reason = CHECK, f"{moved}, but KS p={p:.2g}: too few volumes to be sure"
    elif significant:
        verdict = CHECK
        reason = f"distributions differ (KS p={p:.2g}) but the median moved only {_percent(shift)}"
    else:
        verdict, reason = OK, f"median moved {_percent(shift)}, KS p={p:.2g}"
    return FeatureResult(
        feature=feature.name,
        kind="numeric",
        test="two-sample Kolmogorov-Smirnov + relative median shift",
        training=training,
        new=new,
        verdict=verdict,
        reason=reason,
        statistics={
            "ks_statistic": d,
            "ks_pvalue": p,
            "shift": shift if math.isfinite(shift) else None,
            "scale": scale,
        },
        unit=feature.unit,
    )


def _orientation(training: list[str], new: list[str], thresholds: Thresholds) -> FeatureResult:
    seen = set(training)
    unseen = [o for o in new if o not in seen]
    share = len(unseen) / len(new)
    names = ", ".join(sorted(set(unseen)))
    if share > thresholds.unseen_share:
        verdict = DRIFT
        reason = (
            f"{_percent(share, signed=False)} of new volumes have an orientation unseen in "
            f"training ({names}) (> {_percent(thresholds.unseen_share, signed=False)})"
        )
    elif unseen:
        verdict = CHECK
        reason = f"{len(unseen)} new volume(s) with an orientation unseen in training ({names})"
    else:
        verdict, reason = OK, "every new orientation was seen in training"
    return FeatureResult(
        feature=ORIENTATION,
        kind="categorical",
        test="share of new volumes with an orientation unseen in training",
        training=training,
        new=new,
        verdict=verdict,
        reason=reason,
        statistics={"unseen_share": share},
    )


def _power_notes(n_training: int, n_new: int, thresholds: Thresholds) -> list[str]:
    """Say when the KS test cannot reach the threshold: with few volumes, it never fires."""
    # The smallest two-sided p-value KS can give (D = 1) is 2 / C(n + m, n).
    floor = min(1.0, 2.0 / math.comb(n_training + n_new, n_new))
    if floor < thresholds.ks_pvalue:
        return []
    return [
        f"With {n_new} new and {n_training} training volumes the KS test cannot reach "
        f"p < {thresholds.ks_pvalue:g} (its smallest p is {floor:.2g}); verdicts rest on the "
        "median shift and the training range. Check more volumes for a firmer answer."
    ]


def _usable(entry: Mapping[str, Any]) -> bool:
    """Whether a profile entry has what the comparison reads (a partial one is skipped)."""
    try:
        for feature in NUMERIC_FEATURES:
            if not math.isfinite(feature.get(dict(entry))):
                return False
        return isinstance(entry["orientation"], str)
    except (KeyError, IndexError, TypeError, ValueError):
        return False


def _spread(items: list, limit: int | None) -> list:
    if limit is None or limit >= len(items):
        return items
    step = len(items) / limit
    return [items[int(i * step)] for i in range(limit)]


def _quantile(ordered: Sequence[float], q: float) -> float:
    if len(ordered) == 1:
        return float(ordered[0])
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (position - low))


def _percent(value: float, *, signed: bool = True) -> str:
    if not math.isfinite(value):
        return "from 0" if signed else "inf"
    return f"{value * 100:+.0f}%" if signed else f"{value * 100:.0f}%"


def _num(value: float) -> str:
    return f"{value:.4g}"


def _side_text(result: FeatureResult, values: list) -> str:
    if result.kind == "categorical":
        counts = Counter(values)
        return ", ".join(
            f"{name} {n / len(values) * 100:.0f}%" for name, n in counts.most_common(3)
        )
    ordered = sorted(values)
    return f"{_num(statistics.median(ordered))} [{_num(ordered[0])}, {_num(ordered[-1])}]"


def _statistic_text(result: FeatureResult) -> str:
    stats = result.statistics
    if result.kind == "categorical":
        return f"unseen {_percent(stats['unseen_share'] or 0.0, signed=False)}"
    shift = stats.get("shift")
    shown = _percent(shift) if shift is not None else "inf"
    return f"D={stats['ks_statistic']:.2f} p={stats['ks_pvalue']:.2g} shift={shown}"
