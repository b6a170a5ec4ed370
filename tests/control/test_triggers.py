"""Workflows started by cron, by another workflow's success and by registry events, each run
recording what started it."""

from __future__ import annotations

import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from scanflow.control.workflow_triggers import WorkflowTriggers as TriggerService
from scanflow.engine import LocalEngine
from scanflow.engine.resources import ResourcePool
from scanflow.settings import Settings
from scanflow.spec import SpecError, load_application
from scanflow.store import Store

SPEC = '''
app: demo
team: ds
workflows:
  ingest:
    steps: [{name: a, call: "steps:noop", cache: false}]
  every_second:
    triggers: [{cron: "*/1 * * * * *"}]
    steps: [{name: a, call: "steps:noop", cache: false}]
  after_ingest:
    triggers: [{after_workflow: ingest, params: {}}]
    steps: [{name: a, call: "steps:noop", cache: false}]
  on_new_version:
    triggers: [{model: tiny, event: version_registered}]
    steps: [{name: a, call: "steps:noop", cache: false}]
  on_alias:
    triggers: [{model: tiny, event: alias_moved, alias: champion}]
    steps: [{name: a, call: "steps:noop", cache: false}]
'''


@pytest.fixture
def app(tmp_path: Path):  # type: ignore[no-untyped-def]
    d = tmp_path / "app"
    d.mkdir()
    (d / "steps.py").write_text("def noop():\n    pass\n")
    (d / "scanflow.yaml").write_text(SPEC)
    return load_application(d)


def _register(settings: Settings) -> str:
    import mlflow

    from scanflow.tracking import MlflowTracker, log_sklearn_model

    mlflow.set_tracking_uri(settings.tracking)
    x = np.random.default_rng(0).normal(size=(40, 3))
    with mlflow.start_run(experiment_id=MlflowTracker(settings).experiment_id("demo", "ds")):
        _, version = log_sklearn_model(LogisticRegression().fit(x, x[:, 0] > 0), x[:2], "tiny")
    assert version is not None
    return version


def test_event_triggers_queue_runs_with_provenance(app, settings: Settings, store: Store) -> None:  # type: ignore[no-untyped-def]
    eng = LocalEngine(settings, store, pool=ResourcePool(cpus=2))
    svc = TriggerService(eng, [app])
    assert svc.poll_once() == []  # nothing happened yet
    src = eng.run(app, "ingest")
    (after,) = svc.poll_once()
    run = store.get_run(after)
    assert run is not None and run.workflow == "after_ingest" and run.status == "queued"
    assert run.trigger["by"] == "workflow" and run.trigger["after_run"] == src.run_id
    assert svc.poll_once() == []  # the same success does not fire twice

    version = _register(settings)
    fired = {store.get_run(r).workflow: store.get_run(r).trigger for r in svc.poll_once()}  # type: ignore[union-attr]
    assert fired["on_new_version"]["event"] == "version_registered"
    assert fired["on_new_version"]["version"] == version
    eng.tracker.set_alias("tiny", "champion", version)
    (moved,) = svc.poll_once()
    trig = store.get_run(moved).trigger  # type: ignore[union-attr]
    assert trig["event"] == "alias_moved" and trig["to_version"] == version

    stop = threading.Event()
    t = threading.Thread(target=eng.serve, args=(stop.is_set,), kwargs={"poll": 0.05})
    t.start()
    deadline = time.time() + 60
    while time.time() < deadline and any(
        store.get_run(r).status != "succeeded" for r in svc.fired  # type: ignore[union-attr]
    ):
        time.sleep(0.1)
    stop.set()
    t.join(10)
    assert all(store.get_run(r).status == "succeeded" for r in svc.fired)  # type: ignore[union-attr]


def test_cron_trigger_fires(app, settings: Settings, store: Store) -> None:  # type: ignore[no-untyped-def]
    eng = LocalEngine(settings, store, pool=ResourcePool(cpus=2))
    svc = TriggerService(eng, [app], poll=0.2)
    svc.start()
    try:
        deadline = time.time() + 20
        while time.time() < deadline and not any(
            r.workflow == "every_second" for r in store.list_runs(status=["queued"])
        ):
            time.sleep(0.1)
    finally:
        svc.stop()
    runs = [r for r in store.list_runs() if r.workflow == "every_second"]
    assert runs and runs[0].trigger["by"] == "cron" and runs[0].trigger["cron"] == "*/1 * * * * *"


def test_bad_triggers_are_refused(tmp_path: Path) -> None:
    d = tmp_path / "bad"
    d.mkdir()
    (d / "scanflow.yaml").write_text(textwrap.dedent('''
        app: x
        team: t
        workflows:
          w:
            triggers: [{cron: "every monday"}, {model: m, event: alias_moved}, {}]
            steps: [{name: a, run: "true"}]
    '''))
    with pytest.raises(SpecError) as exc:
        load_application(d)
    text = str(exc.value)
    assert "workflows.w.triggers[0]" in text and "bad cron expression" in text
    assert "workflows.w.triggers[1]" in text and "needs `alias`" in text
    assert "workflows.w.triggers[2]" in text and "exactly one of" in text
