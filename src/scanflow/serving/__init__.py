"""Model serving: the model server app, and deployers that run it (local gunicorn; Ray later).

The names below load on first use: a process that needs one module of the package (the
prediction-log collector process of a worker) does not import FastAPI and the deployer."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scanflow.serving.app import create_app
    from scanflow.serving.backend import Deployer, UnknownService
    from scanflow.serving.deployer import LocalDeployer

__all__ = ["Deployer", "LocalDeployer", "UnknownService", "create_app"]
_WHERE = {"create_app": "app", "Deployer": "backend", "UnknownService": "backend",
          "LocalDeployer": "deployer"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"scanflow.serving.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'scanflow.serving' has no attribute {name!r}")
