"""Why does a service serve this model with this many replicas? The chain behind it.

`why(store, service)` walks back from the deployment events that set the current model version
and the current replica count: the event (who acted: an agent, or a person) <- the action that
caused it (idempotency key, status, result) <- the decision that fired it (rule, reason, evidence:
statistics, thresholds, windows) <- the decisions upstream whose messages fed it (the analyzer's
drift tests, the monitor's window), plus the workflow run and model version an action produced.
Everything comes from the store; the answer is a plain dict, ready for JSON (the API) and for
`scanflow why <service>` (the CLI).
"""

from __future__ import annotations

from typing import Any

from scanflow.store import Store
from scanflow.store.schema import Action, Decision, Event, Message
from scanflow.times import iso_utc

VERSION_EVENTS = ("deployed", "rollout_completed", "rollback_completed")
REPLICA_EVENTS = ("deployed", "scaled")
_VERSION_KEYS = ("candidate_version", "to_version", "model_version", "version")
_SLACK_S = 2.0  # an event is recorded just after the action that caused it returns


def _event(e: Event) -> dict[str, Any]:
    return {"id": e.id, "ts": e.ts, "time": iso_utc(e.ts), "kind": e.kind, "source": e.source,
            "actor": e.payload.get("actor"), "payload": e.payload}


def _decision(d: Decision) -> dict[str, Any]:
    return {"key": d.key, "ts": d.ts, "time": iso_utc(d.ts), "agent": d.agent, "sensor": d.sensor,
            "rule": d.rule, "fired": d.fired, "reason": d.evidence.get("reason", ""),
            "evidence": d.evidence, "actions": d.actions, "by": d.by}


def _action(a: Action) -> dict[str, Any]:
    return {"key": a.key, "agent": a.agent, "kind": a.kind, "status": a.status, "result": a.result,
            "started": iso_utc(a.created_at), "ended": iso_utc(a.ended_at), "ts": a.created_at}


def _mentions(value: Any, keys: tuple[str, ...], target: Any) -> bool:
    """Does a (nested) action result name `target` under one of `keys`?"""
    if isinstance(value, dict):
        for k, v in value.items():
            if k in keys and str(v) == str(target):
                return True
            if _mentions(v, keys, target):
                return True
    elif isinstance(value, list):
        return any(_mentions(v, keys, target) for v in value)
    return False


class _Chain:
    """Look-ups over one store, cached for one `why` call."""

    def __init__(self, store: Store, service: str) -> None:
        self.store = store
        self.service = service
        self.agents = store.decisions.decision_agents() | {a.name for a in store.list_agents()}

    def decision(self, key: str) -> Decision | None:
        return self.store.decisions.decision_by_key(key)

    def message(self, key: str) -> Message | None:
        return self.store.agents.message_by_key(key)

    def action_at(self, ts: float, agent: str | None, keys: tuple[str, ...], target: Any) -> Action | None:
        """The action running when the event was recorded, preferring one whose result names
        the event's target (replicas, version); by `agent` when the event names it."""
        found = list(self.store.decisions.actions_around(ts, _SLACK_S, agent, limit=50))
        for a in found:
            if _mentions(a.result, keys, target):
                return a
        return found[0] if found and agent is not None else None

    def upstream(self, d: Decision, depth: int = 4) -> list[dict[str, Any]]:
        """The decisions whose messages this decision judged, oldest first."""
        out: list[dict[str, Any]] = []
        frontier = [d]
        seen = {d.key}
        for _ in range(depth):
            nxt: list[Decision] = []
            for cur in frontier:
                for key in self._fed_by(cur):
                    msg = self.message(key)
                    if msg is None:
                        continue
                    up = self._sender_decision(msg)
                    if up is not None and up.key not in seen:
                        seen.add(up.key)
                        nxt.append(up)
            out += [_decision(u) for u in nxt]
            frontier = nxt
            if not nxt:
                break
        return sorted(out, key=lambda x: x["ts"])

    @staticmethod
    def _fed_by(d: Decision) -> list[str]:
        """Message keys a decision consumed: its observation (an inbox message), or the drift
        reports a planner window read (the last few)."""
        keys: list[str] = []
        if d.key and d.key.count(":") >= 2:
            keys.append(d.key.split(":", 2)[2])
        keys += list(d.evidence.get("drift_report_keys", []))[-3:]
        return keys

    def _sender_decision(self, msg: Message) -> Decision | None:
        # Senders key their messages '<sender>:<their observation>:<kind>'.
        prefix, suffix = f"{msg.sender}:", f":{msg.kind}"
        if not (msg.key.startswith(prefix) and msg.key.endswith(suffix)):
            return None
        obs = msg.key[len(prefix):-len(suffix)]
        return self.store.decisions.first_decision_ending(msg.sender, f":{obs}")


