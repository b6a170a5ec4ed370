"""Audit commands: `events`, `decisions`, `why` (read the store, change nothing).

Times are ISO 8601 UTC to the millisecond in the tables and in `--json` alike; `--json` also
gives each time's epoch seconds (`ts`)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from scanflow.cli import remote as via
from scanflow.cli.common import context, fail, iso, out, print_json, show, table, when

# What an action's stored summary says about itself rather than about what it did.
_ACTION_BOOKKEEPING = {"action", "key", "status", "replayed"}


def events(
    service: Annotated[str | None, typer.Option(help="only this service")] = None,
    kind: Annotated[list[str] | None, typer.Option(help="only these kinds")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """The event log (drift detected, retrains, promotions, rollouts...)."""
    if (api := via.remote()) is not None:
        rows = [via.row(e) for e in api.pages("/api/v1/events", {"service": service, "kind": kind,
                                                                  "limit": 1000}, limit=1000)]
    else:
        rows = context()[1].list_events(service, kind)
    if as_json:
        listed = []
        for e in rows:
            row = {"id": e.id, "time": when(e.ts), "ts": e.ts, "kind": e.kind, "source": e.source,
                   "service": e.service}
            listed.append({**row, **{k: v for k, v in e.payload.items() if k not in row}})
        print_json(listed)
        return
    t = table("time", "source", "kind", "service", "details")
    for e in rows:
        details = ", ".join(f"{k}={v}" for k, v in e.payload.items() if not isinstance(v, list | dict))
        t.add_row(iso(e.ts), e.source, e.kind, e.service or "-", details)
    show(t)


def _action_text(a: dict[str, Any]) -> str:
    """One action as `decisions` shows it: its name, how it ended, and what it reported."""
    said = ", ".join(f"{k}={v}" for k, v in a.items() if k not in _ACTION_BOOKKEEPING)
    return f"{a.get('action', '?').split(':')[-1]}: {a.get('status')}" + (f" ({said})" if said else "")


def decisions(
    agent: Annotated[str | None, typer.Option(help="only this agent")] = None,
    service: Annotated[str | None, typer.Option(help="only this service")] = None,
    fired: Annotated[bool, typer.Option("--fired", help="only decisions that acted")] = False,
    limit: Annotated[int | None, typer.Option(min=1, help="only the newest N")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="every decision with its evidence")] = False,
) -> None:
    """Every judgement of the agents: when, which sensor, whether its rule fired and why, and
    the actions it took with how they ended."""
    if (api := via.remote()) is not None:
        rows = [via.row(d) for d in api.pages("/api/v1/decisions", {
            "agent": agent, "service": service, "fired": True if fired else None, "limit": 1000})]
    else:
        rows = list(context()[1].list_decisions(agent, service, fired=True if fired else None))
    if limit is not None:
        rows = rows[-limit:]
    if as_json:
        print_json([{"id": d.id, "time": when(d.ts), "ts": d.ts, "agent": d.agent, "sensor": d.sensor,
                     "rule": d.rule, "fired": d.fired, "reason": d.evidence.get("reason", ""),
                     "service": d.service, "key": d.key, "evidence": d.evidence, "actions": d.actions,
                     "by": d.by}
                    for d in rows])
        return
    t = table("time", "agent", "sensor", "fired", "reason", "actions")
    for d in rows:
        t.add_row(iso(d.ts), d.agent, d.sensor, "yes" if d.fired else "no",
                  str(d.evidence.get("reason", "")) or "-",
                  "; ".join(_action_text(a) for a in d.actions) or "-")
    show(t, head=3)


def why(
    service: str,
    as_json: Annotated[bool, typer.Option("--json", help="the whole chain with every evidence")] = False,
    history: Annotated[bool, typer.Option("--history", help="also every version/replica change")] = False,
) -> None:
    """Why the service serves this model version with this many replicas: each decision with
    its evidence, the action, the run and model version it produced, and who approved it."""
    from scanflow.control.audit import why as audit_why  # lazy: the store (SQLAlchemy, ~0.5 s)

    if (api := via.remote()) is not None:
        res = api.call("GET", f"/api/v1/services/{service}/why")
    else:
        try:
            res = audit_why(context()[1], service)
        except KeyError as exc:
            fail(str(exc).strip("'\""))
    if as_json:
        print_json(res)
        return
    cur = res["current"]
    out.print(f"[bold]{service}[/]: models:/{cur['model']}@{cur['alias']} version "
              f"[bold]{cur['model_version']}[/] x[bold]{cur['replicas']}[/] ({cur['status']})")
    for label, link in (("model", res["model_change"]), ("replicas", res["replica_change"])):
        if link:
            out.print(f"  {label}: {link['event']['kind']} at {link['event']['time']}, "
                      f"approved by [bold]{link['approved_by']}[/]")
    t = table("time (UTC)", "for", "step", "who", "what")
    for s in res["chain"]:
        t.add_row(iso(s["ts"]), s["what"], s["step"], s["who"], s["summary"])
    show(t)
    if history:
        h = table("time", "change", "by", "version", "replicas")
        for e in res["history"]:
            ver = f"{e['from_version'] or ''} -> {e['to_version']}" if e["to_version"] is not None else ""
            rep = f"{e['from_replicas'] or ''} -> {e['to_replicas']}" if e["to_replicas"] is not None else ""
            h.add_row(e["time"], e["kind"], e["approved_by"], ver, rep)
        show(h)
