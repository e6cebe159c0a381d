"""The trained network as an MLflow pyfunc: NIfTI in, a mask in the input's own space out.

Why a pyfunc and not ``mlflow.pytorch.log_model``: MLflow 3 logs PyTorch models as ``pt2``
(``torch.export``) by default, which fixes the input shape to the example's, and a CT can have
any size. So the model stores three plain artifacts and rebuilds everything at load time:

* ``config``: the :class:`~seg3d.config.TrainConfig` as JSON; :func:`~seg3d.networks.
  build_network` rebuilds the same network from it,
* ``weights``: the state dict, loaded with ``torch.load(..., weights_only=True)`` (no pickled
  code runs when a service loads a model),
* ``preprocessing``: ``mlpipe.preprocessing.describe(infer_transforms(config))``, rebuilt with
  ``mlpipe.preprocessing.rebuild``: the exact MONAI chain, so the service preprocesses as
  training did even if this package's defaults change later.

A service calls it like any pyfunc::

    model = mlflow.pyfunc.load_model("models:/seg3d/1")
    out = model.predict(pd.DataFrame({"path": ["/data/ct_001.nii.gz"]}))
    mask = decode_nifti(out.loc[0, "mask"])      # uint8, same shape and affine as the input
    out.loc[0, "volume_ml_1"]                    # class 1's volume in mL

Input rows give either ``path`` (a NIfTI file the service can read) or ``nifti`` (base64 of a
``.nii.gz`` or ``.nii`` file, for callers over HTTP). Each volume goes through the inference
chain (RAS, training spacing, intensity), sliding-window inference, argmax, and then the
inverse of the chain's spatial steps (``Invertd``, nearest neighbour), so the mask lines up
voxel for voxel with the file the caller sent, whatever its orientation and spacing.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import json
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

if TYPE_CHECKING:
    import nibabel as nib
    import torch
    from mlflow.models.model import ModelInfo
    from mlflow.models.signature import ModelSignature

    from seg3d.config import TrainConfig

INPUT_COLUMNS = ("path", "nifti")
"""A row gives one of these; ``path`` wins when both are set."""

OVERLAP = 0.25
SW_BATCH_SIZE = 4
EXAMPLE_MAX_SHAPE = 32
"""The input example is cropped to at most this many voxels per axis: MLflow runs a prediction
on it while logging (to check it can be served), and it is stored with every model version."""

MODEL_CODE = """\
\"\"\"The seg3d pyfunc, as "models from code": MLflow runs this file instead of unpickling.\"\"\"
import mlflow

from seg3d.pyfunc import Seg3dModel

