"""`why`: the chain behind a service's model version and replica count, from a real store.

The agents here are real (the runtime, its keys, durable messages); only the last actuator
stands in for the retrain workflow and the deployer, writing the run and events they write.
The chain through a real deployed service is tested in test_planner (slow)."""

from __future__ import annotations

import json
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from scanflow.agents import Agent
from scanflow.control.audit import why
from scanflow.settings import Settings
from scanflow.spec import load_application
from scanflow.store import Store

CUSTOM = '''
def drifted(obs, ctx):
    return True, "ks p=0.0001 < 0.01 (Bonferroni over 4 features)"


def promote(obs, ctx):
    """What the executor's retrain-and-promote leaves behind: a run, the promotion, a rollout."""
    run = ctx.store.create_run("demo", "ds", "retrain", {"new_data": "x.npz"},
                               {"by": "agent", "agent": ctx.name, "observation": obs.key},
                               status="succeeded")
    ctx.store.add_event(ctx.name, "promoted", ctx.service, model="m", alias="champion", version="2",
                        previous_version="1", approved_by="policy:promotion-gate", run_id=run.id,
                        candidate_acc_new=0.93, champion_acc_new=0.57)
    ctx.store.update_deployment(ctx.service, model_version="2")
    ctx.store.add_event("deployer", "rollout_completed", ctx.service, actor=ctx.name,
                        from_version="1", to_version="2", seconds=3.2)
    return {"promoted": True, "candidate_version": "2", "previous_version": "1", "run_id": run.id}
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
        actuators:
          - {func: scanflow.agents.builtin:send, params: {to: analyzer, kind: window}}
  analyzer:
    role: analyzer
    service: svc
    sensors:
      - name: drift
        func: scanflow.agents.builtin:inbox
        params: {kinds: [window]}
        rule: custom:drifted
        actuators:
          - {func: scanflow.agents.builtin:send, params: {to: planner, kind: drift_report, drift: true}}
  planner:
    role: planner
    service: svc
    sensors:
      - name: plan
        func: scanflow.agents.builtin:inbox
        params: {kinds: [drift_report]}
        rule: {func: scanflow.agents.builtin:plan_retrain, params: {consecutive: 1, cooldown_s: 0}}
        actuators:
          - {func: scanflow.agents.builtin:send, params: {to: executor, kind: retrain}}
  executor:
    role: executor
    service: svc
    sensors:
      - name: act
        func: scanflow.agents.builtin:inbox
        params: {kinds: [retrain]}
        actuators: [custom:promote]
'''


@pytest.fixture
def app(tmp_path: Path) -> Any:
    d = tmp_path / "app"
    d.mkdir()
    (d / "custom.py").write_text(textwrap.dedent(CUSTOM))
    (d / "scanflow.yaml").write_text(textwrap.dedent(SPEC))
    return load_application(d)


def _deploy(store: Store, actor: str = "alice") -> None:
    store.put_deployment(service="svc", app="demo", team="ops", model_name="m", alias="champion",
                         model_version="1", host="127.0.0.1", port=1, pid=None, replicas=1,
                         status="running", workdir="/nonexistent")
    store.add_event("deployer", "deployed", "svc", actor=actor, model="m", alias="champion",
                    model_version="1", replicas=1)


def _run_loop(settings: Settings, store: Store, app: Any) -> None:
    store.add_predictions(
        {"request_id": f"r{i}", "service": "svc", "model_version": "1", "ts": time.time() - 5,
         "inputs": [i], "outputs": 0, "latency_ms": 1.0} for i in range(4)
    )
    for name, sensor in (("monitor", "windows"), ("analyzer", "drift"), ("planner", "plan"),
                         ("executor", "act")):
        assert Agent(settings, store, app, name).tick(sensor) == 1


