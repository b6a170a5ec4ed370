"""The planner: one declarative policy per service, and arbitration between its actions.

The judgement is a pure function, :func:`plan` (signals + state + policy -> a plan and the next
state), so every rule of the arbitration is tested without a service, a clock or a database:

- latency breach without drift -> scale up; drift without latency breach -> retrain; both ->
  scale now, retrain after (one plan, executed in that order);
- a promoted model that does worse than the champion it replaced -> roll back (first);
- load gone -> scale down, only after `scale_down_windows` cold windows, a cooldown, and only if
  the load per replica afterwards stays below the level that breached the SLO last time, so a
  service does not scale down into the breach it just scaled out of;
- cooldowns per action kind, a retrain budget per 24 h, and at most one retrain at a time.

Around it, thin functions for specs (`func: scanflow.agents.planner:<name>`, the calling
convention of :mod:`scanflow.agents.builtin`):

- sensor :func:`service_signals` - one observation per time window of the prediction log
  (p95 latency, throughput), with the analyzer's drift reports, a CBPE accuracy estimate,
  label-joined accuracy, retrain outcomes and the probation figures of a promoted model;
- rule :func:`decide` - runs :func:`plan`, keeps the planner state in the store;
- actuator :func:`execute` - carries the plan out under the service's lease (scale and roll back
  here, retrain by a durable message to the executor agent).

The gate a candidate must pass (:func:`promotion_gate`) and the rollback judgement
(:func:`rollback_judgement`) are pure functions too; :func:`rollback` is an actuator that rolls
a service back and records an event that says why, with the numbers.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field
from sqlalchemy import select

from scanflow.agents.runtime import AgentContext, Observation
from scanflow.spec.policy import Policy
from scanflow.store import Store
from scanflow.store.schema import Event, Message
from scanflow.tracking.models import load_version

log = logging.getLogger("scanflow.agents.planner")

DAY_S = 86_400.0
STATE_KEY = "planner.state"
ActionKind = Literal["scale_up", "scale_down", "retrain", "rollback"]


# =============================================================================================
# Signals, state, plan
# =============================================================================================
class DriftReport(BaseModel):
    """One analyzer window, as the analyzer reported it."""

    drift: bool
    first_id: int | None = None
    last_id: int | None = None
    tests: list[str] = Field(default_factory=list, description="tests that flagged drift")
    key: str = ""
    reference_version: str | None = Field(
        default=None, description="the model version whose reference the window was judged against")


class ProbationSignal(BaseModel):
    """How a promoted model does against the champion it replaced, on labelled traffic."""

    promoted_version: str
    previous_version: str
    promoted_at: float
    promoted_accuracy: float | None = None
    promoted_n: int = 0
    previous_accuracy: float | None = None
    previous_n: int = 0
    previous_basis: str = Field(default="own_history",
                                description="same_requests: the old champion re-scored the promoted "
                                            "model's labelled requests; own_history: its own last window")


class Signals(BaseModel):
    """Everything the planner knows about one service for one window."""

    window: str = Field(description="unique key of the window (idempotency of the decision)")
    now: float = Field(description="end of the window, UNIX seconds")
    window_s: float = 10.0
    replicas: int = 1
    model_version: str | None = None
    n_requests: int = 0
    p95_latency_ms: float | None = None
    throughput_rps: float | None = None
    drift_reports: list[DriftReport] = Field(default_factory=list)
    accuracy_estimate: float | None = Field(default=None, description="CBPE, label-free")
    accuracy_estimate_n: int = 0
    labelled_accuracy: float | None = None
    labelled_n: int = 0
    retrains_done: list[dict[str, Any]] = Field(default_factory=list)
    probation: ProbationSignal | None = None
    notes: list[str] = Field(default_factory=list, description="what the sensor could not measure")


class PlannedAction(BaseModel):
    kind: ActionKind
    reason: str
    params: dict[str, Any] = Field(default_factory=dict)
    evidence: dict[str, Any] = Field(default_factory=dict)
    after: ActionKind | None = Field(default=None, description="run once this action of the plan is done")


class Plan(BaseModel):
    """What to do for one window, or why nothing."""

    window: str
    actions: list[PlannedAction] = Field(default_factory=list)
    hold: list[str] = Field(default_factory=list, description="why nothing (else) was done")
    evidence: dict[str, Any] = Field(default_factory=dict)

    @property
    def fired(self) -> bool:
        return bool(self.actions)

    @property
    def reason(self) -> str:
        acts = "; ".join(f"{a.kind}: {a.reason}" for a in self.actions)
        hold = "; ".join(self.hold)
        if acts and hold:
            return f"{acts} (held: {hold})"
        return acts or f"hold: {hold}"


class PlannerState(BaseModel):
    """What the planner remembers between windows (kept in the store: survives restarts)."""

    window: str | None = Field(default=None, description="the last window absorbed")
    plan: Plan | None = Field(default=None, description="the plan made for it (replayed, never re-made)")
    model_version: str | None = None
    hot_streak: int = 0
    cold_streak: int = 0
    drift_streak: int = 0
    low_accuracy_streak: int = 0
    episode: int = 0
    episode_start_id: int | None = None
    retraining: bool = False
    retrain_started_at: float | None = None
    retrain_ended_at: float | None = None
    retrains: list[float] = Field(default_factory=list, description="start times, last 24 h")
    last_action_at: dict[str, float] = Field(default_factory=dict)
    breach_rps_per_replica: float | None = None
    judged_versions: dict[str, str] = Field(default_factory=dict, description="version -> kept|rolled_back")


# =============================================================================================
# Pure judgements
# =============================================================================================
class GateResult(BaseModel):
    passed: bool
    reasons: list[str]
    evidence: dict[str, Any]


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


class RollbackVerdict(BaseModel):
    decision: Literal["rollback", "keep", "wait"]
    reason: str
    evidence: dict[str, Any]


def rollback_judgement(signal: ProbationSignal, policy: Policy, now: float) -> RollbackVerdict:
    """Roll back a promoted model whose label-joined accuracy, over its first `window` labelled
    predictions, is below the old champion's over its last `window` by more than `margin`.
    'wait' until `min_labelled` labels exist; 'keep' once a full window passed or probation
    (`within`) ended."""
    r = policy.rollback
    age = now - signal.promoted_at
    ev: dict[str, Any] = {
        **signal.model_dump(), "margin": r.margin, "window": r.window, "min_labelled": r.min_labelled,
        "probation_s": r.within, "age_s": round(age, 3),
    }
    new, old = signal.promoted_accuracy, signal.previous_accuracy
    if old is None or signal.previous_n == 0:
        why = f"no labelled accuracy of version {signal.previous_version} to compare with"
        return RollbackVerdict(decision="keep", evidence=ev, reason=why)
    if new is not None and signal.promoted_n >= r.min_labelled:
        ev["difference"] = new - old
        if new < old - r.margin:
            return RollbackVerdict(
                decision="rollback", evidence=ev,
                reason=(f"version {signal.promoted_version} accuracy {new:.4f} on {signal.promoted_n} "
                        f"labelled predictions is below version {signal.previous_version}'s {old:.4f} "
                        f"({'on the same requests' if signal.previous_basis == 'same_requests' else 'on'}"
                        f" {signal.previous_n}) by {old - new:.4f} > margin {r.margin:.4f}"),
            )
        if signal.promoted_n >= r.window:
            return RollbackVerdict(
                decision="keep", evidence=ev,
                reason=(f"version {signal.promoted_version} accuracy {new:.4f} vs {old:.4f} over a full "
                        f"window of {signal.promoted_n}: kept"),
            )
    if age > r.within:
        why = f"probation of {r.within:.0f}s ended with {signal.promoted_n} labels: kept"
        return RollbackVerdict(decision="keep", evidence=ev, reason=why)
    return RollbackVerdict(
        decision="wait", evidence=ev,
        reason=(f"version {signal.promoted_version}: {signal.promoted_n} of {r.min_labelled} labelled "
                f"predictions to judge it" if signal.promoted_n < r.min_labelled else
                f"version {signal.promoted_version} accuracy {new:.4f} vs {old:.4f}: within margin so far"),
    )


def _accuracy(s: Signals, p: Policy) -> tuple[float | None, str]:
    """Label-joined accuracy when enough labels exist, else the CBPE estimate."""
    if s.labelled_accuracy is not None and s.labelled_n >= p.objectives.accuracy_min_labels:
        return s.labelled_accuracy, "labels"
    if s.accuracy_estimate is not None:
        return s.accuracy_estimate, "cbpe"
    return None, "none"


def _since(state: PlannerState, kind: str, now: float) -> float:
    t = state.last_action_at.get(kind)
    return math.inf if t is None else now - t


def plan(signals: Signals, state: PlannerState, policy: Policy) -> tuple[Plan, PlannerState]:
    """Arbitrate one window: the actions to take (with reasons and evidence) or why to hold,
    and the state for the next window. Pure; a window seen before returns its plan again."""
    if state.window == signals.window and state.plan is not None:
        return state.plan, state
    s, p = signals, policy
    st = state.model_copy(deep=True)
    now = s.now
    obj, lim, cd, hy = p.objectives, p.limits, p.cooldowns, p.hysteresis
    hold: list[str] = []
    actions: list[PlannedAction] = []

    # -- bookkeeping: a new model, retrains that ended or got lost ---------------------------
    if s.model_version is not None and s.model_version != st.model_version:
        if st.model_version is not None:
            st.drift_streak = st.low_accuracy_streak = 0  # the new model needs its own evidence
            st.episode_start_id = None
        st.model_version = s.model_version
    for done in s.retrains_done:
        st.retraining = False
        st.retrain_ended_at = float(done.get("ts", now))
        st.drift_streak = st.low_accuracy_streak = 0
        st.episode_start_id = None
    started = st.retrain_started_at
    if st.retraining and started is not None and now - started > lim.retrain_timeout:
        st.retraining = False
        hold.append(f"retrain started {now - st.retrain_started_at:.0f}s ago never reported done "
                    f"(timeout {lim.retrain_timeout:.0f}s): given up")
    st.retrains = [t for t in st.retrains if now - t < DAY_S]

    # -- latency and load --------------------------------------------------------------------
    slo = obj.p95_latency_ms
    idle = s.n_requests < hy.min_requests or s.p95_latency_ms is None
    p95 = s.p95_latency_ms
    rps = s.throughput_rps or 0.0
    per_replica = rps / max(s.replicas, 1)
    hot_latency = not idle and p95 is not None and p95 > hy.scale_up_latency_ratio * slo
    busy = not idle and p95 is not None and p95 >= hy.scale_down_latency_ratio * slo
    throughput_breach = obj.min_throughput_rps > 0 and busy and rps < obj.min_throughput_rps
    hot = hot_latency or throughput_breach
    cold = idle or (p95 is not None and p95 < hy.scale_down_latency_ratio * slo and not throughput_breach)
    if hot:
        st.hot_streak, st.cold_streak = st.hot_streak + 1, 0
        st.breach_rps_per_replica = per_replica
    elif cold:
        st.hot_streak, st.cold_streak = 0, st.cold_streak + 1
        if st.breach_rps_per_replica is not None and not idle and per_replica >= st.breach_rps_per_replica:
            st.breach_rps_per_replica = None  # cold at that load: the old breach level is stale
    else:
        st.hot_streak = st.cold_streak = 0
    load_ev = {
        "p95_latency_ms": p95, "slo_p95_ms": slo, "throughput_rps": s.throughput_rps,
        "min_throughput_rps": obj.min_throughput_rps, "n_requests": s.n_requests, "window_s": s.window_s,
        "replicas": s.replicas, "hot": hot, "cold": cold, "idle": idle,
        "hot_streak": st.hot_streak, "cold_streak": st.cold_streak,
        "scale_up_above_ms": hy.scale_up_latency_ratio * slo,
        "scale_down_below_ms": hy.scale_down_latency_ratio * slo,
        "scale_up_windows": hy.scale_up_windows, "scale_down_windows": hy.scale_down_windows,
        "breach_rps_per_replica": st.breach_rps_per_replica,
    }

    # -- drift and accuracy ------------------------------------------------------------------
    ignored = [r for r in s.drift_reports
               if r.reference_version is not None and s.model_version is not None
               and str(r.reference_version) != str(s.model_version)]
    if ignored:
        hold.append(f"{len(ignored)} drift report(s) judged against version(s) "
                    f"{', '.join(sorted({str(r.reference_version) for r in ignored}))}, not the "
                    f"served {s.model_version}: ignored")
    for r in s.drift_reports:
        if r in ignored:
            continue
        if r.drift:
            if st.drift_streak == 0:
                # The first drifted window straddles the onset: learn from what follows it.
                st.episode_start_id = (r.last_id + 1) if r.last_id is not None else r.first_id
            st.drift_streak += 1
        else:
            st.drift_streak = 0
    acc, acc_source = _accuracy(s, p)
    if acc is not None:
        st.low_accuracy_streak = st.low_accuracy_streak + 1 if acc < obj.accuracy_floor else 0
    drift_holds = st.drift_streak >= hy.drift_windows
    accuracy_low = st.low_accuracy_streak >= hy.accuracy_windows
    quality_ev = {
        "drift_reports": len(s.drift_reports), "drift_in_reports": sum(r.drift for r in s.drift_reports),
        "drift_tests": sorted({t for r in s.drift_reports for t in r.tests}),
        "drift_streak": st.drift_streak, "drift_windows": hy.drift_windows,
        "accuracy": acc, "accuracy_source": acc_source, "accuracy_floor": obj.accuracy_floor,
        "accuracy_estimate": s.accuracy_estimate, "accuracy_estimate_n": s.accuracy_estimate_n,
        "labelled_accuracy": s.labelled_accuracy, "labelled_n": s.labelled_n,
        "low_accuracy_streak": st.low_accuracy_streak, "accuracy_windows": hy.accuracy_windows,
    }
    evidence = {"load": load_ev, "quality": quality_ev, "model_version": s.model_version,
                "notes": s.notes}

    # -- 1. probation of a promoted model: roll back first ----------------------------------
    pr = s.probation
    if pr is not None and pr.promoted_version == s.model_version and pr.promoted_version not in (
        st.judged_versions
    ):
        verdict = rollback_judgement(pr, p, now)
        evidence["probation"] = {"decision": verdict.decision, "reason": verdict.reason}
        if verdict.decision == "keep":
            st.judged_versions[pr.promoted_version] = "kept"
        elif verdict.decision == "rollback":
            wait = cd.rollback - _since(st, "rollback", now)
            if wait > 0:
                hold.append(f"rollback wanted but in cooldown ({wait:.0f}s left): {verdict.reason}")
            else:
                actions.append(PlannedAction(
                    kind="rollback", reason=verdict.reason, evidence=verdict.evidence,
                    params={"from_version": pr.promoted_version, "to_version": pr.previous_version},
                ))
                hold.append("scaling and retraining wait for the rollback")
                out = Plan(window=s.window, actions=actions, hold=hold, evidence=evidence)
                st.window, st.plan = s.window, out
                return out, st

    # -- 2. replicas -------------------------------------------------------------------------
    n = s.replicas
    latency_breach = st.hot_streak >= hy.scale_up_windows
    if n < lim.min_replicas:
        actions.append(PlannedAction(kind="scale_up", reason=f"{n} replica(s) is below min_replicas "
                                     f"{lim.min_replicas}", params={"replicas": lim.min_replicas},
                                     evidence=load_ev))
    elif n > lim.max_replicas:
        actions.append(PlannedAction(kind="scale_down", reason=f"{n} replica(s) is above max_replicas "
                                     f"{lim.max_replicas}", params={"replicas": lim.max_replicas},
                                     evidence=load_ev))
    elif latency_breach:
        what = (f"p95 {p95:.1f} ms > {hy.scale_up_latency_ratio * slo:.1f} ms" if hot_latency else
                f"throughput {rps:.2f} req/s < {obj.min_throughput_rps:.2f} req/s while busy")
        wait = cd.scale_up - _since(st, "scale_up", now)
        if n >= lim.max_replicas:
            hold.append(f"load breach ({what}) but already at max_replicas {lim.max_replicas}")
        elif wait > 0:
            hold.append(f"load breach ({what}) but scale-up cooldown: {wait:.0f}s left")
        else:
            target = min(lim.max_replicas, n + lim.scale_step)
            actions.append(PlannedAction(
                kind="scale_up", params={"replicas": target}, evidence=load_ev,
                reason=f"{what} for {st.hot_streak} window(s) (>= {hy.scale_up_windows}): {n} -> {target}",
            ))
    elif st.cold_streak >= hy.scale_down_windows and n > lim.min_replicas:
        target = max(lim.min_replicas, n - lim.scale_step)
        projected = rps / target
        wait = cd.scale_down - min(_since(st, "scale_down", now), _since(st, "scale_up", now))
        breach = st.breach_rps_per_replica
        ceiling = None if breach is None else hy.scale_down_headroom * breach
        if wait > 0:
            hold.append(f"load low for {st.cold_streak} windows but scale-down cooldown: {wait:.0f}s left")
        elif ceiling is not None and not idle and projected >= ceiling:
            hold.append(
                f"load low, but {target} replica(s) would carry {projected:.2f} req/s each, >= "
                f"{hy.scale_down_headroom:.0%} of the {st.breach_rps_per_replica:.2f} req/s per replica "
                "that breached the SLO last time"
            )
        else:
            why = "no traffic" if idle else f"p95 {p95:.1f} ms < {hy.scale_down_latency_ratio * slo:.1f} ms"
            actions.append(PlannedAction(
                kind="scale_down", params={"replicas": target},
                evidence={**load_ev, "projected_rps_per_replica": projected,
                          "ceiling_rps_per_replica": ceiling},
                reason=f"{why} for {st.cold_streak} window(s) (>= {hy.scale_down_windows}): {n} -> {target}",
            ))

    # Signals on their way to a breach: said, so a hold explains what it waits for.
    watch: list[str] = []
    if hot and not latency_breach:
        watch.append(f"load breach in {st.hot_streak} of {hy.scale_up_windows} window(s) to scale up")
    if 0 < st.cold_streak < hy.scale_down_windows and n > lim.min_replicas:
        watch.append(f"load low in {st.cold_streak} of {hy.scale_down_windows} window(s) to scale down")
    if 0 < st.drift_streak < hy.drift_windows:
        watch.append(f"drift in {st.drift_streak} of {hy.drift_windows} analyzer window(s) needed")
    if 0 < st.low_accuracy_streak < hy.accuracy_windows:
        watch.append(f"accuracy under the floor in {st.low_accuracy_streak} of {hy.accuracy_windows} "
                     "window(s) needed")

    # -- 3. retrain --------------------------------------------------------------------------
    if p.retrain_requires_accuracy_drop:
        want, why = accuracy_low, "accuracy under the floor"
        if drift_holds and not accuracy_low:
            hold.append(f"drift for {st.drift_streak} windows, but accuracy {acc} ({acc_source}) is not "
                        f"under the floor {obj.accuracy_floor}: no retrain (policy)")
    else:
        want = drift_holds or accuracy_low
        causes = (("drift held", drift_holds), ("accuracy under the floor", accuracy_low))
        why = " and ".join(x for x, on in causes if on)
    if want:
        detail = (f"{why}: drift in {st.drift_streak} window(s) (>= {hy.drift_windows}), accuracy "
                  + (f"{acc:.4f}" if acc is not None else "unknown") + f" ({acc_source}, floor "
                  f"{obj.accuracy_floor}, {st.low_accuracy_streak} low window(s))")
        wait = cd.retrain - min(_since(st, "retrain", now),
                                math.inf if st.retrain_ended_at is None else now - st.retrain_ended_at)
        if st.retraining:
            hold.append(f"{why}, but a retrain is in progress (since {st.retrain_started_at or 0:.0f})")
        elif len(st.retrains) >= lim.retrain_budget_per_day:
            nxt = (min(st.retrains) + DAY_S - now) if st.retrains else 0.0
            hold.append(f"{why}, but the retrain budget is spent: {len(st.retrains)} of "
                        f"{lim.retrain_budget_per_day} in the last 24 h (next in {nxt:.0f}s)")
        elif wait > 0:
            hold.append(f"{why}, but retrain cooldown: {wait:.0f}s left")
        else:
            scaling = next((a.kind for a in actions if a.kind == "scale_up"), None)
            actions.append(PlannedAction(
                kind="retrain", reason=detail + (" - after scaling up" if scaling else ""),
                params={"since_id": st.episode_start_id, "episode": st.episode + 1},
                evidence={**quality_ev, "retrains_last_24h": len(st.retrains),
                          "retrain_budget_per_day": lim.retrain_budget_per_day},
                after=scaling,
            ))

    hold += watch
    if not actions and not hold:
        hold.append(_all_well(s, p, acc, acc_source, st))
    out = Plan(window=s.window, actions=actions, hold=hold, evidence=evidence)
    st.window, st.plan = s.window, out
    return out, st


def _all_well(s: Signals, p: Policy, acc: float | None, source: str, st: PlannerState) -> str:
    lat = ("idle" if s.p95_latency_ms is None or s.n_requests < p.hysteresis.min_requests
           else f"p95 {s.p95_latency_ms:.1f} ms (SLO {p.objectives.p95_latency_ms:.0f})")
    floor = p.objectives.accuracy_floor
    a = "accuracy unknown" if acc is None else f"accuracy {acc:.4f} ({source}, floor {floor})"
    return (f"{lat}, {s.replicas} replica(s); drift in {st.drift_streak} of {p.hysteresis.drift_windows} "
            f"windows; {a}")


def record_outcome(state: PlannerState, kind: ActionKind, ok: bool, now: float,
                   params: dict[str, Any] | None = None) -> PlannerState:
    """The state after an action of the plan was carried out (`ok`) or not. Cooldowns and
    budgets start only for actions that happened; failed ones are simply planned again."""
    st = state.model_copy(deep=True)
    if not ok:
        return st
    st.last_action_at[kind] = now
    if kind in ("scale_up", "scale_down"):
        st.hot_streak = st.cold_streak = 0
    elif kind == "retrain":
        st.retraining = True
        st.retrain_started_at = now
        st.retrains.append(now)
        st.episode += 1
    elif kind == "rollback":
        if params and params.get("from_version"):
            st.judged_versions[str(params["from_version"])] = "rolled_back"
        st.low_accuracy_streak = 0
    return st


# =============================================================================================
# Leases
# =============================================================================================
class LeaseBusy(RuntimeError):
    """Another holder acts on the service now."""


def lease_holder(ctx: AgentContext) -> str:
    """This process of this agent: a restarted agent is a new holder, so it waits for the lease
    of the killed one to expire instead of acting next to a process that may still live."""
    return f"{ctx.name}:{os.getpid()}"


@contextmanager
def service_lease(
    store: Store, service: str, holder: str, *, ttl_s: float = 30.0, wait_s: float = 0.0, purpose: str = ""
) -> Iterator[None]:
    """Hold the service's lease for the block, renewed in the background every ttl/3; raise
    LeaseBusy if it stays taken for `wait_s`."""
    name = f"service:{service}"
    deadline = time.monotonic() + wait_s
    while not store.acquire_lease(name, holder, ttl_s, purpose=purpose):
        if time.monotonic() >= deadline:
            cur = store.get_lease(name)
            who = f"{cur.holder} until {cur.expires_at:.0f} ({cur.purpose})" if cur else "another holder"
            raise LeaseBusy(f"service {service!r} is leased by {who}")
        time.sleep(min(1.0, ttl_s / 5))
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(ttl_s / 3):
            try:
                if not store.renew_lease(name, holder, ttl_s):
                    log.error("lease on %s lost by %s", service, holder)
                    return
            except Exception:  # noqa: BLE001 - a store hiccup: try again next period
                log.exception("renewing the lease on %s", service)

    t = threading.Thread(target=renew, name=f"lease-{service}", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(timeout=5)
        store.release_lease(name, holder)


# =============================================================================================
# Store-facing sensor, rule and actuators
# =============================================================================================
def policy_for(ctx: AgentContext, service: str) -> Policy:
    """The policy of `service` in the agent's application (the default policy if none)."""
    svc = ctx.app.services.get(service)
    pol = getattr(svc, "policy", None) if svc is not None else None
    return pol if isinstance(pol, Policy) else Policy()


