"""The control layer's model operations on a real store, a real MLflow registry and a real
local model service: each takes the service's lease (a lease held elsewhere makes it wait, then
fail having changed nothing), records who acted and why, and a retried promotion is recorded once."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from scanflow.control.evaluation import MissingEvaluation, candidate_evaluation
from scanflow.control.leases import LeaseBusy, service_lease, service_lease_name
from scanflow.control.operations import Actor, ModelOps, ServiceChanged
from scanflow.settings import Settings
from scanflow.store import Store
from support.serving import MODEL, DigitsWorkspace, digits_workspace, stop_everything  # noqa: F401

SERVICE = "control-ops"
ALICE = Actor.person("alice")


@pytest.fixture(scope="module")
def served(digits_workspace: DigitsWorkspace) -> Iterator[tuple[DigitsWorkspace, Any]]:  # noqa: F811
    """One running service on `digits@champion` (version 1), one replica."""
    from scanflow.serving import LocalDeployer

    ws = digits_workspace
    deployer = LocalDeployer(ws.settings, ws.store, actor="alice")
    deployer.deploy(SERVICE, app="demo", team="ops", model=MODEL, alias="champion", replicas=1)
    try:
        yield ws, deployer
    finally:
        stop_everything(deployer, ws.store)


def _tracker(ws: DigitsWorkspace) -> Any:
    from scanflow.tracking import MlflowTracker

    return MlflowTracker(ws.settings)


def _snapshot(ws: DigitsWorkspace) -> tuple[Any, ...]:
    dep = ws.store.get_deployment(SERVICE)
    assert dep is not None
    champion = _tracker(ws).alias_version(MODEL, "champion")
    return (dep.model_version, dep.replicas, dep.canary_version, dep.shadow_version, champion,
            len(ws.store.list_events(SERVICE)))


def test_every_operation_waits_for_a_held_lease_then_fails_changing_nothing(
    served: tuple[DigitsWorkspace, Any],
) -> None:
    ws, deployer = served
    ops = ModelOps(deployer, ws.store, _tracker(ws), lease_ttl_s=5.0, lease_wait_s=0.4)
    calls: dict[str, Callable[[], Any]] = {
        "scale": lambda: ops.scale(SERVICE, 2, actor=ALICE),
        "rollout": lambda: ops.rollout(SERVICE, "2", actor=ALICE),
        "rollback": lambda: ops.rollback(SERVICE, actor=ALICE),
        "canary": lambda: ops.canary(SERVICE, "2", 0.5, actor=ALICE),
        "shadow": lambda: ops.shadow(SERVICE, "2", actor=ALICE),
        "promote": lambda: ops.promote(SERVICE, "2", actor=ALICE, expect_serving="1"),
    }
    before = _snapshot(ws)
    assert ws.store.acquire_lease(service_lease_name(SERVICE), "planner:4242", 600, purpose="scale_up (w9)")
    try:
        for name, call in calls.items():
            t0 = time.monotonic()
            with pytest.raises(LeaseBusy, match=r"leased by planner:4242 until .* \(scale_up \(w9\)\)"):
                call()
            assert time.monotonic() - t0 >= 0.4, f"{name} did not wait for the lease"
            assert _snapshot(ws) == before, f"{name} changed something without the lease"
    finally:
        ws.store.release_lease(service_lease_name(SERVICE), "planner:4242")
    # Free again: the lease is taken by the operation and given back after it.
    assert ops.scale(SERVICE, 1, actor=ALICE).changed is False
    assert ws.store.get_lease(service_lease_name(SERVICE)) is None


def test_operations_record_who_acted_and_why(served: tuple[DigitsWorkspace, Any]) -> None:
    ws, deployer = served
    ops = ModelOps(deployer, ws.store, _tracker(ws))
    planner = Actor.policy("planner")

    up = ops.scale(SERVICE, 2, actor=planner, reason="p95 above the SLO", evidence={"p95_latency_ms": 310.0})
    assert up.changed and up.before == 1 and up.after == 2
    (ev,) = ws.store.list_events(SERVICE, ["replicas_set"])
    assert ev.source == "planner" and ev.payload["actor"] == "policy:planner"
    assert ev.payload["reason"] == "p95 above the SLO" and ev.payload["p95_latency_ms"] == 310.0
    assert ev.payload["from_replicas"] == 1 and ev.payload["replicas"] == 2
    assert ops.scale(SERVICE, 2, actor=planner).changed is False  # already so: nothing recorded
    assert len(ws.store.list_events(SERVICE, ["replicas_set"])) == 1

    canary = ops.canary(SERVICE, "2", 0.25, actor=ALICE, reason="try v2")
    assert canary.changed and ws.store.get_deployment(SERVICE).canary_version == "2"
    shadow = ops.shadow(SERVICE, None, actor=ALICE)
    assert shadow.changed is False
    ops.canary(SERVICE, None, actor=ALICE)
    kinds = [(e.kind, e.payload["actor"], e.payload.get("version")) for e in ws.store.list_events(
        SERVICE, ["canary_set", "shadow_set"])]
    assert kinds == [("canary_set", "person:alice", "2"), ("shadow_set", "person:alice", None),
                     ("canary_set", "person:alice", None)]

    moved = ops.rollout(SERVICE, "2", actor=ALICE, reason="by hand")
    assert moved.changed and moved.before == "1" and moved.after == "2"
    back = ops.rollback(SERVICE, actor=planner, reason="v2 lost", evidence={"margin": 0.02})
    assert back.changed and back.before == "2" and back.after == "1"
    (out,) = ws.store.list_events(SERVICE, ["rolled_out"])
    (rb,) = ws.store.list_events(SERVICE, ["rolled_back"])
    assert out.payload["actor"] == "person:alice" and out.payload["to_version"] == "2"
    assert rb.payload["approved_by"] == "policy:planner" and rb.payload["margin"] == 0.02
    assert rb.payload["from_version"] == "2" and rb.payload["to_version"] == "1"
    # The deployer's own events name the same people, with the reasons.
    done = {e.kind: e for e in ws.store.list_events(SERVICE) if e.source == "deployer"}
    assert done["rollout_completed"].payload["reason"] == "by hand"
    # A rollback expecting a version no longer served is a no-op (a retry after it happened).
    again = ops.rollback(SERVICE, actor=planner, expect_serving="2")
    assert again.changed is False and ws.store.get_deployment(SERVICE).model_version == "1"
    assert len(ws.store.list_events(SERVICE, ["rolled_back"])) == 1
    ops.scale(SERVICE, 1, actor=planner)


def test_promote_checks_moves_rolls_out_and_records_once(served: tuple[DigitsWorkspace, Any]) -> None:
    ws, deployer = served
    tracker = _tracker(ws)
    ops = ModelOps(deployer, ws.store, tracker)
    executor = Actor.agent("executor")
    assert ws.store.get_deployment(SERVICE).model_version == "1"

    with pytest.raises(ValueError, match="models:/digits/9 is not registered"):
        ops.promote(SERVICE, "9", actor=executor)
    with pytest.raises(ServiceChanged, match="it serves version 1 now, not 2"):
        ops.promote(SERVICE, "2", actor=executor, expect_serving="2")
    with pytest.raises(ValueError, match="did not pass the gate"):
        ops.promote(SERVICE, "2", actor=executor, evidence={"passed": False})
    assert tracker.alias_version(MODEL, "champion") == "1"
    assert not ws.store.list_events(SERVICE, ["promoted"])

    # The first try moved the alias and died; the resumed try (same key) records and rolls out,
    # a third try changes and records nothing more.
    tracker.set_alias(MODEL, "champion", "2")
    for _ in range(2):
        done = ops.promote(SERVICE, "2", actor=executor, evidence={"passed": True, "gain_on_new": 0.1},
                           previous="1", expect_serving="1" if _ == 0 else "2", key="executor:act:m1:retrain",
                           approved_by="policy:promotion-gate", reason="retrain episode 1")
        assert done.changed and done.before == "1"
    (ev,) = ws.store.list_events(SERVICE, ["promoted"])
    assert ev.payload["approved_by"] == "policy:promotion-gate" and ev.payload["actor"] == "agent:executor"
    assert ev.payload["previous_version"] == "1" and ev.payload["version"] == "2"
    assert ev.payload["gain_on_new"] == 0.1 and ev.payload["forced"] is False
    dep = ws.store.get_deployment(SERVICE)
    assert dep.model_version == "2"
    r = httpx.post(f"http://{dep.host}:{dep.port}/predict", json={"instances": ws.X[:1].tolist()}, timeout=30)
    assert r.status_code == 200 and r.json()["model_version"] == "2"
    assert ops.promote(SERVICE, "2", actor=executor).changed is False  # already there

    # A person forces a version the gate refused: done, and the record says so.
    forced = ops.promote(SERVICE, "1", actor=ALICE, evidence={"passed": False}, force=True, reason="I know")
    assert forced.changed and ws.store.get_deployment(SERVICE).model_version == "1"
    last = ws.store.list_events(SERVICE, ["promoted"])[-1]
    assert last.payload["forced"] is True and last.payload["actor"] == "person:alice"
    assert tracker.alias_version(MODEL, "champion") == "1"


def test_a_model_without_a_service_is_promoted_under_the_model_lease(settings: Settings,
                                                                    tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from scanflow.tracking import MlflowTracker

    store = Store(settings.store)
    client = MlflowClient(tracking_uri=settings.tracking)
    client.create_registered_model("tiny")
    for _ in range(2):
        client.create_model_version("tiny", source=str(tmp_path))
    ops = ModelOps(None, store, MlflowTracker(settings), lease_wait_s=0.2)  # type: ignore[arg-type]
    with service_lease(store, "unused", "x:1"):  # another service's lease does not matter
        done = ops.promote(None, "2", actor=Actor.agent("ops"), model="tiny", key="k")
    assert done.changed and MlflowTracker(settings).alias_version("tiny", "champion") == "2"
    assert store.acquire_lease("model:tiny", "other:1", 60)
    with pytest.raises(LeaseBusy, match="model 'tiny' is leased by other:1"):
        ops.promote(None, "1", actor=Actor.agent("ops"), model="tiny")
    assert MlflowTracker(settings).alias_version("tiny", "champion") == "2"
    (ev,) = store.list_events(kinds=["promoted"])
    assert ev.source == "ops" and ev.service is None and ev.payload["action"] == "k"
    store.close()


def test_the_evaluation_contract_names_a_missing_tag(settings: Settings, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from scanflow.tracking import MlflowTracker

    client = MlflowClient(tracking_uri=settings.tracking)
    client.create_registered_model("cand")
    client.create_model_version("cand", source=str(tmp_path))
    tags = {"candidate_acc_new": "0.93", "champion_acc_new": "0.57", "candidate_acc_clean": "0.97",
            "n_holdout": "450", "loss": "0.2"}
    for k, v in tags.items():
        client.set_model_version_tag("cand", "1", f"eval.{k}", v)
    tracker = MlflowTracker(settings)
    with pytest.raises(MissingEvaluation, match=r"missing tag\(s\) eval\.champion_acc_clean"):
        candidate_evaluation(tracker, "cand", "1")
    client.set_model_version_tag("cand", "1", "eval.champion_acc_clean", "n/a")
    with pytest.raises(MissingEvaluation, match="eval.champion_acc_clean='n/a' is not a number"):
        candidate_evaluation(tracker, "cand", "1")
    client.set_model_version_tag("cand", "1", "eval.champion_acc_clean", "0.98")
    ev = candidate_evaluation(tracker, "cand", "1")
    assert (ev.candidate_acc_new, ev.champion_acc_clean, ev.n_holdout) == (0.93, 0.98, 450)
    assert ev.figures["loss"] == 0.2  # extra figures are kept as evidence
