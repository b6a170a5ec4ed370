"""Durable event sources: workflow runs that finished, model registry events (a version
registered, an alias moved), full prediction windows, messages.

A source is polled; each event it returns carries a stable `key` and a `commit` that advances
the source's cursor. The cursor lives in its consumer's state in the store (an agent; the
workflow triggers of one application for `engine serve`), and advances only once the consumer
has handled the event: events that happen while no consumer runs are delivered when it starts,
and a crash between handling and `commit` replays the event (the consumer recognises it by its
key), never skips it. A cursor starts at the first poll: what happened before a trigger
existed does not fire (prediction windows start at the beginning of the log).
"""

from __future__ import annotations

import time
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

from scanflow.control.triggers import TriggerEvent
from scanflow.spec.models import (
    Application,
    MessageEvent,
    ModelEvent,
    PredictionWindowEvent,
    Trigger,
    WorkflowFinishedEvent,
)
from scanflow.store import Store

if TYPE_CHECKING:  # the type only: importing tracking at run time loads MLflow
    from scanflow.tracking import Tracker

RUN_OVERLAP_S = 60.0  # a run's end is re-checked this long after a later one (late writes)


class SourceEnv(Protocol):
    """What a source reads: the store (cursors in `name`'s state; `name`'s inbox), the
    application its refs are resolved in, the registry, the default service."""

    @property
    def store(self) -> Store: ...

    @property
    def name(self) -> str: ...

    @property
    def app(self) -> Application: ...

    @property
    def service(self) -> str | None: ...

    @property
    def tracker(self) -> Tracker: ...


def scalars(payload: dict[str, Any]) -> dict[str, Any]:
    """The scalar entries of a payload: what goes into evidence as it is."""
    return {k: v for k, v in payload.items() if isinstance(v, str | int | float | bool) or v is None}


class EventSource:
    """Polls one kind of event for one consumer; its cursor is `cursor_key` in the consumer's
    state."""

    def __init__(self, env: SourceEnv, cursor_key: str, trigger: str | None = None) -> None:
        self.env = env
        self.cursor_key = cursor_key
        self.trigger = trigger

    def _get(self) -> Any:
        return self.env.store.get_state(self.env.name, self.cursor_key)

    def _set(self, value: Any) -> None:
        self.env.store.set_state(self.env.name, self.cursor_key, value)

    def poll(self) -> list[TriggerEvent]:
        raise NotImplementedError

    def cursor(self) -> Any:
        return self._get()


class WorkflowFinished(EventSource):
    """Runs of a workflow that ended; the cursor is the newest end time seen plus the runs seen
    within `RUN_OVERLAP_S` before it (a run written late is still caught, not twice)."""

    def __init__(self, env: SourceEnv, cursor_key: str, event: WorkflowFinishedEvent,
                 trigger: str | None = None) -> None:
        super().__init__(env, cursor_key, trigger)
        self.event = event

    def _runs(self, after: float) -> list[Any]:
        want = self.event.target(self.env.app.app, self.env.app.team)
        runs = [r for r in self.env.store.list_runs(want[2], limit=500, status=self.event.status)
                if (r.app, r.team, r.workflow) == want and (r.ended_at or 0) > after]
        return sorted(runs, key=lambda r: (r.ended_at or 0, r.id))

    def poll(self) -> list[TriggerEvent]:
        cur = self._get()
        if cur is None:  # runs that ended before the trigger existed do not fire
            now = time.time()
            self._set({"ts": now, "seen": {f"run:{r.id}:{r.status}": float(r.ended_at or 0)
                                           for r in self._runs(now - RUN_OVERLAP_S)}})
            return []
        out = []
        for r in self._runs(float(cur["ts"]) - RUN_OVERLAP_S):
            key = f"run:{r.id}:{r.status}"
            if key in cur["seen"]:
                continue
            ended = float(r.ended_at or 0)
            info = {"workflow": r.workflow, "team": r.team, "app": r.app, "run_id": r.id,
                    "status": r.status, "ended_at": ended, "error": (r.error or "")[:500] or None}
            out.append(TriggerEvent(kind="workflow_finished", key=key, trigger=self.trigger,
                                    evidence=info, data=dict(info),
                                    commit=partial(self._seen, key, ended)))
        return out

    def _seen(self, key: str, ended: float) -> None:
        c = self._get() or {"ts": 0.0, "seen": {}}
        ts = max(float(c["ts"]), ended)
        seen = {k: t for k, t in {**c["seen"], key: ended}.items() if t > ts - RUN_OVERLAP_S}
        self._set({"ts": ts, "seen": seen})


