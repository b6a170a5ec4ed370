"""The executor (`retrain_and_promote`) checks the retrain contracts: a real retrain workflow
(a step script this test writes) that forgets its part fails with a message naming what is
missing and the helper that writes it, recorded as a `contract_violation` event.

The service is a deployment record with labelled predictions in the store (what the executor
reads); no check here gets as far as a rollout, so no model server runs."""

from __future__ import annotations

import re
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from scanflow.agents import Agent, AgentSpec, SensorSpec
from scanflow.control import backends
from scanflow.settings import Settings
from scanflow.spec import Application, Service, validate_application
from scanflow.store import Store
from support.waiting import wait_for

MODEL = "tiny"
SVC = "tabular"

# One step that does the retrain right, except for what MODE says it forgets.
STEP = textwrap.dedent('''
    import argparse

    import mlflow.sklearn
    from mlflow import MlflowClient
    from sklearn.dummy import DummyClassifier

    from scanflow.tracking import (evaluate_candidate, log_model_with_reference, log_sklearn_model,
                                   publish_evaluation, read_new_data)

    MODE = "{mode}"
    p = argparse.ArgumentParser()
    p.add_argument("--new_data", required=True)
    new = read_new_data(p.parse_args().new_data)
    # a constant model: worse than the champion, so a right workflow ends at the gate's "no"
    candidate = DummyClassifier(strategy="most_frequent").fit(new.x_new, new.y_new)
    champion = mlflow.sklearn.load_model("models:/{model}@champion")
    if MODE == "no_reference":
        with mlflow.start_run():
            _, version = log_sklearn_model(candidate, new.x_new[:5], "{model}")
    else:
        version = log_model_with_reference(candidate, new.x_new, "{model}")
    holdout = (new.x_holdout, new.y_holdout)
    figures = evaluate_candidate(candidate, champion, holdout, holdout)
    if MODE == "no_alias":
        publish_evaluation("{model}", version, figures, alias=None)
    elif MODE == "no_eval":
        MlflowClient().set_registered_model_alias("{model}", "challenger", version)
    else:
        publish_evaluation("{model}", version, figures)
''')

SPEC = textwrap.dedent("""
    app: demo
    team: science
    models: [{model}]
    workflows:
      retrain:
        {params}
        steps:
          - name: fit
            run: python fit.py
            cache: false
            registers: [{model}]
""")


@dataclass
class Served:
    """A service of the module's workspace, its own for one test (events and decisions are
    per service and agent)."""

    settings: Settings
    store: Store
    service: str

    def violation(self) -> dict[str, Any]:
        """The last `contract_violation` event's payload."""
        events = self.store.list_events(self.service, ["contract_violation"])
        assert events, "no contract_violation event was recorded"
        return dict(events[-1].payload)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Settings, Store, np.ndarray]]:
    """One MLflow registry for the module (creating it costs seconds): `tiny` v1 is the
    champion, logged with its reference."""
    import mlflow
    from sklearn.linear_model import LogisticRegression

    from scanflow.tracking import log_model_with_reference

    root = tmp_path_factory.mktemp("executor-contracts")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SCANFLOW_WORKSPACE", str(root / "ws"))
        settings = Settings(workspace=root / "ws").ensure()
        rng = np.random.default_rng(0)
        x = rng.normal(size=(120, 3))
        mlflow.set_tracking_uri(settings.tracking)
        exp = mlflow.create_experiment("champions", artifact_location=(settings.artifacts / "ch").as_uri())
        with mlflow.start_run(experiment_id=exp):
            model = LogisticRegression().fit(x, (x[:, 0] > 0).astype(int))
            assert log_model_with_reference(model, x, MODEL, alias="champion") == "1"
        store = backends.store(settings)
        yield settings, store, x
        store.close()


