"""When something fires: APScheduler triggers for interval, cron and date, planned at start by
their misfire policy, and the `TriggerEvent` every fire (scheduled or observed) becomes.

Every fire has a `key` that names it uniquely and stably, so a fire replayed after a crash is
recognised by what was stored under it (an agent's decision, a workflow run's action). A time
trigger's record (`TimeTrigger`) lives in its consumer's state in the store: when it last fired,
until when its schedule was served, and whether its last fire finished; so fires missed while
no consumer ran are coalesced into one at the next start (or skipped), and a fire cut off by a
crash is replayed under its key. Consumers are the agents' runtime (scope: a sensor) and the
workflow triggers of `engine serve` (scope: a workflow).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger

from scanflow.jsonsafe import json_safe
from scanflow.spec.models import Trigger
from scanflow.spec.triggers import cron_trigger
from scanflow.store import Store

log = logging.getLogger("scanflow.triggers")

MAX_COUNTED_MISSES = 1000  # a cron fire every second over a week is "1000 or more" missed


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


def iso(ts: float | datetime | None) -> str | None:
    """UTC ISO 8601 to the second (None stays None): how fire times are shown and stored."""
    if ts is None:
        return None
    if not isinstance(ts, datetime):
        ts = datetime.fromtimestamp(ts, UTC)
    return ts.astimezone(UTC).isoformat(timespec="seconds")


def time_event(trig: Trigger, kind: str | None = None, at: datetime | None = None,
               **evidence: Any) -> TriggerEvent:
    """The event of a scheduled (or manual) fire at `at` (default: now)."""
    kind = kind or trig.kind
    at = at or datetime.now(UTC)
    if trig.date is not None and kind == "date":
        key = f"date:{iso(trig.date)}"
    else:  # milliseconds: two fires of a fast interval must not look like one replayed
        key = f"{trig.key}@{at.astimezone(UTC).isoformat(timespec='milliseconds')}"
    return TriggerEvent(kind=kind, key=key, trigger=trig.key,
                        evidence={"trigger": trig.key, "fired_at": iso(at), "schedule": trig.describe(),
                                  **evidence})


def manual_event(sensor: str) -> TriggerEvent:
    """A fire by hand (the CLI, the API): a fresh key, never a replay."""
    return TriggerEvent(kind="manual", key=f"manual:{uuid.uuid4().hex[:12]}",
                        evidence={"trigger": "manual", "fired_at": iso(time.time())})


def poll_trigger(trig: Trigger, every: float | None = None) -> tuple[Any, datetime]:
    """(APScheduler trigger, first run time) of an event trigger: its poll (or `every`), from now."""
    assert trig.event is not None
    return IntervalTrigger(seconds=every or trig.event.poll, timezone=UTC), datetime.now(UTC)


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
    now = now or datetime.now(UTC)
    last = (record or {}).get("last")
    covered = (record or {}).get("covered", last)
    if trig.interval is not None:
        return _plan_interval(trig, last, covered, now)
    if trig.cron is not None:
        return _plan_cron(trig, covered, now)
    return _plan_date(trig, now)


def _plan_interval(trig: Trigger, last: Any, covered: Any, now: datetime) -> SchedulePlan:
    every, t_now = float(trig.interval or 0), now.timestamp()
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
    if trig.misfire_policy == "coalesce":
        return SchedulePlan(aps, now, missed=missed, missed_since=since, fire_now=True)
    ahead = last + every * (int((t_now - last) // every) + 1)
    return SchedulePlan(aps, datetime.fromtimestamp(ahead, UTC), missed=missed, missed_since=since)


def _plan_cron(trig: Trigger, covered: Any, now: datetime) -> SchedulePlan:
    aps = cron_trigger(trig.cron or "")
    if covered is None:
        return SchedulePlan(aps, None)
    slot = aps.get_next_fire_time(datetime.fromtimestamp(float(covered), UTC), now)
    since, missed = slot, 0
    while slot is not None and slot <= now and missed < MAX_COUNTED_MISSES:
        missed += 1
        slot = aps.get_next_fire_time(slot, now)
    if not missed:
        return SchedulePlan(aps, None)
    coalesce = trig.misfire_policy == "coalesce"
    return SchedulePlan(aps, now if coalesce else None, missed=missed, missed_since=since,
                        fire_now=coalesce)


def _plan_date(trig: Trigger, now: datetime) -> SchedulePlan:
    assert trig.date is not None, "event triggers are polled, not planned"
    if trig.date > now:
        return SchedulePlan(DateTrigger(run_date=trig.date, timezone=UTC), trig.date)
    if trig.misfire_policy == "coalesce":  # a date already past fires once, now
        return SchedulePlan(DateTrigger(run_date=now, timezone=UTC), now, missed=1,
                            missed_since=trig.date, fire_now=True)
    return SchedulePlan(None, None, scheduled=False, missed=1, missed_since=trig.date)


# -- the durable record of a time trigger ------------------------------------------------------
def fire_key(scope: str, trigger: str) -> str:
    """State key of a time trigger: its last fire (replayed if cut off) and served-until."""
    return f"_fire:{scope}/{trigger}"


def fired_key(scope: str, trigger: str) -> str:
    """State key of when a date trigger fired (once, ever)."""
    return f"_fired:{scope}/{trigger}"


@dataclass
class StartPlan:
    """What a consumer schedules for a time trigger at start. `aps` None: nothing (a date
    done or skipped). `first` None: the trigger's own next time. `startup` is what the first
    run owes (`replay`: a fire cut off by a crash; `coalesce`: the one fire for those missed);
    `skipped` describes missed fires skipped (for a `misfire_skipped` event)."""

    aps: Any
    first: datetime | None
    startup: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, Any] | None = None


class TimeTrigger:
    """One interval, cron or date trigger of one consumer (`scope`: a sensor, a workflow), with
    its record in the consumer's state in the store."""

    def __init__(self, store: Store, consumer: str, scope: str, trig: Trigger) -> None:
        self.store = store
        self.consumer = consumer
        self.scope = scope
        self.trig = trig
        self.key = fire_key(scope, trig.key)

    def record(self) -> dict[str, Any] | None:
        rec = self.store.get_state(self.consumer, self.key)
        return rec if isinstance(rec, dict) else None

    def save(self, record: dict[str, Any]) -> None:
        self.store.set_state(self.consumer, self.key, json_safe(record))

    def fired_at(self) -> str | None:
        """When a date trigger fired (None: not yet)."""
        value = self.store.get_state(self.consumer, fired_key(self.scope, self.trig.key))
        return str(value) if value is not None else None

    def start(self, paused: bool = False, now: datetime | None = None) -> StartPlan:
        """Plan the trigger at a consumer's start: replay a fire cut off by a crash, coalesce or
        skip fires missed while no consumer ran (the trigger's `misfire`); a date fires once, ever."""
        t, where = self.trig, f"{self.scope}/{self.trig.key}"
        record = self.record()
        replay = record if record and not record.get("done", True) and record.get("key") else None
        if t.date is not None and replay is None and (self.fired_at() or (record or {}).get("skipped")):
            return StartPlan(None, None)  # a date fires once, ever (or never: skipped)
        now = now or datetime.now(UTC)
        plan = plan_schedule(t, record, now)
        if record is None:  # the schedule is served from now on
            self.save({"last": None, "key": None, "done": True, "covered": now.timestamp()})
        out = StartPlan(plan.trigger, plan.first)
        if replay is not None:  # a fire cut off by a crash: again, under the same key
            out.startup["replay"] = replay
        if plan.missed and (not paused or t.date is not None):
            missed = {"missed": plan.missed, "missed_since": iso(plan.missed_since),
                      "misfire": t.misfire_policy}
            if plan.fire_now and not (replay is not None and t.date is not None):
                out.startup["coalesce"] = missed
                log.info("%s missed %d fire(s) since %s: firing once now", where, plan.missed,
                         missed["missed_since"])
            elif not plan.fire_now:
                log.info("%s missed %d fire(s) since %s: skipped", where, plan.missed,
                         missed["missed_since"])
                out.skipped = missed
                rec = {**(record or {}), "covered": now.timestamp()}  # not counted again next time
                if t.date is not None:
                    rec["skipped"] = now.timestamp()
                self.save(rec)
        if not plan.scheduled:
            if replay is None:
                return StartPlan(None, None, skipped=out.skipped)
            out.aps = DateTrigger(run_date=now, timezone=UTC)
        if out.startup:
            out.first = now
        return out

    def due(self, startup: dict[str, Any] | None = None) -> list[tuple[TriggerEvent, dict[str, Any] | None]]:
        """The fires a run of the schedule owes: the replay and the coalesced fire a start
        planned (`startup`), else this fire; each with the record it fires under (None: new)."""
        startup = startup or {}
        out: list[tuple[TriggerEvent, dict[str, Any] | None]] = []
        replay = startup.get("replay")
        if replay is not None:
            ev = TriggerEvent(kind=self.trig.kind, key=replay["key"], trigger=self.trig.key,
                              evidence={**replay.get("evidence", {}), "replayed": True})
            out.append((ev, replay))
            if "coalesce" not in startup:
                return out  # this run was for the replay; the schedule goes on as planned
        out.append((time_event(self.trig, **(startup.get("coalesce") or {})), None))
        return out

    def fire(self, ev: TriggerEvent, record: dict[str, Any] | None,
             handle: Callable[[TriggerEvent], None]) -> None:
        """A scheduled fire: written down first (a crash replays it under the same key, so it
        is handled once), then handled; its time is the trigger's last fire time."""
        now = time.time()
        rec = record or {"last": now, "key": ev.key, "evidence": ev.evidence, "covered": now}
        self.save({**rec, "done": False})
        try:
            handle(ev)
        finally:
            if self.trig.date is not None:
                self.store.set_state(self.consumer, fired_key(self.scope, self.trig.key),
                                     iso(time.time()))
            self.save({**rec, "done": True})
