"""Real-anatomy datasets: the MNI152 brain warped into subjects, in the Decathlon layout.

Synthetic blobs are easy to segment and say little about real data. nilearn's wheel ships the
ICBM 2009 MNI152 T1 template and its grey- and white-matter probability maps (1 mm, under
``nilearn/datasets/data/``), so real anatomy is available with no download. Each subject is the
template seen through a random affine (rotation, scale, shift) and a smooth elastic
displacement, resampled onto its own grid, with a multiplicative bias field and noise; its label
is the most probable tissue (1 grey matter, 2 white matter) under the same warp.

Three variants exercise what a training plan must decide:

* ``mri``: T1-weighted, isotropic spacing, ``"modality": {"0": "MRI"}``;
* ``ct``: Hounsfield units (air -1000, soft tissue 0..45 HU), 1x1x3 mm thick slices,
  ``"modality": {"0": "CT"}``: the anisotropic-axis rule and CT clipping;
* ``multi``: 4D images with T1, T2 and FLAIR-like contrasts (channels last), declared by
  ``"modality": {"0": "T1", "1": "T2", "2": "FLAIR"}``.

Deterministic: a case depends only on ``(seed, split, index)`` and nibabel writes gzip with a
zero mtime, so the same arguments give byte-identical files (and the same dataset digest).
The files are read without importing nilearn (which pulls in scikit-learn).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np

from seg3d.config import Seg3dInputError

VARIANTS = ("mri", "ct", "multi")
LABELS = {"0": "background", "1": "grey matter", "2": "white matter"}
_MODALITY = {"mri": {"0": "MRI"}, "ct": {"0": "CT"}, "multi": {"0": "T1", "1": "T2", "2": "FLAIR"}}
_TEMPLATE = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
_CT_SPACING = (1.0, 1.0, 3.0)
_SUBFOLDERS = ("imagesTr", "labelsTr", "imagesTs", "labelsTs")
# tissue intensities: (background/CSF inside the head, grey, white) per contrast
_CONTRAST = {"T1": (20.0, 60.0, 100.0), "T2": (100.0, 65.0, 40.0), "FLAIR": (15.0, 80.0, 55.0)}
_CT_HU = (8.0, 40.0, 28.0)
"""CSF, grey and white matter in HU: a 12 HU grey/white contrast, as in real head CT."""


def template_path(kind: str) -> Path:
    """The packaged MNI152 file (``t1``, ``gm`` or ``wm``), found without importing nilearn.

    Raises:
        Seg3dInputError: nilearn is not installed (it is a dependency of the project).
    """
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise Seg3dInputError("the real-anatomy generator needs nilearn: pip install nilearn")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    return path / _TEMPLATE.format(kind)


@lru_cache(maxsize=1)
def _templates() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """T1 (0..1), grey and white matter probabilities (0..1), and the template affine."""
    import nibabel as nib

    images = [nib.load(template_path(k)) for k in ("t1", "gm", "wm")]
    arrays = [np.asarray(i.dataobj, dtype=np.float32) / 255.0 for i in images]
    return arrays[0], arrays[1], arrays[2], np.asarray(images[0].affine)


def make_anatomy(
    out_dir: str | Path,
    *,
    variant: str = "mri",
    count: int = 8,
    test_count: int = 2,
    spacing: float | tuple[float, float, float] = 2.0,
    seed: int = 0,
    field_of_view: tuple[float, float, float] = (150.0, 180.0, 150.0),
) -> Path:
    """Write ``count`` training and ``test_count`` test subjects and ``dataset.json``.

    Args:
        out_dir: a new or empty folder.
        variant: ``mri``, ``ct`` or ``multi`` (see the module docstring).
        count: training cases (``imagesTr``/``labelsTr``).
        test_count: test cases (``imagesTs``/``labelsTs``).
        spacing: voxel size in mm (the ``ct`` variant uses 1x1x3 mm scaled by ``spacing``).
        seed: the same seed gives the same files.
        field_of_view: mm covered by each volume (the template's brain fills ~140x175x120).

    Returns:
        The dataset folder.
    """
    if variant not in VARIANTS:
        raise Seg3dInputError(f"variant: {variant!r} is not one of {', '.join(VARIANTS)}")
    if count < 2 or test_count < 0:
        raise Seg3dInputError(f"count: {count}, test_count: {test_count}; need 2+ and 0+")
    base = np.broadcast_to(np.asarray(spacing, dtype=float), (3,))
    voxel = base * np.asarray(_CT_SPACING) if variant == "ct" else base
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise Seg3dInputError(f"out_dir: {out} is not empty; give a new or empty folder")
    for folder in _SUBFOLDERS:
        (out / folder).mkdir(parents=True, exist_ok=True)
    training, test = [], []
    cases = [("Tr", 0, i) for i in range(count)] + [("Ts", 1, i) for i in range(test_count)]
    for suffix, split, index in cases:
        name = f"brain_{index if split == 0 else count + index:03d}.nii.gz"
        rng = np.random.default_rng([seed, split, index, VARIANTS.index(variant)])
        image, label, affine = subject(rng, variant, tuple(voxel), field_of_view)
        _save(image, affine, out / f"images{suffix}" / name)
        _save(label.astype(np.uint8), affine, out / f"labels{suffix}" / name)
        if split == 0:
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        else:
            test.append(f"./imagesTs/{name}")
    meta = {
        "name": f"mni-anatomy-{variant}",
        "version": f"anat1-{variant}-s{seed}-n{count}-t{test_count}-{_fmt(voxel)}",
        "description": "MNI152 2009 brain warped into subjects (seg3d.anatomy)",
        "reference": "ICBM 2009a nonlinear symmetric template, via nilearn",
        "tensorImageSize": "4D" if variant == "multi" else "3D",
        "modality": _MODALITY[variant],
        "labels": dict(LABELS),
        "numTraining": count,
        "numTest": test_count,
        "training": training,
        "test": test,
    }
    (out / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    print(f"seg3d: wrote {count + test_count} {variant} subjects to {out}", file=sys.stderr)
    return out


def subject(
    rng: np.random.Generator,
    variant: str,
    spacing: tuple[float, float, float],
    field_of_view: tuple[float, float, float],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One warped subject: image (3D, or 4D channels last), label, affine (RAS, mm)."""
    from scipy.ndimage import map_coordinates

    t1, gm, wm, template_affine = _templates()
    shape = tuple(max(8, round(f / s)) for f, s in zip(field_of_view, spacing, strict=True))
    # world coordinates of the subject's voxels, centred on the template's brain centre
    centre = np.array([0.0, -18.0, 8.0])
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing, strict=True)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).astype(np.float32)
    angles = np.radians(rng.uniform(-8, 8, 3))
    matrix = _rotation(angles) * rng.uniform(0.92, 1.08)
    shift = rng.uniform(-4, 4, 3)
    world = grid @ matrix.T.astype(np.float32) + (centre + shift).astype(np.float32)
    world += _displacement(rng, shape, magnitude=3.0)
    inverse = np.linalg.inv(template_affine)
    coords = world @ inverse[:3, :3].T.astype(np.float32) + inverse[:3, 3].astype(np.float32)
    coords = np.moveaxis(coords, -1, 0)
    sample = [map_coordinates(v, coords, order=1, mode="constant", cval=0.0) for v in (t1, gm, wm)]
    t1_s, gm_s, wm_s = (np.asarray(a, dtype=np.float32) for a in sample)
    head = t1_s > 0.05
    csf = np.clip(1.0 - gm_s - wm_s, 0.0, 1.0) * head
    label = np.argmax(np.stack([csf + (~head), gm_s, wm_s]), axis=0).astype(np.uint8)
    tissue = (csf, gm_s, wm_s)
    bias = np.exp(_smooth(rng, shape, 0.15))
    if variant == "ct":
        hu = sum(v * w for v, w in zip(_CT_HU, tissue, strict=True))
        image = np.where(head, hu, -1000.0) + rng.normal(0, 6.0, shape)
        image = np.round(image).astype(np.int16)
    elif variant == "mri":
        image = _contrast(rng, "T1", tissue, head, bias, shape)
    else:
        channels = [_contrast(rng, c, tissue, head, bias, shape) for c in ("T1", "T2", "FLAIR")]
        image = np.stack(channels, axis=-1)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -(np.asarray(shape) - 1) / 2 * np.asarray(spacing)
    return image, label, affine


