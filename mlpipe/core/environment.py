"""The ``mlpipe.env.*`` tags: which library versions and which GPU a run used.

"The model ran on my machine but not in the service" is usually a version difference; these
tags make it visible in the runs table. torch is imported only when it is installed, since
CUDA facts need it.
"""

from __future__ import annotations

import platform
from importlib import metadata


def environment_tags() -> dict[str, str]:
    """python, torch, monai, mlflow versions; CUDA version and GPU name and count, or none."""
    tags = {
        "mlpipe.env.python": platform.python_version(),
        "mlpipe.env.torch": _version("torch"),
        "mlpipe.env.monai": _version("monai"),
        "mlpipe.env.mlflow": _version("mlflow"),
        "mlpipe.env.cuda": "none",
        "mlpipe.env.gpu": "none",
    }
    if tags["mlpipe.env.torch"] == "absent":
        return tags
    import torch

    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        names = sorted({torch.cuda.get_device_name(i) for i in range(count)})
        tags["mlpipe.env.cuda"] = str(torch.version.cuda or "unknown")
        tags["mlpipe.env.gpu"] = f"{' + '.join(names)} x{count}"
    return tags


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"
