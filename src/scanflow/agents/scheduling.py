"""An agent's triggers: scheduling them (APScheduler, UTC), polling its event sources, and
changing them at run time (pause, resume, add, remove, fire by hand; kept in the store so they
survive restarts). A mixin of `Agent`, which owns the state it works on."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC
from functools import partial
from typing import TYPE_CHECKING, Any

from apscheduler.schedulers.background import BackgroundScheduler
from pydantic import ValidationError

from scanflow.agents.context import AgentContext, _failpoint, _Part
from scanflow.agents.errors import DuplicateTrigger, UnknownTrigger
from scanflow.agents.registry import name_of
from scanflow.control.events import EventSource, event_source
from scanflow.control.triggers import TimeTrigger, TriggerEvent, manual_event, poll_trigger
from scanflow.control.triggers import fire_key as _fire_key
from scanflow.jsonsafe import json_safe
from scanflow.spec.models import AgentSpec, SensorSpec, Trigger
from scanflow.store import Store
from scanflow.times import iso_utc

log = logging.getLogger("scanflow.agents")

OVERRIDES = "_runtime"  # triggers added/removed and sensors paused at run time (survive restarts)


class TriggerScheduling:
    """The trigger half of `Agent` (see `scanflow.agents.runtime`)."""

    name: str
    spec: AgentSpec
    store: Store
    ctx: AgentContext
    _sensors: dict[str, SensorSpec]
    _actuators: dict[str, list[_Part]]
    _ctl: Any
    _sched: Any
    _triggers: dict[str, dict[str, tuple[Trigger, str]]]
    _sources: dict[tuple[str, str], EventSource]
    _paused: set[str]
    _stopping: threading.Event
    _stats: dict[str, dict[str, Any]]
    _startup: dict[tuple[str, str], dict[str, Any]]

    if TYPE_CHECKING:
        def tick(self, sensor_name: str, event: TriggerEvent | None = None) -> int: ...
        def recover(self) -> int: ...
        def _sensor(self, name: str) -> SensorSpec: ...
        def _failed(self, sensor: str, exc: BaseException) -> None: ...
        def sensor_failing(self, sensor: str) -> bool: ...
        def _handle_message(self, message_id: int, sensor: str, handle: Callable[[], object],
                            commit: Callable[[], None] | None = None) -> bool: ...

    # -- scheduling ------------------------------------------------------------------------------
    def _overrides(self) -> dict[str, Any]:
        raw = self.store.get_state(self.name, OVERRIDES) or {}
        return {"added": raw.get("added", {}), "removed": raw.get("removed", {}),
                "paused": raw.get("paused", [])}

    def _save_overrides(self, ov: dict[str, Any]) -> None:
        self.store.set_state(self.name, OVERRIDES, ov)

    def _date_fired(self, sensor: str, trig: Trigger) -> str | None:
        return self.store.get_state(self.name, f"_fired:{sensor}/{trig.key}")

    def _load_triggers(self) -> None:
        ov = self._overrides()
        for s in self.spec.sensors:
            removed = set(ov["removed"].get(s.name, []))
            trigs = {t.key: (t, "spec") for t in s.triggers if t.key not in removed}
            for raw in ov["added"].get(s.name, []):
                try:
                    t = Trigger.model_validate(raw)
                except ValidationError as exc:
                    log.error("ignoring a stored run-time trigger of %s: %s", s.name, exc)
                    continue
                trigs[t.key] = (t, "runtime")
            self._triggers[s.name] = trigs
        self._paused = {p for p in ov["paused"] if p in self._sensors}

    def start(self, recover: bool = True) -> None:
        """Schedule every trigger (APScheduler, UTC) and resume decisions a crash cut off."""
        with self._ctl:
            self._stopping.clear()
            self._load_triggers()
            self._sched = BackgroundScheduler(
                timezone=UTC,
                job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            )
            for sensor, trigs in self._triggers.items():
                for t, _ in trigs.values():
                    self._schedule(sensor, t)
            self._sched.start()
        if recover:
            threading.Thread(target=self._safe_recover, name=f"{self.name}-recover", daemon=True).start()

    def _safe_recover(self) -> None:
        try:
            self.recover()
        except Exception:  # noqa: BLE001 - retried at the next start; the agent keeps running
            log.exception("resuming interrupted decisions failed")

    def stop(self, wait: bool = True) -> None:
        self._stopping.set()
        with self._ctl:
            if self._sched is not None:
                self._sched.shutdown(wait=wait)
                self._sched = None

    def _job_id(self, sensor: str, key: str) -> str:
        return f"{sensor}/{key}"

    def _schedule(self, sensor: str, t: Trigger) -> None:
        job_id, name = self._job_id(sensor, t.key), f"{sensor}: {t.describe()}"
        paused = sensor in self._paused
        if t.event is not None:
            self._sources[(sensor, t.key)] = event_source(self.ctx, sensor, t)
            poll, first = poll_trigger(t)
            self._sched.add_job(self._poll_job, poll, args=[sensor, t.key], id=job_id, name=name,
                                replace_existing=True, next_run_time=None if paused else first)
            return
        plan = TimeTrigger(self.store, self.name, sensor, t).start(paused)
        if plan.skipped is not None:
            self.ctx.event("misfire_skipped", sensor=sensor, trigger=t.key, schedule=t.describe(),
                           **plan.skipped)
        if plan.aps is None:
            return
        if plan.startup:
            self._startup[(sensor, t.key)] = plan.startup
        kwargs: dict[str, Any] = {}
        if paused:
            kwargs["next_run_time"] = None  # added paused
        elif plan.first is not None:
            kwargs["next_run_time"] = plan.first
        self._sched.add_job(self._time_job, plan.aps, args=[sensor, t.key], id=job_id, name=name,
                            replace_existing=True, **kwargs)

    def _save_fire(self, sensor: str, key: str, record: dict[str, Any]) -> None:
        self.store.set_state(self.name, _fire_key(sensor, key), json_safe(record))

    def _time_job(self, sensor: str, key: str) -> None:
        entry = self._triggers.get(sensor, {}).get(key)
        if entry is None or self._stopping.is_set():
            return
        t = entry[0]
        for ev, record in TimeTrigger(self.store, self.name, sensor, t).due(
                self._startup.pop((sensor, key), None)):
            self._fire_time(sensor, t, ev, record)

    def _fire_time(self, sensor: str, t: Trigger, ev: TriggerEvent,
                   record: dict[str, Any] | None = None) -> None:
        """A scheduled fire: written down first (a crash replays it under the same key, so it
        is judged once), then judged; its time is the trigger's last fire time."""
        def judge(ev: TriggerEvent) -> None:
            try:
                self.tick(sensor, ev)
            except Exception:  # noqa: BLE001 - a failing sensor must not kill the agent (logged)
                pass

        TimeTrigger(self.store, self.name, sensor, t).fire(ev, record, judge)

    def _poll_job(self, sensor: str, key: str) -> None:
        src = self._sources.get((sensor, key))
        if src is None or self._stopping.is_set():
            return
        try:
            events = src.poll()
        except Exception as exc:  # noqa: BLE001 - e.g. the registry is down: retried next poll
            self._failed(sensor, exc)
            return
        for ev in events:
            if self._stopping.is_set() or sensor in self._paused:
                break
            if ev.message_id is not None:  # each message on its own: one failing blocks none
                self._handle_message(ev.message_id, sensor, partial(self.tick, sensor, ev),
                                     commit=ev.commit)
                continue
            try:
                self.tick(sensor, ev)
            except Exception:  # noqa: BLE001 - logged; retried at the next poll, in order
                break
            _failpoint("before_cursor")
            if ev.commit is not None:
                ev.commit()

    def poll(self, sensor: str | None = None) -> None:
        """Check the event triggers (of one sensor, or all) once now, without the scheduler."""
        names = [self._sensor(sensor).name] if sensor else list(self._sensors)
        if not self._triggers:
            self._load_triggers()
        for name in names:
            for key, (t, _) in list(self._triggers.get(name, {}).items()):
                if t.event is not None:
                    if (name, key) not in self._sources:
                        self._sources[(name, key)] = event_source(self.ctx, name, t)
                    self._poll_job(name, key)

    # -- run-time control (the HTTP API) ----------------------------------------------------------
    def sensors_info(self) -> list[dict[str, Any]]:
        return [self.sensor_info(s) for s in self._sensors]

    def sensor_info(self, name: str) -> dict[str, Any]:
        s = self._sensor(name)
        trigs = []
        for key, (t, origin) in self._triggers.get(name, {}).items():
            job = self._sched.get_job(self._job_id(name, key)) if self._sched else None
            nxt = job.next_run_time if job is not None else None
            entry: dict[str, Any] = {
                "id": key, "kind": t.kind if t.event is None else t.event.kind,
                "trigger": t.model_dump(mode="json", exclude_none=True),
                "schedule": t.describe(), "origin": origin,
                "next_fire_time": iso_utc(nxt) if t.event is None else None,
            }
            if t.event is not None:
                entry["next_poll_time"] = iso_utc(nxt)
                src = self._sources.get((name, key))
                entry["cursor"] = src.cursor() if src is not None else None
            else:
                rec = self.store.get_state(self.name, _fire_key(name, key)) or {}
                entry["misfire"] = t.misfire_policy
                entry["last_fire_time"] = iso_utc(rec.get("last"))
            if t.date is not None:
                entry["fired_at"] = self._date_fired(name, t)
                entry["skipped_at"] = iso_utc(rec.get("skipped"))
            trigs.append(entry)
        nexts = sorted(e["next_fire_time"] for e in trigs if e["next_fire_time"])
        stats = self._stats[name]
        return {
            "name": name, "func": name_of(s.func, "sensor") if s.func is not None else None,
            "rule": name_of(s.rule.func, "rule") if s.rule else None,
            "actuators": [p.name for p in self._actuators[name]],
            "paused": name in self._paused, "triggers": trigs,
            "next_fire_time": nexts[0] if nexts else None,
            "ticks": stats["ticks"], "observations": stats["observations"],
            "last_tick": iso_utc(stats["last_tick"]), "last_error": stats["last_error"],
            "failing": self.sensor_failing(name), "failed_ticks": stats["failed_ticks"],
            "failing_since": iso_utc(stats["failing_since"]),
        }

    def fire(self, name: str, wait: bool = True) -> dict[str, Any]:
        """Fire a sensor now, by hand (also when paused)."""
        self._sensor(name)
        self.ctx.event("sensor_fired", sensor=name, by="manual")
        if not wait:
            threading.Thread(target=self._manual, args=[name], daemon=True,
                             name=f"{self.name}-fire-{name}").start()
            return {"sensor": name, "queued": True}
        return {"sensor": name, "observations": self.tick(name, manual_event(name))}

    def _manual(self, name: str) -> None:
        try:
            self.tick(name, manual_event(name))
        except Exception:  # noqa: BLE001 - logged and recorded by tick
            pass

    def pause(self, name: str | None = None) -> list[str]:
        names = [self._sensor(name).name] if name else list(self._sensors)
        with self._ctl:
            ov = self._overrides()
            ov["paused"] = sorted(set(ov["paused"]) | set(names))
            self._save_overrides(ov)
            for n in names:
                if n not in self._paused:
                    self._paused.add(n)
                    self._each_job(n, "pause_job")
                    self.ctx.event("sensor_paused", sensor=n)
        return names

    def resume(self, name: str | None = None) -> list[str]:
        names = [self._sensor(name).name] if name else list(self._sensors)
        with self._ctl:
            ov = self._overrides()
            ov["paused"] = sorted(set(ov["paused"]) - set(names))
            self._save_overrides(ov)
            for n in names:
                if n in self._paused:
                    self._paused.discard(n)
                    self._served_from_now(n)
                    self._each_job(n, "resume_job")
                    self.ctx.event("sensor_resumed", sensor=n)
        return names

    def _served_from_now(self, sensor: str) -> None:
        """A resumed sensor's schedule is served from now: fires due while it was paused were
        skipped on purpose, not missed (a restart does not fire them)."""
        now = time.time()
        for key, (t, _) in self._triggers.get(sensor, {}).items():
            if t.event is None:
                rec = self.store.get_state(self.name, _fire_key(sensor, key)) or {"last": None, "done": True}
                self._save_fire(sensor, key, {**rec, "covered": now})

    def _each_job(self, sensor: str, method: str) -> None:
        if self._sched is None:
            return
        for key in self._triggers.get(sensor, {}):
            if self._sched.get_job(self._job_id(sensor, key)) is not None:
                getattr(self._sched, method)(self._job_id(sensor, key))

    def add_trigger(self, name: str, trig: Trigger) -> dict[str, Any]:
        """Add a trigger to a sensor at run time (kept in the store: it survives restarts)."""
        self._sensor(name)
        with self._ctl:
            current = self._triggers.setdefault(name, {})
            if trig.key in current:
                raise DuplicateTrigger(f"sensor {name!r} already has a trigger {trig.key!r}")
            self._check_triggers(name, [t for t, _ in current.values()] + [trig])
            stored = trig.model_copy(update={"id": trig.key})
            ov = self._overrides()
            ov["added"].setdefault(name, []).append(stored.model_dump(mode="json", exclude_none=True))
            removed = ov["removed"].get(name, [])
            if trig.key in removed:
                removed.remove(trig.key)
            self._save_overrides(ov)
            current[trig.key] = (stored, "runtime")
            if self._sched is not None:
                self._schedule(name, stored)
            self.ctx.event("trigger_added", sensor=name, trigger=trig.key, schedule=trig.describe())
        return next(t for t in self.sensor_info(name)["triggers"] if t["id"] == trig.key)

    def _check_triggers(self, name: str, triggers: list[Trigger]) -> None:
        """The agent-wide rules of the spec (e.g. one sensor per message kind) still hold."""
        sensors = [s.model_copy(update={"triggers": triggers if s.name == name else
                                        [t for t, _ in self._triggers.get(s.name, {}).values()]})
                   for s in self.spec.sensors]
        data = {**self.spec.model_dump(exclude={"sensors"}), "sensors": [
            {**s.model_dump(exclude={"triggers"}), "triggers": s.triggers} for s in sensors]}
        try:
            AgentSpec.model_validate(data)
        except ValidationError as exc:
            msgs = [e["msg"].removeprefix("Value error, ") for e in exc.errors()]
            raise ValueError("; ".join(msgs)) from None

    def remove_trigger(self, name: str, key: str) -> None:
        self._sensor(name)
        with self._ctl:
            current = self._triggers.get(name, {})
            if key not in current:
                known = ", ".join(current) or "none"
                raise UnknownTrigger(f"sensor {name!r} has no trigger {key!r} (triggers: {known})")
            _, origin = current.pop(key)
            ov = self._overrides()
            if origin == "runtime":
                ov["added"][name] = [t for t in ov["added"].get(name, []) if t.get("id") != key]
            else:
                ov["removed"].setdefault(name, []).append(key)
            self._save_overrides(ov)
            self.store.delete_state(self.name, _fire_key(name, key))  # added again: a new history
            self._sources.pop((name, key), None)
            if self._sched is not None and self._sched.get_job(self._job_id(name, key)) is not None:
                self._sched.remove_job(self._job_id(name, key))
            self.ctx.event("trigger_removed", sensor=name, trigger=key)