def _log_window(store: Store, service: str, *, since: float | None = None, until: float | None = None,
                labelled_only: bool = False, version: str | None = None,
                with_inputs: bool = False, limit: int | None = None) -> dict[str, Any]:
    """Columns of the prediction log, oldest first: ts, latency_ms, outputs, labels, versions
    (and inputs)."""
    if hasattr(store, "prediction_window"):  # the columnar read path
        w = store.prediction_window(service, model_version=version, since=since, until=until,
                                    labelled_only=labelled_only, with_inputs=with_inputs, limit=limit)
        return {"ids": list(w.ids), "ts": np.asarray(w.ts), "latency_ms": np.asarray(w.latency_ms),
                "outputs": list(w.outputs), "labels": list(w.labels), "versions": list(w.model_versions),
                "inputs": w.inputs}
    rows = store.predictions(service, since=since, until=until, labelled_only=labelled_only)
    if version is not None:
        rows = [r for r in rows if r["model_version"] == version]
    rows = rows[:limit] if limit is not None else rows
    return {"ids": [r["id"] for r in rows], "ts": np.asarray([r["ts"] for r in rows], dtype=float),
            "latency_ms": np.asarray([r["latency_ms"] for r in rows], dtype=float),
            "outputs": [r["outputs"] for r in rows], "labels": [r["label"] for r in rows],
            "versions": [r["model_version"] for r in rows],
            "inputs": [r["inputs"] for r in rows] if with_inputs else None}


