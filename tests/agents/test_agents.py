"""Agents: decisions stored with evidence, watermarks, messages handled once across restarts."""

from __future__ import annotations

import os
import signal
import textwrap
import time
from pathlib import Path

import pytest

from scanflow.agents import Agent
from scanflow.agents.process import AgentSupervisor
from scanflow.control import backends
from scanflow.procs import pid_alive
from scanflow.settings import Settings
from scanflow.spec import load_application
from scanflow.store import Store
from support.waiting import wait_for

CUSTOM = '''
from pathlib import Path

def record(obs, ctx, path):
    # A call cut off by a kill after its write is called again with the same key: it can tell.
    if ctx.action is not None and ctx.action.resumed and Path(path).exists() and \\
            obs.key in Path(path).read_text().split():
        return {"written": obs.key, "already": True}
    with open(path, "a") as f:
        f.write(obs.key + "\\n")
    return {"written": obs.key}

def big_window(obs, ctx, min_n=3):
    return obs.evidence["n"] >= min_n, f"n={obs.evidence['n']}"
'''

SPEC = '''
app: demo
team: ops
services:
  svc: {model: m}
agents:
  monitor:
    role: monitor
    service: svc
    sensors:
      - name: windows
        func: scanflow.agents.builtin:prediction_window
        params: {window_size: 4, settle_s: 0}
        trigger: {interval: 0.2}
        rule: {func: "custom:big_window", params: {min_n: 4}}
        actuators:
          - {func: scanflow.agents.builtin:send, params: {to: receiver, kind: window}}
  receiver:
    role: custom
    sensors:
      - name: inbox
        func: scanflow.agents.builtin:inbox
        params: {kinds: [window]}
        trigger: {interval: 0.2}
        actuators:
          - {func: "custom:record", params: {path: "RECORD"}}
'''


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    d = tmp_path / "app"
    d.mkdir()
    (d / "custom.py").write_text(textwrap.dedent(CUSTOM))
    (d / "scanflow.yaml").write_text(SPEC.replace("RECORD", str(tmp_path / "record.txt")))
    return d


def _log(store: Store, n: int, start: int = 0) -> None:
    now = time.time() - 5
    store.add_predictions(
        {"request_id": f"r{i}", "service": "svc", "model_version": "1", "ts": now,
         "inputs": [i], "outputs": 0, "latency_ms": 1.0} for i in range(start, start + n)
    )


def test_windows_are_judged_once_with_evidence(app_dir: Path, settings: Settings, store: Store) -> None:
    app = load_application(app_dir)
    _log(store, 10)
    monitor = Agent(settings, store, app, "monitor")
    assert monitor.tick("windows") == 2  # two full windows of 4; 2 records wait
    assert monitor.tick("windows") == 0  # watermark: nothing judged twice
    # A restarted agent (new object, same store) resumes from the watermark.
    _log(store, 2, start=10)
    assert Agent(settings, store, app, "monitor").tick("windows") == 1
    decisions = store.list_decisions("monitor")
    assert len(decisions) == 3 and all(d.fired for d in decisions)
    assert decisions[0].evidence["n"] == 4 and decisions[0].evidence["reason"] == "n=4"
    assert decisions[0].actions[0]["status"] == "succeeded"
    msgs = store.list_messages("receiver")
    assert len(msgs) == 3 and msgs[0].payload["first_id"] < msgs[1].payload["first_id"]


def test_replayed_observation_does_not_act_twice(app_dir: Path, settings: Settings, store: Store,
                                                  tmp_path: Path) -> None:
    app = load_application(app_dir)
    store.send_message("monitor", "receiver", "window", {"n": 1}, key="w1")
    receiver = Agent(settings, store, app, "receiver")
    # Simulate a crash after acting but before the acknowledgement: handle, then un-ack.
    assert receiver.tick("inbox") == 1
    from sqlalchemy import update

    from scanflow.store.schema import Message

    with store.session() as s:
        s.execute(update(Message).values(status="pending"))
    assert receiver.tick("inbox") == 1  # delivered again ...
    assert (tmp_path / "record.txt").read_text().splitlines() == ["w1"]  # ... handled once
    assert store.inbox("receiver") == []


def test_agent_processes_deliver_messages_across_restarts(app_dir: Path, settings: Settings,
                                                          tmp_path: Path) -> None:
    store = backends.store(settings)
    sup = AgentSupervisor(settings, store)
    record = tmp_path / "record.txt"
    store.send_message("someone", "receiver", "window", {"n": 1}, key="sent-while-down")
    pids = sup.start(app_dir, ["receiver"])
    try:
        wait_for(lambda: record.exists() and "sent-while-down" in record.read_text())
        os.kill(pids["receiver"], signal.SIGKILL)  # crash
        wait_for(lambda: not pid_alive(pids["receiver"]))
        store.send_message("someone", "receiver", "window", {"n": 2}, key="sent-while-dead")
        assert sup.status()[0]["status"] == "dead"
        pids = sup.start(app_dir, ["receiver"])
        wait_for(lambda: "sent-while-dead" in record.read_text())
        time.sleep(1.0)  # give a duplicate a chance to appear
        assert record.read_text().splitlines() == ["sent-while-down", "sent-while-dead"]
        assert len(store.list_decisions("receiver")) == 2
    finally:
        sup.stop()
    assert not pid_alive(pids["receiver"])
    assert "started" in sup.log_path("receiver").read_text()


def test_unknown_agent_is_refused(app_dir: Path, settings: Settings, store: Store) -> None:
    with pytest.raises(KeyError, match="no agent 'ghost'"):
        Agent(settings, store, load_application(app_dir), "ghost")
    with pytest.raises(KeyError, match="ghost"):
        AgentSupervisor(settings, store).start(app_dir, ["ghost"])


def test_long_keys_forwarded_between_agents_still_fit(settings: Settings, store: Store) -> None:
    from scanflow.agents import AgentSpec, SensorSpec

    spec = AgentSpec(role="custom", sensors=[SensorSpec(
        name="relay", triggers=[{"event": {"message": {}}}],
        actuators=[{"func": "send", "params": {"to": "next", "kind": "relayed"}}])])
    agent = Agent.define(settings, store, "relay-agent-with-a-long-name", spec)
    long_key = "w" * 290  # e.g. a key grown hop by hop
    store.send_message("up", "relay-agent-with-a-long-name", "x", {}, key=long_key)
    agent.poll()
    agent.poll()  # (nothing new: the message was acknowledged)
    (d,) = store.list_decisions("relay-agent-with-a-long-name")
    assert len(d.key) <= 300 and d.actions[0]["status"] == "succeeded"
    (fwd,) = store.list_messages("next")
    assert len(fwd.key) <= 300 and fwd.kind == "relayed"
