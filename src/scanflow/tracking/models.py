"""Loading registered model versions, in one place (agents score versions they do not serve)."""

from __future__ import annotations

import importlib
from typing import Any

from scanflow.settings import Settings


def load_version(settings: Settings, model: str, version: str, flavour: str = "pyfunc") -> Any:
    """`models:/<model>/<version>` loaded with an MLflow flavour (`pyfunc`, `sklearn`...)."""
    import mlflow

    mlflow.set_tracking_uri(settings.tracking)
    if settings.registry_uri:
        mlflow.set_registry_uri(settings.registry_uri)
    return importlib.import_module(f"mlflow.{flavour}").load_model(f"models:/{model}/{version}")


__all__ = ["load_version"]