def predicted_class(out: Any) -> Any:
    """The served class of one output (a bare label, or a dict with a label field)."""
    if isinstance(out, dict):
        for k in ("label", "prediction", "predicted", "class"):
            if k in out:
                return out[k]
    return out


def _confidences(ctx: AgentContext, service: str, version: str, win: dict[str, Any], proba_key: str
                 ) -> np.ndarray | None:
    """Top-class confidence of each prediction: from the logged outputs when the model returns
    probabilities (`proba_key`), else by asking the served model version (sklearn flavour)."""
    outs = win["outputs"]
    if outs and all(isinstance(o, dict) and proba_key in o for o in outs):
        return np.asarray([max(o[proba_key]) if isinstance(o[proba_key], list) else o[proba_key]
                           for o in outs], dtype=float)
    x = win.get("inputs")
    if x is None or len(outs) == 0:
        return None
    model = _model(ctx, service, version)
    if model is None or not hasattr(model, "predict_proba"):
        return None
    arr = np.asarray(x, dtype=np.float64).reshape(len(outs), -1)
    return np.asarray(model.predict_proba(arr), dtype=float).max(axis=1)


def _model(ctx: AgentContext, service: str, version: str, flavour: str = "sklearn") -> Any:
    """A registered version of the service's model, loaded once per agent process (None when
    it cannot be loaded with that flavour: the caller falls back and says so)."""
    cache: dict[tuple[str, str], Any] = ctx.__dict__.setdefault("_planner_models", {})
    if (flavour, version) not in cache:
        dep = ctx.store.get_deployment(service)
        try:
            cache[(flavour, version)] = (load_version(ctx.settings, dep.model_name, version, flavour)
                                         if dep else None)
        except Exception as exc:  # noqa: BLE001 - e.g. not an sklearn model: no CBPE
            log.warning("cannot load %s v%s as %s: %s", service, version, flavour, exc)
            cache[(flavour, version)] = None
    return cache[(flavour, version)]