def _approved_by(actor: str | None, agents: set[str], action: Action | None) -> str:
    if actor and actor in agents:
        return f"policy:{actor}"
    if action is not None and not actor:
        return f"policy:{action.agent}"
    if actor:
        return f"person:{actor}"
    return "unknown"


def _link(ch: _Chain, ev: Event, keys: tuple[str, ...], target: Any) -> dict[str, Any]:
    actor = ev.payload.get("actor")
    by_agent = actor if actor in ch.agents else None
    act = ch.action_at(ev.ts, by_agent, keys, target) if (by_agent or not actor) else None
    link: dict[str, Any] = {"event": _event(ev), "approved_by": _approved_by(actor, ch.agents, act),
                            "action": None, "decision": None, "upstream": [], "workflow_run": None,
                            "promotion": None}
    version = ev.payload.get("to_version") or ev.payload.get("model_version")
    if version is not None:
        promo = ch.store.latest_events(ch.service, ["promoted"], limit=20)
        for p in promo:
            if str(p.payload.get("version")) == str(version) and p.ts <= ev.ts + _SLACK_S:
                link["promotion"] = _event(p)
                break
    if act is None:
        return link
    link["action"] = _action(act)
    dkey = act.key[: -(len(act.kind) + 1)] if act.key.endswith(f":{act.kind}") else act.key.rsplit(":", 1)[0]
    d = ch.decision(dkey)
    if d is not None:
        link["decision"] = _decision(d)
        link["upstream"] = ch.upstream(d)
    run_id = act.result.get("run_id") if isinstance(act.result, dict) else None
    if run_id:
        run = ch.store.get_run(str(run_id))
        if run is not None:
            link["workflow_run"] = {"id": run.id, "workflow": run.workflow, "app": run.app, "team": run.team,
                                    "status": run.status, "trigger": run.trigger,
                                    "mlflow_run_id": run.mlflow_run_id, "ts": run.created_at,
                                    "created": iso_utc(run.created_at)}
    return link


def _steps(link: dict[str, Any] | None, what: str) -> list[dict[str, Any]]:
    """One link as a list of steps for printing, oldest first."""
    if not link:
        return []
    out: list[dict[str, Any]] = []
    for d in [*link["upstream"], *([link["decision"]] if link["decision"] else [])]:
        out.append({"ts": d["ts"], "what": what, "step": "decision", "who": d["agent"],
                    "summary": _decision_summary(d), "key": d["key"]})
    if link["action"]:
        a = link["action"]
        out.append({"ts": a["ts"], "what": what, "step": "action", "who": a["agent"],
                    "summary": _action_summary(a), "key": a["key"]})
    if link["workflow_run"]:
        r = link["workflow_run"]
        out.append({"ts": r["ts"], "what": what, "step": "workflow_run", "who": r["team"],
                    "summary": f"{r['workflow']} run {r['id'][:8]} {r['status']}", "key": r["id"]})
    if link["promotion"]:
        p = link["promotion"]
        pay = p["payload"]
        out.append({"ts": p["ts"], "what": what, "step": "model_version", "who": p["source"],
                    "summary": f"{pay.get('model')} v{pay.get('version')} promoted to @{pay.get('alias')} "
                    f"(approved by {pay.get('approved_by', '?')})", "key": str(p["id"])})
    e = link["event"]
    pay = e["payload"]
    if e["kind"] == "scaled":
        summary = f"scaled {pay.get('from')} -> {pay.get('to')} replica(s)"
    elif e["kind"] == "deployed":
        summary = f"deployed v{pay.get('model_version')} x{pay.get('replicas')}"
    else:
        summary = f"{e['kind']}: v{pay.get('from_version')} -> v{pay.get('to_version')}"
        if pay.get("reason"):
            summary += f" ({pay['reason']})"
    out.append({"ts": e["ts"], "what": what, "step": "event", "who": f"{e['source']} as {e['actor'] or '?'}",
                "summary": f"{summary}; approved by {link['approved_by']}", "key": str(e["id"])})
    return out