@pytest.fixture
def served(workspace: tuple[Settings, Store, np.ndarray], request: pytest.FixtureRequest) -> Served:
    """A service of its own serving champion v1, which answered 120 labelled requests; no
    `challenger` alias."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    settings, store, x = workspace
    svc = request.node.name.removeprefix("test_")[:40].replace("_", "-")
    y = (x[:, 0] > 0).astype(int)
    store.put_deployment(service=svc, app="demo", team="ops", model_name=MODEL, alias="champion",
                         model_version="1", host="127.0.0.1", port=1, pid=None, replicas=1,
                         status="running", workdir=str(settings.root))
    store.add_predictions({"request_id": f"{svc}-{i}", "service": svc, "model_version": "1",
                           "ts": 1000.0 + i, "inputs": x[i].tolist(), "outputs": int(y[i]),
                           "latency_ms": 1.0} for i in range(len(x)))
    store.add_labels({f"{svc}-{i}": int(y[i]) for i in range(len(x))})
    try:
        MlflowClient(tracking_uri=settings.tracking).delete_registered_model_alias(MODEL, "challenger")
    except MlflowException:
        pass  # no test left one
    return Served(settings, store, svc)


def _retrain_app(root: Path, mode: str, params: str = "params: {new_data: {type: path}}") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "fit.py").write_text(STEP.format(mode=mode, model=MODEL))
    (root / "scanflow.yaml").write_text(SPEC.format(model=MODEL, params=params))
    return root / "scanflow.yaml"


def _retrain(served: Served, spec: Path, key: str, message: dict[str, Any] | None = None,
             **params: Any) -> tuple[Agent, dict[str, Any]]:
    """An executor handles one `retrain` message: the agent, and the action as its decision
    records it."""
    svc, store, agent_name = served.service, served.store, f"executor-{served.service}"
    app = Application(app="demo", team="ops", services={svc: Service(model=MODEL)}, agents={
        agent_name: AgentSpec(role="executor", service=svc, sensors=[SensorSpec(
            name="act", triggers=[{"event": {"message": {"kind": "retrain"}}}], actuators=[
                {"func": "retrain_and_promote",
                 "params": {"app": str(spec), "min_labels": 80, "label_wait_s": 0, **params}}])])})
    app.base_dir = spec.parent
    agent = Agent(served.settings, store, validate_application(app), agent_name)
    store.send_message("planner", agent_name, "retrain", {"service": svc, "episode": 1, **(message or {})},
                       key=f"{svc}-{key}")  # message keys are unique in the whole store
    agent.poll("act")
    return agent, _action(served, key)


def _action(served: Served, key: str) -> dict[str, Any]:
    agent = f"executor-{served.service}"
    (decision,) = [d for d in served.store.list_decisions(agent)
                   if d.key == f"{agent}:act:{served.service}-{key}"]
    return dict(decision.actions[0])


def test_a_workflow_without_new_data_is_refused_before_it_runs(tmp_path: Path, served: Served) -> None:
    runs = len(served.store.list_runs("retrain"))
    spec = _retrain_app(tmp_path / "app", "ok", params="description: forgot new_data")
    _, action = _retrain(served, spec, "m1")
    assert action["status"] == "failed"
    assert "declares no parameter `new_data`" in action["error"]
    assert "params: {new_data: {type: path}}" in action["error"] and str(spec) in action["error"]
    ev = served.violation()
    assert ev["contract"] == "new_data" and ev["helper"] == "scanflow.tracking.contracts.read_new_data"
    assert len(served.store.list_runs("retrain")) == runs  # nothing ran

    bad = _retrain_app(tmp_path / "typed", "ok", params="params: {new_data: {type: int}}")
    assert "declare it `{type: path}`" in _retrain(served, bad, "m2")[1]["error"]


@pytest.mark.slow
def test_a_forgotten_challenger_alias_names_publish_evaluation(tmp_path: Path, served: Served) -> None:
    from mlflow import MlflowClient

    agent, action = _retrain(served, _retrain_app(tmp_path / "app", "no_alias"), "m1")
    assert action["status"] == "failed", action
    assert f"left no alias models:/{MODEL}@challenger" in action["error"]
    assert "publish_evaluation" in action["error"]
    assert served.violation()["contract"] == "challenger"
    runs = len(served.store.list_runs("retrain"))

    # An alias left from an earlier episode is no candidate of this run: the message's next try
    # (which continues the finished run, not a new one) finds the alias on version 1.
    MlflowClient(tracking_uri=served.settings.tracking).set_registered_model_alias(MODEL, "challenger", "1")

    def retried() -> dict[str, Any] | None:
        agent.poll("act")
        again = _action(served, "m1")
        return again if "points to version 1" in again.get("error", "") else None

    action = wait_for(retried, what="the next try judging the stale alias")
    assert "which retrain run" in action["error"] and "did not make" in action["error"]
    assert "publish_evaluation" in action["error"]
    assert len(served.store.list_runs("retrain")) == runs


@pytest.mark.slow
def test_a_candidate_without_its_reference_names_log_model_with_reference(
    tmp_path: Path, served: Served
) -> None:
    _, action = _retrain(served, _retrain_app(tmp_path / "app", "no_reference"), "m1")
    assert action["status"] == "failed", action
    assert re.search(f"models:/{MODEL}/[0-9]+: its run", action["error"])
    assert "has no artifact reference/reference.npy" in action["error"]
    assert "scanflow.tracking.contracts.log_model_with_reference" in action["error"]
    ev = served.violation()
    assert ev["contract"] == "reference" and ev["run_id"]


@pytest.mark.slow
def test_a_candidate_without_eval_tags_names_publish_evaluation(tmp_path: Path, served: Served) -> None:
    _, action = _retrain(served, _retrain_app(tmp_path / "app", "no_eval"), "m1")
    assert action["status"] == "failed", action
    assert "eval.candidate_acc_new" in action["error"] and "KeyError" not in action["error"]
    assert "scanflow.tracking.contracts.publish_evaluation" in action["error"]
    assert served.violation()["contract"] == "evaluation"


@pytest.mark.slow
def test_a_workflow_that_keeps_the_contracts_reaches_the_gate(tmp_path: Path, served: Served) -> None:
    _, action = _retrain(served, _retrain_app(tmp_path / "app", "ok"), "m1")
    assert action["status"] == "succeeded", action
    assert action["promoted"] is False and action["candidate_version"] != "1"  # the gate said no
    assert list(served.store.list_events(served.service, ["contract_violation"])) == []
    (finished,) = served.store.list_events(served.service, ["retrain_finished"])
    assert finished.payload["new_candidate_only"] is not None  # the paired counts reached the executor


def _retrain_data(served: Served) -> tuple[dict[str, Any], np.ndarray]:
    """The last `retrain_started` event's payload and the inputs the executor wrote for the run."""
    started = served.store.list_events(served.service, ["retrain_started"])[-1]
    with np.load(started.payload["data"]) as z:
        return dict(started.payload), np.concatenate([z["x_new"], z["x_holdout"]])


