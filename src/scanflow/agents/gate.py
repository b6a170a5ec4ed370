"""Judgements shared by the planner, the builtin actuators and `promotion.offer`.

Pure functions over a service's policy and numbers (no store, no runtime), kept below the
planner and the builtins so neither imports the other: the promotion gate a candidate must
pass, and how a served answer is compared with a label.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import numpy as np
from pydantic import BaseModel

from scanflow.spec.models import Application
from scanflow.spec.policy import Policy


class HasApp(Protocol):
    """Anything that knows the application (an `AgentContext`)."""

    @property
    def app(self) -> Application: ...


class GateResult(BaseModel):
    passed: bool
    reasons: list[str]
    evidence: dict[str, Any]


def policy_for(ctx: HasApp, service: str) -> Policy:
    """The policy of `service` in the agent's application (the default policy if none)."""
    svc = ctx.app.services.get(service)
    pol = getattr(svc, "policy", None) if svc is not None else None
    return pol if isinstance(pol, Policy) else Policy()


def promotion_gate(
    candidate_new: float,
    champion_new: float,
    candidate_holdout: float,
    champion_holdout: float,
    n_labelled: int,
    policy: Policy,
) -> GateResult:
    """May the candidate replace the champion? It must beat it on recent labelled data of the
    new distribution by more than `min_gain_on_new`, lose at most `max_loss_on_holdout` on the
    clean holdout, and the comparison must rest on at least `min_labelled` samples."""
    g = policy.promotion
    gain = candidate_new - champion_new
    loss = champion_holdout - candidate_holdout
    reasons: list[str] = []
    ok_n = n_labelled >= g.min_labelled
    ok_gain = gain > g.min_gain_on_new
    ok_loss = loss <= g.max_loss_on_holdout + 1e-12
    for value in (candidate_new, champion_new, candidate_holdout, champion_holdout):
        if not math.isfinite(value):
            reasons.append("an accuracy is not a number")
            ok_gain = False
    if not ok_n:
        reasons.append(f"only {n_labelled} labelled samples of the new distribution, need {g.min_labelled}")
    reasons.append(
        f"on new data {candidate_new:.4f} vs champion {champion_new:.4f} (gain {gain:+.4f}, "
        f"must exceed {g.min_gain_on_new:+.4f}): {'ok' if ok_gain else 'not enough'}"
    )
    reasons.append(
        f"on the clean holdout {candidate_holdout:.4f} vs champion {champion_holdout:.4f} "
        f"(loss {loss:+.4f}, at most {g.max_loss_on_holdout:.4f}): {'ok' if ok_loss else 'too much'}"
    )
    return GateResult(
        passed=ok_n and ok_gain and ok_loss,
        reasons=reasons,
        evidence={
            "candidate_acc_new": candidate_new, "champion_acc_new": champion_new,
            "candidate_acc_holdout": candidate_holdout, "champion_acc_holdout": champion_holdout,
            "gain_on_new": gain, "loss_on_holdout": loss, "n_labelled": n_labelled,
            "min_gain_on_new": g.min_gain_on_new, "max_loss_on_holdout": g.max_loss_on_holdout,
            "min_labelled": g.min_labelled,
        },
    )


def predicted_class(out: Any) -> Any:
    """The served class of one output (a bare label, or a dict with a label field)."""
    if isinstance(out, dict):
        for k in ("label", "prediction", "predicted", "class"):
            if k in out:
                return out[k]
    return out


def rescored_accuracy(model: Any, x: Any, labels: Any) -> float:
    """Accuracy of `model` (anything with `predict`) re-scoring inputs whose true labels are known."""
    preds = model.predict(np.asarray(x, dtype=np.float64))
    preds = preds.tolist() if hasattr(preds, "tolist") else list(preds)
    truth = labels.tolist() if isinstance(labels, np.ndarray) else list(labels)
    return float(np.mean([predicted_class(p_) == lab for p_, lab in zip(preds, truth, strict=True)]))


__all__ = ["GateResult", "policy_for", "predicted_class", "promotion_gate", "rescored_accuracy"]