def _cbpe_estimate(ctx: AgentContext, service: str, version: str, win: dict[str, Any], notes: list[str],
                   calibration_size: int, min_calibration: int, proba_key: str) -> tuple[float | None, int]:
    from scanflow.monitor.cbpe import CBPE

    cache: dict[str, Any] = ctx.__dict__.setdefault("_planner_cbpe", {})
    cbpe = cache.get(version)
    if cbpe is None:
        # Calibrate on the first labelled predictions this version served (its reference).
        lab = _log_window(ctx.store, service, labelled_only=True, version=version, with_inputs=True,
                          limit=calibration_size)
        k = min(len(lab["outputs"]), calibration_size)
        if k < min_calibration:
            notes.append(f"CBPE: {k} labelled predictions of version {version}, "
                         f"need {min_calibration} to calibrate")
            return None, 0
        ref = {key: (v[:k] if v is not None else None) for key, v in lab.items()}
        conf = _confidences(ctx, service, version, ref, proba_key)
        if conf is None:
            notes.append("CBPE: no class probabilities (neither logged nor from the model)")
            return None, 0
        y_pred = [predicted_class(o) for o in ref["outputs"]]
        cbpe = CBPE(min_reference=min_calibration).fit(conf, np.asarray(ref["labels"], dtype=object),
                                                       y_pred=np.asarray(y_pred, dtype=object))
        cache[version] = cbpe
    mine = [i for i, v in enumerate(win["versions"]) if v == version]
    if not mine:
        return None, 0
    sub = {"outputs": [win["outputs"][i] for i in mine],
           "inputs": None if win.get("inputs") is None else np.asarray(win["inputs"])[mine]}
    conf = _confidences(ctx, service, version, sub, proba_key)
    if conf is None:
        return None, 0
    est = cbpe.estimate(conf)
    return est.accuracy, est.n


