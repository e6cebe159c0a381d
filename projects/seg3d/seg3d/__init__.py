"""seg3d: 3D segmentation of CT/MRI NIfTI volumes with MONAI, tracked with mlpipe.log."""

__version__ = "0.1.0"
