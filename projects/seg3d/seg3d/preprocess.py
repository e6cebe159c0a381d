"""The ``preprocess`` entry point: RAS, target spacing, intensity, body crop, written to disk.

Training resamples every volume on every start; for a large CT dataset that is most of the
time of a short run. ``preprocess`` does the deterministic part once and writes a new
Decathlon-layout dataset, whose version names both the raw data and the preprocessing
(``<raw version>+pp.<digest>``), so a model trained on it can be traced back to both: the run
logs the raw input and the output as datasets, and the chain as ``preprocess.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from seg3d.config import MODALITIES, Seg3dInputError, TrainConfig

if TYPE_CHECKING:
    from monai.transforms import Compose

    from mlpipe.data.dataset import DatasetInfo, Pair

RAW_MANIFEST_ARTIFACT = "mlpipe/dataset_manifest_raw.json"
CROP_MARGIN = 2
"""Voxels kept around the body, so the skin is not cut at the crop box edge."""
_PROGRESS_EVERY = 4
_KEPT_META = ("description", "reference", "licence", "tensorImageSize", "modality", "labels")


def preprocess(
    data_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    spacing: Sequence[float],
    modality: str,
    window: Sequence[float],
) -> Path:
    """Preprocess every case of a dataset into a new Decathlon-layout dataset, and log both.

    The output is written into a hidden sibling folder and moved into place at the end, so an
    interrupted run leaves ``out_dir`` as it was. Cases the manifest marks ``val`` go to
    ``imagesTr`` like ``train`` ones (the Decathlon layout has no validation folder).

    In the active MLflow run (started if none): the raw dataset (``context="raw"``), the chain
    (``mlpipe/preprocessing/preprocess.json``), then the output (``context="preprocessed"``).
    The run's ``mlpipe.dataset.*`` tags describe the output, which is what a training run on it
    will report; ``mlpipe.dataset.raw.*`` tags and ``mlpipe/dataset_manifest_raw.json`` keep the
    raw input, whose tags and manifest the second ``mlog.dataset`` call would overwrite.

    Args:
        data_dir: the raw dataset; empty for the embedded synthetic one.
        out_dir: where the preprocessed dataset goes: a new or empty folder, or an earlier
            output of this function (replaced).
        spacing: target voxel size in mm (RAS order).
        modality: ``"ct"`` (window to 0..1) or ``"mri"`` (z-score of the non-zero voxels).
        window: the CT window in HU, ``(low, high)``.

    Returns:
        The output folder.

    Raises:
        Seg3dInputError: a bad parameter, an ``out_dir`` that holds other data or overlaps the
            raw dataset, or a dataset that fails ``check_geometry``; nothing is logged.
        DatasetError: the raw dataset cannot be read (from ``build_manifest``).
    """
    from mlpipe.data.dataset import build_manifest
    from seg3d.checks import check_geometry, resolve_data_dir

    if modality not in MODALITIES:
        raise Seg3dInputError(f"modality: {modality!r} is not one of {', '.join(MODALITIES)}")
    config = TrainConfig(
        data_dir=os.fspath(data_dir),
        spacing=tuple(float(s) for s in spacing),  # type: ignore[arg-type]
        modality=modality,
        window=tuple(float(w) for w in window),  # type: ignore[arg-type]
    )
    raw_dir = resolve_data_dir(config).absolute()
    out = Path(out_dir).absolute()
    _check_out_dir(out, raw_dir)
    checked = build_manifest(raw_dir)  # every refusal before anything is logged
    check_geometry(checked.pairs)

    import mlflow

    import mlpipe.log as mlog
    from mlpipe.data import preprocessing as prep

    raw = mlog.dataset(raw_dir, context="raw")
    chain = preprocess_transforms(config)
    digest = prep.digest(mlog.preprocessing(chain, name="preprocess"))
    image_chain = preprocess_transforms(config, keys=("image",))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:12]}"  # mkdir: umask applies
    tmp.mkdir()
    try:
        meta = _write_cases(raw.pairs, tmp, chain, image_chain)
        meta = _dataset_meta(raw, config, digest, meta)
        (tmp / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        _replace(out, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    mlog.dataset(out, context="preprocessed")
    mlflow.set_tags(
        {
            "mlpipe.dataset.raw.name": raw.name,
            "mlpipe.dataset.raw.version": raw.version,
            "mlpipe.dataset.raw.digest": raw.digest,
            "mlpipe.dataset.raw.uri": raw.source,
        }
    )
    mlflow.log_dict(raw.manifest(), RAW_MANIFEST_ARTIFACT)
    print(f"seg3d: preprocessed dataset {meta['version']} in {out}", file=sys.stderr, flush=True)
    return out


def preprocess_transforms(config: TrainConfig, keys: Sequence[str] = ("image", "label")) -> Compose:
    """The training base chain plus a crop to the body, taken from the image.

    The crop box comes from the image, not the label: a label-driven crop cannot be replayed
    at inference (there is no label) and would centre every training volume on the organ,
    a field of view the model never sees in service. For CT, windowed intensity above 0 is
    tissue above the window's low end (air and the table's surroundings fall below it); for
    MRI, the z-scoring leaves the background at exactly 0, so non-zero is the body.
    """
    from monai.transforms import Compose, CropForegroundd
    from monai.transforms.utils import is_positive

    from seg3d.transforms import base_transforms

    chain = base_transforms(config, keys=tuple(keys))
    chain.append(
        CropForegroundd(
            keys=list(keys),
            source_key="image",
            select_fn=is_positive if config.modality == "ct" else nonzero,
            margin=CROP_MARGIN,
            allow_smaller=True,  # keep the box inside the volume: crop, never pad
        )
    )
    return Compose(chain)


def nonzero(img: Any) -> Any:
    """``img != 0``: the MRI body mask (importable, so the logged chain can be rebuilt)."""
    return img != 0


# Writing ------------------------------------------------------------------------------------------


def _write_cases(pairs: Sequence[Pair], root: Path, chain: Compose, image_chain: Compose) -> dict:
    """Run the chain case by case (one volume in memory) and save; the MSD case lists."""
    for folder in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (root / folder).mkdir()
    training: list[dict] = []
    test: list[str] = []
    for done, pair in enumerate(pairs, start=1):
        suffix = "Ts" if pair.split == "test" else "Tr"
        name = pair.case.replace("/", "__") + ".nii.gz"
        item = {"image": str(pair.image)}
        if pair.label is not None:
            item["label"] = str(pair.label)
        result = (chain if pair.label is not None else image_chain)(item)
        _save(result["image"], root / f"images{suffix}" / name, label=False)
        if pair.label is not None:
            _save(result["label"], root / f"labels{suffix}" / name, label=True)
        del result
        if suffix == "Tr":
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        else:
            test.append(f"./imagesTs/{name}")
        if done % _PROGRESS_EVERY == 0 or done == len(pairs):
            print(f"seg3d: preprocessed {done}/{len(pairs)} cases", file=sys.stderr, flush=True)
    return {"training": training, "test": test}


def _save(volume: Any, path: Path, *, label: bool) -> None:
    """Save a channel-first MetaTensor with the affine the chain tracked (resampled, cropped)."""
    import nibabel as nib

    data = np.asarray(volume.detach().cpu().numpy())[0]
    affine = np.asarray(volume.affine.detach().cpu().numpy(), dtype=np.float64)
    if label:
        data = np.rint(data)
        data = data.astype(np.uint8 if data.min() >= 0 and data.max() < 256 else np.int16)
    else:
        data = data.astype(np.float32, copy=False)
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    nib.save(img, path)


def _dataset_meta(raw: DatasetInfo, config: TrainConfig, digest: str, cases: dict) -> dict:
    """``dataset.json``: the raw one's descriptive keys, a derived version, the provenance."""
    raw_meta = _read_meta(Path(raw.source) / "dataset.json")
    meta = {key: raw_meta[key] for key in _KEPT_META if key in raw_meta}
    meta.setdefault("modality", {"0": config.modality.upper()})
    return {
        "name": f"{raw.name}-preprocessed",
        "version": f"{raw.version}+pp.{digest[:8]}",
        **meta,
        "numTraining": len(cases["training"]),
        "numTest": len(cases["test"]),
        "training": cases["training"],
        "test": cases["test"],
        "preprocessing": {
            "by": "seg3d.preprocess",
            "digest": digest,
            "spacing": list(config.spacing),
            "modality": config.modality,
            "window": list(config.window),
            "raw": {"name": raw.name, "version": raw.version, "digest": raw.digest},
        },
    }


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


# The output folder -------------------------------------------------------------------------------


def _check_out_dir(out: Path, raw: Path) -> None:
    """Refuse an ``out_dir`` whose replacement would destroy data that is not ours."""
    out_real, raw_real = out.resolve(), raw.resolve()
    if out_real == raw_real or raw_real in out_real.parents or out_real in raw_real.parents:
        raise Seg3dInputError(
            f"out_dir: {out} overlaps the raw dataset {raw}; give a folder outside it"
        )
    if out.exists() and not out.is_dir():
        raise Seg3dInputError(f"out_dir: {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not _is_ours(out):
        raise Seg3dInputError(
            f"out_dir: {out} is not empty and holds no seg3d preprocessed dataset; give a new "
            "or empty folder (an earlier preprocess output is replaced)"
        )


def _is_ours(folder: Path) -> bool:
    preprocessing = _read_meta(folder / "dataset.json").get("preprocessing")
    return isinstance(preprocessing, dict) and preprocessing.get("by") == "seg3d.preprocess"


def _replace(out: Path, new: Path) -> None:
    """Move ``new`` to ``out``; an earlier output is moved aside first and then deleted."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:12]}"
        os.rename(out, old)
    os.rename(new, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
