"""What an in-process step receives: its paths, its MLflow run, and a log of its own."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from scanflow.tracking import Tracker


@dataclass
class StepContext:
    run_id: str
    step: str
    mlflow_run_id: str
    experiment_id: str
    tracker: Tracker
    params: dict[str, Any]
    inputs: dict[str, Path]
    outputs: dict[str, Path]
    log_file: TextIO
    extra: dict[str, Any] = field(default_factory=dict)

    def log(self, *parts: object) -> None:
        print(*parts, file=self.log_file, flush=True)

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        self.tracker.log_metrics(self.mlflow_run_id, metrics, step)

    def mlflow_run(self) -> Any:
        """`with ctx.mlflow_run():` makes this step's MLflow run the active one (fluent API)."""
        import mlflow

        return mlflow.start_run(run_id=self.mlflow_run_id)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.tracker.client.log_artifact(self.mlflow_run_id, str(path), artifact_path)
