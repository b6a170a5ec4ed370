"""The store behaves the same on SQLite and PostgreSQL (every test runs on both)."""

from __future__ import annotations

import time

from scanflow.store import Store


def test_runs_and_steps_roundtrip(store: Store) -> None:
    run = store.create_run("app", "team", "train", {"epochs": 3}, {"by": "agent", "agent": "x"})
    store.upsert_step(run.id, "load", status="running", started_at=time.time())
    store.upsert_step(run.id, "load", status="succeeded", exit_code=0)
    store.upsert_step(run.id, "fit", status="pending")
    store.update_run(run.id, status="succeeded")
    got = store.get_run(run.id[:8])
    assert got is not None and got.status == "succeeded" and got.trigger["agent"] == "x"
    steps = {s.step: s for s in store.list_steps(run.id)}
    assert steps["load"].status == "succeeded" and steps["load"].exit_code == 0
    assert len(steps) == 2  # the upsert did not duplicate the step
    assert store.get_run("does-not-exist") is None


def test_ended_attempts_logs_are_kept_once_each_in_attempt_order(store: Store) -> None:
    run = store.create_run("app", "team", "train", {})
    other = store.create_run("app", "team", "train", {})
    store.keep_step_logs([(run.id, "fit", 2, "second try\n"), (run.id, "fit", 1, "first try\n"),
                          (other.id, "fit", 1, "another run\n")])
    store.keep_step_logs([(run.id, "fit", 1, "written again"), (run.id, "fit", 3, "é" * 5000)])
    assert store.step_attempt_logs(run.id, "fit") == [
        (1, "first try\n"), (2, "second try\n"), (3, "é" * 5000)]  # an attempt ends once: first text
    assert store.step_attempt_logs(other.id, "fit") == [(1, "another run\n")]
    assert store.step_attempt_logs(run.id, "load") == []


def test_prediction_log_windows_and_late_labels(store: Store) -> None:
    now = time.time()
    store.add_labels({"r1": 7})  # a label may arrive before its prediction is flushed
    store.add_predictions(
        {"request_id": f"r{i}", "service": "svc", "model_version": "1", "ts": now + i,
         "inputs": [i, i], "outputs": i % 10, "latency_ms": 1.0}
        for i in range(10)
    )
    store.add_labels({"r2": 3, "r1": 1})
    rows = store.predictions("svc")
    assert [r["request_id"] for r in rows] == [f"r{i}" for i in range(10)]
    assert {r["request_id"]: r["label"] for r in rows if r["label"] is not None} == {"r1": 1, "r2": 3}
    assert len(store.predictions("svc", labelled_only=True)) == 2
    assert len(store.predictions("svc", since=now + 5)) == 5
    ids = store.prediction_ids("svc", after_id=rows[3]["id"])
    assert len(ids) == 6
    assert store.count_predictions("svc") == (10, rows[-1]["id"])
    assert store.predictions("other") == []


def test_messages_are_durable_and_deduplicated(store: Store) -> None:
    assert store.send_message("a", "b", "window", {"n": 1}, key="k1")
    assert not store.send_message("a", "b", "window", {"n": 1}, key="k1")  # same key: once
    store.send_message("a", "b", "other", {}, key="k2")
    first = store.inbox("b", ["window"])
    assert [m.key for m in first] == ["k1"]
    # Not acknowledged (e.g. the receiver crashed): delivered again.
    assert [m.key for m in Store(store.url).inbox("b", ["window"])] == ["k1"]
    store.ack_message(first[0].id)
    assert store.inbox("b", ["window"]) == []
    assert [m.key for m in store.inbox("b")] == ["k2"]


def test_actions_have_idempotency_keys(store: Store) -> None:
    _, first = store.begin_action("agent:obs:act", "agent", "act")
    assert first
    store.finish_action("agent:obs:act", "succeeded", {"version": "2"})
    action, again = store.begin_action("agent:obs:act", "agent", "act")
    assert not again and action.result == {"version": "2"}


def test_decisions_events_state(store: Store) -> None:
    d1 = store.add_decision("an", "drift", "rule", True, {"p": 0.001}, "svc", [], key="k")
    d2 = store.add_decision("an", "drift", "rule", True, {"p": 0.5}, "svc", [], key="k")
    assert d1.id == d2.id and len(store.list_decisions("an")) == 1
    store.add_event("an", "drift_detected", "svc", p=0.001)
    assert [e.kind for e in store.list_events("svc")] == ["drift_detected"]
    store.set_state("an", "watermark", 10)
    store.set_state("an", "watermark", 20)
    assert store.get_state("an", "watermark") == 20
    assert store.get_state("an", "missing", "d") == "d"


