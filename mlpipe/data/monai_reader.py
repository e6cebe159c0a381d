"""A MONAI ``ImageReader`` over ``mlpipe.data.dicom``, so a MONAI chain (``LoadImaged``) reads
a DICOM series folder exactly as mlpipe does: slices along the normal, the RAS affine, HU.

MONAI's own choice for a folder (``PydicomReader``, or ``ITKReader`` when ITK is installed)
orders slices by InstanceNumber and takes the first series of a folder; a label drawn on the
NIfTI of the same data would then not lie on the image. Pass an instance, or the dotted name
MONAI resolves itself (so a chain described as JSON stays JSON)::

    LoadImaged(keys=["image", "label"], reader="mlpipe.data.monai_reader.DicomSeriesReader")

The reader claims only series (a folder of DICOM files, a ``.zip`` of one, a ``.dcm``);
``LoadImage`` falls back to its default readers for everything else (NIfTI labels included).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from monai.data.image_reader import ImageReader
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple

from mlpipe.data.volumes import is_series, load_volume


class DicomSeriesReader(ImageReader):
    """Reads one DICOM series per file name with ``mlpipe.data.volumes.load_volume``.

    Args:
        dtype: the array's dtype [default float32: HU for CT].
    """

    def __init__(self, dtype: Any = np.float32, **kwargs: Any) -> None:
        super().__init__()
        self.dtype = dtype
        self.kwargs = kwargs

    def verify_suffix(self, filename: Sequence[os.PathLike | str] | os.PathLike | str) -> bool:
        names = ensure_tuple(filename)
        return len(names) == 1 and is_series(names[0])

    def read(self, data: Sequence[os.PathLike | str] | os.PathLike | str, **kwargs: Any) -> Any:
        (name,) = ensure_tuple(data)
        if not is_series(name):
            # LoadImage tries a reader named by the user on every file, without asking
            # verify_suffix first; raising hands a NIfTI (4D channels included) to MONAI's own
            # readers, as the class docstring promises.
            raise ValueError(f"{name} is not a DICOM series; MONAI's own readers take it.")
        return os.fspath(name)  # nothing is read until get_data: one volume in memory

    def get_data(self, img: Any) -> tuple[np.ndarray, dict]:
        array, header = load_volume(img, dtype=self.dtype)
        affine = np.asarray(header.affine, dtype=np.float64)
        meta = {
            MetaKeys.AFFINE: affine,
            MetaKeys.ORIGINAL_AFFINE: affine.copy(),
            MetaKeys.SPATIAL_SHAPE: np.asarray(header.spatial_shape),
            MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan"),
            MetaKeys.SPACE: SpaceKeys.RAS,
            "filename_or_obj": img,
        }
        return np.ascontiguousarray(array), meta
