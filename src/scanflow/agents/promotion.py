"""A person offers a model version for promotion: the service policy's gate decides.

The executor agent promotes what *it* trained through `gate.promotion_gate`; a person with
a candidate of their own must pass the same gate, or the loop has a hole: "it looked good
offline" is how bad models reach users. `offer` re-scores the candidate **and** the champion on
the same recent labelled requests of the service (the distribution it serves now) and, when
given, on a clean holdout, so the gate has the paired counts of its exact tests; promotes and
rolls out only if the gate passes. `force` lets a person
overrule the gate, recorded as such; the planner's probation still judges the model afterwards
and rolls it back if it loses to the old champion.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scanflow.agents.gate import GateResult, promotion_gate, rescored_correct
from scanflow.control import backends
from scanflow.control.evaluation import CandidateEvaluation
from scanflow.control.leases import LeaseBusy
from scanflow.control.operations import Actor, ModelOps, ServiceChanged, check_registered
from scanflow.settings import Settings
from scanflow.spec.policy import Policy
from scanflow.store import Store
from scanflow.tracking.models import load_version

log = logging.getLogger(__name__)

SOURCE = "promotion"
HOLDOUT_KEYS = (("x", "y"), ("x_holdout", "y_holdout"), ("x_test", "y_test"))


@dataclass
class Offer:
    """What happened to an offered version, with the gate's evidence."""

    service: str
    model: str
    version: str
    champion_version: str
    promoted: bool
    forced: bool
    gate: GateResult
    event_id: int | None = None
    served_version: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"service": self.service, "model": self.model, "version": self.version,
                "champion_version": self.champion_version, "promoted": self.promoted,
                "forced": self.forced, "passed": self.gate.passed, "reasons": self.gate.reasons,
                "evidence": self.gate.evidence, "served_version": self.served_version,
                "notes": self.notes}


