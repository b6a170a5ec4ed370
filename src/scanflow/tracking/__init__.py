"""Tracking: the `Tracker` interface and its MLflow implementation (experiments per app/team,
parent/child runs, registry with aliases). The only package that talks to MLflow's client or
sets MLflow's global state."""

from scanflow.tracking.base import Tracker
from scanflow.tracking.mlflow_tracking import MlflowTracker, configure_mlflow, log_sklearn_model

__all__ = ["MlflowTracker", "Tracker", "configure_mlflow", "log_sklearn_model"]
