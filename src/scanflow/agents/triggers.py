"""When sensors fire: APScheduler triggers for interval, cron and date, and event sources
polled for workflow runs that finished, registry events, full prediction windows and
messages.

Every fire is a `TriggerEvent` whose `key` names it uniquely and stably, so an event replayed
after a crash is recognised by the decision stored under it. Each event source keeps a cursor
in the agent's state and advances it only once the event has been judged (`commit`): a
`kill -9` at any point replays the event, never skips it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from scanflow.spec.models import Trigger, cron_trigger

if TYPE_CHECKING:
    from scanflow.agents.runtime import AgentContext

RUN_OVERLAP_S = 60.0  # a run's end is re-checked this long after a later one (late writes)


@dataclass
class TriggerEvent:
    """One fire of a trigger: what happened, under a key that a replay reproduces."""

    kind: str  # interval | cron | date | manual | workflow_finished | version_registered | ...
    key: str
    trigger: str | None = None  # the trigger's id
    evidence: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    message_id: int | None = None
    commit: Callable[[], None] | None = None  # advances the source's cursor

    @property
    def replayable(self) -> bool:
        """Event keys are stable across restarts; scheduled-time keys are not worth scoping."""
        return self.kind not in ("interval", "cron", "manual")


def _iso(ts: float | datetime | None = None) -> str:
    if isinstance(ts, datetime):
        return ts.astimezone(UTC).isoformat(timespec="seconds")
    return datetime.fromtimestamp(time.time() if ts is None else ts, UTC).isoformat(timespec="seconds")


def time_event(trig: Trigger, kind: str | None = None, at: datetime | None = None,
               **evidence: Any) -> TriggerEvent:
    """The event of a scheduled (or manual) fire at `at` (default: now)."""
    kind = kind or trig.kind
    at = at or datetime.now(UTC)
    if trig.date is not None and kind == "date":
        key = f"date:{_iso(trig.date)}"
    else:  # milliseconds: two fires of a fast interval must not look like one replayed
        key = f"{trig.key}@{at.astimezone(UTC).isoformat(timespec='milliseconds')}"
    return TriggerEvent(kind=kind, key=key, trigger=trig.key,
                        evidence={"trigger": trig.key, "fired_at": _iso(at), "schedule": trig.describe(),
                                  **evidence})


def manual_event(sensor: str) -> TriggerEvent:
    import uuid

    now = _iso()
    return TriggerEvent(kind="manual", key=f"manual:{uuid.uuid4().hex[:12]}",
                        evidence={"trigger": "manual", "fired_at": now})


def poll_trigger(trig: Trigger) -> tuple[Any, datetime]:
    """(APScheduler trigger, first run time) of an event trigger: its poll, from now."""
    from apscheduler.triggers.interval import IntervalTrigger

    assert trig.event is not None
    return IntervalTrigger(seconds=trig.event.poll, timezone=UTC), datetime.now(UTC)


MAX_COUNTED_MISSES = 1000  # a cron fire every second over a week is "1000 or more" missed


@dataclass
class SchedulePlan:
    """How a time trigger is scheduled at start, given when its schedule was last served.

    `first` is the first run time (None: the scheduler's own next time after now; nothing at
    all when `scheduled` is false). `missed` counts the fire times that went by unserved (up
    to `MAX_COUNTED_MISSES`), the first of them at `missed_since`; `fire_now` is the one fire
    that stands for them all (policy `coalesce`)."""

    trigger: Any
    first: datetime | None
    scheduled: bool = True
    missed: int = 0
    missed_since: datetime | None = None
    fire_now: bool = False


def plan_schedule(trig: Trigger, record: dict[str, Any] | None, now: datetime | None = None) -> SchedulePlan:
    """Apply the trigger's misfire policy, given its durable `record`: when it last fired
    (`last`) and until when its schedule was served (`covered`: the last fire, the first start,
    a resume), in UNIX seconds. Without a record nothing can have been missed: an interval
    fires at start, a cron waits for its time, a date already past fires (coalesce) or not."""
    from apscheduler.triggers.date import DateTrigger
    from apscheduler.triggers.interval import IntervalTrigger

    now = now or datetime.now(UTC)
    t_now = now.timestamp()
    coalesce = trig.misfire_policy == "coalesce"
    last = (record or {}).get("last")
    covered = (record or {}).get("covered", last)
    if trig.interval is not None:
        every = trig.interval
        if last is None:  # never fired: at start, then every `interval`
            return SchedulePlan(IntervalTrigger(seconds=every, start_date=now, timezone=UTC), now)
        last = float(last)
        aps = IntervalTrigger(seconds=every, start_date=datetime.fromtimestamp(last, UTC), timezone=UTC)
        base = max(last, float(covered if covered is not None else last))  # a resume moves it on
        # the next tick of the grid `last + k * every` after `base` (and after now, if missed)
        nxt = last + every * (int((base - last) // every) + 1)
        if nxt > t_now:
            return SchedulePlan(aps, datetime.fromtimestamp(nxt, UTC))
        missed = min(int((t_now - nxt) // every) + 1, MAX_COUNTED_MISSES)
        since = datetime.fromtimestamp(nxt, UTC)
        if coalesce:
            return SchedulePlan(aps, now, missed=missed, missed_since=since, fire_now=True)
        ahead = last + every * (int((t_now - last) // every) + 1)
        return SchedulePlan(aps, datetime.fromtimestamp(ahead, UTC), missed=missed, missed_since=since)
    if trig.cron is not None:
        aps = cron_trigger(trig.cron)
        if covered is None:
            return SchedulePlan(aps, None)
        slot = aps.get_next_fire_time(datetime.fromtimestamp(float(covered), UTC), now)
        since, missed = slot, 0
        while slot is not None and slot <= now and missed < MAX_COUNTED_MISSES:
            missed += 1
            slot = aps.get_next_fire_time(slot, now)
        if not missed:
            return SchedulePlan(aps, None)
        return SchedulePlan(aps, now if coalesce else None, missed=missed, missed_since=since,
                            fire_now=coalesce)
    assert trig.date is not None, "event triggers are polled, not planned"
    if trig.date > now:
        return SchedulePlan(DateTrigger(run_date=trig.date, timezone=UTC), trig.date)
    if coalesce:  # a date already past fires once, now
        return SchedulePlan(DateTrigger(run_date=now, timezone=UTC), now, missed=1,
                            missed_since=trig.date, fire_now=True)
    return SchedulePlan(None, None, scheduled=False, missed=1, missed_since=trig.date)


# -- event sources --------------------------------------------------------------------------------
class EventSource:
    """Polls one event trigger of one sensor; its cursor lives in the agent's state."""

    def __init__(self, ctx: AgentContext, sensor: str, trig: Trigger) -> None:
        self.ctx = ctx
        self.sensor = sensor
        self.trig = trig
        self.cursor_key = f"_cursor:{sensor}/{trig.key}"

    def _get(self) -> Any:
        return self.ctx.store.get_state(self.ctx.name, self.cursor_key)

    def _set(self, value: Any) -> None:
        self.ctx.store.set_state(self.ctx.name, self.cursor_key, value)

    def poll(self) -> list[TriggerEvent]:
        raise NotImplementedError

    def cursor(self) -> Any:
        return self._get()


