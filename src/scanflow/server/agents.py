"""`/api/v1/agents/...`: start and stop a team's agents, and steer a running one (fire a sensor,
pause, resume, add or remove a trigger, requeue dead letters). Starting and stopping go through
the agents' supervisor on the server's machine; steering goes to the agent's own API with its
local key (`scanflow.agents.api`), after the caller's role was checked here."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query

from scanflow.agents.process import AgentSupervisor
from scanflow.server.auth import Caller, authorize
from scanflow.server.errors import ERROR_RESPONSES, STATUS_CODES, ApiError
from scanflow.server.models import AgentsStartIn, Strict
from scanflow.server.platform import Platform, platform
from scanflow.store.identity import Identity

router = APIRouter(prefix="/api/v1/agents", tags=["agents"], responses=ERROR_RESPONSES)
Plat = Annotated[Platform, Depends(platform)]


class TriggerIn(Strict):
    trigger: dict[str, Any]


def _agent(plat: Platform, who: Identity, agent: str, action: str = "agents") -> AgentSupervisor:
    """The supervisor, once `who` was found allowed `action` in agent `agent`'s team (owner for
    `agents`, viewer for `read`)."""
    row = next((a for a in plat.store.list_agents() if a.name == agent), None)
    if row is None:
        raise ApiError(404, "not_found", f"no agent {agent!r}")
    team = plat.team_of_agent(row.app, agent)
    if team is None and not who.admin:
        raise ApiError(403, "forbidden", f"agent {agent!r}: its application {row.app!r} is not "
                       "registered here, so only an admin may act on it")
    if team is not None:
        authorize(who, action, team, agent)
    return AgentSupervisor(plat.settings, plat.store)


def _relay(sup: AgentSupervisor, agent: str, method: str, path: str, **kw: Any) -> Any:
    """One call to the agent's own API; its 4xx become ours, in our error shape."""
    import httpx  # lazy: only the relaying routes need the client

    try:
        client = sup.client(agent, timeout=600.0)
    except (KeyError, ValueError) as exc:
        raise ApiError(409, "conflict", str(exc).strip("'\"")) from exc
    try:
        with client:
            r = client.request(method, path, **kw)
    except httpx.HTTPError as exc:
        raise ApiError(409, "agent_unreachable", f"agent {agent!r} does not answer "
                       f"({type(exc).__name__})") from exc
    if r.status_code >= 400:
        try:
            detail = r.json().get("detail", r.text)
        except ValueError:
            detail = r.text
        status = r.status_code if r.status_code < 500 else 502
        raise ApiError(status, STATUS_CODES.get(status, "agent_error"), f"{agent}: {detail}")
    return r.json()


@router.post("/start", response_model=dict[str, int], status_code=201)
def start(body: AgentsStartIn, who: Caller, plat: Plat) -> dict[str, int]:
    """Start a registered application's agents (owner), under its supervisor; their pids."""
    spec, team = plat.spec_of(body.app, body.team)
    authorize(who, "agents", team, body.app)
    unknown = [a for a in body.agents or [] if a not in spec.agents]
    if unknown:
        raise ApiError(404, "not_found", f"no agent(s) {unknown} in app {body.app!r} "
                       f"(known: {', '.join(spec.agents)})")
    row = plat.store.applications.get_app(body.app, team)
    assert row is not None
    sup = AgentSupervisor(plat.settings, plat.store)
    try:
        return sup.start(row.spec_path, body.agents or None, supervise=True)
    except (ValueError, KeyError) as exc:
        raise ApiError(409, "conflict", str(exc)) from exc


@router.post("/{agent}/stop", response_model=list[str])
def stop(agent: str, who: Caller, plat: Plat) -> list[str]:
    """Stop an agent (it is not restarted until started again)."""
    return _agent(plat, who, agent).stop([agent])


@router.post("/{agent}/sensors/{sensor}/fire", response_model=dict[str, Any])
def fire(agent: str, sensor: str, who: Caller, plat: Plat, wait: bool = True) -> dict[str, Any]:
    """Fire a sensor now (also when paused); with `wait`, once judged and acted on."""
    res: dict[str, Any] = _relay(_agent(plat, who, agent), agent, "POST",
                                 f"/sensors/{sensor}/fire", params={"wait": wait})
    return res


