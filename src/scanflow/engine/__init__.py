"""Running workflows: DAG scheduling, parallel steps, failure propagation, tracking."""

from scanflow.engine.backend import Engine, RunResult
from scanflow.engine.context import StepContext
from scanflow.engine.local import LocalEngine
from scanflow.engine.params import ParamError, resolve_params

__all__ = ["Engine", "LocalEngine", "ParamError", "RunResult", "StepContext", "resolve_params"]