class WorkflowFinished(EventSource):
    """Runs of a workflow that ended; the cursor is the newest end time seen plus the runs seen
    within `RUN_OVERLAP_S` before it (a run written late is still caught, not twice)."""

    def poll(self) -> list[TriggerEvent]:
        ev = self.trig.event.workflow_finished  # type: ignore[union-attr]
        assert ev is not None
        cur = self._get()
        if cur is None:  # runs that ended before the trigger existed do not fire
            self._set({"ts": time.time(), "seen": {}})
            return []
        app = self.ctx.app
        want = (app.app, app.team, *ev.workflow.split("/"))[-3:]
        since = float(cur["ts"]) - RUN_OVERLAP_S
        runs = [r for r in self.ctx.store.list_runs(want[2], limit=500, status=ev.status)
                if (r.app, r.team, r.workflow) == want and (r.ended_at or 0) > since]
        out = []
        for r in sorted(runs, key=lambda r: (r.ended_at or 0, r.id)):
            key = f"run:{r.id}:{r.status}"
            if key in cur["seen"]:
                continue
            ended = float(r.ended_at or 0)
            info = {"workflow": r.workflow, "team": r.team, "app": r.app, "run_id": r.id,
                    "status": r.status, "ended_at": ended, "error": (r.error or "")[:500] or None}

            def commit(key: str = key, ended: float = ended) -> None:
                c = self._get() or {"ts": 0.0, "seen": {}}
                ts = max(float(c["ts"]), ended)
                seen = {k: t for k, t in {**c["seen"], key: ended}.items() if t > ts - RUN_OVERLAP_S}
                self._set({"ts": ts, "seen": seen})

            out.append(TriggerEvent(kind="workflow_finished", key=key, trigger=self.trig.key,
                                    evidence=info, data=dict(info), commit=commit))
        return out


