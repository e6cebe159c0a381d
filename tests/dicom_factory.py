"""Real DICOM series written with pydicom from a volume and its NIfTI affine, for the tests.

``write_series(data, affine, folder)`` writes one CT or MR Image Storage file per slice
(explicit VR little endian), with the geometry a scanner would write: ImagePositionPatient and
ImageOrientationPatient in LPS from the RAS affine, PixelSpacing, and for CT a rescale
intercept (stored values = HU + 1024). Options shuffle and rename the files, give
InstanceNumber in the opposite order to position, drop a slice, plant patient identifiers.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

PLANTED = {
    "PatientName": "Zyxwvut^Qorbelline",
    "PatientID": "PID-739184620",
    "PatientBirthDate": "19410923",
    "AccessionNumber": "ACC88127364",
    "InstitutionName": "Saint Vorbolden Infirmary",
    "ReferringPhysicianName": "Plonkett^Ermintrude",
    "OperatorsName": "Quibblestone^Arvid",
    "StudyID": "STU55120943",
    "InstitutionAddress": "17 Glimmerwick Lane",
}
"""Identifiers nothing real contains, so that finding one anywhere is a leak."""

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def oblique_affine(spacing=(0.8, 0.9, 2.5), degrees: float = 20.0, origin=(-40.0, 25.0, 10.0)):
    """A right-handed RAS affine rotated about x and z (a tilted acquisition)."""
    a, b = np.radians(degrees), np.radians(degrees / 2)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def write_series(
    data: np.ndarray,
    affine: np.ndarray,
    folder: Path,
    *,
    modality: str = "CT",
    intercept: float = -1024.0,
    slope: float = 1.0,
    identifiers: dict[str, str] | None = None,
    series_uid: str | None = None,
    study_uid: str | None = None,
    frame_uid: str | None = None,
    shuffle: bool = False,
    rename: bool = False,
    drop: int | None = None,
    reverse_instance_numbers: bool = False,
    transfer_syntax: str = ExplicitVRLittleEndian,
    seed: int = 0,
) -> list[Path]:
    """Write ``data`` (x, y, z) as a series of ``data.shape[2]`` files; return their paths.

    The stored value is ``(value - intercept) / slope`` as int16 (CT: HU + 1024); MR uses
    ``intercept=0``. ``affine`` must be right-handed (its third axis along row x column).
    """
    folder.mkdir(parents=True, exist_ok=True)
    lps = LPS @ np.asarray(affine, dtype=float)
    row_dir = lps[:3, 0] / np.linalg.norm(lps[:3, 0])
    col_dir = lps[:3, 1] / np.linalg.norm(lps[:3, 1])
    if np.dot(np.cross(row_dir, col_dir), lps[:3, 2]) <= 0:
        raise ValueError("write_series needs a right-handed affine")
    spacing = [float(np.linalg.norm(lps[:3, 1])), float(np.linalg.norm(lps[:3, 0]))]
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    frame_uid = frame_uid or generate_uid()
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    count = data.shape[2]
    order = list(range(count))
    rng = random.Random(seed)
    if shuffle:
        rng.shuffle(order)
    paths = []
    for written, k in enumerate(order):
        if drop is not None and k == drop:
            continue
        stored = np.rint((data[:, :, k].T - intercept) / slope).astype(np.int16)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = transfer_syntax
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        name = f"IMG{rng.randrange(10**6):06d}_{written}" if rename else f"slice_{k:04d}.dcm"
        path = folder / name
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.Modality = modality
        ds.Manufacturer = "mlpipe-tests"
        ds.PatientName = ""
        ds.PatientID = ""
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.StudyDate = "20250101"
        ds.StudyTime = "120000"
        ds.AccessionNumber = ""
        ds.ReferringPhysicianName = ""
        ds.StudyID = "1"
        ds.SeriesNumber = 3
        ds.InstanceNumber = (count - k) if reverse_instance_numbers else (k + 1)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        for key, value in (identifiers or {}).items():
            setattr(ds, key, value)
        ds.ImagePositionPatient = [f"{v:.6f}" for v in (lps @ [0, 0, k, 1])[:3]]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [f"{v:.6f}" for v in spacing]
        ds.SliceThickness = f"{float(np.linalg.norm(lps[:3, 2])):.6f}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = stored.shape
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = f"{intercept:g}"
        ds.RescaleSlope = f"{slope:g}"
        if modality == "CT":
            ds.RescaleType = "HU"
            ds.KVP = "120"
        ds.PixelData = stored.tobytes()
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def ct_volume(shape=(24, 20, 10), seed: int = 0) -> np.ndarray:
    """HU-like float32 volume: air around a body of ~40 HU with a bright box, integer valued."""
    rng = np.random.default_rng(seed)
    data = np.full(shape, -1000.0, dtype=np.float32)
    x, y, z = shape
    data[2 : x - 2, 2 : y - 2, :] = 40 + np.rint(rng.normal(0, 10, (x - 4, y - 4, z)))
    data[x // 4 : x // 2, y // 4 : y // 2, z // 4 : z // 2 + 1] = 300
    return data


def read_dataset(path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(path)


def write_dicom_dataset(
    root: Path,
    cases: int = 3,
    *,
    shape=(24, 20, 10),
    affine=None,
    identifiers: dict[str, str] | None = None,
) -> Path:
    """A Decathlon-layout dataset whose images are DICOM series folders (``imagesTr/<case>/``)
    and whose labels are NIfTI on the same grid (``labelsTr/<case>.nii.gz``)."""
    import json

    import nibabel as nib

    affine = np.diag([1.5, 1.5, 3.0, 1.0]) if affine is None else affine
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    for i in range(cases):
        data = ct_volume(shape, seed=i)
        write_series(data, affine, root / "imagesTr" / f"case_{i}", identifiers=identifiers)
        label = (data > 200).astype(np.uint8)
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / f"case_{i}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({"name": "dicom-toy", "version": "v1"}))
    return root


def zip_folder(folder: Path, archive: Path) -> Path:
    """``folder``'s files in a zip under ``series/`` (as a user zips an export)."""
    import zipfile

    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.iterdir()):
            zf.write(path, f"series/{path.name}")
    return archive