mlflow.models.set_model(Seg3dModel())
"""
"""Logged as the model's code (MLflow's models-from-code): loading a version then unpickles
nothing at all, where ``python_model=Seg3dModel()`` would store a cloudpickle of the object."""

REQUIREMENTS = ("mlflow", "torch", "monai", "nibabel", "pandas")
_GZIP_MAGIC = b"\x1f\x8b"


class UnreadableVolumeError(ValueError):
    """A volume file whose header reads but whose voxel data does not (truncated, corrupt)."""


class Seg3dModel(mlflow.pyfunc.PythonModel):
    """Segments NIfTI volumes of any size and orientation; see the module docstring."""

    def load_context(self, context: Any) -> None:
        """Rebuild network, weights and inference chain from the model's artifacts.

        Nothing is unpickled: the network is built from the config and the weights are a
        state dict read with ``weights_only=True``.
        """
        import torch

        from mlpipe.data.preprocessing import rebuild
        from seg3d.config import TrainConfig
        from seg3d.networks import build_network

        artifacts = context.artifacts
        self.config = TrainConfig.from_dict(json.loads(Path(artifacts["config"]).read_text()))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        network = build_network(self.config)
        state = torch.load(artifacts["weights"], map_location=self.device, weights_only=True)
        network.load_state_dict(state)
        self.network = network.to(self.device).eval()
        self.transform = rebuild(json.loads(Path(artifacts["preprocessing"]).read_text()))

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict | None = None
    ) -> pd.DataFrame:
        """Segment each row's volume.

        Args:
            context: MLflow's model context (unused; everything was loaded in ``load_context``).
            model_input: rows with a ``path`` (NIfTI file) or ``nifti`` (base64 NIfTI) column.
            params: unused.

        Returns:
            One row per input row: ``mask`` (base64 ``.nii.gz``, uint8, the input's shape and
            affine), ``volume_ml_<c>`` for each foreground class, ``shape`` (``"50x61x37"``).

        Raises:
            MlflowException: (INVALID_PARAMETER_VALUE, HTTP 400 when served) neither column, a
                row with neither value, or a file that is missing or not a 3D NIfTI volume;
                the message names the row and the column.
        """
        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        present = [c for c in INPUT_COLUMNS if c in model_input.columns]
        if not present:
            raise _input_error(
                "the input has neither a 'path' column (a NIfTI file path) nor a 'nifti' column "
                f"(base64 of a .nii.gz file); got {list(model_input.columns) or 'no such column'}"
            )
        rows = []
        for position, (index, row) in enumerate(model_input.iterrows()):
            where = f"row {index}" if index == position else f"row {position} (index {index})"
            rows.append(self._predict_row(row, present, where))
        return pd.DataFrame(rows, columns=output_columns(self.config.num_classes))

    def _predict_row(self, row: pd.Series, present: list[str], where: str) -> dict:
        with tempfile.TemporaryDirectory(prefix="seg3d-") as tmp:
            path, column = _row_volume(row, present, where, Path(tmp))
            original = _read_header(path, where, column, self.config.in_channels)
            try:
                mask = self.segment(path)
            except UnreadableVolumeError as exc:
                shown = path if column == "path" else "the decoded file"
                raise _input_error(
                    f"{where}, column {column!r}: {shown} is not a readable NIfTI volume ({exc})"
                ) from None
        if mask.shape != original.shape[:3]:  # the inverse should make this impossible
            raise RuntimeError(
                f"{where}: mask shape {mask.shape} differs from input shape {original.shape}"
            )
        voxel_ml = abs(float(np.linalg.det(original.affine[:3, :3]))) / 1000.0
        counts = np.bincount(mask.ravel(), minlength=self.config.num_classes)
        out = {"mask": encode_nifti(_mask_image(mask, original))}
        for c in range(1, self.config.num_classes):
            out[f"volume_ml_{c}"] = float(counts[c]) * voxel_ml
        out["shape"] = "x".join(str(n) for n in mask.shape)
        return out

    def segment(self, path: str | Path) -> np.ndarray:
        """One volume file -> its label mask (uint8) in the file's own voxel grid.

        Raises:
            UnreadableVolumeError: the chain's first step (``LoadImaged``) cannot read the
                file, e.g. a header that is fine followed by truncated voxel data.
        """
        import torch
        from monai.data import MetaTensor
        from monai.inferers import sliding_window_inference
        from monai.transforms import Invertd

        # Loading runs on its own so that a bad file is told apart from a failure further on,
        # which is a bug and keeps its traceback.
        try:
            data = self.transform({"image": str(path)}, end=1)
        except Exception as exc:
            raise UnreadableVolumeError(str(exc.__cause__ or exc)) from exc
        data = self.transform(data, start=1)
        image = data["image"]
        batch = image.as_tensor().unsqueeze(0).to(self.device)
        amp = self.device.type == "cuda"
        with torch.no_grad(), torch.autocast(device_type=self.device.type, enabled=amp):
            logits = sliding_window_inference(
                batch,
                roi_size=tuple(self.config.patch_size),
                sw_batch_size=SW_BATCH_SIZE,
                predictor=self.network,
                overlap=OVERLAP,
            )
        labels = logits.argmax(dim=1).to(torch.float32).cpu()
        # Invertd replays the image's applied operations (Orientation, Spacing) backwards; it
        # needs them on the prediction, and nearest_interp keeps labels whole on the way back.
        data["pred"] = MetaTensor(
            labels, meta=image.meta, applied_operations=image.applied_operations
        )
        inverse = Invertd(
            keys="pred", transform=self.transform, orig_keys="image", nearest_interp=True
        )
        restored = inverse(data)["pred"]
        return np.rint(np.asarray(restored[0])).astype(np.uint8)


def output_columns(num_classes: int) -> list[str]:
    """The prediction's columns, in order."""
    return ["mask", *(f"volume_ml_{c}" for c in range(1, num_classes)), "shape"]


def signature(num_classes: int) -> ModelSignature:
    """Input: optional string columns ``path``/``nifti``; output: mask, volumes, shape.

    Both input columns are optional (``required=False``) so a caller sends only the one it has;
    ``predict`` refuses a row that has neither.
    """
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    inputs = Schema([ColSpec("string", name, required=False) for name in INPUT_COLUMNS])
    outputs = Schema(
        [
            ColSpec("string", "mask"),
            *(ColSpec("double", f"volume_ml_{c}") for c in range(1, num_classes)),
            ColSpec("string", "shape"),
        ]
    )
    return ModelSignature(inputs=inputs, outputs=outputs)


