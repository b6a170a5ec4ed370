"""Judgements shared by the planner, the builtin actuators and `promotion.offer`.

Pure functions over a service's policy and numbers (no store, no runtime), kept below the
planner and the builtins so neither imports the other: the promotion gate a candidate must
pass (paired tests on the same rows, see :func:`promotion_gate`), and how a served answer is
compared with a label.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import numpy as np
from pydantic import BaseModel

from scanflow.control.evaluation import CandidateEvaluation
from scanflow.spec.models import Application
from scanflow.spec.policy import Policy, PromotionGate


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


def promotion_gate(ev: CandidateEvaluation, policy: Policy) -> GateResult:
    """May the candidate replace the champion? Two tests on the figures of `ev` at `alpha`:

    - **better on the new holdout**: with paired counts, the one-sided exact McNemar test (a
      binomial test on the rows only one model gets right: b candidate-only, c champion-only,
      p = P(Binom(b + c, 1/2) >= b)); it passes when p <= alpha (and the observed gain exceeds
      `min_gain_on_new`), on at least `min_labelled` rows;
    - **not shown worse on the clean set** beyond `max_loss_on_clean` (d): refused only when the
      exact one-sided test of "loss <= d" rejects, i.e. the Clopper-Pearson lower bound of the
      loss, conditional on the m discordant rows, exceeds d (loss = (c - b) / n; with d = 0 this
      is McNemar the other way). A clean set too small to show such a loss does not block.

    Without paired counts (an older retrain workflow), both are one-sided Wald bounds of two
    independent proportions on the accuracies and n (conservative when the models' errors are
    correlated, as they are on the same rows); without n_clean, the clean loss is compared with
    d as a point estimate. The evidence says which method ran.
    """
    g = policy.promotion
    evidence: dict[str, Any] = {
        "candidate_acc_new": ev.candidate_acc_new, "champion_acc_new": ev.champion_acc_new,
        "candidate_acc_clean": ev.candidate_acc_clean, "champion_acc_clean": ev.champion_acc_clean,
        "n_labelled": ev.n_holdout, "n_clean": ev.n_clean, "alpha": g.alpha,
        "max_loss_on_clean": g.max_loss_on_clean, "min_gain_on_new": g.min_gain_on_new,
        "min_labelled": g.min_labelled,
    }
    numbers = (ev.candidate_acc_new, ev.champion_acc_new, ev.candidate_acc_clean, ev.champion_acc_clean)
    if any(v is not None and not math.isfinite(v) for v in numbers):
        return GateResult(passed=False, reasons=["an accuracy is not a number"], evidence=evidence)
    ok_new, why_new = _better_on_new(ev, g, evidence)
    ok_clean, why_clean = _not_worse_on_clean(ev, g, evidence)
    return GateResult(passed=ok_new and ok_clean, reasons=[why_new, why_clean], evidence=evidence)


def _better_on_new(ev: CandidateEvaluation, g: PromotionGate, evidence: dict[str, Any]) -> tuple[bool, str]:
    n = ev.n_holdout or 0
    gain = ev.candidate_acc_new - ev.champion_acc_new
    evidence["gain_on_new"] = gain
    head = f"on new data {ev.candidate_acc_new:.4f} vs champion {ev.champion_acc_new:.4f} (gain {gain:+.4f}"
    if n < g.min_labelled:
        return False, f"{head}): only {n} labelled rows of the new distribution, need {g.min_labelled}"
    if ev.paired_new:
        b, c = int(ev.new_candidate_only or 0), int(ev.new_champion_only or 0)
        p = float(_stats().binomtest(b, b + c, 0.5, alternative="greater").pvalue) if b + c else 1.0
        lo = _discordant_bound(b, b + c, g.alpha, "greater")
        gain_lower = (2 * lo - 1) * (b + c) / n
        evidence.update(method_new="paired exact McNemar, one-sided", new_candidate_only=b,
                        new_champion_only=c, p_value_new=p, gain_lower_bound=gain_lower)
        detail = (f"; {b} rows only the candidate gets right, {c} only the champion, of {n}: "
                  f"McNemar p={p:.4g}")
    else:
        se = math.sqrt((_var(ev.candidate_acc_new) + _var(ev.champion_acc_new)) / n)
        z = gain / se if se > 0 else (math.inf if gain > 0 else -math.inf if gain < 0 else 0.0)
        p = float(_stats().norm.sf(z))
        gain_lower = gain - float(_stats().norm.isf(g.alpha)) * se
        evidence.update(method_new="unpaired two-proportion bound (no paired counts published)",
                        p_value_new=p, gain_lower_bound=gain_lower)
        detail = f" on {n} rows; unpaired z-test p={p:.4g} (no paired counts published)"
    ok = p <= g.alpha and gain > g.min_gain_on_new
    verdict = "better" if ok else "not shown better"
    floor = f", gain must exceed {g.min_gain_on_new:+.4f}" if g.min_gain_on_new > 0 else ""
    return ok, f"{head}{detail} vs alpha {g.alpha:g}{floor}): {verdict}"


def _not_worse_on_clean(ev: CandidateEvaluation, g: PromotionGate, evidence: dict[str, Any]
                        ) -> tuple[bool, str]:
    if ev.candidate_acc_clean is None or ev.champion_acc_clean is None:
        evidence.update(loss_on_clean=None, loss_lower_bound=None)
        return False, "no clean set: the loss on it is unknown, so the gate is not passed"
    loss = ev.champion_acc_clean - ev.candidate_acc_clean
    d = g.max_loss_on_clean
    evidence["loss_on_clean"] = loss
    head = (f"on the clean set {ev.candidate_acc_clean:.4f} vs champion {ev.champion_acc_clean:.4f} "
            f"(loss {loss:+.4f}")
    n = ev.n_clean or 0
    if ev.paired_clean and n > 0:
        b, c = int(ev.clean_candidate_only or 0), int(ev.clean_champion_only or 0)
        hi = _discordant_bound(b, b + c, g.alpha, "less")
        loss_lower = (1 - 2 * hi) * (b + c) / n
        evidence.update(method_clean="paired exact conditional bound, one-sided", clean_candidate_only=b,
                        clean_champion_only=c, loss_lower_bound=loss_lower)
        detail = f"; {b} rows only the candidate gets right, {c} only the champion, of {n}"
    elif n > 0:
        se = math.sqrt((_var(ev.candidate_acc_clean) + _var(ev.champion_acc_clean)) / n)
        loss_lower = loss - float(_stats().norm.isf(g.alpha)) * se
        evidence.update(method_clean="unpaired two-proportion bound (no paired counts published)",
                        loss_lower_bound=loss_lower)
        detail = f" on {n} rows, unpaired"
    else:
        loss_lower = loss
        evidence.update(method_clean="point estimate (the clean set's size was not published)",
                        loss_lower_bound=loss)
        detail = ", size unknown: point estimate"
    ok = loss_lower <= d + 1e-12
    shown = f"loss shown at alpha {g.alpha:g}: >= {loss_lower:+.4f}"
    return ok, (f"{head}{detail}; {shown}, tolerance {d:.4f}): "
                f"{'within tolerance' if ok else 'too much'}")


def _stats() -> Any:
    from scipy import stats  # lazy: scipy.stats loads in ~0.5 s; `scanflow validate` imports this module

    return stats


def _var(acc: float) -> float:
    return acc * (1 - acc)


def _discordant_bound(k: int, m: int, alpha: float, side: str) -> float:
    """One-sided exact (Clopper-Pearson) bound of the share of candidate-only rows among m
    discordant rows: the lower bound (`greater`) or the upper one (`less`) at level 1 - alpha."""
    if m == 0:
        return 0.5  # no discordant row: no difference either way
    test = _stats().binomtest(k, m, 0.5, alternative=side)
    ci = test.proportion_ci(confidence_level=1 - alpha)
    return float(ci.low if side == "greater" else ci.high)


def predicted_class(out: Any) -> Any:
    """The served class of one output (a bare label, or a dict with a label field)."""
    if isinstance(out, dict):
        for k in ("label", "prediction", "predicted", "class"):
            if k in out:
                return out[k]
    return out


def rescored_correct(model: Any, x: Any, labels: Any) -> np.ndarray:
    """Per row, does `model` (anything with `predict`) get the known label right? (Two models'
    rows scored on the same inputs give the paired counts of the promotion gate.)"""
    preds = model.predict(np.asarray(x, dtype=np.float64))
    preds = preds.tolist() if hasattr(preds, "tolist") else list(preds)
    truth = labels.tolist() if isinstance(labels, np.ndarray) else list(labels)
    return np.asarray([predicted_class(p_) == lab for p_, lab in zip(preds, truth, strict=True)], dtype=bool)


def rescored_accuracy(model: Any, x: Any, labels: Any) -> float:
    """Accuracy of `model` (anything with `predict`) re-scoring inputs whose true labels are known."""
    return float(np.mean(rescored_correct(model, x, labels)))


__all__ = ["GateResult", "policy_for", "predicted_class", "promotion_gate", "rescored_accuracy",
           "rescored_correct"]
