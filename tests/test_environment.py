from __future__ import annotations

import platform
from importlib import metadata

import pytest

from mlpipe.core.environment import environment_tags


def test_environment_tags_names_versions():
    tags = environment_tags()
    assert tags["mlpipe.env.python"] == platform.python_version()
    assert tags["mlpipe.env.mlflow"] == metadata.version("mlflow")
    assert tags["mlpipe.env.torch"] == metadata.version("torch")
    assert tags["mlpipe.env.monai"] == metadata.version("monai")


def test_environment_tags_without_gpu_say_none():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    tags = environment_tags()
    assert tags["mlpipe.env.cuda"] == "none"
    assert tags["mlpipe.env.gpu"] == "none"


def test_environment_tags_with_gpu_name_it(monkeypatch):
    """No GPU here: torch.cuda is told it has two devices, to check how they are named."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    tags = environment_tags()
    assert tags["mlpipe.env.gpu"] == "NVIDIA H100 80GB HBM3 x2"
    assert tags["mlpipe.env.cuda"] == "12.8"
