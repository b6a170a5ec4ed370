"""The evaluation a retrain workflow publishes with its candidate: a contract, not a guess.

A retrain workflow run by `retrain_and_promote` registers its candidate under the alias
:data:`CHALLENGER_ALIAS` and writes these figures as **model version tags**, each named
:data:`EVAL_TAG_PREFIX` + the figure (e.g. `eval.candidate_acc_new = "0.9312"`):

- :data:`CANDIDATE_ACC_NEW`, :data:`CHAMPION_ACC_NEW` - accuracies of the candidate and of the
  serving champion on held-out labelled data of the new (drifted) distribution;
- :data:`CANDIDATE_ACC_CLEAN`, :data:`CHAMPION_ACC_CLEAN` - the same on the clean test set of
  the original distribution (what the candidate may have forgotten);
- :data:`N_HOLDOUT` (optional) - how many held-out samples of the new distribution the first
  two rest on (the promotion gate's `min_labelled`).

The promotion gate (`scanflow.agents.gate.promotion_gate`) judges exactly these four numbers.
Any other `eval.*` tag is carried into the `retrain_finished` event as extra evidence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

from scanflow.tracking.contracts import (  # the contract's names live with its writers
    CANDIDATE_ACC_CLEAN,
    CANDIDATE_ACC_NEW,
    CHALLENGER_ALIAS,
    CHAMPION_ACC_CLEAN,
    CHAMPION_ACC_NEW,
    EVAL_TAG_PREFIX,
    N_HOLDOUT,
    REQUIRED_FIGURES,
)


class VersionTags(Protocol):
    """A registry that returns a model version with its `tags` (the `Tracker` does)."""

    def model_version(self, model: str, version: str) -> Any: ...


class MissingEvaluation(ValueError):
    """A candidate lacks (or has an unreadable) figure of the evaluation contract."""


@dataclass(frozen=True)
class CandidateEvaluation:
    """The figures a retrain workflow published for one candidate version."""

    version: str
    candidate_acc_new: float
    champion_acc_new: float
    candidate_acc_clean: float
    champion_acc_clean: float
    n_holdout: int | None = None
    figures: dict[str, float] = field(default_factory=dict)  # every eval.* tag, by figure name


def candidate_evaluation(registry: VersionTags, model: str, version: str) -> CandidateEvaluation:
    """Read and check the evaluation tags of `models:/<model>/<version>`; raise
    MissingEvaluation naming every missing or non-numeric tag."""
    tags: dict[str, str] = dict(getattr(registry.model_version(model, str(version)), "tags", None) or {})
    figures: dict[str, float] = {}
    bad: list[str] = []
    for k, v in tags.items():
        if not k.startswith(EVAL_TAG_PREFIX):
            continue
        try:
            figures[k.removeprefix(EVAL_TAG_PREFIX)] = float(v)
        except (TypeError, ValueError):
            bad.append(f"{k}={v!r} is not a number")
    missing = [f"{EVAL_TAG_PREFIX}{name}" for name in REQUIRED_FIGURES if name not in figures]
    bad += [f"{EVAL_TAG_PREFIX}{k} is {v}" for k, v in figures.items() if not math.isfinite(v)]
    if missing or bad:
        what = "; ".join(([f"missing tag(s) {', '.join(missing)}"] if missing else []) + bad)
        raise MissingEvaluation(
            f"models:/{model}/{version}: the retrain workflow must publish its evaluation as version "
            f"tags ({', '.join(EVAL_TAG_PREFIX + n for n in REQUIRED_FIGURES)}): {what}")
    n = figures.get(N_HOLDOUT)
    return CandidateEvaluation(
        version=str(version), candidate_acc_new=figures[CANDIDATE_ACC_NEW],
        champion_acc_new=figures[CHAMPION_ACC_NEW], candidate_acc_clean=figures[CANDIDATE_ACC_CLEAN],
        champion_acc_clean=figures[CHAMPION_ACC_CLEAN], n_holdout=None if n is None else int(n),
        figures=figures,
    )


__all__ = ["CANDIDATE_ACC_CLEAN", "CANDIDATE_ACC_NEW", "CHALLENGER_ALIAS", "CHAMPION_ACC_CLEAN",
           "CHAMPION_ACC_NEW", "EVAL_TAG_PREFIX", "N_HOLDOUT", "REQUIRED_FIGURES", "CandidateEvaluation",
           "MissingEvaluation", "candidate_evaluation"]
