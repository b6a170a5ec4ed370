"""The engine interface: what the CLI, the control layer and agents may ask of any backend.

Shaped like Prefect's TaskRunner (submit, then wait): `submit` records a run, `execute` runs a
recorded run to completion, `run` does both. `local` implements it here; a `ray` backend will
implement the same contract, and `scanflow.control.backends.engine` picks one from settings.
Every backend records runs and steps in the store, which is what `status` and `logs` read.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from scanflow.spec.models import Application
from scanflow.store import Store

ProgressFn = Callable[[str, str], None]  # (step, status), called as steps change state


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
    """Runs workflows: records them, runs them to completion, stops, resumes and explains them."""

    store: Store  # where runs and step runs are recorded (callers read progress there)

    @abstractmethod
    def submit(
        self,
        app: Application,
        workflow: str,
        params: dict[str, Any] | None = None,
        trigger: dict[str, Any] | None = None,
        *,
        cache: bool = True,
        status: str = "queued",
    ) -> str:
        """Check and record a run (queued by default, for `serve`); its id. Nothing runs yet;
        bad params or resources are refused (ParamError) before anything is recorded."""

    @abstractmethod
    def execute(self, run_id: str, app: Application | None = None,
                progress: ProgressFn | None = None) -> RunResult:
        """Run a submitted run to completion (wait for it) and return its result."""

    @abstractmethod
    def resume(self, run_id: str, app: Application | None = None,
               progress: ProgressFn | None = None) -> RunResult:
        """Re-run only the failed, cancelled, interrupted or never-started steps of a run."""

    @abstractmethod
    def cancel(self, run_id: str) -> str:
        """Ask a run to stop; `cancelled` when it had not started, else `cancelling`."""

    @abstractmethod
    def recover(self) -> list[str]:
        """Mark runs whose engine died as `interrupted` (they can be resumed); their ids."""

    @abstractmethod
    def serve(self, stop: Callable[[], bool], max_runs: int = 2, poll: float = 0.5) -> None:
        """Run queued runs until `stop()` returns true (the loop of `scanflow engine serve`)."""

    @abstractmethod
    def status(self, run_id: str) -> RunResult:
        """Where a run is now (its status and each step's), without waiting."""

    @abstractmethod
    def logs(self, run_id: str, step: str | None = None, *, follow: bool = False,
             poll: float = 0.3) -> Iterator[tuple[str, str]]:
        """A run's step logs as (step, text) pieces: everything written so far, or with
        `follow` new text as it is written until the run ends."""

    def run(
        self,
        app: Application,
        workflow: str,
        params: dict[str, Any] | None = None,
        trigger: dict[str, Any] | None = None,
        progress: ProgressFn | None = None,
        cache: bool = True,
    ) -> RunResult:
        """Run a workflow to completion and record it in the store and the tracker."""
        run_id = self.submit(app, workflow, params, trigger, cache=cache, status="running")
        return self.execute(run_id, progress=progress)