def test_deployments(store: Store) -> None:
    store.put_deployment(service="s", app="a", team="t", model_name="m", alias="champion",
                         model_version="1", host="127.0.0.1", port=1234, pid=1, replicas=2,
                         status="running", workdir="/x")
    store.update_deployment("s", replicas=3)
    dep = store.get_deployment("s")
    assert dep is not None and dep.replicas == 3 and dep.model_version == "1"
    assert [d.service for d in store.list_deployments()] == ["s"]


def test_repositories_behind_the_store(store: Store) -> None:
    """Each aggregate is reachable as its own repository; the flat methods are the same calls."""
    from scanflow.store import (
        AgentRepository,
        DecisionRepository,
        DeploymentRepository,
        PredictionRepository,
        RunRepository,
    )

    for repo, proto in ((store.runs, RunRepository), (store.deployments, DeploymentRepository),
                        (store.prediction_log, PredictionRepository), (store.agents, AgentRepository),
                        (store.decisions, DecisionRepository)):
        missing = [m for m in dir(proto) if not m.startswith("_") and not hasattr(repo, m)]
        assert missing == [], (proto.__name__, missing)
    run = store.runs.create_run("app", "team", "wf", {})
    assert store.get_run(run.id) is not None and not hasattr(store, "find_cached")
    assert not hasattr(store, "get_decision")


def test_cache_index_of_a_workflow(store: Store) -> None:
    runs = [store.create_run("app", "t", "wf", {}) for _ in range(2)]
    other = store.create_run("other", "t", "wf", {})
    for i, r in enumerate([*runs, other]):
        store.upsert_step(r.id, "fit", status="succeeded", cache_key="k1", outputs={"m": f"/{i}"})
        store.upsert_step(r.id, "eval", status="failed", cache_key="k2")
    assert store.runs.cache_index("app", "wf") == {"k1": (runs[1].id, "fit", {"m": "/1"})}  # newest wins
    assert store.runs.cache_index("app", "wf", exclude_run=runs[1].id) == {
        "k1": (runs[0].id, "fit", {"m": "/0"})}
    assert store.runs.cache_index("app", "nope") == {}


def test_lookups_for_the_planner_and_the_audit(store: Store) -> None:
    store.add_event("a", "rollout_completed", "svc", to_version="2")
    store.add_event("a", "rollback_completed", "svc", to_version="1")
    store.add_event("a", "rollout_completed", "other", to_version="9")
    store.add_event("a", "scaled", "svc", to=3)
    last = store.latest_events("svc", ["rollout_completed", "rollback_completed"])
    assert [e.payload["to_version"] for e in last] == ["1"]
    assert [e.kind for e in store.latest_events("svc", ["rollout_completed", "scaled"], limit=5)] == [
        "scaled", "rollout_completed"]
    assert len(store.list_events("svc", limit=None)) == 3
    for k in ("m1", "m2", "m3"):
        store.send_message("mon", "plan", "drift_report", {"k": k}, key=k)
    ids = [m.id for m in store.list_messages("plan")]
    store.ack_message(ids[0])
    assert [m.key for m in store.messages_by_ids([ids[2], ids[0], 10**9])] == ["m1", "m3"]
    assert store.messages_by_ids([]) == []
    assert store.agents.message_by_key("m2") is not None and store.agents.message_by_key("x") is None
    store.add_decision("mon", "s", "r", True, {}, key="mon:s:obs1")
    store.add_decision("mon", "s", "r", True, {}, key="mon:t:obs1")
    assert store.decisions.decision_by_key("mon:t:obs1") is not None
    first = store.decisions.first_decision_ending("mon", ":obs1")
    assert first is not None and first.key == "mon:s:obs1"
    assert store.decisions.decision_agents() == {"mon"}
    store.begin_action("k1", "plan", "rollout")
    store.finish_action("k1", "succeeded", {})
    near = store.decisions.actions_around(time.time(), 2.0)
    assert [a.key for a in near] == ["k1"] and store.decisions.actions_around(time.time(), 2.0, "x") == []
    assert store.decisions.actions_around(time.time() + 3600, 2.0) == []
