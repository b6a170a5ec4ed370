"""What the routes act through: the settings, the store, the workflow engine and the deployer
the settings choose (built once, on first use), the queue runner for submitted runs, and the
workflow triggers of the registered applications (the server does what `engine serve` does)."""

from __future__ import annotations

import logging
import threading
from typing import Any

from fastapi import Request

from scanflow.control import backends
from scanflow.server.errors import ApiError
from scanflow.settings import Settings
from scanflow.spec import load_application
from scanflow.spec.errors import SpecError
from scanflow.store import Store
from scanflow.store.identity import Identity

log = logging.getLogger("scanflow.server")


class Platform:
    """One per server process."""

    def __init__(self, settings: Settings, store: Store, *, run_queue: bool = True,
                 max_runs: int = 2) -> None:
        self.settings, self.store = settings, store
        self.run_queue, self.max_runs = run_queue, max_runs
        self._engine: Any = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._runner: threading.Thread | None = None
        self._triggers: Any = None  # WorkflowTriggers of the registered applications
        self._triggers_lock = threading.Lock()

    def engine(self) -> Any:
        with self._lock:
            if self._engine is None:
                try:
                    self._engine = backends.engine(self.settings, self.store)
                except backends.UnknownBackend as exc:
                    raise ApiError(503, "backend_unavailable", str(exc)) from exc
            return self._engine

    def deployer(self, who: Identity) -> Any:
        """A deployer whose own events name `who`."""
        try:
            return backends.deployer(self.settings, self.store, actor=who.user)
        except backends.UnknownBackend as exc:
            raise ApiError(503, "backend_unavailable", str(exc)) from exc

    def start(self) -> None:
        """Run queued runs (those submitted through the API) fairly across teams."""
        if not self.run_queue or self._runner is not None:
            return
        engine = self.engine()
        self._runner = threading.Thread(
            target=engine.serve, args=(self._stopping.is_set,), kwargs={"max_runs": self.max_runs},
            name="scanflow-run-queue", daemon=True)
        self._runner.start()
        self.reload_triggers()

    def reload_triggers(self) -> int:
        """Fire the workflow triggers (interval, cron, date, events) of every registered
        application by queueing runs, as `engine serve` does; called at start and whenever an
        application is registered. Their cursors live in the store, so a reload neither loses
        nor repeats a fire. A spec that no longer loads is skipped, and logged. -> triggers."""
        from scanflow.control.workflow_triggers import WorkflowTriggers  # lazy: APScheduler

        if not self.run_queue:
            return 0
        specs = []
        for row in self.store.applications.list_apps():
            try:
                specs.append(load_application(row.spec_path))
            except (SpecError, OSError) as exc:
                log.warning("application %s of team %s: its triggers are not fired: %s",
                            row.name, row.team, exc)
        engine = self.engine()
        with self._triggers_lock:
            if self._triggers is not None:
                self._triggers.stop()
            self._triggers = WorkflowTriggers(engine, specs)
            self._triggers.start()
            return int(self._triggers.triggers)

    def resume(self, run_id: str, spec: Any = None) -> None:
        """Resume a run in a thread of the server (it records its own outcome)."""
        engine = self.engine()

        def go() -> None:
            try:
                engine.resume(run_id, spec)
            except Exception:  # noqa: BLE001 - recorded by the engine; the server goes on
                log.exception("resuming run %s failed", run_id)

        threading.Thread(target=go, name=f"scanflow-resume-{run_id[:12]}", daemon=True).start()

    def stop(self) -> None:
        with self._triggers_lock:
            if self._triggers is not None:
                self._triggers.stop()
                self._triggers = None
        self._stopping.set()
        if self._runner is not None:
            self._runner.join(timeout=30)

    def spec_of(self, app: str, team: str | None = None) -> tuple[Any, str]:
        """A registered application's spec (loaded now) and its team; `team` picks one when
        several teams registered a spec of `app`."""
        row = self.store.applications.get_app(app, team)
        if row is None:
            teams = [r.team for r in self.store.applications.list_apps() if r.name == app]
            if len(teams) > 1 and team is None:
                raise ApiError(409, "conflict", f"application {app!r} has a spec from each of the "
                               f"teams {', '.join(teams)}: say which (team)")
            raise ApiError(404, "not_found", f"no application {app!r}"
                           + (f" of team {team!r}" if team else "")
                           + " registered (POST /api/v1/apps with its path)")
        try:
            return load_application(row.spec_path), row.team
        except SpecError as exc:
            raise ApiError(409, "spec_invalid", f"application {app!r} no longer loads from its "
                           f"registered path: {len(exc.issues)} problem(s): "
                           + "; ".join(str(i) for i in exc.issues[:3])) from exc

    def team_of_agent(self, app: str, agent: str) -> str | None:
        """The team whose registered spec of `app` declares `agent` (None: not registered)."""
        rows = [r for r in self.store.applications.list_apps() if r.name == app]
        if len(rows) == 1:
            return rows[0].team
        for r in rows:
            try:
                if agent in load_application(r.spec_path).agents:
                    return r.team
            except (SpecError, OSError):
                continue
        return None


def platform(request: Request) -> Platform:
    p: Platform = request.app.state.platform
    return p
