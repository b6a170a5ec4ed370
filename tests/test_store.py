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
