"""The shared test isolation itself: a leak here sends one test's models to another's store."""

from __future__ import annotations

import os

from tests.conftest import isolated_env


def test_isolated_env_removes_uris_that_mlflow_exported_inside_it(tmp_path):
    """mlflow.set_registry_uri exports MLFLOW_REGISTRY_URI; the leak sent models to old stores."""
    import mlflow

    with isolated_env(tmp_path):
        mlflow.set_registry_uri(f"sqlite:///{tmp_path / 'r.db'}")
        mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 't.db'}")
        assert os.environ["MLFLOW_REGISTRY_URI"].endswith("r.db")
    assert "MLFLOW_REGISTRY_URI" not in os.environ
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert mlflow.get_registry_uri() != f"sqlite:///{tmp_path / 'r.db'}"
