"""Agents act with a token of their own team (issue 17): what an agent may do is what its
identity's roles allow now, and its decisions, events, runs and messages record that identity.
Messages between agents are signed: a row written by anyone without the message key is
dead-lettered, never acted on. A real model service, a real local engine and MLflow."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest

from scanflow.agents import Agent, AgentSpec, SensorSpec
from scanflow.control import backends
from scanflow.settings import Settings
from scanflow.spec import Application, Service, validate_application
from scanflow.spec.access import Role
from scanflow.store import Store
from scanflow.store.schema import Message
from support.serving import MODEL, DigitsWorkspace, digits_workspace  # noqa: F401

OTHER_APP = """
app: reports
team: other
workflows:
  hello:
    steps:
      - {name: say, run: "python -c \\"print('hello from other')\\"", cache: false}
"""


def _agent(settings: Settings, store: Store, actuators: list[Any], service: str | None,
           services: dict[str, Any]) -> Agent:
    """Agent `exec` of team `ops`: its sensor `act` runs `actuators` on each message `go`."""
    app = Application(app="demo", team="ops", services=services, agents={"exec": AgentSpec(
        role="executor", service=service, sensors=[SensorSpec(
            name="act", triggers=[{"event": {"message": {"kind": "go"}}}], actuators=actuators)])})
    app.base_dir = settings.root
    return Agent(settings, store, validate_application(app), "exec")


def _go(agent: Agent, key: str) -> dict[str, Any]:
    agent.store.send_message("test", "exec", "go", {}, key=key)
    agent.poll("act")
    (decision,) = [d for d in agent.store.list_decisions("exec") if d.key == f"exec:act:{key}"]
    return {"by": decision.by, **decision.actions[0]}


def test_an_agent_acts_as_its_team_is_refused_elsewhere_until_granted_and_stops_when_revoked(
    digits_workspace: DigitsWorkspace,  # noqa: F811
) -> None:
    from mlflow import MlflowClient

    from scanflow.serving import LocalDeployer

    ws, store = digits_workspace, digits_workspace.store
    ids = store.identities
    for team in ("ops", "other"):
        ids.create_team(team)
    ids.create_user("alice", admin=True)
    ids.create_token("alice")  # from now on this installation has identities
    deployer = LocalDeployer(ws.settings, store)
    deployer.deploy("ops-svc", app="demo", team="ops", model=MODEL, replicas=1)
    store.put_deployment(service="other-svc", app="reports", team="other", model_name=MODEL,
                         alias="champion", model_version="1", host="127.0.0.1", port=1, pid=None,
                         replicas=1, status="running", workdir=str(ws.settings.root))
    (ws.settings.root / "other").mkdir()
    (ws.settings.root / "other" / "scanflow.yaml").write_text(OTHER_APP)
    services = {"ops-svc": Service(model=MODEL), "other-svc": Service(model=MODEL)}
    try:
        def act(key: str, *actuators: Any) -> dict[str, Any]:
            return _go(_agent(ws.settings, store, list(actuators), None, services), key)

        # its own team's service: allowed, and recorded as the agent's identity
        up = act("up", {"func": "scale", "params": {"service": "ops-svc", "by": 1, "max_replicas": 2}})
        assert up["status"] == "succeeded" and up["replicas"] == 2, up
        assert up["by"] == "agent:ops.exec"
        (ev,) = store.list_events(service="ops-svc", kinds=["replicas_set"])
        assert ev.payload["by"] == "agent:ops.exec" and ev.payload["actor"] == "agent:exec"
        assert ("ops.exec", "agent", False, {"ops": "owner"}) in ids.list_users()

        # another team's service: refused before anything is touched
        across = act("across", {"func": "scale", "params": {"service": "other-svc", "by": 1,
                                                             "max_replicas": 3}})
        assert across["status"] == "failed"
        assert "agent:ops.exec may not scale other-svc of team 'other'" in across["error"]
        assert store.get_deployment("other-svc").replicas == 1
        assert not store.list_events(service="other-svc", kinds=["replicas_set"])

        # another team's workflow: refused, then run once an admin grants operator there
        wf = {"func": "run_workflow", "params": {"app": "other/scanflow.yaml", "workflow": "hello"}}
        refused = act("wf1", wf)
        assert refused["status"] == "failed" and "may not run hello of team 'other'" in refused["error"]
        assert not store.list_runs("hello")
        ids.set_role("ops.exec", "other", Role.operator)
        ran = act("wf2", wf)
        assert ran["status"] == "succeeded", ran
        (run,) = store.list_runs("hello")
        assert run.trigger["by"] == "agent:ops.exec" and run.team == "other"
        tags = MlflowClient(tracking_uri=ws.settings.tracking).get_run(run.mlflow_run_id).data.tags
        assert tags["scanflow.by"] == "agent:ops.exec" and tags["scanflow.team"] == "other"

        # an admin revokes the token the agent holds: its next act is refused
        agent = _agent(ws.settings, store, [{"func": "scale", "params": {"service": "ops-svc",
                                                                          "by": -1}}], None, services)
        (live,) = [t for t in ids.list_tokens("ops.exec") if t.revoked_at is None]
        assert ids.revoke_token(live.id)
        down = _go(agent, "down")
        assert down["status"] == "failed" and "its token was refused (revoked)" in down["error"]
        assert store.get_deployment("ops-svc").replicas == 2
    finally:
        deployer.stop("ops-svc")


def test_an_agent_of_a_team_this_installation_does_not_know_refuses_to_start(
    settings: Settings, store: Store,
) -> None:
    store.identities.create_team("elsewhere")
    store.identities.create_user("root", admin=True)
    store.identities.create_token("root")
    with pytest.raises(Exception, match="scanflow admin create-team ops"):
        _agent(settings, store, [{"func": "send", "params": {"to": "nobody", "kind": "seen"}}], None, {})


def test_messages_are_signed_and_a_forged_or_altered_one_is_dead_lettered_unread(
    settings: Settings, store_url: str,
) -> None:
    """The store signs what a sender holding the key sends; a row written with the database
    alone (no key), or changed after it was signed, is rejected and recorded, not delivered."""
    signed = Store(store_url, signer=backends.message_signer(settings))
    bare = Store(store_url)  # someone with the database, not the key
    key_file = settings.message_key_path
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    secret = key_file.read_text().strip()

    assert signed.send_message("monitor", "planner", "window", {"n": 1}, key="good", by="agent:ops.monitor")
    assert bare.send_message("monitor", "planner", "window", {"n": 2}, key="forged")
    assert signed.send_message("monitor", "planner", "window", {"n": 3}, key="altered")
    assert signed.send_message("monitor", "planner", "window", {"n": 4}, key="reattributed",
                               by="agent:ops.monitor")
    with signed.session() as s:
        for m in s.query(Message).filter(Message.key.in_(["altered", "reattributed"])):
            if m.key == "altered":
                m.payload = {"n": 30}
            else:
                m.by = "agent:ops.executor"

    delivered = signed.inbox("planner")
    assert [m.key for m in delivered] == ["good"] and delivered[0].by == "agent:ops.monitor"
    dead = {m.key: m for m in signed.list_messages("planner", status="dead")}
    assert set(dead) == {"forged", "altered", "reattributed"}
    assert dead["forged"].error == "rejected: unsigned"
    assert dead["altered"].error == dead["reattributed"].error == "rejected: signature does not verify"
    rejected = signed.list_events(kinds=["message_rejected"])
    assert sorted(e.payload["key"] for e in rejected) == ["altered", "forged", "reattributed"]
    assert [m.key for m in signed.inbox("planner")] == ["good"]  # not acked yet: delivered again
    assert len(signed.list_events(kinds=["message_rejected"])) == 3  # each rejected once
    # the key is nowhere in what the store keeps
    with signed.session() as s:
        kept = " ".join(f"{m.signature} {m.payload} {m.error}" for m in s.query(Message))
    assert secret not in kept and all(secret not in str(e.payload) for e in rejected)
    assert secret not in repr(signed.signer)


def test_an_agent_never_acts_on_a_message_written_without_the_key(
    settings: Settings, store: Store, store_url: str,
) -> None:
    agent = _agent(settings, store, [{"func": "send", "params": {"to": "nobody", "kind": "seen"}}], None, {})
    Store(store_url).send_message("test", "exec", "go", {}, key="forged")
    store.send_message("test", "exec", "go", {}, key="real")
    agent.poll("act")
    assert [d.key for d in store.list_decisions("exec")] == ["exec:act:real"]
    forged = store.agents.message_by_key("forged")
    assert forged is not None and forged.status == "dead" and forged.error == "rejected: unsigned"
    assert len(store.list_messages("nobody")) == 1  # the one real message acted on, once


def test_the_message_key_is_made_once_and_shared_by_processes_of_one_workspace(tmp_path: Path) -> None:
    from scanflow.store.signing import load_or_create_key

    path = tmp_path / "agents" / "messages.key"
    first = load_or_create_key(path)
    assert len(first) == 32 and load_or_create_key(path) == first
