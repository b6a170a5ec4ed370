"""The built-in actuators against the real things: a webhook against a local HTTP server
(retries, timeouts, the idempotency key), promote on the MLflow registry, and scale, roll out
and roll back on a running model service."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from scanflow.agents import Agent, AgentSpec, SensorSpec
from scanflow.control import backends
from scanflow.settings import Settings
from scanflow.spec import Application, Service, validate_application
from scanflow.store import Store
from support.serving import MODEL, DigitsWorkspace, digits_workspace  # noqa: F401


class Hook:
    """A real HTTP endpoint on 127.0.0.1 that answers from a script of (status, delay)."""

    def __init__(self, script: list[tuple[int, float]]) -> None:
        self.script = list(script)
        self.calls: list[dict[str, Any]] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                hook.calls.append({"headers": dict(self.headers), "body": json.loads(body)})
                status, delay = hook.script.pop(0) if hook.script else (200, 0.0)
                time.sleep(delay)
                payload = b'{"ok": true}' if status < 400 else b'{"error": "nope"}'
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook() -> Iterator[Any]:
    made: list[Hook] = []

    def make(*script: tuple[int, float]) -> Hook:
        h = Hook(list(script))
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


def _agent(settings: Settings, store: Store, actuators: list[Any], services: dict[str, Any] | None = None,
           service: str | None = None) -> Agent:
    """One agent whose sensor `act` judges each message of kind `go` and runs `actuators`."""
    app = Application(app="demo", team="ops", services=services or {}, agents={"ops": AgentSpec(
        role="executor", service=service, sensors=[SensorSpec(
            name="act", triggers=[{"event": {"message": {"kind": "go"}}}], actuators=actuators)])})
    app.base_dir = Path.cwd()
    return Agent(settings, store, validate_application(app), "ops")


def _go(agent: Agent, key: str, **payload: Any) -> dict[str, Any]:
    """Send one message, let the agent handle it, return the action record of the decision."""
    agent.store.send_message("test", "ops", "go", payload, key=key)
    agent.poll("act")
    (decision,) = [d for d in agent.store.list_decisions("ops") if d.key == f"ops:act:{key}"]
    return decision.actions[0]


def test_webhook_retries_with_one_idempotency_key_then_succeeds(
    hook: Any, settings: Settings, store: Store
) -> None:
    h = hook((503, 0.0), (502, 0.0), (200, 0.0))
    agent = _agent(settings, store, [{"func": "webhook", "params": {
        "url": h.url, "backoff": 0.01, "headers": {"X-Team": "ops"}, "payload": {"note": "drift"}}}])
    action = _go(agent, "m1", drift=True, p_value=0.001)
    assert action["status"] == "succeeded" and action["attempts"] == 3 and action["status_code"] == 200
    keys = {c["headers"]["Idempotency-Key"] for c in h.calls}
    assert keys == {"ops:act:m1:webhook"} and len(h.calls) == 3  # the same key on every retry
    body = h.calls[-1]["body"]
    assert body["observation"] == "m1" and body["data"]["drift"] is True and body["note"] == "drift"
    assert body["agent"] == "ops" and body["sensor"] == "act"
    assert h.calls[0]["headers"]["X-Team"] == "ops"


def test_webhook_failures_are_recorded_with_the_reason(hook: Any, settings: Settings) -> None:
    store = backends.store(settings)
    refused = hook((400, 0.0))
    slow = hook((200, 2.0), (200, 2.0))
    closed = Hook([])
    closed.close()  # nothing listens there any more
    agent = _agent(settings, store, [
        {"func": "webhook", "params": {"url": refused.url, "backoff": 0.01}},
    ])
    action = _go(agent, "a")
    assert action["status"] == "failed" and len(refused.calls) == 1  # a 4xx is not retried
    assert "refused the call: HTTP 400" in action["error"]

    agent = _agent(settings, store, [{"func": "webhook", "params": {
        "url": slow.url, "timeout": 0.3, "retries": 1, "backoff": 0.01}}])
    action = _go(agent, "b")
    assert action["status"] == "failed" and "after 2 attempt(s): ReadTimeout" in action["error"]

    agent = _agent(settings, store, [{"func": "webhook", "params": {
        "url": closed.url, "retries": 2, "backoff": 0.01}}])
    action = _go(agent, "c")
    assert action["status"] == "failed" and "after 3 attempt(s): ConnectError" in action["error"]

    agent = _agent(settings, store, [{"func": "webhook", "params": {"url": "ftp://x"}}])
    assert "must be http(s)" in _go(agent, "d")["error"]


def test_promote_moves_the_alias_once_and_records_it(
    tmp_path: Path, settings: Settings, store: Store
) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=settings.tracking)
    client.create_registered_model("tiny")
    for _ in range(2):
        client.create_model_version("tiny", source=str(tmp_path))
    client.set_registered_model_alias("tiny", "champion", "1")
    client.set_registered_model_alias("tiny", "challenger", "2")
    agent = _agent(settings, store, [{"func": "promote", "params": {
        "model": "tiny", "alias": "champion", "from_alias": "challenger"}}])

    action = _go(agent, "p1")
    assert action["status"] == "succeeded" and action["version"] == "2" and action["previous_version"] == "1"
    assert str(client.get_model_version_by_alias("tiny", "champion").version) == "2"
    (event,) = [e for e in store.list_events(kinds=["promoted"])]
    assert event.payload["previous_version"] == "1" and event.payload["action"] == "ops:act:p1:promote"

    again = _go(agent, "p2")  # already there: nothing moves, nothing new is recorded
    assert again["status"] == "succeeded" and again["changed"] is False
    assert len(store.list_events(kinds=["promoted"])) == 1

    # the version may come with the observation, and must exist
    agent = _agent(settings, store, [{"func": "promote", "params": {"model": "tiny"}}])
    assert _go(agent, "p3", version="1")["version"] == "1"
    assert str(client.get_model_version_by_alias("tiny", "champion").version) == "1"
    missing = _go(agent, "p4", version="9")
    assert missing["status"] == "failed" and "models:/tiny/9 is not registered" in missing["error"]


def test_scale_rollout_and_rollback_a_running_service(digits_workspace: DigitsWorkspace) -> None:  # noqa: F811
    from scanflow.serving import LocalDeployer

    ws = digits_workspace
    svc = "agent-svc"
    deployer = LocalDeployer(ws.settings, ws.store)
    deployer.deploy(svc, app="demo", team="ops", model=MODEL, replicas=1)
    try:
        services = {svc: Service(model=MODEL)}

        def act(key: str, *actuators: Any) -> dict[str, Any]:
            return _go(_agent(ws.settings, ws.store, list(actuators), services, svc), key)

        up = act("up", {"func": "scale", "params": {"by": 1, "max_replicas": 2}})
        assert up["status"] == "succeeded" and up["replicas"] == 2 and up["from_replicas"] == 1
        capped = act("up-again", {"func": "scale", "params": {"by": 1, "max_replicas": 2}})
        assert capped["changed"] is False and capped["replicas"] == 2

        moved = act("v2", {"func": "rollout", "params": {"version": "2"}})
        assert moved["status"] == "succeeded", moved
        assert moved["model_version"] == "2" and moved["from_version"] == "1"
        back = act("back", {"func": "rollback_now"})
        assert back["status"] == "succeeded", back
        assert back["model_version"] == "1" and back["from_version"] == "2"

        dep = ws.store.get_deployment(svc)
        assert dep is not None and dep.model_version == "1" and dep.replicas == 2
        r = httpx.post(f"http://{dep.host}:{dep.port}/predict", json={"instances": ws.X[:2].tolist()},
                       timeout=30)
        assert r.status_code == 200 and r.json()["model_version"] == "1"
        done = {e.kind: e for e in ws.store.list_events(service=svc)}
        assert done["rollback_completed"].payload.get("actor") == "ops"  # the audit trail names the agent
        assert "agent ops" in done["rollback_completed"].payload.get("reason", "")
    finally:
        deployer.stop(svc)


def test_bare_rollback_is_the_guarded_one(settings: Settings, store: Store) -> None:
    """`func: rollback` judges the probation first: a model that was deployed, not promoted,
    is left serving (`rollback_now` is the unconditional one)."""
    store.put_deployment(service="svc", app="demo", team="ops", model_name="m", alias="champion",
                         model_version="1", host="127.0.0.1", port=1, pid=None, replicas=1,
                         status="running", workdir="/nonexistent")
    store.add_event("deployer", "deployed", "svc", actor="alice", model_version="1", replicas=1)
    agent = _agent(settings, store, [{"func": "rollback"}], {"svc": Service(model="m")}, "svc")
    action = _go(agent, "rb1")
    assert action["status"] == "succeeded" and action["rolled_back"] is False
    assert action["why"] == "the served model is not on probation"
    assert store.get_deployment("svc").model_version == "1"
    assert not store.list_events("svc", ["rolled_back", "rollback_started"])