def test_why_walks_from_the_rollout_back_to_the_drift_window(app: Any, settings: Settings,
                                                             store: Store) -> None:
    _deploy(store)
    _run_loop(settings, store, app)
    store.update_deployment("svc", replicas=3)
    store.add_event("deployer", "scaled", "svc", actor="alice", **{"from": 1, "to": 3})

    res = why(store, "svc")
    assert res["current"] == {**res["current"], "model": "m", "model_version": "2", "replicas": 3}

    link = res["model_change"]
    assert link["event"]["kind"] == "rollout_completed" and link["event"]["actor"] == "executor"
    assert link["approved_by"] == "policy:executor"
    assert link["action"]["kind"] == "custom:promote" and link["action"]["status"] == "succeeded"
    assert link["action"]["result"]["candidate_version"] == "2"
    assert link["decision"]["agent"] == "executor"
    assert link["workflow_run"]["workflow"] == "retrain" and link["workflow_run"]["status"] == "succeeded"
    assert link["workflow_run"]["trigger"]["agent"] == "executor"
    promo = link["promotion"]["payload"]
    assert promo["approved_by"] == "policy:promotion-gate" and promo["candidate_acc_new"] == 0.93
    # Upstream, oldest first: the monitor's window, the analyzer's drift test, the planner.
    up = link["upstream"]
    assert [u["agent"] for u in up] == ["monitor", "analyzer", "planner"]
    assert up[0]["evidence"]["n"] == 4 and up[0]["evidence"]["first_id"] >= 1
    assert "ks p=0.0001" in up[1]["reason"]
    assert "retrain (episode 1)" in up[2]["reason"]

    rep = res["replica_change"]
    assert rep["event"]["kind"] == "scaled" and rep["approved_by"] == "person:alice"
    assert rep["action"] is None and rep["decision"] is None

    # One chain, newest last; the model's steps precede alice's scale-out.
    steps = [(s["what"], s["step"], s["who"]) for s in res["chain"]]
    assert steps == [
        ("model", "decision", "monitor"), ("model", "decision", "analyzer"),
        ("model", "decision", "planner"), ("model", "decision", "executor"),
        ("model", "action", "executor"), ("model", "workflow_run", "ds"),
        ("model", "model_version", "executor"), ("model", "event", "deployer as executor"),
        ("replicas", "event", "deployer as alice"),
    ]
    ts = [s["ts"] for s in res["chain"]]
    assert ts == sorted(ts)
    assert [h["approved_by"] for h in res["history"]] == ["person:alice", "policy:executor", "person:alice"]
    json.dumps(res)  # the API answer is plain JSON


def test_replicas_set_at_deploy_time_are_the_deployers(settings: Settings, store: Store) -> None:
    _deploy(store, actor="bob")
    res = why(store, "svc")
    assert res["model_change"]["event"]["kind"] == "deployed"
    assert res["replica_change"]["approved_by"] == "person:bob"
    assert res["model_change"]["approved_by"] == "person:bob"


def test_an_event_without_actor_is_traced_to_the_action_running_then(settings: Settings,
                                                                      store: Store) -> None:
    """Older deployer events name no actor: the agent action that was running when the event
    was written (and that names the same replica count) is the cause."""
    _deploy(store)
    store.add_decision("planner", "plan", "decide", True, {"reason": "p95 300 ms > 250 ms"}, "svc",
                       key="planner:plan:svc:10s:1")
    key = "planner:plan:svc:10s:1:scanflow.agents.planner:execute"
    store.begin_action(key, "planner", "scanflow.agents.planner:execute")
    store.update_deployment("svc", replicas=2)
    store.add_event("deployer", "scaled", "svc", **{"from": 1, "to": 2})
    store.finish_action(key, "succeeded",
                        {"results": [{"kind": "scale_up", "status": "done", "replicas": 2}]})
    rep = why(store, "svc")["replica_change"]
    assert rep["approved_by"] == "policy:planner"
    assert rep["decision"]["reason"] == "p95 300 ms > 250 ms"


def test_unknown_service_is_a_clear_error(store: Store) -> None:
    with pytest.raises(KeyError, match="no service 'nope'"):
        why(store, "nope")


def test_cli_why(app: Any, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    from scanflow.cli import main
    from scanflow.cli.main import app as cli

    # The console was sized when the module was first imported (maybe by another test).
    monkeypatch.setattr(main.out, "width", 200)

    store = Store(settings.store)
    try:
        _deploy(store)
        _run_loop(settings, store, app)
    finally:
        store.close()
    runner = CliRunner()
    res = runner.invoke(cli, ["why", "svc"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "version 2 x1" in res.output
    assert "approved by policy:executor" in res.output
    assert "ks p=0.0001" in res.output and "promoted to @champion" in res.output
    as_json = runner.invoke(cli, ["why", "svc", "--json"])
    assert json.loads(as_json.output)["model_change"]["approved_by"] == "policy:executor"
    hist = runner.invoke(cli, ["why", "svc", "--history"], env={"COLUMNS": "200"})
    assert "person:alice" in hist.output and "1 -> 2" in hist.output
    missing = runner.invoke(cli, ["why", "nope"])
    assert missing.exit_code == 2 and "no service 'nope'" in missing.output