def _labelled_accuracy(win: dict[str, Any], last: int) -> tuple[float | None, int]:
    pairs = [(o, lab) for o, lab in zip(win["outputs"], win["labels"], strict=True) if lab is not None]
    pairs = pairs[-last:] if last else pairs
    if not pairs:
        return None, 0
    return float(np.mean([predicted_class(o) == lab for o, lab in pairs])), len(pairs)


def _probation(ctx: AgentContext, service: str, version: str | None, policy: Policy,
               state: PlannerState) -> ProbationSignal | None:
    """Figures of the model now served if it arrived by a forward rollout (not a rollback)."""
    if version is None or version in state.judged_versions:
        return None
    with ctx.store.session() as s:
        last = s.scalars(
            select(Event)
            .where(Event.service == service, Event.kind.in_(["rollout_completed", "rollback_completed"]))
            .order_by(Event.id.desc())
            .limit(1)
        ).first()
    if last is None or last.kind != "rollout_completed" or str(last.payload.get("to_version")) != version:
        return None
    prev = last.payload.get("from_version")
    if prev is None:
        return None
    prev = str(prev)
    r = policy.rollback
    new = _log_window(ctx.store, service, since=last.ts, labelled_only=True, version=version,
                      limit=r.window, with_inputs=True)
    acc_new, n_new = _first_accuracy(new, r.window)
    # The fair comparison: the old champion on the very requests the new model answered (the
    # traffic may have changed since the old one served: its own history is another distribution).
    acc_old, n_old = _replayed_accuracy(ctx, service, prev, new, r.window)
    basis = "same_requests"
    if acc_old is None:
        old = _log_window(ctx.store, service, since=last.ts - DAY_S, until=last.ts, labelled_only=True,
                          version=prev)
        acc_old, n_old = _labelled_accuracy(old, r.window)
        basis = "own_history"
    return ProbationSignal(promoted_version=version, previous_version=prev, promoted_at=last.ts,
                           promoted_accuracy=acc_new, promoted_n=n_new,
                           previous_accuracy=acc_old, previous_n=n_old, previous_basis=basis)