@router.get("/{agent}/sensors", response_model=list[dict[str, Any]])
def sensors(agent: str, who: Caller, plat: Plat) -> list[dict[str, Any]]:
    """A running agent's sensors: triggers, paused, next and last fire time, failures."""
    res: list[dict[str, Any]] = _relay(_agent(plat, who, agent, "read"), agent, "GET", "/sensors")
    return res


@router.get("/{agent}/messages", response_model=list[dict[str, Any]])
def messages(agent: str, who: Caller, plat: Plat, status: str | None = None,
             limit: Annotated[int, Query(ge=1, le=1000)] = 50) -> list[dict[str, Any]]:
    """A running agent's messages (`status=dead`: its dead letters, with their last error)."""
    res: list[dict[str, Any]] = _relay(_agent(plat, who, agent, "read"), agent, "GET", "/messages",
                                       params={"limit": limit, **({"status": status} if status else {})})
    return res


@router.get("/{agent}/decisions", response_model=list[dict[str, Any]])
def agent_decisions(agent: str, who: Caller, plat: Plat, fired: bool | None = None,
                    limit: Annotated[int, Query(ge=1, le=1000)] = 20) -> list[dict[str, Any]]:
    """A running agent's recent decisions, newest first."""
    res: list[dict[str, Any]] = _relay(
        _agent(plat, who, agent, "read"), agent, "GET", "/decisions",
        params={"limit": limit, **({"fired": fired} if fired is not None else {})})
    return res


@router.post("/{agent}/sensors/{sensor}/pause", response_model=dict[str, Any])
def pause_sensor(agent: str, sensor: str, who: Caller, plat: Plat) -> dict[str, Any]:
    res: dict[str, Any] = _relay(_agent(plat, who, agent), agent, "POST", f"/sensors/{sensor}/pause")
    return res


@router.post("/{agent}/sensors/{sensor}/resume", response_model=dict[str, Any])
def resume_sensor(agent: str, sensor: str, who: Caller, plat: Plat) -> dict[str, Any]:
    res: dict[str, Any] = _relay(_agent(plat, who, agent), agent, "POST", f"/sensors/{sensor}/resume")
    return res


@router.post("/{agent}/pause", response_model=dict[str, Any])
def pause(agent: str, who: Caller, plat: Plat, sensor: str | None = None) -> dict[str, Any]:
    """Pause one sensor's triggers, or every sensor's (kept across restarts)."""
    res: dict[str, Any] = _relay(_agent(plat, who, agent), agent, "POST",
                                 f"/sensors/{sensor}/pause" if sensor else "/pause")
    return res


@router.post("/{agent}/resume", response_model=dict[str, Any])
def resume(agent: str, who: Caller, plat: Plat, sensor: str | None = None) -> dict[str, Any]:
    res: dict[str, Any] = _relay(_agent(plat, who, agent), agent, "POST",
                                 f"/sensors/{sensor}/resume" if sensor else "/resume")
    return res


@router.post("/{agent}/sensors/{sensor}/triggers", response_model=dict[str, Any], status_code=201)
def add_trigger(agent: str, sensor: str, body: TriggerIn, who: Caller, plat: Plat) -> dict[str, Any]:
    """Add a trigger to a sensor (a trigger as in the spec; kept across restarts)."""
    res: dict[str, Any] = _relay(_agent(plat, who, agent), agent, "POST",
                                 f"/sensors/{sensor}/triggers", json=body.trigger)
    return res


@router.delete("/{agent}/sensors/{sensor}/triggers/{trigger_id}", response_model=dict[str, Any])
def remove_trigger(agent: str, sensor: str, trigger_id: str, who: Caller, plat: Plat) -> dict[str, Any]:
    res: dict[str, Any] = _relay(_agent(plat, who, agent), agent, "DELETE",
                                 f"/sensors/{sensor}/triggers/{trigger_id}")
    return res


@router.post("/{agent}/messages/{message_id}/requeue", response_model=dict[str, Any])
def requeue(agent: str, message_id: int, who: Caller, plat: Plat) -> dict[str, Any]:
    """Deliver a dead-lettered message again (its tries from zero)."""
    res: dict[str, Any] = _relay(_agent(plat, who, agent), agent, "POST",
                                 f"/messages/{message_id}/requeue")
    return res
