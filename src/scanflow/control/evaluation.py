"""The evaluation a retrain workflow publishes with its candidate: a contract, not a guess.

A retrain workflow run by `retrain_and_promote` registers its candidate under the alias
:data:`CHALLENGER_ALIAS` and writes these figures as **model version tags**, each named
:data:`EVAL_TAG_PREFIX` + the figure (e.g. `eval.candidate_acc_new = "0.9312"`):

- :data:`CANDIDATE_ACC_NEW`, :data:`CHAMPION_ACC_NEW` - accuracies of the candidate and of the
  serving champion on held-out labelled data of the new (drifted) distribution;
- :data:`CANDIDATE_ACC_CLEAN`, :data:`CHAMPION_ACC_CLEAN` - the same on the clean test set of
  the original distribution (what the candidate may have forgotten);
- the paired figures (optional, but the gate's best evidence): :data:`N_HOLDOUT`,
  :data:`N_CLEAN` (rows of each set) and :data:`NEW_CANDIDATE_ONLY`, :data:`NEW_CHAMPION_ONLY`,
  :data:`CLEAN_CANDIDATE_ONLY`, :data:`CLEAN_CHAMPION_ONLY` (rows only one of the two models gets
  right). With them the promotion gate runs exact paired tests; without them it falls back to
  an unpaired bound from the accuracies and the set sizes, and says so.

`scanflow.tracking.contracts.evaluate_candidate` computes all of them and
`scanflow.tracking.contracts.publish_evaluation` writes them (and the `challenger` alias). The
promotion gate (`scanflow.agents.gate.promotion_gate`) judges these figures. Any other `eval.*`
tag is carried into the `retrain_finished` event as extra evidence.
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
    CLEAN_CANDIDATE_ONLY,
    CLEAN_CHAMPION_ONLY,
    EVAL_TAG_PREFIX,
    N_CLEAN,
    N_HOLDOUT,
    NEW_CANDIDATE_ONLY,
    NEW_CHAMPION_ONLY,
    REQUIRED_FIGURES,
)


class VersionTags(Protocol):
    """A registry that returns a model version with its `tags` (the `Tracker` does)."""

    def model_version(self, model: str, version: str) -> Any: ...


class MissingEvaluation(ValueError):
    """A candidate lacks (or has an unreadable) figure of the evaluation contract."""


@dataclass(frozen=True)
class CandidateEvaluation:
    """The figures a retrain workflow published for one candidate version (or that `scanflow
    promote` measured): accuracies, and the paired counts when the rows were scored by both
    models (None when an older workflow did not publish them). A clean accuracy of None means
    the clean set is unknown (the gate then does not pass)."""

    version: str
    candidate_acc_new: float
    champion_acc_new: float
    candidate_acc_clean: float | None
    champion_acc_clean: float | None
    n_holdout: int | None = None
    figures: dict[str, float] = field(default_factory=dict)  # every eval.* tag, by figure name
    n_clean: int | None = None
    new_candidate_only: int | None = None  # new-holdout rows only the candidate gets right
    new_champion_only: int | None = None
    clean_candidate_only: int | None = None
    clean_champion_only: int | None = None

    @property
    def paired_new(self) -> bool:
        return None not in (self.n_holdout, self.new_candidate_only, self.new_champion_only)

    @property
    def paired_clean(self) -> bool:
        return None not in (self.n_clean, self.clean_candidate_only, self.clean_champion_only)


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
            f"tags ({', '.join(EVAL_TAG_PREFIX + n for n in REQUIRED_FIGURES)}): {what}. "
            "scanflow.tracking.contracts.evaluate_candidate computes them and "
            "scanflow.tracking.contracts.publish_evaluation writes them")

    def count(name: str) -> int | None:
        v = figures.get(name)
        return None if v is None else int(round(v))

    return CandidateEvaluation(
        version=str(version), candidate_acc_new=figures[CANDIDATE_ACC_NEW],
        champion_acc_new=figures[CHAMPION_ACC_NEW], candidate_acc_clean=figures[CANDIDATE_ACC_CLEAN],
        champion_acc_clean=figures[CHAMPION_ACC_CLEAN], n_holdout=count(N_HOLDOUT), figures=figures,
        n_clean=count(N_CLEAN), new_candidate_only=count(NEW_CANDIDATE_ONLY),
        new_champion_only=count(NEW_CHAMPION_ONLY), clean_candidate_only=count(CLEAN_CANDIDATE_ONLY),
        clean_champion_only=count(CLEAN_CHAMPION_ONLY),
    )


__all__ = ["CANDIDATE_ACC_CLEAN", "CANDIDATE_ACC_NEW", "CHALLENGER_ALIAS", "CHAMPION_ACC_CLEAN",
           "CHAMPION_ACC_NEW", "CLEAN_CANDIDATE_ONLY", "CLEAN_CHAMPION_ONLY", "EVAL_TAG_PREFIX", "N_CLEAN",
           "NEW_CANDIDATE_ONLY", "NEW_CHAMPION_ONLY", "N_HOLDOUT", "REQUIRED_FIGURES", "CandidateEvaluation",
           "MissingEvaluation", "candidate_evaluation"]