def _replayed_accuracy(ctx: AgentContext, service: str, version: str, win: dict[str, Any], first: int
                       ) -> tuple[float | None, int]:
    """Accuracy of `version` re-scoring the first `first` labelled requests of `win` (None when
    the inputs or the model are not available)."""
    inputs = win.get("inputs")
    if not isinstance(inputs, np.ndarray) or not len(inputs):
        return None, 0
    labels = win["labels"][:first]
    model = _model(ctx, service, version, flavour="pyfunc")
    if model is None:
        return None, 0
    try:
        return rescored_accuracy(model, inputs[: len(labels)], labels), len(labels)
    except Exception as exc:  # noqa: BLE001 - fall back to the model's own history
        log.warning("probation: version %s cannot re-score the window: %s", version, exc)
        return None, 0


def rescored_accuracy(model: Any, x: Any, labels: Any) -> float:
    """Accuracy of `model` (anything with `predict`) re-scoring inputs whose true labels are known."""
    preds = model.predict(np.asarray(x, dtype=np.float64))
    preds = preds.tolist() if hasattr(preds, "tolist") else list(preds)
    truth = labels.tolist() if isinstance(labels, np.ndarray) else list(labels)
    return float(np.mean([predicted_class(p_) == lab for p_, lab in zip(preds, truth, strict=True)]))


def _first_accuracy(win: dict[str, Any], first: int) -> tuple[float | None, int]:
    pairs = [(o, lab) for o, lab in zip(win["outputs"], win["labels"], strict=True) if lab is not None]
    pairs = pairs[:first]
    if not pairs:
        return None, 0
    return float(np.mean([predicted_class(o) == lab for o, lab in pairs])), len(pairs)


def load_state(ctx: AgentContext) -> PlannerState:
    raw = ctx.get(STATE_KEY)
    return PlannerState.model_validate(raw) if raw else PlannerState()


def save_state(ctx: AgentContext, state: PlannerState) -> None:
    ctx.set(STATE_KEY, state.model_dump(mode="json"))