class ModelRegistry(EventSource):
    """New versions of a registered model (one event per version, in order), or an alias that
    moved (one event per observed move, numbered so that moving back and forth stays unique)."""

    def poll(self) -> list[TriggerEvent]:
        ev = self.trig.event.model  # type: ignore[union-attr]
        assert ev is not None
        tracker = self.ctx.tracker
        cur = self._get()
        if ev.event == "version_registered":
            versions = sorted(tracker.model_versions(ev.name), key=lambda v: int(v.version))
            latest = int(versions[-1].version) if versions else 0
            if cur is None:  # versions registered before the trigger existed do not fire
                self._set(latest)
                return []
            out = []
            for mv in versions:
                if int(mv.version) <= int(cur):
                    continue
                info = {"model": ev.name, "version": str(mv.version), "run_id": mv.run_id,
                        "event": "version_registered"}
                out.append(TriggerEvent(
                    kind="version_registered", key=f"model:{ev.name}:v{mv.version}",
                    trigger=self.trig.key, evidence=info, data=dict(info),
                    commit=lambda v=int(mv.version): self._set(max(int(self._get() or 0), v)),
                ))
            return out
        assert ev.alias is not None
        now = tracker.alias_version(ev.name, ev.alias)
        if cur is None:
            self._set({"version": now, "moves": 0})
            return []
        if now == cur["version"]:
            return []
        if now is None:  # the alias was deleted: remember, fire when it points somewhere again
            self._set({**cur, "version": None})
            return []
        moves = int(cur["moves"]) + 1
        info = {"model": ev.name, "alias": ev.alias, "from_version": cur["version"],
                "to_version": now, "event": "alias_moved"}
        return [TriggerEvent(
            kind="alias_moved", key=f"model:{ev.name}@{ev.alias}:move{moves}:v{now}",
            trigger=self.trig.key, evidence=info, data=dict(info),
            commit=lambda: self._set({"version": now, "moves": moves}),
        )]


class PredictionWindow(EventSource):
    """Consecutive windows of `size` records of the prediction log after the watermark; the
    watermark (the last id judged) advances once a window is judged, so nothing is judged twice."""

    def poll(self) -> list[TriggerEvent]:
        ev = self.trig.event.prediction_window  # type: ignore[union-attr]
        assert ev is not None
        svc = ev.service or self.ctx.service
        assert svc is not None
        mark = int(self._get() or 0)
        rows = self.ctx.store.prediction_ids(svc, after_id=mark, before_ts=time.time() - ev.settle)
        out = []
        for start in range(0, len(rows) - ev.size + 1, ev.size):
            chunk = rows[start:start + ev.size]
            first, last = chunk[0][0], chunk[-1][0]
            info = {"service": svc, "first_id": first, "last_id": last, "n": len(chunk),
                    "t0": chunk[0][1], "t1": chunk[-1][1]}
            out.append(TriggerEvent(
                kind="prediction_window", key=f"{svc}:{first}-{last}", trigger=self.trig.key,
                evidence=info, data=dict(info), commit=lambda last=last: self._set(last),
            ))
        return out


class Messages(EventSource):
    """Messages for this agent, oldest first; each is acknowledged once judged and acted on
    (the inbox itself is the cursor: an unacknowledged message is delivered again)."""

    def poll(self) -> list[TriggerEvent]:
        ev = self.trig.event.message  # type: ignore[union-attr]
        assert ev is not None
        store = self.ctx.store
        out = []
        for m in store.inbox(self.ctx.name, ev.kinds(), limit=50):
            scalars = {k: v for k, v in m.payload.items()
                       if isinstance(v, str | int | float | bool) or v is None}
            out.append(TriggerEvent(
                kind="message", key=m.key, trigger=self.trig.key,
                evidence={"message": m.kind, "from": m.sender, **scalars},
                data={"kind": m.kind, "from": m.sender, **m.payload}, message_id=m.id,
                commit=lambda mid=m.id: store.ack_message(mid),
            ))
        return out

    def cursor(self) -> Any:
        return None


SOURCES: dict[str, type[EventSource]] = {
    "workflow_finished": WorkflowFinished,
    "model": ModelRegistry,
    "prediction_window": PredictionWindow,
    "message": Messages,
}


def event_source(ctx: AgentContext, sensor: str, trig: Trigger) -> EventSource:
    assert trig.event is not None
    return SOURCES[trig.event.kind](ctx, sensor, trig)
