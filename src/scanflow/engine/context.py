"""What an in-process step receives: its paths, its MLflow run (created on first use), a log."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from scanflow.tracking import Tracker


@dataclass
class StepContext:
    run_id: str
    step: str
    experiment_id: str
    tracker: Tracker
    params: dict[str, Any]
    inputs: dict[str, Path]
    outputs: dict[str, Path]
    log_path: Path
    make_mlflow_run: Callable[[], str]
    attempt: int = 1
    extra: dict[str, Any] = field(default_factory=dict)
    _mlflow_run_id: str | None = None
    _log_file: TextIO | None = None

    @property
    def log_file(self) -> TextIO:
        """The step's log, opened on first use (most tiny steps never write one)."""
        if self._log_file is None:
            self._log_file = open(self.log_path, "a")  # noqa: SIM115 - closed by close()
        return self._log_file

    def close(self) -> None:
        if self._log_file is not None:
            self._log_file.close()

    @property
    def mlflow_run_id(self) -> str:
        """The step's MLflow child run; created lazily so that steps that log nothing cost
        nothing in MLflow (their lineage is still recorded on the parent run)."""
        if self._mlflow_run_id is None:
            self._mlflow_run_id = self.make_mlflow_run()
        return self._mlflow_run_id

    def log(self, *parts: object) -> None:
        print(*parts, file=self.log_file, flush=True)

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        self.tracker.log_metrics(self.mlflow_run_id, metrics, step)

    def mlflow_run(self) -> AbstractContextManager[Any]:
        """`with ctx.mlflow_run():` makes this step's MLflow run the active one (fluent API)."""
        return self.tracker.active_run(self.mlflow_run_id)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.tracker.log_artifact(self.mlflow_run_id, path, artifact_path)