def load_holdout(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A clean labelled holdout from an .npz (arrays `x`/`y`, `x_holdout`/`y_holdout` or
    `x_test`/`y_test`)."""
    try:
        data = np.load(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"holdout {path}: cannot read it as .npz ({exc})") from exc
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"holdout {path}: an .npz with named arrays is needed, not a bare array")
    for xk, yk in HOLDOUT_KEYS:
        if xk in data and yk in data:
            x, y = np.asarray(data[xk]), np.asarray(data[yk])
            if x.ndim < 1 or y.ndim != 1 or len(x) != len(y) or not len(y):
                raise ValueError(f"holdout {path}: {xk} (shape {x.shape}) and {yk} (shape {y.shape}) "
                                 "must hold the same number of rows, one label each")
            return x.reshape(len(x), -1), y
    raise ValueError(f"holdout {path}: needs arrays {' or '.join('/'.join(k) for k in HOLDOUT_KEYS)}; "
                     f"it has {', '.join(data.files) or 'none'}")


def recent_labelled(store: Store, service: str, n: int) -> tuple[np.ndarray, list[Any]]:
    """The inputs and labels of the last `n` labelled requests of a service (fewer if the log
    holds fewer), oldest first."""
    _, last = store.count_predictions(service)
    span = 4 * n
    while True:
        w = store.prediction_window(service, after_id=max(0, last - span), labelled_only=True,
                                    with_inputs=True)
        if len(w.ids) >= n or last - span <= 0:
            break
        span *= 4
    inputs = w.inputs if isinstance(w.inputs, np.ndarray) else np.empty((0, 0))
    k = min(n, len(w.ids))
    return inputs[len(w.ids) - k:], list(w.labels)[len(w.ids) - k:]


def _correct(model: Any, x: np.ndarray, y: list[Any] | np.ndarray, what: str) -> np.ndarray:
    try:
        return rescored_correct(model, x, y)
    except Exception as exc:  # noqa: BLE001 - e.g. the holdout's width does not fit the model
        raise ValueError(f"the model cannot score {what} ({x.shape[0]} x {x.shape[1:]}): {exc}") from exc


def _paired(cand: Any, champ: Any, x: np.ndarray, y: list[Any] | np.ndarray, what: str
            ) -> tuple[float, float, int, int, int]:
    """Both models on the same rows: accuracies, rows, candidate-only and champion-only rows."""
    a, b = _correct(cand, x, y, what), _correct(champ, x, y, what)
    return (float(a.mean()), float(b.mean()), len(a), int(np.sum(a & ~b)), int(np.sum(b & ~a)))


def _judge(settings: Settings, store: Store, service: str, model: str, version: str, champion: str,
           policy: Policy, holdout: Path | None, x_hold: np.ndarray | None, y_hold: np.ndarray | None
           ) -> tuple[GateResult, list[str]]:
    """The gate on the candidate and the champion re-scored on the same recent labelled requests
    (and the holdout): paired counts, so the gate's exact paired tests apply. Without a clean
    holdout the gate is not passed (a person may still force)."""
    want = max(policy.promotion.min_labelled, policy.rollback.window)
    x_new, y_new = recent_labelled(store, service, want)
    cand, champ = load_version(settings, model, version), load_version(settings, model, champion)
    notes: list[str] = []
    new: tuple[float, float, int, int, int] = (math.nan, math.nan, 0, 0, 0)
    if len(y_new):
        new = _paired(cand, champ, x_new, y_new, "the labelled requests")
    else:
        notes.append(f"{service} has no labelled requests to compare on")
    clean: tuple[float | None, float | None, int | None, int | None, int | None] = (None,) * 5
    if x_hold is not None and y_hold is not None:
        clean = _paired(cand, champ, x_hold, y_hold, "the holdout")
    ev = CandidateEvaluation(
        version=version, candidate_acc_new=new[0], champion_acc_new=new[1], n_holdout=new[2],
        new_candidate_only=new[3], new_champion_only=new[4], candidate_acc_clean=clean[0],
        champion_acc_clean=clean[1], n_clean=clean[2], clean_candidate_only=clean[3],
        clean_champion_only=clean[4])
    gate = promotion_gate(ev, policy)
    if x_hold is None:  # what it forgot is unknown: not passed (a person may still --force)
        gate.reasons[-1] = "no clean holdout given: the loss on it is unknown, so the gate is not passed"
    for k, v in list(gate.evidence.items()):  # JSON has no NaN (no labelled requests)
        if isinstance(v, float) and not math.isfinite(v):
            gate.evidence[k] = None
    gate.evidence.update(holdout=str(holdout) if holdout else None)
    return gate, notes


def offer(
    settings: Settings,
    store: Store,
    deployer: Any,
    service: str,
    version: str,
    *,
    policy: Policy | None = None,
    alias: str | None = None,
    holdout: Path | None = None,
    force: bool = False,
    reason: str = "",
) -> Offer:
    """Judge `version` against the version `service` serves; promote `alias` to it and roll it
    out if the gate passes (or `force`). Records `promoted` or `promotion_rejected`."""
    policy = policy or Policy()
    dep = store.get_deployment(service)
    if dep is None:
        raise ValueError(f"service {service!r} is not deployed")
    model, champion, version = dep.model_name, str(dep.model_version), str(version)
    alias = alias or dep.alias  # the alias the service follows
    tracker = backends.tracker(settings)
    check_registered(tracker, model, version)
    if version == champion:
        raise ValueError(f"{service} already serves version {version}")
    x_hold = y_hold = None
    if holdout is not None:
        x_hold, y_hold = load_holdout(holdout)  # before any work: a bad file changes nothing
    gate, notes = _judge(settings, store, service, model, version, champion, policy, holdout, x_hold, y_hold)
    actor = deployer.actor
    common = {"candidate_version": version, "champion_version": champion,
              "reasons": "; ".join(gate.reasons), "passed": gate.passed, **gate.evidence}
    result = Offer(service=service, model=model, version=version, champion_version=champion,
                   promoted=False, forced=False, gate=gate, notes=notes)
    if not gate.passed and not force:
        ev = store.add_event(SOURCE, "promotion_rejected", service, approved_by=f"person:{actor}",
                             model=model, alias=alias, version=version, actor=actor, reason=reason, **common)
        result.event_id, result.served_version = ev.id, champion
        return result
    approved = (f"person:{actor} via policy:promotion-gate" if gate.passed
                else f"person:{actor} (forced past the promotion gate)")
    why = reason or ("promotion gate passed" if gate.passed else "forced past the promotion gate")
    ops = ModelOps(deployer, store, tracker, lease_wait_s=10.0)
    try:
        done = ops.promote(service, version, actor=Actor.person(actor, source=SOURCE), evidence=common,
                           force=force, reason=why, alias=alias, expect_serving=champion,
                           approved_by=approved)
    except ServiceChanged as exc:
        raise ValueError(f"{exc}: offer it again") from exc
    except LeaseBusy as exc:
        raise ValueError(f"{exc}: an agent is acting on {service}; offer it again later") from exc
    ev_id, new = done.event_id, done.deployment
    result.promoted, result.forced, result.event_id = True, not gate.passed, ev_id
    result.served_version = str(getattr(new, "model_version", version))
    return result


__all__ = ["Offer", "load_holdout", "offer", "recent_labelled"]
