"""Workflow triggers on the control layer's durable sources: what happens while `engine serve`
is down fires when it starts again, once; one trigger vocabulary for workflows and agents, the
0.1 spelling accepted with a deprecation that shows the new one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import warnings
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from scanflow.cli.main import app as cli_app
from scanflow.control.workflow_triggers import WorkflowTriggers, consumer_name
from scanflow.engine import LocalEngine
from scanflow.engine.resources import ResourcePool
from scanflow.settings import Settings
from scanflow.spec import SpecError, load_application
from scanflow.spec.models import Trigger, Workflow
from scanflow.spec.triggers import SpecDeprecationWarning
from scanflow.store import Store
from support.waiting import wait_for

SPEC = '''
app: demo
team: ds
workflows:
  ingest:
    steps: [{name: a, call: "steps:noop", cache: false}]
  after_ingest:
    triggers: [{event: {workflow_finished: {workflow: ingest, status: [succeeded]}},
                params: {n: 3}}]
    params: {n: 1}
    steps: [{name: a, call: "steps:noop", cache: false}]
'''


def _app_dir(tmp_path: Path, spec: str = SPEC) -> Path:
    d = tmp_path / "app"
    d.mkdir()
    (d / "steps.py").write_text("def noop():\n    pass\n")
    (d / "scanflow.yaml").write_text(spec)
    return d


class _Serve:
    """`scanflow engine serve APP` as a process of its own, its output collected."""

    def __init__(self, app_dir: Path) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "400"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "scanflow.cli.main", "engine", "serve", str(app_dir)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())

    def started(self) -> str:
        """The line `engine serve` prints once it has caught up and watches its triggers."""
        return wait_for(lambda: next((ln for ln in self.lines if "caught up" in ln), None)
                        or (self.proc.poll() is not None and self._died()), timeout=60)

    def _died(self) -> None:
        raise AssertionError("engine serve exited:\n" + "\n".join(self.lines))

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(30) == 0, "\n".join(self.lines)


def test_a_run_finished_while_engine_serve_was_down_fires_once_at_restart(
    tmp_path: Path, settings: Settings
) -> None:
    d = _app_dir(tmp_path)
    app = load_application(d)
    store = Store(settings.store)

    def downstream() -> list[Any]:
        return [r for r in store.list_runs("after_ingest")]

    first = _Serve(d)
    assert "caught up: 0 run(s)" in first.started()  # the trigger's cursor starts here
    first.stop()

    upstream = LocalEngine(settings, store).run(app, "ingest")  # while engine serve is down
    assert upstream.ok and not downstream()

    second = _Serve(d)
    try:
        assert "caught up: 1 run(s)" in second.started()
        (run,) = wait_for(lambda: [r for r in downstream() if r.status == "succeeded"], timeout=60)
    finally:
        second.stop()
    assert run.trigger["by"] == "workflow" and run.trigger["after_run"] == upstream.run_id
    assert run.params == {"n": 3}  # the trigger's params

    third = _Serve(d)  # a further restart: the event was delivered, it does not fire again
    try:
        assert "caught up: 0 run(s)" in third.started()
    finally:
        third.stop()
    assert [r.id for r in downstream()] == [run.id]


def test_a_fire_replayed_after_a_crash_queues_no_second_run(settings: Settings, store: Store,
                                                             tmp_path: Path) -> None:
    """A crash after queueing but before the cursor moved: the replayed event finds its run by
    the fire's idempotency key."""
    app = load_application(_app_dir(tmp_path))
    eng = LocalEngine(settings, store, pool=ResourcePool(cpus=2))
    consumer = consumer_name(app)
    assert WorkflowTriggers(eng, [app]).poll_once() == []
    before = store.state_items(consumer, "_cursor:")
    upstream = eng.run(app, "ingest")
    (queued,) = WorkflowTriggers(eng, [app]).poll_once()
    for key, value in before.items():  # as if the process died before committing the cursor
        store.set_state(consumer, key, value)
    assert WorkflowTriggers(eng, [app]).poll_once() == []
    (run,) = store.list_runs("after_ingest")
    assert run.id == queued and run.trigger["after_run"] == upstream.run_id
    events = [e for e in store.list_events(kinds=["workflow_triggered"])]
    assert [e.payload["run_id"] for e in events] == [queued]


