"""Audit commands: `events`, `decisions`, `why` (read the store, change nothing)."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from scanflow.cli.common import context, fail, iso, out


def events(
    service: Annotated[str | None, typer.Option(help="only this service")] = None,
    kind: Annotated[list[str] | None, typer.Option(help="only these kinds")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """The event log (drift detected, retrains, promotions, rollouts...)."""
    _, store = context()
    rows = store.list_events(service, kind)
    if as_json:
        print(json.dumps([{"time": iso(e.ts), "kind": e.kind, "source": e.source,
                           "service": e.service, **e.payload} for e in rows], default=str))
        return
    t = Table("time", "source", "kind", "service", "details")
    for e in rows:
        details = ", ".join(f"{k}={v}" for k, v in e.payload.items() if not isinstance(v, list | dict))
        t.add_row(iso(e.ts), e.source, e.kind, e.service or "-", details[:120])
    out.print(t)


def decisions(
    agent: Annotated[str | None, typer.Option(help="only this agent")] = None,
    fired: Annotated[bool, typer.Option("--fired", help="only decisions that acted")] = False,
) -> None:
    """Every judgement of the agents, with its evidence and actions."""
    _, store = context()
    t = Table("time", "agent", "sensor", "fired", "reason", "actions")
    for d in store.list_decisions(agent, fired=True if fired else None):
        acts = ", ".join(f"{a.get('action', '?').split(':')[-1]}:{a.get('status')}" for a in d.actions)
        t.add_row(iso(d.ts), d.agent, d.sensor, "yes" if d.fired else "no",
                  str(d.evidence.get("reason", ""))[:60], acts)
    out.print(t)


def why(
    service: str,
    as_json: Annotated[bool, typer.Option("--json", help="the whole chain with every evidence")] = False,
    history: Annotated[bool, typer.Option("--history", help="also every version/replica change")] = False,
) -> None:
    """Why the service serves this model version with this many replicas: each decision with
    its evidence, the action, the run and model version it produced, and who approved it."""
    from scanflow.control.audit import why as audit_why  # lazy: the store (SQLAlchemy, ~0.5 s)

    _, store = context()
    try:
        res = audit_why(store, service)
    except KeyError as exc:
        fail(str(exc).strip("'\""))
    if as_json:
        print(json.dumps(res, default=str))
        return
    cur = res["current"]
    out.print(f"[bold]{service}[/]: models:/{cur['model']}@{cur['alias']} version "
              f"[bold]{cur['model_version']}[/] x[bold]{cur['replicas']}[/] ({cur['status']})")
    for label, link in (("model", res["model_change"]), ("replicas", res["replica_change"])):
        if link:
            out.print(f"  {label}: {link['event']['kind']} at {link['event']['time']}, "
                      f"approved by [bold]{link['approved_by']}[/]")
    t = Table("time (UTC)", "for", "step", "who", "what")
    for s in res["chain"]:
        t.add_row(iso(s["ts"]).replace("T", " ")[5:19], s["what"], s["step"], s["who"], s["summary"])
    out.print(t)
    if history:
        h = Table("time", "change", "by", "version", "replicas")
        for e in res["history"]:
            ver = f"{e['from_version'] or ''} -> {e['to_version']}" if e["to_version"] is not None else ""
            rep = f"{e['from_replicas'] or ''} -> {e['to_replicas']}" if e["to_replicas"] is not None else ""
            h.add_row(e["time"], e["kind"], e["approved_by"], ver, rep)
        out.print(h)