def service_signals(
    ctx: AgentContext,
    window_s: float = 10.0,
    settle_s: float = 1.0,
    service: str | None = None,
    drift_kinds: list[str] | None = None,
    done_kinds: list[str] | None = None,
    labelled_window: int = 500,
    labelled_lookback_s: float = 600.0,
    cbpe: bool = True,
    calibration_size: int = 1000,
    min_calibration: int = 200,
    proba_key: str = "probabilities",
) -> Observation | None:
    """One observation per complete time window of `window_s` seconds (aligned to the clock,
    so a replay after a crash names the same window). The window in flight and the messages
    it consumes are written down before it is judged: a restarted planner judges exactly that
    window again, and skips windows that went by while it was down (stale for scaling)."""
    svc = service or ctx.service
    if svc is None:
        raise ValueError("service_signals needs a service (agent `service:` or param)")
    if window_s <= 0:
        raise ValueError(f"window_s must be positive, got {window_s}")
    now = time.time()
    last_complete = math.floor((now - settle_s) / window_s) - 1
    mark = ctx.get("planner.watermark")
    open_w = ctx.get("planner.open")
    kinds = list(drift_kinds or ["drift_report"]) + list(done_kinds or ["retrain_done"])
    if open_w and (mark is None or open_w["index"] > mark):
        idx, message_ids, skipped = int(open_w["index"]), list(open_w["message_ids"]), int(open_w["skipped"])
    else:
        if mark is not None and last_complete <= int(mark):
            return None
        idx = last_complete
        skipped = 0 if mark is None else max(0, idx - int(mark) - 1)
        message_ids = [m.id for m in ctx.store.inbox(ctx.name, kinds, limit=1000)]
        ctx.set("planner.open", {"index": idx, "message_ids": message_ids, "skipped": skipped})
    t0, t1 = idx * window_s, (idx + 1) * window_s
    key = f"{svc}:{window_s:g}s:{idx}"

    with ctx.store.session() as s:
        msgs = list(s.scalars(select(Message).where(Message.id.in_(message_ids)).order_by(Message.id)).all()
                    ) if message_ids else []
    drift_set, done_set = set(drift_kinds or ["drift_report"]), set(done_kinds or ["retrain_done"])
    reports = [DriftReport(drift=bool(m.payload.get("drift")), first_id=m.payload.get("first_id"),
                           last_id=m.payload.get("last_id"), key=m.key,
                           reference_version=(None if m.payload.get("reference_version") is None
                                              else str(m.payload["reference_version"])),
                           tests=[t.get("test", "?") for t in m.payload.get("tests", []) if t.get("drift")])
               for m in msgs if m.kind in drift_set]
    done = [{**_plain(m.payload), "ts": m.ts, "key": m.key} for m in msgs if m.kind in done_set]

    dep = ctx.store.get_deployment(svc)
    version = dep.model_version if dep else None
    notes: list[str] = []
    if dep is None:
        notes.append(f"service {svc!r} is not deployed")
    if skipped:
        notes.append(f"{skipped} window(s) went by unjudged while the planner was down")
    win = _log_window(ctx.store, svc, since=t0, until=t1, with_inputs=cbpe)
    lat = win["latency_ms"]
    n = len(lat)
    p95 = float(np.percentile(lat, 95)) if n else None
    est, est_n = None, 0
    if cbpe and version is not None and n:
        try:
            est, est_n = _cbpe_estimate(ctx, svc, version, win, notes, calibration_size, min_calibration,
                                        proba_key)
        except Exception as exc:  # noqa: BLE001 - an estimate that fails is a note, not a crash
            notes.append(f"CBPE failed: {type(exc).__name__}: {exc}")
    lab_acc, lab_n = (None, 0)
    if version is not None:
        lab = _log_window(ctx.store, svc, since=t1 - labelled_lookback_s, until=t1, labelled_only=True,
                          version=version)
        lab_acc, lab_n = _labelled_accuracy(lab, labelled_window)
    policy = policy_for(ctx, svc)
    state = load_state(ctx)
    probation = _probation(ctx, svc, version, policy, state)
    sig = Signals(
        window=key, now=now, window_s=window_s, replicas=dep.replicas if dep else 0, model_version=version,
        n_requests=n, p95_latency_ms=p95, throughput_rps=n / window_s, drift_reports=reports,
        accuracy_estimate=est, accuracy_estimate_n=est_n, labelled_accuracy=lab_acc, labelled_n=lab_n,
        retrains_done=done, probation=probation, notes=notes,
    )

    def commit() -> None:
        for mid in message_ids:
            ctx.store.ack_message(mid)
        ctx.set("planner.watermark", idx)

    evidence = {"service": svc, "window": {"start": t0, "end": t1, "index": idx},
                "signals": sig.model_dump(mode="json", exclude={"drift_reports", "retrains_done"}),
                "drift_report_keys": [r.key for r in reports], "retrains_done": len(done)}
    data = {"service": svc, "signals": sig.model_dump(mode="json")}
    return Observation(key=key, evidence=evidence, data=data, commit=commit)


def decide(obs: Observation, ctx: AgentContext) -> tuple[bool, str]:
    """Rule: run :func:`plan` on the observation; the plan goes to the actuators in
    `obs.data['plan']` and into the decision's evidence."""
    svc = obs.data.get("service") or ctx.service
    sig = Signals.model_validate(obs.data["signals"])
    state = load_state(ctx)
    policy = policy_for(ctx, svc)
    out, new_state = plan(sig, state, policy)
    if new_state is not state:
        save_state(ctx, new_state)
    obs.data["plan"] = out.model_dump(mode="json")
    obs.evidence["plan"] = {"actions": [a.model_dump(mode="json") for a in out.actions], "hold": out.hold,
                            **out.evidence}
    if out.fired:  # the knobs it acted on; a hold quotes its thresholds in the plan evidence
        obs.evidence["policy"] = policy.model_dump(mode="json")
    return out.fired, out.reason


def _with_actor(ctx: AgentContext) -> Any:
    """The deployer, acting (in the audit trail) as this agent."""
    dep = ctx.deployer
    if getattr(dep, "actor", ctx.name) != ctx.name:
        dep.actor = ctx.name
    return dep