def log_model(
    network: torch.nn.Module,
    config: TrainConfig,
    *,
    name: str = "model",
    registered_model_name: str | None = None,
    example_path: str | Path | None = None,
) -> ModelInfo:
    """Log the network as a :class:`Seg3dModel` pyfunc in the active run (started if none).

    Args:
        network: the trained network; a ``DistributedDataParallel``/``DataParallel`` wrapper or
            a ``torch.compile`` module is unwrapped so the state dict keys fit ``build_network``.
        config: the training config; the network is rebuilt from it at load time.
        name: the model's name in the run.
        registered_model_name: also register it as a new version of this model.
        example_path: a NIfTI volume to store as the input example (centre-cropped to at most
            ``EXAMPLE_MAX_SHAPE`` voxels per axis, keeping its affine). MLflow runs a
            prediction on it while logging, to check that it can be served.

    Returns:
        MLflow's ``ModelInfo`` (``model_uri``, ``registered_model_version``, ...).
    """
    import mlflow.pyfunc

    example = None
    if example_path is not None:
        example = pd.DataFrame({"nifti": [encode_nifti(_small_example(example_path))]})
    with tempfile.TemporaryDirectory(prefix="seg3d-model-") as tmp:
        artifacts = write_artifacts(network, config, Path(tmp) / "artifacts")
        code = _code_paths(Path(tmp) / "code")
        model_code = Path(tmp) / "seg3d_model.py"
        model_code.write_text(MODEL_CODE)
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(model_code),
            artifacts=artifacts,
            code_paths=code,
            signature=signature(config.num_classes),
            input_example=example,
            pip_requirements=pinned_requirements(),
            registered_model_name=registered_model_name,
        )


def write_artifacts(network: torch.nn.Module, config: TrainConfig, folder: Path) -> dict[str, str]:
    """Write the state dict, config and preprocessing JSON; return ``{artifact: path}``.

    The state dict is moved to the CPU so that a CPU-only service loads it as it is.
    """
    import torch

    from mlpipe.data.preprocessing import describe, to_json
    from seg3d.transforms import infer_transforms

    folder.mkdir(parents=True, exist_ok=True)
    module = _unwrap(network)
    state = {key: value.detach().cpu() for key, value in module.state_dict().items()}
    paths = {
        "config": folder / "config.json",
        "weights": folder / "weights.pt",
        "preprocessing": folder / "preprocessing.json",
    }
    torch.save(state, paths["weights"])
    paths["config"].write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True))
    paths["preprocessing"].write_text(to_json(describe(infer_transforms(config))))
    return {key: str(path) for key, path in paths.items()}


def pinned_requirements() -> list[str]:
    """``name==version`` of what the model needs at serving time, as installed here.

    The local version label is dropped (``torch==2.13.0``, not ``2.13.0+cpu``): a GPU service
    installs its own CUDA build, and ``+cpu`` exists only on PyTorch's own index.
    """
    return [f"{pkg}=={metadata.version(pkg).split('+')[0]}" for pkg in REQUIREMENTS]


def encode_nifti(path_or_image: str | Path | nib.Nifti1Image) -> str:
    """A NIfTI file or image as base64 text of ``.nii.gz`` bytes (what ``nifti``/``mask`` hold).

    A ``.nii.gz`` file is sent as it is; a ``.nii`` file or an in-memory image is gzipped
    (masks shrink about a hundredfold).
    """
    if isinstance(path_or_image, (str, Path)):
        raw = Path(path_or_image).read_bytes()
        if not raw.startswith(_GZIP_MAGIC):
            raw = gzip.compress(raw, compresslevel=6)
    else:
        raw = gzip.compress(path_or_image.to_bytes(), compresslevel=6)
    return base64.b64encode(raw).decode("ascii")


def decode_nifti(text: str) -> nib.Nifti1Image:
    """Base64 of ``.nii.gz`` or ``.nii`` bytes -> an in-memory NIfTI image.

    Raises:
        ValueError: the text is not base64, or the bytes are not a single-file NIfTI.
    """
    import nibabel as nib

    raw = _base64_bytes(text)
    try:
        if raw.startswith(_GZIP_MAGIC):
            raw = gzip.decompress(raw)
        return nib.Nifti1Image.from_bytes(raw)
    except Exception as exc:  # gzip, EOF and several nibabel header errors
        raise ValueError(f"not a NIfTI-1 volume: {exc}") from exc


