"""The spacing and shape an input may have, from the training data profile.

A volume far outside what the model saw in training is refused rather than segmented badly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass

logger = logging.getLogger("mlpipe.serve")


DEFAULT_RANGE_FACTOR = 3.0


@dataclass(frozen=True)
class GeometryLimits:
    """The spacing and shape ranges of the training data, and how far outside is too far.

    A value is refused when it lies more than ``factor`` times outside the training range on
    any axis: below ``min / factor`` or above ``max * factor``. Axes are compared in the
    training volumes' orientation (an LPS upload's axes are permuted to match RAS training
    data), since a permuted volume is the same scan.
    """

    spacing_min: tuple[float, ...]
    spacing_max: tuple[float, ...]
    shape_min: tuple[float, ...]
    shape_max: tuple[float, ...]
    orientation: str | None
    factor: float
    volumes: int

    @classmethod
    def from_profile(cls, profile: dict | None, factor: float) -> GeometryLimits | None:
        """From a data profile's summary; ``None`` without one or with ``factor`` 0."""
        if not profile or factor == 0:
            return None
        summary = profile.get("summary") or {}
        try:
            spacing, shape = summary["spacing"], summary["shape"]
            orientations = summary.get("orientation") or {}
            orientation = max(orientations, key=orientations.get) if orientations else None
            return cls(
                spacing_min=tuple(float(v) for v in spacing["min"]),
                spacing_max=tuple(float(v) for v in spacing["max"]),
                shape_min=tuple(float(v) for v in shape["min"]),
                shape_max=tuple(float(v) for v in shape["max"]),
                orientation=orientation,
                factor=float(factor),
                volumes=int(summary.get("volumes", 0)),
            )
        except (KeyError, TypeError, ValueError):
            logger.warning("The training profile has no spacing/shape summary; no geometry check")
            return None

    def problems(
        self, spacing: tuple[float, ...], shape: tuple[int, ...], orientation: str
    ) -> list[str]:
        """What lies too far outside the training data; empty when the volume fits."""
        spacing = self._as_training_axes(tuple(spacing), orientation)
        shape = self._as_training_axes(tuple(shape), orientation)
        found = []
        for what, values, low, high, unit in (
            ("spacing", spacing, self.spacing_min, self.spacing_max, " mm"),
            ("shape", shape, self.shape_min, self.shape_max, ""),
        ):
            outside = [
                axis
                for axis, value in enumerate(values)
                if value < low[axis] / self.factor or value > high[axis] * self.factor
            ]
            if outside:
                trained = ", ".join(
                    _range_text(low[a], high[a]) for a in range(min(len(low), len(values)))
                )
                found.append(
                    f"{what} ({', '.join(f'{v:g}' for v in values)}){unit} is far outside the "
                    f"training data ({trained}{unit} per axis, {self.volumes} volumes): axis "
                    f"{', '.join(map(str, outside))} more than {self.factor:g}x outside"
                )
        return found

    def _as_training_axes(self, values: tuple, orientation: str) -> tuple:
        """Permute the upload's per-axis values into the training volumes' axis order."""
        if (
            not self.orientation
            or orientation == self.orientation
            or "?" in orientation + self.orientation
            or len(values) != 3
        ):
            return values
        import nibabel as nib

        try:
            transform = nib.orientations.ornt_transform(
                nib.orientations.axcodes2ornt(tuple(orientation)),
                nib.orientations.axcodes2ornt(tuple(self.orientation)),
            )
        except ValueError:
            return values
        permuted = list(values)
        for axis, (target, _flip) in enumerate(transform):
            permuted[int(target)] = values[axis]
        return tuple(permuted)

    def describe(self) -> dict:
        return {
            "spacing_mm": {"min": list(self.spacing_min), "max": list(self.spacing_max)},
            "shape": {"min": list(self.shape_min), "max": list(self.shape_max)},
            "orientation": self.orientation,
            "range_factor": self.factor,
            "training_volumes": self.volumes,
        }


def _range_text(low: float, high: float) -> str:
    return f"{low:g}" if low == high else f"{low:g}-{high:g}"