def execute(obs: Observation, ctx: AgentContext, executor: str = "executor", lease_ttl_s: float = 30.0,
            lease_wait_s: float | None = None) -> dict[str, Any]:
    """Actuator: carry out the plan in order, under the service's lease. Scaling and rollback
    happen here; a retrain is a durable message to `executor` (keyed by the window, so a
    replay does not send it twice). Steps done before a crash are not done again."""
    svc = obs.data.get("service") or ctx.service
    p = Plan.model_validate(obs.data["plan"])
    done_key = f"planner.done.{p.window}"
    done: list[str] = list(ctx.get(done_key, []))
    results: list[dict[str, Any]] = []
    failed: list[str] = []
    wait = lease_ttl_s + 5.0 if lease_wait_s is None else lease_wait_s
    for a in p.actions:
        if a.kind in done:
            results.append({"kind": a.kind, "status": "done before a restart"})
            continue
        try:
            if a.kind == "retrain":
                res = _send_retrain(ctx, svc, obs.key, a, executor)
            else:
                with service_lease(ctx.store, svc, lease_holder(ctx), ttl_s=lease_ttl_s, wait_s=wait,
                                   purpose=f"{a.kind} ({p.window})"):
                    scaling = a.kind in ("scale_up", "scale_down")
                    res = _scale(ctx, svc, a) if scaling else _rollback(ctx, svc, a)
            ok = True
        except Exception as exc:  # noqa: BLE001 - recorded, and the plan goes on where it can
            log.error("planner action %s on %s failed: %s", a.kind, svc, exc)
            res, ok = {"error": f"{type(exc).__name__}: {exc}"}, False
            failed.append(a.kind)
            ctx.event("plan_action_failed", action=a.kind, window=p.window, reason=a.reason,
                      error=res["error"])
        save_state(ctx, record_outcome(load_state(ctx), a.kind, ok, time.time(), a.params))
        if ok:
            done.append(a.kind)
            ctx.set(done_key, done)
        results.append({"kind": a.kind, "status": "done" if ok else "failed", **res})
    summary = {"service": svc, "window": p.window, "results": results,
               **{f"{r['kind']}": r["status"] for r in results}}
    if failed:
        raise RuntimeError(f"{', '.join(failed)} failed: " + "; ".join(
            str(r.get("error")) for r in results if r["status"] == "failed"))
    return summary


def _scale(ctx: AgentContext, svc: str, a: PlannedAction) -> dict[str, Any]:
    target = int(a.params["replicas"])
    dep = ctx.store.get_deployment(svc)
    if dep is not None and dep.replicas == target:  # a replay after a crash, or someone did it
        return {"replicas": target, "already": True}
    deployer = _with_actor(ctx)
    dep = deployer.scale(svc, target, reason=a.reason)
    ctx.event("planner_scaled", action=a.kind, replicas=target, reason=a.reason,
              p95_latency_ms=a.evidence.get("p95_latency_ms"), slo_p95_ms=a.evidence.get("slo_p95_ms"),
              throughput_rps=a.evidence.get("throughput_rps"))
    return {"replicas": getattr(dep, "replicas", target)}


def _send_retrain(ctx: AgentContext, svc: str, window: str, a: PlannedAction, executor: str
                  ) -> dict[str, Any]:
    key = f"{ctx.name}:{window}:retrain"
    payload = {"service": svc, "since_id": a.params.get("since_id"), "episode": a.params.get("episode"),
               "reason": a.reason, "window": window, "evidence": _plain(a.evidence)}
    new = ctx.send(executor, "retrain", payload, key=key)
    if new:
        ctx.event("retrain_requested", episode=a.params.get("episode"), since_id=a.params.get("since_id"),
                  reason=a.reason, to=executor, message=key)
    return {"to": executor, "message": key, "new": new, "episode": a.params.get("episode")}


def _rollback(ctx: AgentContext, svc: str, a: PlannedAction) -> dict[str, Any]:
    bad, good = a.params.get("from_version"), a.params.get("to_version")
    dep = ctx.store.get_deployment(svc)
    if dep is not None and bad is not None and str(dep.model_version) != str(bad):
        return {"from_version": bad, "to_version": good, "already": f"serving version {dep.model_version}"}
    deployer = _with_actor(ctx)
    out = deployer.rollback(svc, reason=a.reason)
    now_serving = getattr(out, "model_version", None)
    ctx.event("rolled_back", from_version=bad, to_version=now_serving or good, reason=a.reason,
              approved_by=f"policy:{ctx.name}", **_numbers(a.evidence))
    return {"from_version": bad, "to_version": now_serving or good}


def rollback(obs: Observation, ctx: AgentContext, service: str | None = None, lease_ttl_s: float = 30.0,
             lease_wait_s: float | None = None) -> dict[str, Any]:
    """Actuator for any agent: judge the probation of the served model (the figures come from
    the observation's `probation`, or are read from the store) and roll the service back
    through the deployer if it lost to the champion it replaced; the `rolled_back` event
    carries the accuracies, sample counts and margin."""
    svc = service or obs.data.get("service") or ctx.service
    if svc is None:
        raise ValueError("rollback needs a service (agent `service:` or param)")
    policy = policy_for(ctx, svc)
    dep = ctx.store.get_deployment(svc)
    version = dep.model_version if dep else None
    raw = (obs.data.get("signals") or {}).get("probation") or obs.data.get("probation")
    sig = (ProbationSignal.model_validate(raw) if raw
           else _probation(ctx, svc, version, policy, PlannerState()))
    if sig is None:
        return {"service": svc, "rolled_back": False, "why": "the served model is not on probation"}
    verdict = rollback_judgement(sig, policy, time.time())
    if verdict.decision != "rollback":
        return {"service": svc, "rolled_back": False, "why": verdict.reason}
    act = PlannedAction(kind="rollback", reason=verdict.reason, evidence=verdict.evidence,
                        params={"from_version": sig.promoted_version, "to_version": sig.previous_version})
    wait = lease_ttl_s + 5.0 if lease_wait_s is None else lease_wait_s
    with service_lease(ctx.store, svc, lease_holder(ctx), ttl_s=lease_ttl_s, wait_s=wait, purpose="rollback"):
        res = _rollback(ctx, svc, act)
    return {"service": svc, "rolled_back": True, "reason": verdict.reason, **res}


def _numbers(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if isinstance(v, int | float | str | bool) or v is None}


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    import json

    return json.loads(json.dumps(d, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


__all__ = [
    "DriftReport", "GateResult", "LeaseBusy", "Plan", "PlannedAction", "PlannerState", "ProbationSignal",
    "RollbackVerdict", "Signals", "decide", "execute", "lease_holder", "plan", "policy_for", "promotion_gate",
    "record_outcome", "rollback", "rollback_judgement", "service_lease", "service_signals",
]
