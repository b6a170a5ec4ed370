"""What starts workflows on their own (`scanflow engine serve`): a workflow's `triggers` are the
agents' triggers (interval, cron, date, or an event: another workflow's run finished, a model
version registered or an alias moved, a prediction window full), on the same durable sources.

Each application's triggers are one consumer in the store (`workflows:<app>/<team>`): event
cursors and time-trigger records survive restarts, so what happened while `engine serve` was
down fires when it starts again, and a cron missed meanwhile is coalesced (or skipped). Each
fire queues one run whose `trigger` records what started it and why (provenance); the fire's
key is an idempotency key in the store, so a fire replayed after a crash (or seen by a second
`engine serve`) never queues a second run.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from apscheduler.schedulers.background import BackgroundScheduler

from scanflow.control.events import EventSource, event_source
from scanflow.control.triggers import TimeTrigger, TriggerEvent, poll_trigger
from scanflow.spec.models import Application, Trigger
from scanflow.store import Store

log = logging.getLogger("scanflow.triggers")

EVENTS_SOURCE = "triggers"  # the `source` of the events it records


class RunSubmitter(Protocol):
    """The part of an `Engine` that queues runs (any backend: `LocalEngine`, a Ray engine)."""

    def submit(self, app: Application, workflow: str, params: dict[str, Any] | None = None,
               trigger: dict[str, Any] | None = None) -> str: ...


def consumer_name(app: Application) -> str:
    """The store namespace of one application's workflow triggers (no agent name has a ':')."""
    return f"workflows:{app.app}/{app.team}"


@dataclass
class _AppEnv:
    """What the event sources of one application's workflow triggers read (a `SourceEnv`)."""

    store: Store
    app: Application
    tracker: Any
    name: str
    service: str | None = None


@dataclass
class _Entry:
    env: _AppEnv
    workflow: str
    trig: Trigger
    source: EventSource | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    startup: dict[str, Any] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.env.app.app}/{self.env.app.team}/{self.workflow}"


def provenance(trig: Trigger, ev: TriggerEvent) -> dict[str, Any]:
    """A run's `trigger` record: who or what started it, and why, in a user's words."""
    e = ev.evidence
    why: dict[str, Any] = {"trigger": trig.key, "event_key": ev.key}
    if ev.kind == "workflow_finished":
        why.update(by="workflow", after_run=e["run_id"], after_workflow=e["workflow"],
                   after_status=e["status"],
                   reason=f"{e['workflow']} run {e['run_id'][:12]} {e['status']}")
    elif ev.kind == "version_registered":
        why.update(by="model", event="version_registered", model=e["model"], version=e["version"],
                   reason=f"{e['model']} version {e['version']} was registered")
    elif ev.kind == "alias_moved":
        why.update(by="model", event="alias_moved", model=e["model"], alias=e["alias"],
                   from_version=e["from_version"], to_version=e["to_version"],
                   reason=f"{e['model']}@{e['alias']} moved {e['from_version']} -> {e['to_version']}")
    elif ev.kind == "prediction_window":
        why.update(by="prediction_window", service=e["service"], first_id=e["first_id"],
                   last_id=e["last_id"], reason=f"{e['n']} new predictions of {e['service']}")
    else:  # interval | cron | date
        why.update({k: v for k, v in e.items() if k != "trigger"}, by=ev.kind,
                   reason=f"schedule {trig.describe()}")
        why[ev.kind] = {"cron": trig.cron, "interval": trig.interval,
                        "date": trig.date.isoformat() if trig.date else None}.get(ev.kind)
    return why


def _action_key(entry: _Entry, ev: TriggerEvent) -> str:
    key = f"trigger:{entry.where}/{entry.trig.key}:{ev.key}"
    return key if len(key) <= 240 else f"{key[:198]}~{hashlib.sha1(key.encode()).hexdigest()}"