# internals -------------------------------------------------------------------------------------
def _input_error(message: str) -> Exception:
    """An MlflowException the scoring server answers with HTTP 400 and this message."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _text(value: Any) -> str | None:
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def _row_volume(row: pd.Series, present: list[str], where: str, tmp: Path) -> tuple[Path, str]:
    """The row's volume as a file path (a ``nifti`` value is written into ``tmp``)."""
    path = _text(row["path"]) if "path" in present else None
    if path is not None:
        if not Path(path).is_file():
            raise _input_error(f"{where}, column 'path': {path} is not a file")
        return Path(path), "path"
    text = _text(row["nifti"]) if "nifti" in present else None
    if text is None:
        raise _input_error(
            f"{where}: neither 'path' nor 'nifti' holds a value; give a NIfTI file path or "
            "base64 of a .nii.gz file"
        )
    try:
        raw = _base64_bytes(text)
    except ValueError as exc:
        raise _input_error(f"{where}, column 'nifti': {exc}") from None
    # LoadImaged reads files; the suffix tells it (and nibabel) whether to gunzip.
    target = tmp / ("input.nii.gz" if raw.startswith(_GZIP_MAGIC) else "input.nii")
    target.write_bytes(raw)
    return target, "nifti"


def _base64_bytes(text: str) -> bytes:
    """The bytes behind a ``nifti`` value, still gzipped if they were sent gzipped."""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64 text (expected base64 of a .nii.gz or .nii file)") from None


def _read_header(path: Path, where: str, column: str, channels: int = 1) -> nib.Nifti1Image:
    """The input's own geometry (shape, affine), read before any preprocessing.

    A model trained on ``channels`` > 1 takes 4D images with that many channels last.
    """
    import nibabel as nib

    try:
        image = nib.load(str(path))
        shape = image.shape
    except Exception as exc:  # ImageFileError, gzip/EOF errors, bad headers
        shown = path if column == "path" else "the decoded file"
        raise _input_error(
            f"{where}, column {column!r}: {shown} is not a readable NIfTI volume ({exc})"
        ) from None
    if channels > 1 and (len(shape) != 4 or shape[3] != channels):
        raise _input_error(
            f"{where}, column {column!r}: this model takes 4D volumes with {channels} channels "
            f"last, got shape {tuple(shape)}"
        )
    if channels == 1 and len(shape) != 3:
        raise _input_error(
            f"{where}, column {column!r}: expected a 3D volume, got shape {tuple(shape)}"
        )
    return image


def _mask_image(mask: np.ndarray, original: nib.Nifti1Image) -> nib.Nifti1Image:
    """The mask as uint8 NIfTI with the input's affine and its sform/qform codes."""
    import nibabel as nib

    image = nib.Nifti1Image(mask.astype(np.uint8), original.affine)
    header = getattr(original, "header", None)
    if isinstance(header, nib.Nifti1Header):
        sform_code = int(header["sform_code"])
        qform_code = int(header["qform_code"])
        image.set_sform(original.affine, code=sform_code or 1)
        image.set_qform(original.affine, code=qform_code or 1)
        image.header.set_xyzt_units(*header.get_xyzt_units())
    image.set_data_dtype(np.uint8)
    return image


def _small_example(path: str | Path) -> nib.Nifti1Image:
    """A centre crop of at most ``EXAMPLE_MAX_SHAPE`` per axis; ``slicer`` fixes the affine."""
    import nibabel as nib

    image = nib.load(str(path))
    slices = []
    for size in image.shape[:3]:
        keep = min(size, EXAMPLE_MAX_SHAPE)
        start = (size - keep) // 2
        slices.append(slice(start, start + keep))
    cropped = image.slicer[tuple(slices)]
    return nib.Nifti1Image(np.asanyarray(cropped.dataobj), cropped.affine, cropped.header)


def _unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """DDP/DataParallel keep the network in ``.module``, ``torch.compile`` in ``._orig_mod``."""
    for _ in range(4):  # e.g. DDP around a compiled module
        inner = getattr(network, "module", None)
        if inner is None:
            inner = getattr(network, "_orig_mod", None)
        if inner is None:
            break
        network = inner
    return network


def _code_paths(folder: Path) -> list[str]:
    """Copies of the ``seg3d`` and ``mlpipe`` packages, without caches, for the model's code/.

    ``mlpipe`` goes along because ``load_context`` rebuilds the chain with
    ``mlpipe.preprocessing`` and a service environment installs only the pinned requirements.
    """
    import mlpipe

    packages = [Path(__file__).resolve().parent, Path(mlpipe.__file__).resolve().parent]
    copies = []
    for package in packages:
        target = folder / package.name
        shutil.copytree(package, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        copies.append(str(target))
    return copies
