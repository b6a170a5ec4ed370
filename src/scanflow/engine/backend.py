"""The engine interface; `local` runs here, a `ray` backend implements the same contract."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from scanflow.spec.models import Application


@dataclass
class RunResult:
    run_id: str
    status: str
    mlflow_run_id: str | None
    steps: dict[str, str] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "succeeded"


class Engine(ABC):
    @abstractmethod
    def run(
        self,
        app: Application,
        workflow: str,
        params: dict[str, Any] | None = None,
        trigger: dict[str, Any] | None = None,
    ) -> RunResult:
        """Run a workflow to completion and record it in the store and in MLflow."""
