"""The planner's rule and actuators: :func:`decide` runs the pure :func:`plan` and keeps the
planner state in the store; :func:`execute` carries the plan out (scaling and rollback through
the control layer's operations, under the service's lease; a retrain as a durable message to
the executor agent); :func:`rollback` is the guarded rollback any agent may use.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from scanflow.agents.gate import policy_for
from scanflow.agents.planner.model import Plan, PlannedAction, PlannerState, ProbationSignal, Signals
from scanflow.agents.planner.policy import plan, record_outcome, rollback_judgement
from scanflow.agents.planner.signals import _probation, load_state, plain, save_state
from scanflow.agents.runtime import AgentContext, Observation
from scanflow.control.leases import process_holder
from scanflow.control.operations import ModelOps

log = logging.getLogger("scanflow.agents.planner")


def lease_holder(ctx: AgentContext) -> str:
    """This process of this agent: a restarted agent is a new holder, so it waits for the lease
    of the killed one to expire instead of acting next to a process that may still live."""
    return process_holder(ctx.name)


def _service(obs: Observation, ctx: AgentContext) -> str:
    """The service the observation is about (else the agent's): the planner acts on one."""
    svc = obs.data.get("service") or ctx.service
    if not svc:
        raise ValueError("the planner needs a service (agent `service:` or the observation's)")
    return str(svc)


def decide(obs: Observation, ctx: AgentContext) -> tuple[bool, str]:
    """Rule: run :func:`plan` on the observation; the plan goes to the actuators in
    `obs.data['plan']` and into the decision's evidence."""
    svc = _service(obs, ctx)
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


def _ops(ctx: AgentContext, lease_ttl_s: float, lease_wait_s: float | None) -> ModelOps:
    """The control operations as this agent (the lease waits ttl + 5 s unless told)."""
    wait = lease_ttl_s + 5.0 if lease_wait_s is None else lease_wait_s
    return ModelOps(_with_actor(ctx), ctx.store, lease_ttl_s=lease_ttl_s, lease_wait_s=wait)


def execute(obs: Observation, ctx: AgentContext, executor: str = "executor", lease_ttl_s: float = 30.0,
            lease_wait_s: float | None = None) -> dict[str, Any]:
    """Actuator: carry out the plan in order. Scaling and rollback go through the control
    operations (under the service's lease); a retrain is a durable message to `executor`
    (keyed by the window, so a replay does not send it twice). Steps done before a crash are
    not done again."""
    svc = _service(obs, ctx)
    p = Plan.model_validate(obs.data["plan"])
    done_key = f"planner.done.{p.window}"
    done: list[str] = list(ctx.get(done_key, []))
    results: list[dict[str, Any]] = []
    failed: list[str] = []
    for a in p.actions:
        if a.kind in done:
            results.append({"kind": a.kind, "status": "done before a restart"})
            continue
        try:
            if a.kind == "retrain":
                res = _send_retrain(ctx, svc, obs.key, a, executor)
            elif a.kind == "rollback":
                res = _rollback(ctx, _ops(ctx, lease_ttl_s, lease_wait_s), svc, a)
            else:
                res = _scale(ctx, _ops(ctx, lease_ttl_s, lease_wait_s), svc, a)
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


def _scale(ctx: AgentContext, ops: ModelOps, svc: str, a: PlannedAction) -> dict[str, Any]:
    target = int(a.params["replicas"])
    keys = ("p95_latency_ms", "slo_p95_ms", "throughput_rps", "in_flight", "in_flight_per_replica",
            "target_in_flight_per_replica", "replicas_from", "replicas_to")
    evidence = {"action": a.kind, **{k: a.evidence.get(k) for k in keys if k in a.evidence}}
    out = ops.scale(svc, target, actor=ctx.actor("policy"), reason=a.reason, evidence=evidence,
                    record_as="planner_scaled")
    if not out.changed:  # a replay after a crash, or someone did it
        return {"replicas": target, "already": True}
    return {"replicas": out.after}


def _send_retrain(ctx: AgentContext, svc: str, window: str, a: PlannedAction, executor: str
                  ) -> dict[str, Any]:
    key = f"{ctx.name}:{window}:retrain"
    payload = {"service": svc, "since_id": a.params.get("since_id"), "episode": a.params.get("episode"),
               "since_ts": a.params.get("since_ts"), "reason": a.reason, "window": window,
               "evidence": plain(a.evidence)}
    new = ctx.send(executor, "retrain", payload, key=key)
    if new:
        ctx.event("retrain_requested", episode=a.params.get("episode"), since_id=a.params.get("since_id"),
                  reason=a.reason, to=executor, message=key)
    return {"to": executor, "message": key, "new": new, "episode": a.params.get("episode")}


def _rollback(ctx: AgentContext, ops: ModelOps, svc: str, a: PlannedAction) -> dict[str, Any]:
    bad, good = a.params.get("from_version"), a.params.get("to_version")
    out = ops.rollback(svc, actor=ctx.actor("policy"), reason=a.reason, evidence=_numbers(a.evidence),
                       expect_serving=None if bad is None else str(bad))
    if not out.changed:
        return {"from_version": bad, "to_version": good, "already": f"serving version {out.after}"}
    return {"from_version": bad, "to_version": out.after or good}


def rollback(obs: Observation, ctx: AgentContext, service: str | None = None, lease_ttl_s: float = 30.0,
             lease_wait_s: float | None = None) -> dict[str, Any]:
    """Actuator for any agent: judge the probation of the served model (the figures come from
    the observation's `probation`, or are read from the store) and roll the service back
    through the control layer if it lost to the champion it replaced; the `rolled_back` event
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
    res = _rollback(ctx, _ops(ctx, lease_ttl_s, lease_wait_s), svc, act)
    return {"service": svc, "rolled_back": True, "reason": verdict.reason, **res}


def _numbers(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if isinstance(v, int | float | str | bool) or v is None}


__all__ = ["decide", "execute", "lease_holder", "rollback"]