def _decision_summary(d: dict[str, Any]) -> str:
    """The reason, plus the numbers it rests on: test statistics, or the window judged."""
    ev = d["evidence"]
    parts = [d["reason"]] if d["reason"] else []
    tests = ev.get("tests")
    if isinstance(tests, list) and tests:
        parts.append(", ".join(
            f"{t.get('test')} p={t.get('p_value', float('nan')):.3g} (threshold {t.get('threshold', 0):.3g})"
            for t in tests if isinstance(t, dict)))
    if not parts:
        scal = [f"{k}={_num(v)}" for k, v in ev.items() if _shown(k, v)]
        parts.append(f"{d['rule']}: " + ", ".join(scal[:6]) if scal else d["rule"])
    return "; ".join(parts)


def _shown(k: str, v: Any) -> bool:
    if k == "reason" or isinstance(v, dict | list) or v is None:
        return False
    return not (isinstance(v, float) and abs(v) > 1e8)  # timestamps: the step has its time


def _num(v: Any) -> Any:
    return f"{v:.4g}" if isinstance(v, float) else v


def _action_summary(a: dict[str, Any]) -> str:
    res = a["result"] if isinstance(a["result"], dict) else {}
    if isinstance(res.get("results"), list):  # the planner's plan, step by step
        detail = ", ".join(f"{r.get('kind')} {r.get('status')}" for r in res["results"])
    else:
        detail = ", ".join(f"{k}={v}" for k, v in res.items()
                           if isinstance(v, str | int | float | bool) and k not in ("trace", "service"))
    text = f"{a['kind'].rpartition(':')[2]}: {a['status']}"
    return f"{text} ({detail[:160]})" if detail else text


def _version_of(e: Event) -> Any:
    return e.payload.get("to_version", e.payload.get("model_version"))


def _replicas_of(e: Event) -> int | None:
    v = e.payload.get("to", e.payload.get("replicas"))
    return int(v) if isinstance(v, int | float | str) and str(v).lstrip("-").isdigit() else None


def why(store: Store, service: str) -> dict[str, Any]:
    """The chain behind the current model version and replica count of `service`.

    Returns `current` (model, version, replicas), `model_change` and `replica_change` (each the
    deployment event that set it, `approved_by` - 'policy:<agent>' or 'person:<user>' - and the
    action, decision with evidence, upstream decisions, workflow run and promotion behind it),
    `chain` (their steps merged, newest last) and `history` (every version or replica change).
    Raises KeyError for an unknown service.
    """
    dep = store.get_deployment(service)
    if dep is None:
        known = ", ".join(d.service for d in store.list_deployments()) or "none"
        raise KeyError(f"no service {service!r} (known: {known})")
    ch = _Chain(store, service)
    kinds = sorted(set(VERSION_EVENTS + REPLICA_EVENTS))
    changes = list(store.list_events(service=service, kinds=kinds, limit=None))
    model_ev = next((e for e in reversed(changes) if e.kind in VERSION_EVENTS
                     and str(_version_of(e)) == str(dep.model_version)), None)
    replica_ev = next((e for e in reversed(changes) if e.kind in REPLICA_EVENTS
                       and _replicas_of(e) == dep.replicas), None)
    model_link = _link(ch, model_ev, _VERSION_KEYS, dep.model_version) if model_ev else None
    replica_link = _link(ch, replica_ev, ("replicas",), dep.replicas) if replica_ev else None
    steps = _steps(model_link, "model") + _steps(replica_link, "replicas")
    chain = sorted({(s_["step"], s_["key"]): s_ for s_ in steps}.values(), key=lambda x: x["ts"])
    for s_ in chain:
        s_["time"] = iso_utc(s_["ts"])
    history = []
    for e in changes:
        actor = e.payload.get("actor")
        history.append({"time": iso_utc(e.ts), "kind": e.kind, "actor": actor,
                        "approved_by": _approved_by(actor, ch.agents, None) if actor else "unknown",
                        "from_version": e.payload.get("from_version"),
                        "to_version": _version_of(e),
                        "from_replicas": e.payload.get("from"),
                        "to_replicas": _replicas_of(e)})
    return {
        "service": service,
        "current": {"model": dep.model_name, "alias": dep.alias, "model_version": dep.model_version,
                    "replicas": dep.replicas, "status": dep.status, "updated": iso_utc(dep.updated_at)},
        "model_change": model_link,
        "replica_change": replica_link,
        "chain": chain,
        "history": history,
    }


__all__ = ["why"]
