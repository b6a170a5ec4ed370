"""Tracking: the `Tracker` interface and its MLflow implementation (experiments per app/team,
parent/child runs, registry with aliases). The only package that talks to MLflow's client or
sets MLflow's global state.

The step-side contracts of the built-in agents (:mod:`scanflow.tracking.contracts`) are
exported here too, loaded on first use: a step writes ``from scanflow.tracking import
log_model_with_reference``, while ``import scanflow.tracking`` stays free of MLflow and numpy
(the CLI imports this package for commands that never touch a model).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from scanflow.tracking.base import Tracker
from scanflow.tracking.mlflow_tracking import (
    MlflowTracker,
    configure_mlflow,
    log_python_model,
    log_sklearn_model,
)

if TYPE_CHECKING:
    from scanflow.tracking.contracts import (
        CHALLENGER_ALIAS,
        NEW_DATA_PARAM,
        REFERENCE_ARTIFACT,
        ContractError,
        NewData,
        evaluate_candidate,
        log_model_with_reference,
        publish_evaluation,
        read_new_data,
        write_new_data,
    )

_CONTRACTS = frozenset({
    "CHALLENGER_ALIAS", "NEW_DATA_PARAM", "REFERENCE_ARTIFACT", "ContractError", "NewData",
    "evaluate_candidate", "log_model_with_reference", "publish_evaluation", "read_new_data",
    "write_new_data",
})


def __getattr__(name: str) -> Any:
    """The contracts helpers, imported on first use (they need numpy; see the module doc)."""
    if name in _CONTRACTS:
        return getattr(importlib.import_module("scanflow.tracking.contracts"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CHALLENGER_ALIAS", "NEW_DATA_PARAM", "REFERENCE_ARTIFACT", "ContractError", "MlflowTracker",
           "NewData", "Tracker", "configure_mlflow", "evaluate_candidate", "log_model_with_reference",
           "log_python_model", "log_sklearn_model", "publish_evaluation", "read_new_data", "write_new_data"]