class ModelRegistry(EventSource):
    """New versions of a registered model (one event per version, in order), or an alias that
    moved (one event per observed move, numbered so that moving back and forth stays unique)."""

    def __init__(self, env: SourceEnv, cursor_key: str, event: ModelEvent,
                 trigger: str | None = None) -> None:
        super().__init__(env, cursor_key, trigger)
        self.event = event

    def poll(self) -> list[TriggerEvent]:
        return self._versions() if self.event.event == "version_registered" else self._alias()

    def _versions(self) -> list[TriggerEvent]:
        name, cur = self.event.name, self._get()
        versions = sorted(self.env.tracker.model_versions(name), key=lambda v: int(v.version))
        latest = int(versions[-1].version) if versions else 0
        if cur is None:  # versions registered before the trigger existed do not fire
            self._set(latest)
            return []
        out = []
        for mv in versions:
            if int(mv.version) <= int(cur):
                continue
            info = {"model": name, "version": str(mv.version), "run_id": mv.run_id,
                    "event": "version_registered"}
            out.append(TriggerEvent(
                kind="version_registered", key=f"model:{name}:v{mv.version}",
                trigger=self.trigger, evidence=info, data=dict(info),
                commit=partial(self._raise_to, int(mv.version)),
            ))
        return out

    def _raise_to(self, version: int) -> None:
        self._set(max(int(self._get() or 0), version))

    def _alias(self) -> list[TriggerEvent]:
        name, alias, cur = self.event.name, self.event.alias, self._get()
        assert alias is not None
        now = self.env.tracker.alias_version(name, alias)
        if cur is None:
            self._set({"version": now, "moves": 0})
            return []
        if now == cur["version"]:
            return []
        if now is None:  # the alias was deleted: remember, fire when it points somewhere again
            self._set({**cur, "version": None})
            return []
        moves = int(cur["moves"]) + 1
        info = {"model": name, "alias": alias, "from_version": cur["version"],
                "to_version": now, "event": "alias_moved"}
        return [TriggerEvent(
            kind="alias_moved", key=f"model:{name}@{alias}:move{moves}:v{now}",
            trigger=self.trigger, evidence=info, data=dict(info),
            commit=partial(self._set, {"version": now, "moves": moves}),
        )]


class PredictionWindow(EventSource):
    """Consecutive windows of `size` records of a service's prediction log after the watermark
    (the cursor: the last id judged), which advances once a window is judged, so nothing is
    judged twice. Records younger than `settle` wait, so that the batched writes of several
    replicas land before a window is cut."""

    def __init__(self, env: SourceEnv, cursor_key: str, event: PredictionWindowEvent,
                 trigger: str | None = None) -> None:
        super().__init__(env, cursor_key, trigger)
        self.event = event

    def poll(self) -> list[TriggerEvent]:
        svc = self.event.service or self.env.service
        if svc is None:
            raise ValueError("a prediction window needs a service (the agent's `service:` or the "
                             "event's)")
        size = self.event.size
        mark = int(self._get() or 0)
        rows = self.env.store.prediction_ids(svc, after_id=mark, before_ts=time.time() - self.event.settle)
        out = []
        for start in range(0, len(rows) - size + 1, size):
            chunk = rows[start:start + size]
            first, last = chunk[0][0], chunk[-1][0]
            info = {"service": svc, "first_id": first, "last_id": last, "n": len(chunk),
                    "t0": chunk[0][1], "t1": chunk[-1][1]}
            out.append(TriggerEvent(
                kind="prediction_window", key=f"{svc}:{first}-{last}", trigger=self.trigger,
                evidence=info, data=dict(info), commit=partial(self._set, last),
            ))
        return out


class Messages(EventSource):
    """Messages to the consumer, oldest first (at most `limit` a poll); each is acknowledged
    once judged and acted on (the inbox itself is the cursor: an unacknowledged message is
    delivered again)."""

    def __init__(self, env: SourceEnv, cursor_key: str, event: MessageEvent,
                 trigger: str | None = None, limit: int = 50) -> None:
        super().__init__(env, cursor_key, trigger)
        self.event = event
        self.limit = limit

    def poll(self) -> list[TriggerEvent]:
        store = self.env.store
        out = []
        for m in store.inbox(self.env.name, self.event.kinds(), limit=self.limit):
            out.append(TriggerEvent(
                kind="message", key=m.key, trigger=self.trigger,
                evidence={"message": m.kind, "from": m.sender, **scalars(m.payload)},
                data={"kind": m.kind, "from": m.sender, **m.payload}, message_id=m.id,
                commit=partial(store.ack_message, m.id),
            ))
        return out

    def cursor(self) -> Any:
        return None


def cursor_key(scope: str, trig: Trigger) -> str:
    """State key of an event trigger's cursor (`scope`: a sensor, a workflow)."""
    return f"_cursor:{scope}/{trig.key}"


def event_source(env: SourceEnv, scope: str, trig: Trigger) -> EventSource:
    """The source that polls `trig`, an event trigger, for a consumer."""
    ev, key = trig.event, cursor_key(scope, trig)
    assert ev is not None
    if ev.workflow_finished is not None:
        return WorkflowFinished(env, key, ev.workflow_finished, trig.key)
    if ev.model is not None:
        return ModelRegistry(env, key, ev.model, trig.key)
    if ev.prediction_window is not None:
        return PredictionWindow(env, key, ev.prediction_window, trig.key)
    assert ev.message is not None
    return Messages(env, key, ev.message, trig.key)
