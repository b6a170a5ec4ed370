"""`scanflow agents ...`: start and stop agent processes, and drive a running agent through its
HTTP API (list sensors and their next and last fire time, fire a sensor now, pause, resume, add
and remove triggers, list and requeue dead-lettered messages). Exit codes: 0 ok, 1 the agent did
not answer, 2 bad input or unknown name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from scanflow.cli import remote as via
from scanflow.cli.common import err, fail, out, print_json, show, timed
from scanflow.cli.common import iso as common_iso
from scanflow.spec.errors import SpecError

agents_app = typer.Typer(no_args_is_help=True, help="Start, stop, inspect and steer agents.")

AgentName = Annotated[str, typer.Argument(help="agent name")]
SensorName = Annotated[str, typer.Argument(help="sensor name")]


def iso(ts: float | str | None) -> str:
    """A time as every command shows it (the agents' API already sends text)."""
    return ts if isinstance(ts, str) else common_iso(ts)


def _supervisor() -> Any:
    from scanflow.agents.process import AgentSupervisor  # lazy: the agent runtime (~2 s)
    from scanflow.control import backends  # lazy: the store (SQLAlchemy, ~0.5 s)
    from scanflow.settings import get_settings  # lazy: pydantic-settings (~90 ms)

    settings = get_settings().ensure()
    try:
        return AgentSupervisor(settings, backends.store(settings))
    except backends.UnknownBackend as exc:
        fail(str(exc))


def _load(ref: str) -> Any:
    from scanflow.agents.process import load_app  # lazy: the agent runtime (~2 s)
    try:
        return load_app(ref)
    except SpecError as exc:
        for issue in exc.issues:
            err.print(str(issue), style="red", markup=False, highlight=False, soft_wrap=True)
        fail(f"{len(exc.issues)} problem(s) in the spec; nothing was started")
    except (OSError, ImportError, AttributeError, TypeError) as exc:
        fail(f"cannot load {ref}: {exc}")


def _call(agent: str, method: str, path: str, **kw: Any) -> Any:
    """One request to a running agent's API (through the server, with `SCANFLOW_SERVER`); its
    4xx answers become exit code 2 with the detail."""
    import httpx  # lazy: httpx (~50 ms), for commands that call an agent

    if (api := via.remote()) is not None:  # the server's routes mirror the agent API's paths
        return api.call(method, f"/api/v1/agents/{agent}{path}", body=kw.get("json"),
                        params=kw.get("params"))

    sup = _supervisor()
    try:
        client = sup.client(agent)
    except (KeyError, ValueError) as exc:
        fail(str(exc).strip("'\""))
    try:
        with client:
            r = client.request(method, path, **kw)
    except httpx.HTTPError as exc:
        fail(f"agent {agent!r} does not answer at {client.base_url} ({exc}); "
             f"see {sup.log_path(agent)}", code=1)
    if r.status_code >= 400:
        detail = r.json().get("detail", r.text) if r.headers.get("content-type", "").startswith(
            "application/json") else r.text
        if isinstance(detail, list):  # pydantic's 422: one line per problem, with its field
            detail = "; ".join(f"{'.'.join(str(p) for p in d.get('loc', []) if p != 'body') or 'body'}: "
                               f"{d.get('msg')}" for d in detail)
        fail(f"{agent}: {detail}", code=2 if r.status_code < 500 else 1)
    return r.json()


@agents_app.command("start")
def start(
    app: Annotated[str, typer.Argument(help="spec file or folder, or file.py:app for agents in Python")],
    agent: Annotated[list[str] | None, typer.Option("--agent", "-a", help="only these")] = None,
    supervise: Annotated[bool, typer.Option(
        help="leave the application's supervisor running, which restarts a dead agent with backoff "
             "(--no-supervise: when something else, e.g. systemd, restarts them)")] = True,
) -> None:
    """Start the application's agents, each in its own process (with its HTTP API), under the
    application's supervisor (one per application; see `scanflow agents list`)."""
    spec = _load(app)
    unknown = [a for a in agent or [] if a not in spec.agents]
    if unknown:
        fail(f"no agent(s) {unknown} in {spec.source or app} (known: {', '.join(spec.agents)})")
    if (api := via.remote()) is not None:
        if not supervise:
            fail("--no-supervise: through a server, its supervisor starts the agents")
        api.ensure_app(spec.app, spec.team, Path(app))
        pids = api.call("POST", "/api/v1/agents/start",
                        body={"app": spec.app, "team": spec.team, "agents": agent})
        rows = {r["name"]: r for r in api.call("GET", "/api/v1/agents")}
        for name, pid in pids.items():
            out.print(f"[green]started[/] agent {name} (pid {pid}) api "
                      f"{rows.get(name, {}).get('api') or '-'}")
        return
    sup = _supervisor()
    try:
        pids = sup.start(app, agent, supervise=supervise)
    except (ValueError, KeyError) as exc:
        fail(str(exc))
    except (RuntimeError, TimeoutError) as exc:
        fail(str(exc), code=1)
    rows = {r["name"]: r for r in sup.status()}
    for name, pid in pids.items():
        row = rows.get(name, {})
        out.print(f"[green]started[/] agent {name} (pid {pid}) api {row.get('api') or '-'}")
    sv = next((r["supervisor"] for r in rows.values() if r["name"] in pids and r.get("supervisor")), None)
    if supervise and sv and sv.get("pid"):
        out.print(f"supervised by pid {sv['pid']} (restarts a dead agent; `scanflow agents stop` stops both)")


@agents_app.command("stop")
def stop(agent: Annotated[list[str] | None, typer.Option("--agent", "-a", help="only these")] = None) -> None:
    """Stop agents (SIGTERM, then SIGKILL after 15 s) and, without --agent, their supervisors;
    a stopped agent is not restarted."""
    if (api := via.remote()) is not None:  # every agent the caller may see, or those named
        for name in agent or [r["name"] for r in api.call("GET", "/api/v1/agents")
                              if r["status"] not in ("stopped",)]:
            for stopped in api.call("POST", f"/api/v1/agents/{name}/stop"):
                out.print(f"stopped agent {stopped}")
        return
    for name in _supervisor().stop(agent):
        out.print(f"stopped agent {name}")


@agents_app.command("list")
def list_(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Every agent started in this workspace: role, pid, status (running, failing, stopped, dead),
    heartbeat, API address, restarts and supervision (starting, running, backoff, given_up,
    stopped; `-` when unsupervised) with its supervisor's pid; each failing sensor's last error."""
    api = via.remote()
    rows = api.call("GET", "/api/v1/agents") if api is not None else _supervisor().status()
    if api is not None:
        for row in rows:
            row.pop("team", None)  # what the server adds: the rows as `list` prints them locally
    if as_json:
        print_json([timed(dict(row), "heartbeat", "started_at", "next_try") for row in rows])
        return
    t = Table("agent", "role", "pid", "status", "heartbeat", "api", "restarts", "supervision")
    for row in rows:
        status = f"[red]{row['status']}[/]" if row["status"] in ("failing", "dead") else row["status"]
        t.add_row(row["name"], row["role"], str(row["pid"]), status, iso(row["heartbeat"]),
                  row["api"] or "-", str(row["restarts"]), _supervision(row))
    show(t)
    for row in rows:
        for f in row["failing"]:
            err.print(f"{row['name']}: {_failing_line(f)}", markup=False, highlight=False)


def _supervision(row: dict[str, Any]) -> str:
    """'running, supervisor pid 12', 'backoff until 12:00:03 (killed by SIGKILL)', 'given_up
    (exit status 3), supervisor down': an agent's supervision as `agents list` shows it."""
    from scanflow.agents.supervision import describe_exit  # lazy: with the supervisor above

    state = row["supervision"]
    if state == "-":
        return "-"
    text = state
    if state == "backoff" and row.get("next_try"):
        text += f" until {iso(row['next_try'])}"
    if state in ("backoff", "given_up") and row.get("last_exit"):
        text += f" ({describe_exit(row['last_exit'])})"
    sv = row.get("supervisor") or {}
    if state != "stopped":
        text += f", supervisor pid {sv['pid']}" if sv.get("pid") else f", supervisor {sv.get('status', '-')}"
    return text


def _failing_line(f: dict[str, Any]) -> str:
    """One failing sensor, as `agents list` and `agents status` say it."""
    return (f"sensor {f['sensor']} failing: {f['failed_ticks']} tick(s) in a row failed since "
            f"{f['since']}; last error: {f['error']}")


@agents_app.command("status")
def status(
    agent: AgentName,
    decisions: Annotated[int, typer.Option(help="recent decisions to show")] = 10,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """A running agent's status (`failing` while a sensor's ticks fail, with its last error), its
    sensors (triggers, paused, next and last fire time), dead-lettered messages, recent decisions."""
    sensors = _call(agent, "GET", "/sensors")
    dead = _call(agent, "GET", "/messages", params={"status": "dead"})
    recent = _call(agent, "GET", "/decisions", params={"limit": decisions}) if decisions else []
    failing = [{"sensor": s["name"], "error": s["last_error"], "since": s["failing_since"],
                "failed_ticks": s["failed_ticks"]} for s in sensors if s.get("failing")]
    state = "failing" if failing else "running"
    if as_json:
        print(json.dumps({"status": state, "failing": failing, "sensors": sensors, "dead_letters": dead,
                          "decisions": recent}))
        return
    out.print(f"{agent}: [{'red' if failing else 'green'}]{state}[/]", highlight=False)
    for f in failing:
        err.print(f"{agent}: {_failing_line(f)}", markup=False, highlight=False)
    t = Table("sensor", "trigger", "id", "next fire", "last fire", "state", "ticks", "last error",
              title=agent)
    for s in sensors:
        state = "paused" if s["paused"] else "failing" if s.get("failing") else "active"
        trigs = s["triggers"] or [{"schedule": "(none: fire by hand)", "id": "-"}]
        for i, tr in enumerate(trigs):
            nxt = tr.get("next_fire_time") or (
                f"polls {tr['next_poll_time']}" if tr.get("next_poll_time")
                else f"fired {tr['fired_at']}" if tr.get("fired_at") else "-")
            t.add_row(s["name"] if i == 0 else "", tr["schedule"], tr["id"], nxt,
                      tr.get("last_fire_time") or "-",
                      state if i == 0 else "", str(s["ticks"]) if i == 0 else "",
                      (s["last_error"] or "") if i == 0 else "")
    show(t)
    if dead:
        d = Table("id", "kind", "key", "from", "tries", "dead since", "last error",
                  title=f"dead-lettered messages (`scanflow agents requeue {agent} <id>`)")
        for m in dead:
            d.add_row(str(m["id"]), m["kind"], m["key"][:40], m["from"], str(m["attempts"]),
                      m["handled_at"] or "-", (m["error"] or "")[:80])
        out.print(d)
    if recent:
        d = Table("time", "sensor", "fired", "reason", "actions", title="recent decisions")
        for row in recent:
            acts = ", ".join(f"{a.get('action', '?').split(':')[-1]}:{a.get('status')}"
                             for a in row["actions"])
            d.add_row(row["time"], row["sensor"], "yes" if row["fired"] else "no",
                      str(row["evidence"].get("reason", "")), acts)
        out.print(d)


@agents_app.command("fire")
def fire(
    agent: AgentName, sensor: SensorName,
    wait: Annotated[bool, typer.Option(help="wait until judged and acted on")] = True,
) -> None:
    """Fire a sensor now (also when it is paused)."""
    res = _call(agent, "POST", f"/sensors/{sensor}/fire", params={"wait": wait}, timeout=None)
    if wait:
        out.print(f"{agent}/{sensor}: fired, {res['observations']} observation(s) judged")
    else:
        out.print(f"{agent}/{sensor}: fire queued")


@agents_app.command("pause")
def pause(agent: AgentName,
          sensor: Annotated[str | None, typer.Argument(help="one sensor (default: all)")] = None) -> None:
    """Stop a sensor's triggers (kept across restarts) until `resume`."""
    if sensor:
        _call(agent, "POST", f"/sensors/{sensor}/pause")
        out.print(f"{agent}/{sensor}: paused")
    else:
        res = _call(agent, "POST", "/pause")
        out.print(f"{agent}: paused {', '.join(res['paused'])}")


@agents_app.command("resume")
def resume(agent: AgentName,
           sensor: Annotated[str | None, typer.Argument(help="one sensor (default: all)")] = None) -> None:
    """Start a paused sensor's triggers again."""
    if sensor:
        _call(agent, "POST", f"/sensors/{sensor}/resume")
        out.print(f"{agent}/{sensor}: resumed")
    else:
        res = _call(agent, "POST", "/resume")
        out.print(f"{agent}: resumed {', '.join(res['resumed'])}")


@agents_app.command("add-trigger")
def add_trigger(
    agent: AgentName, sensor: SensorName,
    interval: Annotated[str | None, typer.Option(help="e.g. 30s, 5m")] = None,
    cron: Annotated[str | None, typer.Option(help="crontab, UTC (5 fields, or 6 with seconds)")] = None,
    date: Annotated[str | None, typer.Option(help="ISO 8601, fires once")] = None,
    event: Annotated[str | None, typer.Option(help='JSON, e.g. \'{"message": {"kind": "retrain"}}\'')] = None,
    trigger_id: Annotated[str | None, typer.Option("--id", help="name it (default: derived)")] = None,
    misfire: Annotated[str | None, typer.Option(
        help="fires missed while the agent was down: coalesce (once at restart, default) or skip")] = None,
) -> None:
    """Add a trigger to a running agent's sensor (kept across restarts)."""
    body: dict[str, Any] = {k: v for k, v in
                            {"interval": interval, "cron": cron, "date": date, "id": trigger_id,
                             "misfire": misfire}.items()
                            if v is not None}
    if event is not None:
        try:
            body["event"] = json.loads(event)
        except json.JSONDecodeError as exc:
            fail(f"--event is not JSON: {exc}")
    res = _call(agent, "POST", f"/sensors/{sensor}/triggers", json=body)
    nxt = res.get("next_fire_time") or res.get("next_poll_time") or "-"
    out.print(f"{agent}/{sensor}: added trigger {res['id']} ({res['schedule']}), next {nxt}")


@agents_app.command("remove-trigger")
def remove_trigger(agent: AgentName, sensor: SensorName,
                   trigger_id: Annotated[str, typer.Argument(help="as `agents status` lists it")]) -> None:
    """Remove a trigger from a running agent's sensor (kept across restarts)."""
    _call(agent, "DELETE", f"/sensors/{sensor}/triggers/{trigger_id}")
    out.print(f"{agent}/{sensor}: removed trigger {trigger_id}")


@agents_app.command("requeue")
def requeue(
    agent: AgentName,
    message_ids: Annotated[list[int] | None, typer.Argument(help="as `agents status` lists them")] = None,
    all_dead: Annotated[bool, typer.Option("--all", help="every dead-lettered message of the agent")] = False,
) -> None:
    """Deliver dead-lettered messages again (their tries start from zero). Through the running
    agent's API; an agent that is not running gets them at its next start."""
    if bool(message_ids) == all_dead:
        fail("give message ids, or --all")
    if via.remote() is not None:  # through the server: the running agent's API
        ids = message_ids or [m["id"] for m in _call(agent, "GET", "/messages",
                                                     params={"status": "dead", "limit": 1000})]
        for mid in ids:
            m = _call(agent, "POST", f"/messages/{mid}/requeue")
            out.print(f"{agent}: requeued message {m['id']} ({m['kind']}, {m['key']})", highlight=False)
        if not ids:
            out.print(f"{agent}: no dead-lettered messages")
        return
    sup = _supervisor()
    known = {r["name"]: r for r in sup.status()}
    if agent not in known and not sup.store.list_messages(agent, limit=1):
        fail(f"no agent {agent!r} (known: {', '.join(sorted(known)) or 'none'})")
    running = known.get(agent, {}).get("status") in ("running", "failing")  # its process is up
    if running:
        ids = message_ids or [m["id"] for m in _call(agent, "GET", "/messages",
                                                     params={"status": "dead", "limit": 1000})]
        for mid in ids:
            m = _call(agent, "POST", f"/messages/{mid}/requeue")
            out.print(f"{agent}: requeued message {m['id']} ({m['kind']}, {m['key']})", highlight=False)
    else:  # the store is the queue: no agent needs to be up
        ids = message_ids or [m.id for m in sup.store.list_messages(agent, status="dead")]
        for mid in ids:
            try:
                m = sup.store.requeue_message(agent, mid)
            except (KeyError, ValueError) as exc:
                fail(str(exc).strip("'\""))
            out.print(f"{agent}: requeued message {m.id} ({m.kind}, {m.key}); it is delivered when "
                      "the agent runs", highlight=False)
    if not ids:
        out.print(f"{agent}: no dead-lettered messages")
