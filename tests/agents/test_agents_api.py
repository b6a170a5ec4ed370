"""Every agent's HTTP API (sensors with their next and last fire time, fire now, pause/resume,
add and remove triggers, recent decisions and events, dead-lettered messages and their requeue)
and the `scanflow agents` CLI that wraps it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from scanflow.agents import Agent
from scanflow.agents.api import KEY_HEADER, key_file, read_key
from scanflow.agents.process import AgentSupervisor
from scanflow.control import backends
from scanflow.procs import pid_alive
from scanflow.settings import Settings
from scanflow.spec import load_application
from support.waiting import wait_for

PARTS = '''
from scanflow.agents import actuator, rule, sensor

@sensor("explode")
def explode(ctx):
    raise RuntimeError("the data source is gone")

@rule("odd_n")
def odd_n(obs, ctx):
    return obs.data.get("n", 1) % 2 == 1, f"n={obs.data.get('n')}"

@actuator("note")
def note(obs, ctx, path):
    with open(path, "a") as f:
        f.write(f"{ctx.sensor} {obs.key}\\n")
    return {"noted": obs.key}
'''

SPEC = '''
app: demo
team: ops
agents:
  watcher:
    role: monitor
    imports: [parts]
    max_attempts: 2
    retry_backoff: 0.1s
    sensors:
      - name: pings
        trigger: {event: {message: {kind: ping}, poll: 0.2}}
        rule: odd_n
        actuators: [{func: note, params: {path: NOTES}}]
      - name: clock
        triggers: [{cron: "0 3 * * *", id: nightly}, {interval: 1h}]
        actuators: [{func: note, params: {path: NOTES}}]
      - name: broken
        func: explode
        triggers: []
'''


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    d = tmp_path / "app"
    d.mkdir()
    (d / "parts.py").write_text(PARTS)
    (d / "scanflow.yaml").write_text(SPEC.replace("NOTES", str(tmp_path / "notes.txt")))
    return d


@pytest.fixture
def served(app_dir: Path, settings: Settings) -> Iterator[tuple[Agent, httpx.Client]]:
    """The agent running in this process (scheduler + API thread), as its process would."""
    store = backends.store(settings)
    agent = Agent(settings, store, load_application(app_dir), "watcher")
    stop = threading.Event()
    t = threading.Thread(target=agent.run_forever, args=(stop.is_set,), daemon=True)
    t.start()
    wait_for(lambda: agent.api_url is not None and _up(agent.api_url))
    key = read_key(key_file(settings.agents_dir, "watcher"))
    assert key  # written by the agent, for its user only
    assert key_file(settings.agents_dir, "watcher").stat().st_mode & 0o077 == 0
    with httpx.Client(base_url=str(agent.api_url), timeout=30, headers={KEY_HEADER: key}) as client:
        yield agent, client
    stop.set()
    t.join(15)


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_api_lists_fires_pauses_and_changes_triggers(served: tuple[Agent, httpx.Client],
                                                     tmp_path: Path) -> None:
    agent, c = served
    sensors = {s["name"]: s for s in c.get("/sensors").json()}
    clock = sensors["clock"]
    assert [t["id"] for t in clock["triggers"]][0] == "nightly"
    assert clock["triggers"][0]["schedule"] == "cron '0 3 * * *' (UTC)"
    assert clock["next_fire_time"] and clock["triggers"][0]["next_fire_time"].endswith("03:00:00.000Z")
    assert sensors["pings"]["triggers"][0]["kind"] == "message"
    assert sensors["pings"]["triggers"][0]["next_poll_time"]

    # fire now (by hand): a sensor without `func` judges the fire itself
    assert c.post("/sensors/clock/fire").json() == {"sensor": "clock", "observations": 1}
    (last,) = c.get("/decisions", params={"limit": 1}).json()
    assert last["sensor"] == "clock" and last["key"].startswith("watcher:clock:manual:")
    assert last["actions"][0]["status"] == "succeeded"

    # pause: no next fire time, events wait; resume: they are handled
    paused = c.post("/sensors/pings/pause").json()
    assert paused["paused"] and paused["triggers"][0]["next_poll_time"] is None
    agent.store.send_message("x", "watcher", "ping", {"n": 1}, key="while-paused")
    time.sleep(0.6)  # a few poll periods
    assert [m.key for m in agent.store.inbox("watcher")] == ["while-paused"]
    assert c.post("/sensors/pings/resume").json()["paused"] is False
    wait_for(lambda: agent.store.inbox("watcher") == [])
    decision = next(d for d in c.get("/decisions").json() if d["sensor"] == "pings")
    assert decision["fired"] and decision["evidence"]["reason"] == "n=1"

    # add and remove a trigger at run time
    added = c.post("/sensors/clock/triggers", json={"interval": "2m", "id": "often"})
    assert added.status_code == 201 and added.json()["origin"] == "runtime"
    assert added.json()["next_fire_time"]
    assert c.post("/sensors/clock/triggers", json={"interval": "2m", "id": "often"}).status_code == 409
    assert "often" in [t["id"] for t in c.get("/sensors/clock").json()["triggers"]]
    assert c.delete("/sensors/clock/triggers/often").json() == {"sensor": "clock", "removed": "often"}
    assert c.delete("/sensors/clock/triggers/often").status_code == 404

    kinds = [e["kind"] for e in c.get("/events").json()]
    assert kinds == ["trigger_removed", "trigger_added", "sensor_resumed", "sensor_paused", "sensor_fired"]


def test_api_errors_are_clear_4xx(served: tuple[Agent, httpx.Client]) -> None:
    agent, c = served
    r = c.post("/sensors/ghost/fire")
    assert r.status_code == 404 and r.json()["detail"].startswith("agent 'watcher' has no sensor 'ghost'")
    assert c.get("/sensors/ghost").status_code == 404
    assert c.delete("/sensors/clock/triggers/nope").status_code == 404

    def problems(body: Any) -> list[tuple[list[Any], str]]:
        r = c.post("/sensors/clock/triggers", json=body)
        assert r.status_code == 422, r.text
        return [(p["loc"], p["msg"]) for p in r.json()["detail"]]

    assert problems({"interval": "fast"}) == [
        (["body", "interval"], "cannot read 'fast' as a duration (use e.g. 2, '500ms', '2s', '1m')")]
    assert problems({"every": 5}) == [(["body", "every"], "Extra inputs are not permitted")]
    assert problems({"cron": "61 * * * *"})[0][1].startswith("bad cron expression '61 * * * *'")
    assert problems({"event": {"model": {"name": "m", "event": "alias_moved"}}}) == [
        (["body", "event", "model"], "`event: alias_moved` needs `alias`")]
    assert problems({"interval": "1m", "misfire": "later"}) == [
        (["body", "misfire"], "Input should be 'coalesce' or 'skip'")]
    assert problems({"event": {"message": {"kind": "q"}}, "misfire": "skip"})[0][1].startswith(
        "`misfire` applies to interval, cron and date triggers")
    # valid alone, not next to the other sensor's message trigger
    assert "overlaps" in problems({"event": {"message": {}}})[0][1]
    assert c.post("/sensors/clock/triggers", content=b"not json",
                  headers={"content-type": "application/json"}).status_code == 422
    assert c.get("/decisions", params={"limit": 0}).status_code == 422
    assert c.get("/messages", params={"status": "lost"}).status_code == 422
    r = c.post("/messages/424242/requeue")
    assert r.status_code == 404 and r.json()["detail"] == "agent 'watcher' has no message 424242"
    r = c.get("/why/ghost")
    assert r.status_code == 404 and r.json()["detail"].startswith("no service 'ghost'")
    agent.store.put_deployment(service="svc", app="demo", team="ops", model_name="m", alias="champion",
                               model_version="7", host="127.0.0.1", port=1, pid=None, replicas=2,
                               status="running", workdir="/nonexistent")
    agent.store.add_event("deployer", "deployed", "svc", model_version="7", replicas=2, actor="alice")
    r = c.get("/why/svc")
    assert r.status_code == 200, r.text
    why = r.json()
    assert why["current"]["model_version"] == "7" and why["current"]["replicas"] == 2
    assert why["model_change"]["approved_by"] == "person:alice"

    # a sensor that fails says why, and the agent lives on
    r = c.post("/sensors/broken/fire")
    assert r.status_code == 500
    assert r.json()["detail"] == "sensor 'broken' failed: RuntimeError: the data source is gone"
    assert c.get("/sensors/broken").json()["last_error"] == "RuntimeError: the data source is gone"
    assert c.get("/events", params={"limit": 1}).json()[0]["kind"] == "sensor_failed"
    assert c.get("/health").status_code == 200


def test_api_lists_dead_letters_and_requeues_them(served: tuple[Agent, httpx.Client]) -> None:
    agent, c = served
    agent.store.send_message("x", "watcher", "ping", {"n": "x"}, key="bad-ping")  # the rule raises
    agent.store.send_message("x", "watcher", "ping", {"n": 1}, key="good-ping")

    def dead() -> list[dict[str, Any]]:
        return c.get("/messages", params={"status": "dead"}).json()  # type: ignore[no-any-return]

    (bad,) = wait_for(dead)
    assert (bad["key"], bad["attempts"], bad["kind"]) == ("bad-ping", 2, "ping")  # max_attempts: 2
    assert bad["error"].startswith("TypeError: ") and bad["handled_at"]
    (good,) = c.get("/messages", params={"status": "done"}).json()
    assert good["key"] == "good-ping" and good["attempts"] == 1
    assert c.get("/health").json()["messages"] == {"dead": 1, "done": 1}
    (event,) = [e for e in c.get("/events").json() if e["kind"] == "message_dead_lettered"]
    assert (event["message_id"], event["key"], event["attempts"], event["sensor"]) == (
        bad["id"], "bad-ping", 2, "pings")
    assert event["error"] == bad["error"]

    requeued = c.post(f"/messages/{bad['id']}/requeue")
    assert requeued.status_code == 200
    assert [requeued.json()[k] for k in ("status", "attempts", "error")] == ["pending", 0, None]
    # tried again (twice: the rule still fails) and dead-lettered again
    wait_for(lambda: [e["kind"] for e in c.get("/events").json()].count("message_dead_lettered") == 2)
    assert [(m["key"], m["attempts"]) for m in dead()] == [("bad-ping", 2)]
    assert "message_requeued" in [e["kind"] for e in c.get("/events").json()]
    r = c.post(f"/messages/{good['id']}/requeue")
    assert r.status_code == 409 and r.json()["detail"].startswith(f"message {good['id']} is done")
    assert len([d for d in agent.recent_decisions() if d["sensor"] == "pings"]) == 1  # the good one


PY_APP = '''
from pathlib import Path

from scanflow.agents import AgentSpec, SensorSpec, actuator
from scanflow.spec import Application


@actuator("py_note")
def py_note(obs, ctx, path):
    with open(path, "a") as f:
        f.write(obs.key + "\\n")


app = Application(app="pyapp", team="ops", agents={"pyagent": AgentSpec(role="custom", sensors=[
    SensorSpec(name="inbox", triggers=[{"event": {"message": {"kind": "hello"}, "poll": 0.2}}],
               actuators=[{"func": "py_note", "params": {"path": "NOTES"}}]),
])})
'''


def _cli(ws: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SCANFLOW_WORKSPACE": str(ws), "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-m", "scanflow.cli.main", *args], env=env,
                          capture_output=True, text=True, timeout=120)
    if ok:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_cli_drives_agent_processes_and_changes_survive_restarts(
    app_dir: Path, settings: Settings, tmp_path: Path
) -> None:
    ws = settings.root
    store = backends.store(settings)
    py = tmp_path / "pyagents.py"
    py.write_text(PY_APP.replace("NOTES", str(tmp_path / "py-notes.txt")))
    try:
        # unsupervised, so that it stays dead when killed below (tests/agents/test_agent_supervision.py
        # covers the supervisor); the Python-declared agent runs under its supervisor
        assert "started agent watcher" in _cli(ws, "agents", "start", str(app_dir), "--no-supervise").stdout
        assert "started agent pyagent" in _cli(ws, "agents", "start", f"{py}:app").stdout
        rows = {r["name"]: r for r in json.loads(_cli(ws, "agents", "list", "--json").stdout)}
        assert rows["watcher"]["status"] == "running" and rows["watcher"]["api"].startswith("http://127.0.0.1:")
        assert rows["pyagent"]["role"] == "custom"

        # an agent declared in Python handles its messages like any other
        store.send_message("x", "pyagent", "hello", {}, key="hello-1")
        store.send_message("x", "watcher", "ping", {"n": "x"}, key="bad-cli")  # its rule raises
        wait_for(lambda: (tmp_path / "py-notes.txt").exists())
        assert (tmp_path / "py-notes.txt").read_text() == "hello-1\n"
        (poison,) = wait_for(lambda: store.list_messages("watcher", status="dead"))

        status = _cli(ws, "agents", "status", "watcher").stdout
        assert "nightly" in status and "cron '0 3 * * *' (UTC)" in status and "active" in status
        assert "dead-lettered messages" in status and "bad-cli" in status and "TypeError" in status
        assert "observation(s) judged" in _cli(ws, "agents", "fire", "watcher", "clock").stdout
        assert "paused" in _cli(ws, "agents", "pause", "watcher", "clock").stdout
        assert "added trigger daily" in _cli(ws, "agents", "add-trigger", "watcher", "clock",
                                             "--cron", "30 4 * * *", "--id", "daily").stdout
        bad = _cli(ws, "agents", "add-trigger", "watcher", "clock", "--cron", "99 * * * *", ok=False)
        assert bad.returncode == 2 and "bad cron expression '99 * * * *'" in bad.stderr
        gone = _cli(ws, "agents", "fire", "watcher", "ghost", ok=False)
        assert gone.returncode == 2 and "has no sensor 'ghost'" in gone.stderr
        missing = _cli(ws, "agents", "status", "nobody", ok=False)
        assert missing.returncode == 2 and "no agent 'nobody'" in missing.stderr
        _cli(ws, "agents", "remove-trigger", "watcher", "clock", "nightly")

        # kill -9 and start again: the pause and the trigger changes were stored
        old = rows["watcher"]["pid"]
        os.kill(old, 9)
        wait_for(lambda: not pid_alive(old))
        sup = AgentSupervisor(settings, store)
        assert {r["name"]: r["status"] for r in sup.status()}["watcher"] == "dead"
        # requeue works with the agent down (the store is the queue): tried again at its start
        assert "it is delivered when the agent runs" in _cli(ws, "agents", "requeue", "watcher",
                                                              str(poison.id)).stdout
        assert store.list_messages("watcher", status="dead") == []
        typo = _cli(ws, "agents", "requeue", "wacher", "--all", ok=False)
        assert typo.returncode == 2 and "no agent 'wacher'" in typo.stderr, typo.stderr
        _cli(ws, "agents", "start", str(app_dir), "-a", "watcher", "--no-supervise")
        info = json.loads(_cli(ws, "agents", "status", "watcher", "--json").stdout)
        clock = next(s for s in info["sensors"] if s["name"] == "clock")
        assert clock["paused"] is True
        assert sorted(t["id"] for t in clock["triggers"]) == sorted(
            ["daily", next(t["id"] for t in clock["triggers"] if t["kind"] == "interval")])
        assert info["decisions"][0]["sensor"] == "clock"  # the hand-fired decision is there
        assert "resumed" in _cli(ws, "agents", "resume", "watcher").stdout
        with sup.client("watcher") as c:
            assert not any(s["paused"] for s in c.get("/sensors").json())
        (again,) = wait_for(lambda: store.list_messages("watcher", status="dead"))  # failed twice more
        assert again.id == poison.id and again.attempts == 2
        assert f"requeued message {poison.id}" in _cli(ws, "agents", "requeue", "watcher", "--all").stdout
    finally:
        AgentSupervisor(settings, store).stop()
    assert all(not pid_alive(r["pid"]) for r in AgentSupervisor(settings, store).status())


def test_the_api_needs_the_agents_key_or_an_allowed_token(
    served: tuple[Agent, httpx.Client], settings: Settings
) -> None:
    """No identity: 401 (only /health answers); a wrong key: 401; a token lets a viewer of the
    agent's team read, and only an owner act; another team's owner gets 403."""
    from scanflow.spec.access import Role

    agent, c = served
    url = str(agent.api_url)
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    assert httpx.get(f"{url}/sensors", timeout=10).status_code == 401
    assert httpx.post(f"{url}/sensors/clock/fire", timeout=10).status_code == 401
    assert httpx.get(f"{url}/sensors", headers={KEY_HEADER: "guess"}, timeout=10).status_code == 401
    ids = agent.store.identities
    team = agent.ctx.app.team
    for t in (team, "elsewhere"):
        ids.create_team(t)
    tokens = {}
    for user, t, role in (("v", team, Role.viewer), ("o", team, Role.owner),
                          ("x", "elsewhere", Role.owner)):
        ids.create_user(user)
        ids.set_role(user, t, role)
        tokens[user] = {"Authorization": f"Bearer {ids.create_token(user)[1]}"}
    assert httpx.get(f"{url}/sensors", headers=tokens["v"], timeout=10).status_code == 200
    assert httpx.post(f"{url}/pause", headers=tokens["v"], timeout=10).status_code == 403
    assert httpx.get(f"{url}/sensors", headers=tokens["x"], timeout=10).status_code == 403
    r = httpx.post(f"{url}/pause", headers=tokens["o"], timeout=10)
    assert r.status_code == 200, r.text
    assert httpx.post(f"{url}/resume", headers=tokens["o"], timeout=10).status_code == 200
