"""What starts workflows on their own: cron schedules, another workflow's success, and model
registry events (a version registered, an alias moved). Each fire queues a run whose
`trigger` records who or what started it and why (provenance); `LocalEngine.serve` runs it.
Agents start workflows through their `run_workflow` actuator, with the same provenance."""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime
from typing import Any

from scanflow.engine.local import LocalEngine
from scanflow.spec.models import Application, WorkflowTrigger, cron_trigger

log = logging.getLogger("scanflow.triggers")


class TriggerService:
    def __init__(self, engine: LocalEngine, apps: list[Application], poll: float = 1.0) -> None:
        self.engine = engine
        self.apps = apps
        self.poll = poll
        self._since = time.time()  # runs that ended before we started do not fire
        self._versions: dict[str, int] = {}
        self._aliases: dict[tuple[str, str], str | None] = {}
        self._sched: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.fired: list[str] = []
        tracker = engine.tracker
        for _, _, trig in self._triggers():
            if trig.model is not None:
                self._versions.setdefault(trig.model, tracker.latest_version(trig.model))
                if trig.alias:
                    self._aliases[(trig.model, trig.alias)] = tracker.alias_version(trig.model, trig.alias)

    def _triggers(self) -> list[tuple[Application, str, WorkflowTrigger]]:
        return [(app, name, t) for app in self.apps for name, wf in app.workflows.items()
                for t in wf.triggers]

    def _fire(self, app: Application, workflow: str, trig: WorkflowTrigger, why: dict[str, Any]) -> str:
        run_id = self.engine.submit(app, workflow, dict(trig.params),
                                    trigger={**why, "fired_at": datetime.now(UTC).isoformat()})
        self.engine.store.add_event("triggers", "workflow_triggered", None, app=app.app,
                                    team=app.team, workflow=workflow, run_id=run_id, **why)
        log.info("queued %s/%s run %s: %s", app.app, workflow, run_id[:12], why)
        self.fired.append(run_id)
        return run_id

    def poll_once(self) -> list[str]:
        """Check the event triggers (workflow success, registry: the same `Tracker` queries as
        the agents' model triggers); returns the runs queued."""
        queued: list[str] = []
        ended = [r for r in self.engine.store.list_runs(status=["succeeded"], limit=1000)
                 if (r.ended_at or 0) > self._since]
        newest = max((r.ended_at or 0 for r in ended), default=self._since)
        for app, name, trig in self._triggers():
            if trig.after_workflow is not None:
                parts = trig.after_workflow.split("/")
                want = (app.app, app.team, *parts)[-3:]  # 'wf', 'team/wf' or 'app/team/wf'
                for r in sorted(ended, key=lambda r: r.ended_at or 0):
                    if (r.app, r.team, r.workflow) == want:
                        queued.append(self._fire(app, name, trig, {
                            "by": "workflow", "after_run": r.id, "after_workflow": r.workflow,
                            "reason": f"{r.workflow} run {r.id[:12]} succeeded"}))
            elif trig.model is not None and trig.event == "version_registered":
                latest = self.engine.tracker.latest_version(trig.model)
                if latest > self._versions.get(trig.model, 0):
                    queued.append(self._fire(app, name, trig, {
                        "by": "model", "event": "version_registered", "model": trig.model,
                        "version": str(latest),
                        "reason": f"{trig.model} version {latest} was registered"}))
            elif trig.model is not None and trig.alias:
                now = self.engine.tracker.alias_version(trig.model, trig.alias)
                before = self._aliases.get((trig.model, trig.alias))
                if now != before and now is not None:
                    queued.append(self._fire(app, name, trig, {
                        "by": "model", "event": "alias_moved", "model": trig.model,
                        "alias": trig.alias, "from_version": before, "to_version": now,
                        "reason": f"{trig.model}@{trig.alias} moved {before} -> {now}"}))
                self._aliases[(trig.model, trig.alias)] = now
        for _, _, trig in self._triggers():
            if trig.model is not None:
                self._versions[trig.model] = max(self._versions.get(trig.model, 0),
                                                 self.engine.tracker.latest_version(trig.model))
        self._since = max(self._since, newest)
        return queued

    # -- running ------------------------------------------------------------------------------
    def start(self) -> None:
        from apscheduler.schedulers.background import BackgroundScheduler

        self._sched = BackgroundScheduler(timezone="UTC")
        for app, name, trig in self._triggers():
            if trig.cron is not None:
                self._sched.add_job(
                    self._fire, cron_trigger(trig.cron), max_instances=1, coalesce=True,
                    args=[app, name, trig, {"by": "cron", "cron": trig.cron,
                                            "reason": f"schedule {trig.cron!r}"}],
                )
        self._sched.start()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="triggers")
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.poll):
            try:
                self.poll_once()
            except Exception:  # noqa: BLE001 - keep watching
                log.exception("trigger poll failed")

    def stop(self) -> None:
        self._stop.set()
        if self._sched is not None:
            self._sched.shutdown(wait=False)
        if self._thread is not None:
            self._thread.join(timeout=10)
