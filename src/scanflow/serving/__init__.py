"""Model serving: the model server app, and deployers that run it (local gunicorn; Ray later)."""

from scanflow.serving.app import create_app
from scanflow.serving.backend import Deployer, UnknownService
from scanflow.serving.deployer import LocalDeployer

__all__ = ["Deployer", "LocalDeployer", "UnknownService", "create_app"]