SCHEDULED = '''
app: demo
team: ds
workflows:
  hourly:
    triggers: [{interval: 1h, params: {n: 2}}]
    params: {n: 1}
    steps: [{name: a, call: "steps:noop", cache: false}]
  once:
    triggers: [{date: "2020-01-01T00:00:00Z"}]
    steps: [{name: a, call: "steps:noop", cache: false}]
'''


def test_time_triggers_of_workflows_are_durable(settings: Settings, tmp_path: Path) -> None:
    """An interval fires at its first start and not again at a restart within the hour; a date
    already past fires once, ever."""
    store = Store(settings.store)
    app = load_application(_app_dir(tmp_path, SCHEDULED))
    eng = LocalEngine(settings, store, pool=ResourcePool(cpus=2))

    def runs(wf: str) -> list[Any]:
        return list(store.list_runs(wf))

    svc = WorkflowTriggers(eng, [app])
    svc.start()
    try:
        wait_for(lambda: runs("hourly") and runs("once"), timeout=60)
    finally:
        svc.stop()
    (hourly,) = runs("hourly")
    assert hourly.trigger["by"] == "interval" and hourly.params == {"n": 2}
    assert runs("once")[0].trigger["by"] == "date"

    again = WorkflowTriggers(eng, [app])
    again.start()
    try:  # its jobs are planned at start: the interval's next fire is an hour after the last
        jobs = again._sched.get_jobs()  # noqa: SLF001
        assert len(jobs) == 1 and jobs[0].next_run_time > datetime.now(UTC) + timedelta(minutes=59)
    finally:
        again.stop()
    assert len(runs("hourly")) == 1 and len(runs("once")) == 1


LEGACY = '''
app: demo
team: ds
workflows:
  ingest:
    steps: [{name: a, call: "steps:noop", cache: false}]
  old:
    triggers:
      - {after_workflow: ingest}
      - {model: tiny, event: alias_moved, alias: champion}
    steps: [{name: a, call: "steps:noop", cache: false}]
'''


def test_the_old_spelling_is_converted_with_a_deprecation(tmp_path: Path, settings: Settings) -> None:
    d = _app_dir(tmp_path, LEGACY)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        app = load_application(d)
    found = [str(w.message) for w in caught if issubclass(w.category, SpecDeprecationWarning)]
    assert len(found) == 2 and all(issubclass(SpecDeprecationWarning, DeprecationWarning) for _ in found)
    assert "write {event: {workflow_finished: {workflow: ingest, status: [succeeded]}}}" in found[0]
    assert "write {event: {model: {name: tiny, event: alias_moved, alias: champion}}}" in found[1]
    after, alias = app.workflows["old"].triggers
    assert isinstance(after, Trigger) and after.event is not None
    assert after.event.workflow_finished is not None and after.event.workflow_finished.status == ["succeeded"]
    assert alias.event is not None and alias.event.model is not None
    assert alias.event.model.alias == "champion"

    res = CliRunner().invoke(cli_app, ["validate", str(d)])
    assert res.exit_code == 0, res.output
    assert "deprecated" in res.output and "event: {workflow_finished:" in res.output


def test_one_vocabulary_refuses_what_does_not_apply(tmp_path: Path) -> None:
    d = tmp_path / "bad"
    d.mkdir()
    (d / "scanflow.yaml").write_text(textwrap.dedent('''
        app: x
        team: t
        workflows:
          w:
            triggers:
              - {event: {message: {kind: go}}}
              - {event: {prediction_window: {size: 10}}}
              - {cron: "0 3 * * *"}
              - {cron: "0 3 * * *", params: {n: 1}}
            steps: [{name: a, run: "true"}]
        agents:
          a:
            role: custom
            sensors: [{name: s, trigger: {interval: 5, params: {n: 1}}}]
    '''))
    with pytest.raises(SpecError) as exc:
        load_application(d)
    text = str(exc.value)
    assert "triggers[0].event.message: a workflow has no inbox" in text
    assert "triggers[1].event.prediction_window.service: needed" in text
    assert "triggers[3] repeats triggers[2]" in text
    assert "agents.a.sensors[0]: triggers[0].params: only a workflow trigger takes `params`" in text
    # a workflow trigger is the agents' Trigger: the same kinds, the same ids
    wf = Workflow.model_validate({"triggers": [{"interval": "1h"}], "steps": [{"name": "a", "run": "true"}]})
    assert wf.triggers[0].key == Trigger(interval=3600).key
