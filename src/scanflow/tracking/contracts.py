"""The contracts between a user's workflow steps and the built-in agents, as code.

The built-in agents rely on three things a step must produce or read; these helpers are the
documented way to do each, used by the MNIST example and by `scanflow init`'s templates:

1. **A model version with its reference sample** - the analyzer compares served inputs with the
   sample of the training distribution logged with the version a service serves, at
   :data:`REFERENCE_ARTIFACT` in that version's run: :func:`log_model_with_reference`.
2. **The new data of a retrain** - the executor (`retrain_and_promote`) runs the retrain
   workflow with one parameter :data:`NEW_DATA_PARAM`, the path of an ``.npz`` holding
   ``x_new, y_new`` (labelled served requests to learn from) and ``x_holdout, y_holdout`` (to
   judge the candidate on): :func:`read_new_data` (:func:`write_new_data` is the executor's side).
3. **The candidate's evaluation** - the retrain registers its candidate under the alias
   :data:`CHALLENGER_ALIAS` and publishes, as ``eval.*`` version tags, the accuracies of the
   candidate and of the champion on the new holdout and on the clean test set, with the paired
   counts the promotion gate tests (rows only one of the two models gets right):
   :func:`evaluate_candidate` then :func:`publish_evaluation`.

The executor checks each contract (`scanflow.agents.retrain_contract`) and, when one is broken,
fails naming what is missing and the helper here that writes it. All of these are exported by
`scanflow.tracking` too.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scanflow.tracking.mlflow_tracking import log_python_model, log_sklearn_model

REFERENCE_ARTIFACT = "reference/reference.npy"
NEW_DATA_PARAM = "new_data"
NEW_DATA_ARRAYS = ("x_new", "y_new", "x_holdout", "y_holdout")
CHALLENGER_ALIAS = "challenger"
EVAL_TAG_PREFIX = "eval."

# -- figures of the evaluation (each published as the version tag `eval.<figure>`) --------
CANDIDATE_ACC_NEW = "candidate_acc_new"  # accuracy on the holdout of the new distribution
CHAMPION_ACC_NEW = "champion_acc_new"
CANDIDATE_ACC_CLEAN = "candidate_acc_clean"  # accuracy on the clean test set (the original data)
CHAMPION_ACC_CLEAN = "champion_acc_clean"
N_HOLDOUT = "n_holdout"  # rows of the new holdout
N_CLEAN = "n_clean"  # rows of the clean test set
NEW_CANDIDATE_ONLY = "new_candidate_only"  # holdout rows the candidate gets right, the champion wrong
NEW_CHAMPION_ONLY = "new_champion_only"  # holdout rows the champion gets right, the candidate wrong
CLEAN_CANDIDATE_ONLY = "clean_candidate_only"
CLEAN_CHAMPION_ONLY = "clean_champion_only"
REQUIRED_FIGURES = (CANDIDATE_ACC_NEW, CHAMPION_ACC_NEW, CANDIDATE_ACC_CLEAN, CHAMPION_ACC_CLEAN)
PAIRED_FIGURES = (N_HOLDOUT, N_CLEAN, NEW_CANDIDATE_ONLY, NEW_CHAMPION_ONLY, CLEAN_CANDIDATE_ONLY,
                  CLEAN_CHAMPION_ONLY)


class ContractError(ValueError):
    """A step's input or output does not follow the contract (names what is wrong)."""


# -- 1. a model version with its reference sample -----------------------------------------
def log_model_with_reference(
    model: Any, reference: Any, registered_name: str, *, x_example: Any = None, alias: str | None = None,
    code_paths: list[str] | None = None, pip_requirements: list[str] | None = None,
) -> str:
    """Log a model and its reference sample (rows of the distribution it was trained for, e.g.
    500-1,000 held-out training rows) in one MLflow run, register it as a new version of
    `registered_name` (pointing `alias` at it if given) and return the version.

    The model is a scikit-learn-like estimator (MLflow's sklearn flavour) or an
    ``mlflow.pyfunc.PythonModel`` whose ``predict(x)`` returns one prediction per row (any
    framework: torch, ...; ``code_paths`` and ``pip_requirements`` as in
    :func:`~scanflow.tracking.mlflow_tracking.log_python_model`). Both are served and judged
    through ``mlflow.pyfunc``.

    Uses the active MLflow run, or starts one (a scanflow step's run is active already).
    """
    import mlflow  # lazy: MLflow loads in ~2 s; `scanflow validate` must not pay for it

    ref = np.asarray(reference)
    if ref.ndim == 0 or len(ref) < 2:
        raise ContractError(f"the reference sample needs at least 2 rows, got shape {ref.shape}")
    if ref.dtype.kind not in "biuf":  # the analyzer reads it without pickle and tests numbers
        raise ContractError(f"the reference sample must be numeric (the model's input features), got "
                            f"dtype {ref.dtype}")
    if (code_paths or pip_requirements) and not _is_python_model(model):
        raise ContractError("code_paths and pip_requirements are for an mlflow.pyfunc.PythonModel; "
                            "a scikit-learn model records its own")
    example = ref[: min(5, len(ref))] if x_example is None else x_example
    active = mlflow.active_run()
    run = mlflow.start_run() if active is None else None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(REFERENCE_ARTIFACT).name
            np.save(path, ref)
            mlflow.log_artifact(str(path), str(Path(REFERENCE_ARTIFACT).parent))
        if _is_python_model(model):
            _, version = log_python_model(model, example, registered_name, code_paths=code_paths,
                                          pip_requirements=pip_requirements)
        else:
            _, version = log_sklearn_model(model, example, registered_name)
    finally:
        if run is not None:
            mlflow.end_run()
    assert version is not None  # registered_name was given
    if alias:
        mlflow.MlflowClient().set_registered_model_alias(registered_name, alias, version)
    return version