def _contrast(rng, name: str, tissue, head, bias, shape) -> np.ndarray:
    """An MRI contrast: tissue means (scaled per subject), bias field, Rician-like noise."""
    scale = rng.uniform(0.7, 1.4)
    mean = sum(v * w for v, w in zip(_CONTRAST[name], tissue, strict=True)) * head
    signal = mean * bias * scale
    noise = 4.0 * scale
    real = signal + rng.normal(0, noise, shape)
    imag = rng.normal(0, noise, shape)
    return (np.sqrt(real**2 + imag**2) * head).astype(np.float32)  # skull-stripped: 0 outside


def _fmt(values) -> str:
    return "x".join(f"{v:g}" for v in values)


def _rotation(angles: np.ndarray) -> np.ndarray:
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _smooth(rng: np.random.Generator, shape: tuple[int, ...], amplitude: float) -> np.ndarray:
    """A smooth random field (a 4x4x4 grid of values, cubic-upsampled), ~amplitude in size."""
    from scipy.ndimage import zoom

    coarse = rng.normal(0, amplitude, (4, 4, 4))
    field = zoom(coarse, [n / 4 for n in shape], order=3, mode="nearest")
    return field[: shape[0], : shape[1], : shape[2]].astype(np.float32)


def _displacement(rng: np.random.Generator, shape: tuple[int, ...], magnitude: float) -> np.ndarray:
    """An elastic displacement in mm (three smooth fields), channels last."""
    return np.stack([_smooth(rng, shape, magnitude) for _ in range(3)], axis=-1)


def _save(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    import nibabel as nib

    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    nib.save(image, path)
