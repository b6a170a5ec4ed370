"""`/api/v1/events`, `/api/v1/decisions`, `/api/v1/services/{s}/why`, `/api/v1/agents`: the
audit trail and the agents, each filtered to the teams the caller may read."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query

from scanflow.agents.process import AgentSupervisor
from scanflow.control.audit import why as audit_why
from scanflow.server.auth import Caller, authorize, readable_teams
from scanflow.server.errors import ERROR_RESPONSES, ApiError
from scanflow.server.models import AgentOut, DecisionOut, EventOut, Page
from scanflow.server.platform import Platform, platform
from scanflow.store.identity import Identity

router = APIRouter(prefix="/api/v1", tags=["audit"], responses=ERROR_RESPONSES)
Plat = Annotated[Platform, Depends(platform)]
Limit = Annotated[int, Query(ge=1, le=1000)]
Cursor = Annotated[int | None, Query(ge=0, description="the `next` of the previous page")]


def _services(plat: Platform, who: Identity) -> list[str] | None:
    """The services whose events `who` may read; None: all."""
    teams = readable_teams(who)
    if teams is None:
        return None
    return [d.service for d in plat.store.list_deployments() if d.team in teams]


def _agents(plat: Platform, who: Identity) -> dict[str, str | None]:
    """Each agent's team (through its application)."""
    return {a.name: plat.team_of_agent(a.app, a.name) for a in plat.store.list_agents()}


@router.get("/events", response_model=Page[EventOut])
def events(who: Caller, plat: Plat, service: str | None = None,
           kind: Annotated[list[str] | None, Query()] = None,
           limit: Limit = 200, cursor: Cursor = None) -> Page[EventOut]:
    """The event log, oldest first: the events of the services of the teams you may read."""
    rows = plat.store.decisions.list_events(service, kind, limit=limit + 1,
                                            services=_services(plat, who), after=cursor)
    items = [EventOut(id=e.id, ts=e.ts, source=e.source, kind=e.kind, service=e.service,
                      payload=e.payload) for e in rows[:limit]]
    return Page[EventOut](items=items, next=str(items[-1].id) if len(rows) > limit else None)


@router.get("/decisions", response_model=Page[DecisionOut])
def decisions(who: Caller, plat: Plat, agent: str | None = None, service: str | None = None,
              fired: bool | None = None, limit: Limit = 200, cursor: Cursor = None,
              ) -> Page[DecisionOut]:
    """The agents' judgements, oldest first: those about your teams' services or by your
    teams' agents."""
    teams = readable_teams(who)
    services = agents = None
    if teams is not None:
        services = list(_services(plat, who) or [])
        agents = [a for a, team in _agents(plat, who).items() if team in teams]
    rows = plat.store.decisions.list_decisions(agent, service, fired, after=cursor, limit=limit + 1,
                                               services=services, agents=agents)
    out = [DecisionOut(id=d.id, ts=d.ts, agent=d.agent, sensor=d.sensor, rule=d.rule, fired=d.fired,
                       service=d.service, key=d.key, evidence=d.evidence, actions=d.actions, by=d.by)
           for d in rows[:limit]]
    return Page[DecisionOut](items=out, next=str(out[-1].id) if len(rows) > limit else None)


@router.get("/services/{service}/why", response_model=dict[str, Any])
def why(service: str, who: Caller, plat: Plat) -> dict[str, Any]:
    """Why the service serves this version with this many replicas: the chain of decisions,
    actions, runs and approvals (as `scanflow why --json`)."""
    dep = plat.store.get_deployment(service)
    if dep is None:
        raise ApiError(404, "not_found", f"no service {service!r}")
    authorize(who, "read", dep.team, service)
    try:
        res: dict[str, Any] = audit_why(plat.store, service)
    except KeyError as exc:
        raise ApiError(404, "not_found", str(exc).strip("'\"")) from exc
    return res


@router.get("/agents", response_model=list[AgentOut])
def agents(who: Caller, plat: Plat) -> list[AgentOut]:
    """The agents of the teams you may read, with their state and restarts."""
    teams = readable_teams(who)
    out = []
    for row in AgentSupervisor(plat.settings, plat.store).status():
        team = plat.team_of_agent(str(row.get("app", "")), str(row.get("name", "")))
        if teams is None or team in teams:
            out.append(AgentOut(**{**row, "team": team}))
    return out