def _is_python_model(model: Any) -> bool:
    from mlflow.pyfunc import PythonModel  # lazy: MLflow, as above

    return isinstance(model, PythonModel)


# -- 2. the new data of a retrain ----------------------------------------------------------
@dataclass(frozen=True)
class NewData:
    """Labelled served requests of the new distribution, split by the executor."""

    x_new: np.ndarray
    y_new: np.ndarray
    x_holdout: np.ndarray
    y_holdout: np.ndarray


def read_new_data(path: str | Path) -> NewData:
    """Read the ``new_data`` file the executor passes to a retrain workflow."""
    p = Path(path)
    if not p.is_file():
        raise ContractError(f"{NEW_DATA_PARAM}: {p} is not a file (the executor writes it; run the "
                            f"retrain workflow with {NEW_DATA_PARAM}=<path of an .npz>)")
    try:
        with np.load(p, allow_pickle=False) as z:
            missing = [k for k in NEW_DATA_ARRAYS if k not in z.files]
            if missing:
                raise ContractError(f"{NEW_DATA_PARAM}: {p} lacks array(s) {', '.join(missing)} "
                                    f"(expected {', '.join(NEW_DATA_ARRAYS)})")
            arrays = {k: np.asarray(z[k]) for k in NEW_DATA_ARRAYS}
    except (OSError, ValueError) as exc:
        if isinstance(exc, ContractError):
            raise
        raise ContractError(f"{NEW_DATA_PARAM}: {p} is not a readable .npz: {exc}") from exc
    for x, y in (("x_new", "y_new"), ("x_holdout", "y_holdout")):
        if len(arrays[x]) != len(arrays[y]):
            raise ContractError(f"{NEW_DATA_PARAM}: {x} has {len(arrays[x])} rows but {y} has "
                                f"{len(arrays[y])}")
    return NewData(**arrays)


def write_new_data(path: str | Path, data: NewData) -> Path:
    """Write `data` where :func:`read_new_data` reads it (the executor's side of the contract)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(p, **{k: getattr(data, k) for k in NEW_DATA_ARRAYS})
    return p


# -- 3. the candidate's evaluation -----------------------------------------------------------
def _correct(model: Any, x: Any, y: Any) -> np.ndarray:
    pred = np.asarray(model.predict(np.asarray(x)))
    truth = np.asarray(y)
    if pred.shape[0] != truth.shape[0]:
        raise ContractError(f"the model returned {pred.shape[0]} predictions for {truth.shape[0]} rows")
    return np.asarray(pred.reshape(len(truth), -1)[:, 0] == truth.reshape(len(truth)), dtype=bool)


def evaluate_candidate(
    candidate: Any, champion: Any, holdout: tuple[Any, Any], clean: tuple[Any, Any],
) -> dict[str, float]:
    """The figures the promotion gate judges: both models scored on the same rows of the new
    holdout and of the clean test set (``(x, y)`` pairs), with the paired counts."""
    figures: dict[str, float] = {}
    for part, (x, y), n_key in (("new", holdout, N_HOLDOUT), ("clean", clean, N_CLEAN)):
        if len(y) == 0:
            raise ContractError(f"the {part} evaluation set is empty")
        cand, champ = _correct(candidate, x, y), _correct(champion, x, y)
        figures[f"candidate_acc_{part}"] = float(cand.mean())
        figures[f"champion_acc_{part}"] = float(champ.mean())
        figures[f"{part}_candidate_only"] = float(np.sum(cand & ~champ))
        figures[f"{part}_champion_only"] = float(np.sum(champ & ~cand))
        figures[n_key] = float(len(y))
    return figures


def publish_evaluation(registered_name: str, version: str, figures: dict[str, float],
                       alias: str | None = CHALLENGER_ALIAS) -> None:
    """Write `figures` as ``eval.*`` tags of the version and point `alias` (the challenger) at it."""
    import mlflow  # lazy: MLflow loads in ~2 s; `scanflow validate` must not pay for it

    missing = [k for k in REQUIRED_FIGURES if k not in figures]
    if missing:
        raise ContractError(f"the evaluation lacks {', '.join(missing)} (use evaluate_candidate)")
    values: dict[str, float] = {}
    for k, v in figures.items():
        try:
            values[k] = float(v)
        except (TypeError, ValueError):
            raise ContractError(f"the evaluation's {k} is {v!r}, not a number") from None
        if not np.isfinite(values[k]):
            raise ContractError(f"the evaluation's {k} is {v!r}; the promotion gate needs a finite number")
    client = mlflow.MlflowClient()
    for k, f in values.items():
        client.set_model_version_tag(registered_name, str(version), f"{EVAL_TAG_PREFIX}{k}", f"{f:.6f}")
    if alias:
        client.set_registered_model_alias(registered_name, alias, str(version))


__all__ = [
    "CANDIDATE_ACC_CLEAN", "CANDIDATE_ACC_NEW", "CHALLENGER_ALIAS", "CHAMPION_ACC_CLEAN", "CHAMPION_ACC_NEW",
    "CLEAN_CANDIDATE_ONLY", "CLEAN_CHAMPION_ONLY", "EVAL_TAG_PREFIX", "NEW_CANDIDATE_ONLY",
    "NEW_CHAMPION_ONLY",
    "NEW_DATA_ARRAYS", "NEW_DATA_PARAM", "N_CLEAN", "N_HOLDOUT", "PAIRED_FIGURES", "REFERENCE_ARTIFACT",
    "REQUIRED_FIGURES", "ContractError", "NewData", "evaluate_candidate", "log_model_with_reference",
    "publish_evaluation", "read_new_data", "write_new_data",
]
