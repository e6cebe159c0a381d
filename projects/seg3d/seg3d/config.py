"""Training settings: one dataclass the entry points, the model and the service share.

Parsed once from the command line so every module sees checked values; ``to_dict`` is what
is stored next to the model, so a service rebuilds the network from it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

MODELS = ("dynunet", "unet", "segresnet")
MODALITIES = ("ct", "mri")


class Seg3dInputError(ValueError):
    """Bad input (a parameter or a dataset file): exit code 2, a message that names the fix."""


@dataclass
class TrainConfig:
    data_dir: str = ""
    dataset_version: str = ""
    model: str = "unet"
    epochs: int = 40
    batch_size: int = 2
    patch_size: tuple[int, int, int] = (32, 32, 32)
    spacing: tuple[float, float, float] = (1.5, 1.5, 2.0)
    modality: str = "ct"
    window: tuple[float, float] = (-175.0, 250.0)
    num_classes: int = 3
    lr: float = 5e-3
    val_every: int = 5
    val_fraction: float = 0.2
    cache_rate: float = 1.0
    amp: bool = True
    seed: int = 0
    max_minutes: float = 0.0
    checkpoint_every_s: float = 30.0
    """``last.pt`` at most once per this many seconds (0: every epoch); see ``train``."""
    resume_from: str = ""
    register: bool = False
    nproc: int = 1
    num_samples: int = 2
    """Random patches per volume per step (positive/negative sampling)."""
    in_channels: int = 1
    norm_mean: float = 0.0
    norm_std: float = 0.0
    """CT: with ``norm_std > 0`` the window clips and this z-scores (the plan's foreground
    statistics); 0 keeps the older window-to-0..1 mapping."""
    nonzero: bool = True
    """MRI: z-score over the non-zero voxels only (a large zero background)."""
    kernels: list | None = None
    strides: list | None = None
    filters: list | None = None
    """DynUNet topology (from the plan); None for unet/segresnet."""
    class_ratios: list | None = None
    """``RandCropByLabelClassesd`` weights per class; None: positive/negative sampling."""
    auto: list = field(default_factory=list)
    """Fields not given on the command line: the plan sets them (``seg3d.plan``)."""
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {k: v for k, v in values.items() if k in cls.__dataclass_fields__}
        for key in ("patch_size", "spacing", "window"):
            if known.get(key) is not None:
                known[key] = tuple(known[key])
        return cls(**known)

    def check(self) -> None:
        """Refuse values no training can use, naming the parameter and the fix."""
        if self.model not in MODELS:
            raise Seg3dInputError(f"model: {self.model!r} is not one of {', '.join(MODELS)}")
        if self.modality not in MODALITIES:
            raise Seg3dInputError(f"modality: {self.modality!r} is not one of ct, mri")
        if self.num_classes < 2:
            raise Seg3dInputError(
                f"num_classes: {self.num_classes}; need at least 2 (background + one class)"
            )
        if self.epochs < 1 or self.batch_size < 1 or self.val_every < 0:
            raise Seg3dInputError("epochs and batch_size must be at least 1, val_every 0 or more")
        if self.val_every == 0 and self.max_minutes <= 0:
            raise Seg3dInputError(
                "val_every: 0 (validate by time) needs a max_minutes budget; give val_every >= 1"
            )
        if self.checkpoint_every_s < 0:
            raise Seg3dInputError(
                f"checkpoint_every_s: {self.checkpoint_every_s}; expected 0 (every epoch) or "
                "more seconds"
            )
        if not 0.0 < self.val_fraction < 1.0:
            raise Seg3dInputError(
                f"val_fraction: {self.val_fraction}; expected a fraction between 0 and 1"
            )
        if not 0.0 <= self.cache_rate <= 1.0:
            raise Seg3dInputError(f"cache_rate: {self.cache_rate}; expected 0 to 1")
        if self.model == "segresnet" and any(p % 8 for p in self.patch_size):
            raise Seg3dInputError(
                f"patch_size: {self.patch_size}; segresnet needs multiples of 8 (e.g. 32,32,32)"
            )
        if self.model == "dynunet" and self.strides:
            from seg3d.plan import divisor

            step = divisor(self.strides)
            if any(p % d for p, d in zip(self.patch_size, step, strict=True)):
                raise Seg3dInputError(
                    f"patch_size: {self.patch_size}; this DynUNet (strides {self.strides[1:]}) "
                    f"needs multiples of {'x'.join(map(str, step))}"
                )
        if self.model == "unet" and any(p % 16 for p in self.patch_size):
            raise Seg3dInputError(
                f"patch_size: {self.patch_size}; unet (4 down-samplings) needs multiples of 16"
            )
        local = self.resume_from and not self.resume_from.startswith(("runs:/", "models:/"))
        if local and not Path(self.resume_from).is_file():
            raise Seg3dInputError(
                f"resume_from: {self.resume_from} does not exist; give a checkpoint file "
                "or a runs:/<run_id>/checkpoints/last.pt URI"
            )


def triple(text: str, what: str, kind: type = float) -> tuple:
    """``"96"`` or ``"96,96,64"`` -> a 3-tuple; the error names the parameter."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        values = [kind(p) for p in parts]
    except ValueError:
        raise Seg3dInputError(
            f"{what}: {text!r} is not a number or three comma-separated numbers (e.g. 1.5,1.5,2)"
        ) from None
    if len(values) == 1:
        values *= 3
    if len(values) != 3 or any(v <= 0 for v in values):
        raise Seg3dInputError(f"{what}: {text!r}; expected one or three positive numbers")
    return tuple(values)


def pair(text: str, what: str) -> tuple[float, float]:
    parts = [p.strip() for p in str(text).split(",")]
    try:
        low, high = (float(p) for p in parts)
    except ValueError:
        raise Seg3dInputError(f"{what}: {text!r}; expected two numbers, low,high") from None
    if low >= high:
        raise Seg3dInputError(f"{what}: {text!r}; low must be below high")
    return low, high
