"""The MLflow adapter: experiments per app/team, parent/child runs, registry with aliases."""

from scanflow.tracking.mlflow_tracking import Tracker, log_sklearn_model

__all__ = ["Tracker", "log_sklearn_model"]