@pytest.mark.slow
def test_the_retrain_takes_the_newest_labels_of_the_episode_up_to_the_cap(tmp_path: Path,
                                                                          served: Served) -> None:
    """An episode that began at the 21st request has 100 labelled requests; the cap is 60:
    the retrain learns from (and is judged on) the 60 newest, none from before the episode."""
    ids = served.store.prediction_window(served.service, with_inputs=False).ids
    x = served.store.prediction_window(served.service).inputs
    _, action = _retrain(served, _retrain_app(tmp_path / "app", "ok"), "m1",
                         {"since_id": int(ids[20])}, min_labels=50, max_labels=60)
    assert action["status"] == "succeeded", action
    payload, used = _retrain_data(served)
    assert payload["labelled"] == 60 and payload["since_id"] == int(ids[20])
    assert sorted(map(tuple, used.tolist())) == sorted(map(tuple, np.asarray(x[-60:]).tolist()))
    # The gate said no (a constant model); the next try of the same champion takes every label
    # of its episode: a verdict on 30 % of 60 rows could not show a small gain.
    assert served.store.list_events(served.service, ["promotion_rejected"])
    _, again = _retrain(served, _retrain_app(tmp_path / "app2", "ok"), "m2",
                        {"since_id": int(ids[20]), "episode": 2}, min_labels=50, max_labels=60)
    assert again["status"] == "succeeded", again
    payload, used = _retrain_data(served)
    assert payload["labelled"] == 100 and len(used) == 100


@pytest.mark.slow
def test_a_retrain_asked_by_the_accuracy_rule_starts_its_episode_at_since_ts(tmp_path: Path,
                                                                             served: Served) -> None:
    """No drifted window (no `since_id`): the episode starts at `since_ts`, not when the
    champion began serving; the requests stamped 1000-1089 are left out."""
    x = served.store.prediction_window(served.service).inputs
    ids = served.store.prediction_window(served.service, with_inputs=False).ids
    _, action = _retrain(served, _retrain_app(tmp_path / "app", "ok"), "m1", {"since_ts": 1090.0},
                         min_labels=20, max_labels=40)
    assert action["status"] == "succeeded", action
    payload, used = _retrain_data(served)
    assert payload["since_id"] == int(ids[90]) and payload["labelled"] == 30
    assert sorted(map(tuple, used.tolist())) == sorted(map(tuple, np.asarray(x[90:]).tolist()))


def test_the_retrain_waits_for_labels_after_the_window_that_straddles_the_onset(served: Served) -> None:
    """The episode's first drifted window (from the 21st request) may hold rows of the old
    distribution; the window after it starts at the 91st. With 30 labels there and 50 needed,
    the executor waits for the next 20 rather than take 20 from the straddling window, and
    takes those only when the wait runs out."""
    import threading
    from types import SimpleNamespace

    from scanflow.agents.builtin import _labelled_rows
    from scanflow.agents.context import Observation

    svc, store = served.service, served.store
    ids = store.prediction_window(svc, with_inputs=False).ids
    obs = Observation(key="retrain", data={"since_id": int(ids[20]), "settled_id": int(ids[90])})
    ctx = SimpleNamespace(store=store)

    # The wait runs out: the 50 newest of the episode, 20 of them from the straddling window.
    _, rows = _labelled_rows(ctx, obs, svc, "1", 50, 0.3, 50)  # type: ignore[arg-type]
    assert [int(r["id"]) for r in rows] == [int(i) for i in ids[70:]]

    def label_more() -> None:  # 20 more labelled requests, after the executor began to wait
        store.add_predictions({"request_id": f"{svc}-late-{i}", "service": svc, "model_version": "1",
                               "ts": 2000.0 + i, "inputs": [float(i)] * 4, "outputs": 0,
                               "latency_ms": 1.0} for i in range(20))
        store.add_labels({f"{svc}-late-{i}": 0 for i in range(20)})

    later = threading.Timer(0.5, label_more)
    later.start()
    try:
        _, rows = _labelled_rows(ctx, obs, svc, "1", 50, 60.0, 50)  # type: ignore[arg-type]
    finally:
        later.join()
    assert len(rows) == 50 and min(int(r["id"]) for r in rows) == int(ids[90])
    assert sum(1 for r in rows if r["request_id"].startswith(f"{svc}-late-")) == 20
