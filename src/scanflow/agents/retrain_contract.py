"""The executor's side of the retrain contracts (:mod:`scanflow.tracking.contracts`), checked
before the retrain workflow runs and after it: a workflow that forgets its part fails with a
message naming the missing parameter, alias, artifact or tag and the helper that writes it,
instead of a KeyError deep inside the executor or a candidate the analyzer cannot judge later.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from scanflow.control.evaluation import MissingEvaluation, candidate_evaluation
from scanflow.spec.models import Application
from scanflow.tracking.base import Tracker
from scanflow.tracking.contracts import (
    CHALLENGER_ALIAS,
    EVAL_TAG_PREFIX,
    NEW_DATA_PARAM,
    PAIRED_FIGURES,
    REFERENCE_ARTIFACT,
    ContractError,
)

HELPERS = "scanflow.tracking.contracts"


class ContractViolation(ContractError):
    """A retrain workflow broke one of the contracts: `contract` says which (`new_data`,
    `challenger`, `reference`, `evaluation`) and `helper` what writes it right, for the
    `contract_violation` event (first in its payload, so that a narrow table still shows them)."""

    def __init__(self, contract: str, message: str, helper: str) -> None:
        super().__init__(message)
        self.contract = contract
        self.helper = f"{HELPERS}.{helper}"


@dataclass(frozen=True)
class RetrainRun:
    """What the executor knows of the retrain run it started: to tell its candidate from an
    older version the alias may still point to."""

    run_id: str
    mlflow_run_id: str | None
    created_at: float  # seconds since the epoch (the store's clock)
    warnings: list[str] = field(default_factory=list)


def check_workflow(app: Application, workflow: str, model: str) -> list[str]:
    """Before the run: the workflow exists and takes `new_data` (else ContractViolation);
    returns warnings (no step declares that it registers `model`).

    A missing `registers:` is a warning, not an error: nothing at run time reads that key (a
    step may register without declaring it), and the check after the run fails anyway, naming
    the helper, when no new candidate appears under the alias."""
    where = app.source or f"{app.base_dir}/scanflow.yaml"
    wf = app.workflows.get(workflow)
    if wf is None:
        known = ", ".join(sorted(app.workflows)) or "none"
        raise ContractViolation(NEW_DATA_PARAM, f"the retrain workflow {workflow!r} is not in {where} "
                                f"(workflows there: {known}); the executor's `workflow:` param names it",
                                "read_new_data")
    declared = {"workflow": wf.params.get(NEW_DATA_PARAM)}
    declared.update({f"step {s.name}": s.params.get(NEW_DATA_PARAM) for s in wf.steps})
    found = {k: p for k, p in declared.items() if p is not None}
    if not found:
        raise ContractViolation(NEW_DATA_PARAM, (
            f"workflow {workflow!r} in {where} declares no parameter `{NEW_DATA_PARAM}`: the executor runs "
            f"it with {NEW_DATA_PARAM}=<path of an .npz of the new labelled data>. Add `params: "
            f"{{{NEW_DATA_PARAM}: {{type: path}}}}` to the workflow (or to the step that reads it) and read "
            f"it with {HELPERS}.read_new_data"), "read_new_data")
    wrong = [f"{k} declares it as {p.type}" for k, p in found.items() if p.type not in ("path", "str")]
    if wrong:
        raise ContractViolation(NEW_DATA_PARAM, (
            f"workflow {workflow!r} in {where}: `{NEW_DATA_PARAM}` is the path of an .npz, but "
            f"{'; '.join(wrong)}; declare it `{{type: path}}`"), "read_new_data")
    if not any(model in s.registers for s in wf.steps):
        return [f"no step of workflow {workflow!r} in {where} declares `registers: [{model}]`; the step "
                f"that registers the candidate should (`scanflow validate --registry` checks it)"]
    return []


def check_candidate(tracker: Tracker, model: str, run: RetrainRun) -> tuple[str, list[str]]:
    """After the run: the candidate under `challenger` is new, carries its reference sample and
    its evaluation. -> (candidate version, warnings); ContractViolation naming the helper."""
    version = tracker.alias_version(model, CHALLENGER_ALIAS)
    if version is None:
        raise ContractViolation(CHALLENGER_ALIAS, (
            f"retrain run {run.run_id} left no alias models:/{model}@{CHALLENGER_ALIAS}: the retrain "
            f"workflow must register its candidate and point `{CHALLENGER_ALIAS}` at it "
            f"({HELPERS}.publish_evaluation does it with the evaluation)"), "publish_evaluation")
    mv = tracker.model_version(model, version)
    src_run = getattr(mv, "run_id", None) or None
    if not _made_by(tracker, mv, run):
        raise ContractViolation(CHALLENGER_ALIAS, (
            f"models:/{model}@{CHALLENGER_ALIAS} points to version {version}, which retrain run "
            f"{run.run_id} did not make (it is older than the run, from MLflow run {src_run}): the "
            f"workflow must point `{CHALLENGER_ALIAS}` at the version it registers "
            f"({HELPERS}.publish_evaluation(model, version, figures) does)"), "publish_evaluation")
    if src_run is None or REFERENCE_ARTIFACT not in _artifacts(tracker, src_run):
        raise ContractViolation("reference", (
            f"models:/{model}/{version}: its run {src_run} has no artifact {REFERENCE_ARTIFACT} (the "
            f"analyzer judges served inputs against it once this version serves): log the candidate "
            f"with {HELPERS}.log_model_with_reference"), "log_model_with_reference")
    try:
        ev = candidate_evaluation(tracker, model, version)
    except MissingEvaluation as exc:
        msg = str(exc)
        if "publish_evaluation" not in msg:
            msg += f". {HELPERS}.evaluate_candidate computes them, {HELPERS}.publish_evaluation writes them"
        raise ContractViolation("evaluation", msg, "publish_evaluation") from None
    missing = [EVAL_TAG_PREFIX + f for f in PAIRED_FIGURES if f not in ev.figures]
    warnings = [] if not missing else [
        f"models:/{model}/{version} has no paired figures ({', '.join(missing)}): the promotion gate "
        f"falls back to an unpaired bound from the accuracies; {HELPERS}.evaluate_candidate computes them"]
    return version, warnings


def _made_by(tracker: Tracker, mv: Any, run: RetrainRun) -> bool:
    """The version was logged by a run of this workflow run, or registered after it began."""
    created = getattr(mv, "creation_timestamp", None)
    if created is not None and float(created) / 1000.0 >= run.created_at:
        return True
    if run.mlflow_run_id is None or not getattr(mv, "run_id", None):
        return False
    ours = {run.mlflow_run_id} | {r.info.run_id for r in tracker.child_runs(run.mlflow_run_id)}
    return str(mv.run_id) in ours


def _artifacts(tracker: Tracker, run_id: str) -> list[str]:
    folder = REFERENCE_ARTIFACT.rpartition("/")[0]
    try:
        return tracker.list_artifacts(run_id, folder)
    except Exception as exc:  # noqa: BLE001 - a run that is gone has no artifacts; say which
        raise ContractViolation("reference", f"cannot list the artifacts of MLflow run {run_id}: {exc}",
                                "log_model_with_reference") from None


__all__ = ["ContractViolation", "RetrainRun", "check_candidate", "check_workflow"]
