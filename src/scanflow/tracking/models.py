"""Loading registered model versions, in one place (agents score versions they do not serve)."""

from __future__ import annotations

import importlib
from typing import Any

from scanflow.settings import Settings
from scanflow.tracking.mlflow_tracking import configure_mlflow


def load_version(settings: Settings, model: str, version: str, flavour: str = "pyfunc") -> Any:
    """`models:/<model>/<version>` loaded with an MLflow flavour (`pyfunc`, `sklearn`...)."""
    configure_mlflow(settings.tracking, settings.registry_uri)
    return importlib.import_module(f"mlflow.{flavour}").load_model(f"models:/{model}/{version}")


__all__ = ["load_version"]
