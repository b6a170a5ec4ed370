"""Running workflows: DAG scheduling, parallel steps, failure propagation, tracking.

Callers type against `Engine`; `scanflow.control.backends.engine` builds the implementation
that settings choose (`LocalEngine` is exported for tests and embedding)."""

from scanflow.engine.backend import Engine, ProgressFn, RunResult
from scanflow.engine.context import StepContext
from scanflow.engine.local import LocalEngine
from scanflow.engine.params import ParamError, resolve_params

__all__ = ["Engine", "LocalEngine", "ParamError", "ProgressFn", "RunResult", "StepContext",
           "resolve_params"]