class WorkflowTriggers:
    """Fires the workflow triggers of `apps` by queueing runs on `engine` (which `serve` runs).
    `poll` (seconds) overrides every event trigger's own `poll`."""

    def __init__(self, engine: RunSubmitter, apps: list[Application], poll: float | None = None,
                 *, store: Store | None = None, tracker: Any = None) -> None:
        self.engine = engine
        self.store: Store = store if store is not None else engine.store  # type: ignore[attr-defined]
        tracker = tracker if tracker is not None else engine.tracker  # type: ignore[attr-defined]
        self.poll = poll
        self.fired: list[str] = []
        self._entries: list[_Entry] = []
        for app in apps:
            env = _AppEnv(self.store, app, tracker, consumer_name(app))
            for name, wf in app.workflows.items():
                for t in wf.triggers:
                    src = event_source(env, name, t) if t.event is not None else None
                    self._entries.append(_Entry(env, name, t, src))
        self._sched: Any = None

    @property
    def triggers(self) -> int:
        return len(self._entries)

    # -- firing ---------------------------------------------------------------------------------
    def _fire(self, entry: _Entry, ev: TriggerEvent) -> str | None:
        """Queue the run of one fire, once: None if it was queued before (a replay)."""
        akey = _action_key(entry, ev)
        _, attempt = self.store.claim_action(akey, entry.env.name, "workflow_triggered")
        if attempt == 0:
            return None
        app, why = entry.env.app, provenance(entry.trig, ev)
        prior = self._run_of(entry, akey) if attempt > 1 else None  # cut off after queueing?
        if prior is not None:
            self.store.finish_action(akey, "succeeded", {"run_id": prior})
            return None
        try:
            run_id = self.engine.submit(app, entry.workflow, dict(entry.trig.params or {}), trigger={
                **why, "action_key": akey, "fired_at": datetime.now(UTC).isoformat()})
        except ValueError as exc:  # bad params or resources: this fire never runs; say so
            log.error("%s: trigger %s could not queue a run: %s", entry.where, entry.trig.key, exc)
            self.store.finish_action(akey, "failed", {"error": str(exc)[:2000]})
            self.store.add_event(EVENTS_SOURCE, "workflow_trigger_failed", None, app=app.app,
                                 team=app.team, workflow=entry.workflow, error=str(exc)[:2000], **why)
            return None
        self.store.add_event(EVENTS_SOURCE, "workflow_triggered", None, app=app.app, team=app.team,
                             workflow=entry.workflow, run_id=run_id, **why)
        self.store.finish_action(akey, "succeeded", {"run_id": run_id})
        log.info("queued %s run %s: %s", entry.where, run_id[:12], why["reason"])
        self.fired.append(run_id)
        return run_id

    def _run_of(self, entry: _Entry, akey: str) -> str | None:
        app = entry.env.app
        for r in self.store.list_runs(entry.workflow, limit=500):
            if (r.app, r.team) == (app.app, app.team) and (r.trigger or {}).get("action_key") == akey:
                return r.id
        return None

    def _poll(self, entry: _Entry) -> list[str]:
        """Poll one event trigger: queue a run per new event, in order, then move its cursor.
        A failure (the registry is down, the store is busy) leaves the rest for the next poll."""
        assert entry.source is not None
        queued: list[str] = []
        with entry.lock:
            try:
                for ev in entry.source.poll():
                    run_id = self._fire(entry, ev)
                    if ev.commit is not None:
                        ev.commit()
                    if run_id is not None:
                        queued.append(run_id)
            except Exception:  # noqa: BLE001 - keep watching; retried at the next poll
                log.exception("%s: polling trigger %s failed", entry.where, entry.trig.key)
        return queued

    def poll_once(self) -> list[str]:
        """Poll every event trigger once now; returns the runs queued."""
        return [r for e in self._entries if e.source is not None for r in self._poll(e)]

    # -- running --------------------------------------------------------------------------------
    def start(self) -> list[str]:
        """Catch up (events while no consumer ran fire now: returns the runs queued), then
        schedule every trigger until `stop`."""
        caught_up = self.poll_once()
        self._sched = BackgroundScheduler(
            timezone=UTC, job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None})
        for i, entry in enumerate(self._entries):
            if entry.source is not None:
                aps, first = poll_trigger(entry.trig, self.poll)
                self._sched.add_job(self._poll, aps, args=[entry], id=f"poll-{i}", next_run_time=first)
            else:
                self._schedule_time(i, entry)
        self._sched.start()
        return caught_up

    def _schedule_time(self, i: int, entry: _Entry) -> None:
        plan = TimeTrigger(self.store, entry.env.name, entry.workflow, entry.trig).start()
        if plan.skipped is not None:
            app = entry.env.app
            self.store.add_event(EVENTS_SOURCE, "misfire_skipped", None, app=app.app, team=app.team,
                                 workflow=entry.workflow, trigger=entry.trig.key,
                                 schedule=entry.trig.describe(), **plan.skipped)
        if plan.aps is None:
            return
        entry.startup = plan.startup
        kwargs = {"next_run_time": plan.first} if plan.first is not None else {}
        self._sched.add_job(self._time_job, plan.aps, args=[entry], id=f"time-{i}", **kwargs)

    def _time_job(self, entry: _Entry) -> None:
        tt = TimeTrigger(self.store, entry.env.name, entry.workflow, entry.trig)
        startup, entry.startup = entry.startup, {}
        for ev, record in tt.due(startup):
            tt.fire(ev, record, self._fire_logged(entry))

    def _fire_logged(self, entry: _Entry) -> Any:
        def handle(ev: TriggerEvent) -> None:
            try:
                self._fire(entry, ev)
            except Exception:  # noqa: BLE001 - a failing fire must not stop the schedule
                log.exception("%s: trigger %s failed", entry.where, entry.trig.key)
        return handle

    def stop(self) -> None:
        if self._sched is not None:
            self._sched.shutdown(wait=True)
            self._sched = None

