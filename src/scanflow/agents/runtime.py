"""One agent = sensors (on triggers) -> rule -> actuators; every judgement is a stored decision.

Crash safety comes from keys and from the order of writes:

1. an observation's `key` (a window, a message, an event) makes a replay recognisable;
2. the decision is stored under it *before* anything is done about it, in one transaction with
   the state its rule wrote and a pending marker naming the actions still to run — a `kill -9`
   leaves all of these or none, so a rule never judges the same observation twice;
3. each action has an idempotency key: a finished one is never run again; one cut off by a
   crash is called again with the same key (`ctx.action`), so it can tell and not repeat its
   effect (the built-in actuators do), or is recorded `interrupted` (`on_interrupted: abandon`);
4. watermarks, cursors and message acknowledgements advance only after that.

A message whose handling fails (its sensor, rule or an actuator raises) is tried again after a
backoff, `max_attempts` tries in all (a try the agent died in counts), then dead-lettered:
kept with status `dead`, its last error and its tries, until `requeue`. Messages behind it
keep flowing. A scheduled fire is written down before it runs (replayed under the same key
after a crash) and its time is kept, so that fires missed while the agent was down are
coalesced into one at restart, or skipped (the trigger's `misfire`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from scanflow.agents.api import ApiServer
from scanflow.agents.errors import DuplicateTrigger, UnknownMessage, UnknownSensor, UnknownTrigger
from scanflow.agents.registry import agent_issues, name_of, resolve
from scanflow.control import backends
from scanflow.control.events import EventSource, event_source
from scanflow.control.triggers import TimeTrigger, TriggerEvent, manual_event, poll_trigger
from scanflow.control.triggers import fire_key as _fire_key
from scanflow.settings import Settings
from scanflow.spec.loader import validate_application
from scanflow.spec.models import AgentSpec, Application, CallSpec, SensorSpec, Trigger
from scanflow.store import Store

if TYPE_CHECKING:
    from scanflow.engine import Engine
    from scanflow.serving import Deployer
    from scanflow.tracking import Tracker

log = logging.getLogger("scanflow.agents")

OVERRIDES = "_runtime"  # triggers added/removed and sensors paused at run time (survive restarts)
FAILPOINT_ENV = "SCANFLOW_AGENT_FAILPOINT"


@dataclass
class Observation:
    """What a sensor saw. `key` names it uniquely (e.g. a window's id range, a message key)."""

    key: str
    evidence: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    message_id: int | None = None
    commit: Callable[[], None] | None = None  # advances a watermark once judged
    # A sensor reading its inbox that could not observe one message says so here: that message
    # fails alone (counted, retried with backoff, dead-lettered) while the others are judged.
    error: str | None = None


class SensorMessageError(RuntimeError):
    """The sensor could not observe one message of its inbox (`Observation.error`)."""


@dataclass(frozen=True)
class ActionCall:
    """The action an actuator is performing now: its idempotency key, and which call this is
    (more than 1 when a crash cut off an earlier call with the same key)."""

    key: str
    name: str
    attempt: int
    after_failure: bool = False  # the call before failed (its message is being tried again)

    @property
    def resumed(self) -> bool:
        """An earlier call with this key exists (cut off by a crash, or failed): it may have
        done part of its effect."""
        return self.attempt > 1


class ActionFailed(RuntimeError):
    """An actuator of a decision on a message failed: the message is tried again (the actions
    that succeeded are not repeated), then dead-lettered."""


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:20]


def bounded_key(key: str, limit: int = 240) -> str:
    """Keys fit their columns (300 chars) however long an observation key grows as messages
    are forwarded from agent to agent; the digest keeps them unique and replay-stable."""
    return key if len(key) <= limit else f"{key[:limit - 42]}~{hashlib.sha1(key.encode()).hexdigest()}"


def _pending_key(dkey: str) -> str:
    return f"_pending:{_digest(dkey)}"


def _intent_key(action_key: str) -> str:
    return f"_intent:{_digest(action_key)}"


def jsonable(value: Any) -> Any:
    """What survives a JSON column: numpy scalars become numbers, the rest strings."""
    return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def _iso(dt: datetime | float | None) -> str | None:
    if dt is None:
        return None
    if not isinstance(dt, datetime):
        dt = datetime.fromtimestamp(dt, UTC)
    return dt.astimezone(UTC).isoformat(timespec="seconds")


def _failpoint(name: str) -> None:
    """Test hook: with SCANFLOW_AGENT_FAILPOINT=<name> the process kills itself (SIGKILL)
    right there, as a crash would. The durability tests use it; nothing else sets it."""
    if os.environ.get(FAILPOINT_ENV) == name:
        log.warning("failpoint %s: killing myself", name)
        os.kill(os.getpid(), signal.SIGKILL)


class AgentContext:
    """What sensors, rules and actuators may use: the store, state, messaging, the platform,
    and facts about the current call (`sensor`, `trigger_event`, `action`)."""

    def __init__(self, settings: Settings, store: Store, app: Application, name: str) -> None:
        self.settings = settings
        self.store = store
        self.app = app
        self.name = name
        self.spec: AgentSpec = app.agents[name]
        self.service = self.spec.service
        self._local = threading.local()  # sensors of one agent run in parallel threads

    # -- the current call ----------------------------------------------------------------------
    @contextmanager
    def _scope(self, **facts: Any) -> Iterator[None]:
        saved = {k: getattr(self._local, k, None) for k in facts}
        for k, v in facts.items():
            setattr(self._local, k, v)
        try:
            yield
        finally:
            for k, v in saved.items():
                setattr(self._local, k, v)

    @property
    def sensor(self) -> str | None:
        return getattr(self._local, "sensor", None)

    @property
    def trigger_event(self) -> TriggerEvent | None:
        """The fire being handled: an event (its key, what happened), a schedule, or manual."""
        return getattr(self._local, "event", None)

    @property
    def action(self) -> ActionCall | None:
        return getattr(self._local, "action", None)

    @property
    def action_key(self) -> str | None:
        """The idempotency key of the running action: pass it on to what you call."""
        act = self.action
        return act.key if act else None

    # -- state survives restarts because it lives in the store --------------------------------
    def get(self, key: str, default: Any = None) -> Any:
        txn = getattr(self._local, "txn", None)
        if txn is not None and key in txn:
            return txn[key]
        return self.store.get_state(self.name, key, default)

    def set(self, key: str, value: Any) -> None:
        txn = getattr(self._local, "txn", None)
        if txn is not None:  # a rule's writes commit with its decision, atomically
            txn[key] = jsonable(value)
            return
        self.store.set_state(self.name, key, value)

    def remember(self, name: str, compute: Callable[[], Any]) -> Any:
        """A value computed once per action: a call resumed after a crash gets the first call's
        value (e.g. the version a rollback started from), so it does not act twice."""
        act = self.action
        if act is None:
            return compute()
        key = _intent_key(act.key)
        saved = self.store.get_state(self.name, key) or {}
        if name in saved:
            return saved[name]
        value = jsonable(compute())
        self.store.set_state(self.name, key, {**saved, name: value})
        self._local.remembered = True
        return value

    def send(self, to: str, kind: str, payload: dict[str, Any], key: str | None = None) -> bool:
        return self.store.send_message(self.name, to, kind, payload, key=key)

    def event(self, kind: str, **payload: Any) -> None:
        self.store.add_event(self.name, kind, self.service, **jsonable(payload))
        log.info("event %s %s", kind, payload)

    @cached_property
    def tracker(self) -> Tracker:
        return backends.tracker(self.settings)

    @cached_property
    def deployer(self) -> Deployer:
        # What it does is recorded as done by this agent.
        return backends.deployer(self.settings, self.store, actor=self.name, tracker=self.tracker)

    def engine(self) -> Engine:
        return backends.engine(self.settings, self.store, self.tracker)


@dataclass
class _Part:
    call: CallSpec
    fn: Callable[..., Any]
    name: str


class Agent:
    """Runs the sensors of one agent spec; `tick` is one fire of one sensor."""

    def __init__(self, settings: Settings, store: Store, app: Application, name: str) -> None:
        if name not in app.agents:
            known = ", ".join(sorted(app.agents)) or "none"
            raise KeyError(f"no agent {name!r} in app {app.app!r} (known: {known})")
        self.ctx = AgentContext(settings, store, app, name)
        self.settings = settings
        self.name = name
        self.spec = app.agents[name]
        self.store = store
        base, imports = app.base_dir, self.spec.imports
        self._sensors: dict[str, SensorSpec] = {s.name: s for s in self.spec.sensors}
        self._funcs = {s.name: resolve("sensor", s.func, base, imports) if s.func is not None else None
                       for s in self.spec.sensors}
        self._rules = {s.name: resolve("rule", s.rule.func, base, imports) if s.rule else None
                       for s in self.spec.sensors}
        self._actuators: dict[str, list[_Part]] = {}
        for s in self.spec.sensors:
            parts, seen = [], set()
            for i, call in enumerate(s.actuators):
                nm = name_of(call.func, "actuator")
                parts.append(_Part(call, resolve("actuator", call.func, base, imports),
                                   nm if nm not in seen else f"{nm}#{i}"))
                seen.add(nm)
            self._actuators[s.name] = parts
        self._locks = {s: threading.Lock() for s in self._sensors}
        self._ctl = threading.RLock()
        self._sched: Any = None
        self._triggers: dict[str, dict[str, tuple[Trigger, str]]] = {}
        self._sources: dict[tuple[str, str], EventSource] = {}
        self._paused: set[str] = set()
        self._stopping = threading.Event()
        self._stats: dict[str, dict[str, Any]] = {
            s: {"ticks": 0, "observations": 0, "last_tick": None, "last_error": None} for s in self._sensors
        }
        self._startup: dict[tuple[str, str], dict[str, Any]] = {}  # what a trigger's first run owes
        self.max_attempts = self.spec.max_attempts or settings.agent_max_attempts
        self.retry_backoff = self.spec.retry_backoff or settings.agent_retry_backoff
        self.retry_max_backoff = settings.agent_retry_max_backoff
        self.api_url: str | None = None

    @classmethod
    def define(
        cls, settings: Settings, store: Store, name: str, spec: AgentSpec, *,
        app: str = "agents", team: str = "python", base_dir: Path | None = None,
    ) -> Agent:
        """An agent declared in Python: its spec may hold functions or registered names."""
        application = Application(app=app, team=team, agents={name: spec})
        application.base_dir = (base_dir or Path.cwd()).resolve()
        return cls(settings, store, validate_application(application, checks=[agent_issues]), name)

    # -- judging ---------------------------------------------------------------------------------
    def _sensor(self, name: str) -> SensorSpec:
        try:
            return self._sensors[name]
        except KeyError:
            known = ", ".join(self._sensors)
            raise UnknownSensor(f"agent {self.name!r} has no sensor {name!r} (sensors: {known})") from None

    def tick(self, sensor_name: str, event: TriggerEvent | None = None) -> int:
        """Fire one sensor (for `event`, or by hand); returns the number of observations judged."""
        spec = self._sensor(sensor_name)
        stats = self._stats[sensor_name]
        with self._locks[sensor_name], self.ctx._scope(sensor=sensor_name, event=event):
            all_ok = True
            try:
                items = self._observe(spec, event)
                for obs in items:
                    if obs.message_id is not None and (event is None or event.message_id is None):
                        # a sensor reading the inbox itself: each message succeeds or fails alone
                        all_ok &= self._handle_message(obs.message_id, sensor_name,
                                                       partial(self._judge_noting, spec, obs))
                    else:
                        self._judge(spec, obs)
            except Exception as exc:
                self._failed(sensor_name, exc)
                raise
            stats["ticks"] += 1
            stats["observations"] += len(items)
            stats["last_tick"] = time.time()
            if all_ok:  # a message that failed alone keeps its error visible in `agents status`
                stats["last_error"] = None
        return len(items)

    def _judge_noting(self, spec: SensorSpec, obs: Observation) -> None:
        try:
            if obs.error is not None:
                raise SensorMessageError(obs.error)
            self._judge(spec, obs)
        except Exception as exc:
            self._failed(spec.name, exc)
            raise

    def _observe(self, spec: SensorSpec, event: TriggerEvent | None) -> list[Observation]:
        fn = self._funcs[spec.name]
        if fn is None:  # the fire itself is what is judged
            ev = event or manual_event(spec.name)
            return [Observation(key=ev.key, evidence=dict(ev.evidence), data=dict(ev.data),
                                message_id=None if ev.commit else ev.message_id)]
        observed = fn(self.ctx, **spec.params)
        if observed is None:
            return []
        items = observed if isinstance(observed, list) else [observed]
        if event is not None and event.replayable:
            # Scope what the sensor saw to the event, so that its replay maps to the same keys.
            for obs in items:
                if obs.key != event.key and not obs.key.startswith(event.key + "|"):
                    obs.key = f"{event.key}|{obs.key}"
        return items

    def _judge(self, spec: SensorSpec, obs: Observation) -> None:
        dkey = bounded_key(f"{self.name}:{spec.name}:{obs.key}")
        if self.store.has_decision(dkey):
            # Judged before a crash: never judge twice; finish what it started, then bookkeeping.
            pending = self.store.get_state(self.name, _pending_key(dkey))
            if pending is not None:
                self._complete(spec, dkey, pending)
            self._finish(obs)
            return
        rule_fn = self._rules[spec.name]
        reason = ""
        txn: dict[str, Any] = {}
        with self.ctx._scope(txn=txn):
            if rule_fn is None:
                fired = True
            else:
                verdict = rule_fn(obs, self.ctx, **(spec.rule.params if spec.rule else {}))
                fired, reason = verdict if isinstance(verdict, tuple) else (bool(verdict), "")
        evidence = jsonable({**obs.evidence, **({"reason": reason} if reason else {})})
        parts = self._actuators[spec.name] if fired else []
        planned = [{"action": p.name, "key": bounded_key(f"{dkey}:{p.name}"), "status": "pending"}
                   for p in parts]
        pending = None
        if parts:
            pending = (_pending_key(dkey), {"decision": dkey, "sensor": spec.name, "key": obs.key,
                                            "evidence": evidence, "data": jsonable(obs.data),
                                            "message_id": self._message_of(obs)})
        rule_name = name_of(spec.rule.func, "rule") if spec.rule else "always"
        _failpoint("before_decision")
        self.store.record_decision(self.name, spec.name, rule_name, bool(fired), evidence,
                                   self.ctx.service, planned, dkey, state=txn, pending=pending)
        _failpoint("after_decision")
        if pending is not None:
            self._complete(spec, dkey, pending[1], obs)
        _failpoint("before_commit")
        self._finish(obs)

    def _message_of(self, obs: Observation) -> int | None:
        """The message being handled when `obs` is judged (its failures are retried), if any."""
        if obs.message_id is not None:
            return obs.message_id
        ev = self.ctx.trigger_event
        return ev.message_id if ev is not None else None

    def _complete(self, spec: SensorSpec, dkey: str, pending: dict[str, Any],
                  obs: Observation | None = None, retry: bool | None = None) -> None:
        """Run the decision's actions not finished yet, then store their outcome. On a message
        (`retry`), a failed action keeps the decision pending and raises `ActionFailed`: the
        message's next try calls it again, with the same key."""
        if obs is None:  # resumed after a crash: the observation as it was judged
            obs = Observation(key=pending["key"], evidence=pending.get("evidence", {}),
                              data=pending.get("data", {}))
        if retry is None:
            retry = pending.get("message_id") is not None
        results = [self._act(dkey, p, obs, retry) for p in self._actuators[spec.name]]
        failed = [r for r in results if r["status"] == "failed"] if retry else []
        if failed:
            self.store.complete_decision(dkey, results, self.name, None)  # still pending
            raise ActionFailed("; ".join(f"actuator {r['action']} failed: {r.get('error', '?')}"
                                         for r in failed))
        self.store.complete_decision(dkey, results, self.name, _pending_key(dkey))

    def _act(self, dkey: str, part: _Part, obs: Observation, retry: bool = False) -> dict[str, Any]:
        key = bounded_key(f"{dkey}:{part.name}")
        row, attempt = self.store.claim_action(key, self.name, part.name, retry_failed=retry)
        if attempt == 0:  # finished before: never again
            return {**_summary(row.result or {}), "action": part.name, "key": key,
                    "status": row.status, "replayed": True}
        after_failure = (row.result or {}).get("retry") == "failed"
        remembered = False
        if attempt > 1 and part.call.on_interrupted == "abandon" and not after_failure:
            result: dict[str, Any] = {"error": "cut off by a crash; not called again "
                                      "(on_interrupted: abandon)", "attempt": attempt}
            status = "interrupted"
        else:
            if after_failure:
                log.warning("action %s failed before: calling it again (attempt %d)", key, attempt)
            elif attempt > 1:
                log.warning("action %s was cut off by a crash: calling it again (attempt %d)", key, attempt)
            try:
                with self.ctx._scope(action=ActionCall(key, part.name, attempt, after_failure),
                                     remembered=False):
                    out = part.fn(obs, self.ctx, **part.call.params)
                    remembered = bool(getattr(self.ctx._local, "remembered", False))
                result = out if isinstance(out, dict) else ({} if out is None else {"result": out})
                status = "succeeded"
            except Exception as exc:  # noqa: BLE001 - an actuator failure is a recorded outcome
                remembered = True  # (it may have remembered something before failing)
                log.error("actuator %s failed: %s", part.name, exc)
                result = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc(limit=5)}
                status = "failed"
            if attempt > 1:
                result = {**result, "attempt": attempt}
        self.store.finish_action(key, status, jsonable(result))
        if (attempt > 1 or remembered) and not (status == "failed" and retry):
            self.store.delete_state(self.name, _intent_key(key))  # what `remember` kept (a call
            # to be tried again keeps it: the next try gets the first call's values)
        _failpoint("after_action")
        return {**_summary(result), "action": part.name, "key": key, "status": status}

    def _finish(self, obs: Observation) -> None:
        if obs.commit is not None:
            obs.commit()
        if obs.message_id is not None:
            self.store.ack_message(obs.message_id)

    def recover(self) -> int:
        """Finish the actions of decisions a crash cut off; returns how many were resumed.
        A decision on a message still to be handled (pending: its next try; dead-lettered: a
        requeue) is left to that message, which owns its tries and backoff."""
        n = 0
        for pkey, pending in self.store.state_items(self.name, "_pending:").items():
            spec = self._sensors.get(pending.get("sensor", ""))
            if spec is None:
                log.warning("pending decision %s names a sensor no longer in the spec", pending)
                continue
            mid = pending.get("message_id")
            if mid is not None:
                msg = self.store.get_message(int(mid))
                if msg is not None and msg.status in ("pending", "dead"):
                    continue
            with self._locks[spec.name], self.ctx._scope(sensor=spec.name):
                current = self.store.get_state(self.name, pkey)
                if current is None:  # a replayed tick finished it meanwhile
                    continue
                log.info("resuming the actions of decision %s", current["decision"])
                try:
                    self._complete(spec, current["decision"], current, retry=False)
                except Exception:  # noqa: BLE001 - one failing resume must not stop the others
                    log.exception("resuming decision %s failed", current["decision"])
                    continue
                n += 1
        return n

    # -- messages: tries, backoff, dead letters ----------------------------------------------------
    def _backoff(self, attempt: int) -> float:
        """Seconds to wait after failed try `attempt` (1, 2, ...): doubling, capped."""
        return float(min(self.retry_backoff * 2 ** (attempt - 1), self.retry_max_backoff))

    def _handle_message(self, message_id: int, sensor: str, handle: Callable[[], object],
                        commit: Callable[[], None] | None = None) -> bool:
        """One try at a message: counted first (durably), then `handle`d and acknowledged
        (`commit`); a failure schedules the next try or, after the last, dead-letters it.
        True if it was handled."""
        attempt = self.store.start_message_attempt(message_id, self.max_attempts)
        if attempt == 0:  # its last try was cut off (the agent died handling it): no more
            msg = self.store.get_message(message_id)
            if msg is not None and msg.status == "pending":
                self._dead_letter(message_id, sensor, msg.attempts, msg.error or
                                  "the agent died while handling it (its last try was cut off)")
            return False
        try:
            handle()
        except Exception as exc:  # noqa: BLE001 - recorded on the message, tried again or dead
            error = f"{type(exc).__name__}: {exc}"
            if attempt >= self.max_attempts:
                self._dead_letter(message_id, sensor, attempt, error)
            else:
                wait = self._backoff(attempt)
                log.warning("message %d failed (try %d of %d), next try in %.1fs: %s", message_id,
                            attempt, self.max_attempts, wait, error)
                self.store.fail_message(message_id, error, retry_at=time.time() + wait)
            return False
        if commit is not None:
            _failpoint("before_cursor")
            commit()
        return True

    def _dead_letter(self, message_id: int, sensor: str, attempts: int, error: str) -> None:
        msg = self.store.get_message(message_id)
        payload = jsonable({"message_id": message_id, "key": msg.key if msg else None,
                            "message_kind": msg.kind if msg else None,
                            "from": msg.sender if msg else None,
                            "sensor": sensor, "attempts": attempts, "error": error[:2000]})
        log.error("message %d dead-lettered after %d tries: %s", message_id, attempts, error)
        self.store.fail_message(message_id, error, dead_letter=(self.name, payload))

    def messages(self, status: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """This agent's messages (newest `limit`, oldest first): dead letters with `status='dead'`."""
        return [message_info(m) for m in self.store.list_messages(self.name, status=status, limit=limit)]

    def requeue(self, message_id: int) -> dict[str, Any]:
        """Deliver a dead-lettered message again, its tries counted from zero; a decision it
        left pending finishes its failed actions (the succeeded ones are not repeated)."""
        try:
            msg = self.store.requeue_message(self.name, message_id)
        except KeyError as exc:
            raise UnknownMessage(str(exc).strip("'\"")) from None
        log.info("message %d requeued", message_id)
        return message_info(msg)

    def _failed(self, sensor: str, exc: BaseException) -> None:
        """Log and record a failure once per distinct error (a poll may fail every second)."""
        text = f"{type(exc).__name__}: {exc}"
        stats = self._stats[sensor]
        if stats["last_error"] != text:
            log.error("sensor %s failed", sensor, exc_info=exc)
            self.ctx.event("sensor_failed", sensor=sensor, error=text[:2000])
        stats["last_error"] = text
        stats["last_error_at"] = time.time()

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
        from apscheduler.schedulers.background import BackgroundScheduler

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
        self.store.set_state(self.name, _fire_key(sensor, key), jsonable(record))

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
                "next_fire_time": _iso(nxt) if t.event is None else None,
            }
            if t.event is not None:
                entry["next_poll_time"] = _iso(nxt)
                src = self._sources.get((name, key))
                entry["cursor"] = src.cursor() if src is not None else None
            else:
                rec = self.store.get_state(self.name, _fire_key(name, key)) or {}
                entry["misfire"] = t.misfire_policy
                entry["last_fire_time"] = _iso(rec.get("last"))
            if t.date is not None:
                entry["fired_at"] = self._date_fired(name, t)
                entry["skipped_at"] = _iso(rec.get("skipped"))
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
            "last_tick": _iso(stats["last_tick"]), "last_error": stats["last_error"],
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

    def recent_decisions(self, limit: int = 20, fired: bool | None = None) -> list[dict[str, Any]]:
        return [{"id": d.id, "time": _iso(d.ts), "sensor": d.sensor, "key": d.key, "rule": d.rule,
                 "fired": d.fired, "evidence": d.evidence, "actions": d.actions}
                for d in self.store.recent_decisions(self.name, limit, fired)]

    def recent_events(self, limit: int = 20) -> list[dict[str, Any]]:
        return [{"id": e.id, "time": _iso(e.ts), "kind": e.kind, "service": e.service, **e.payload}
                for e in self.store.recent_events(self.name, limit)]

    # -- the process loop --------------------------------------------------------------------
    def run_forever(self, stop: Callable[[], bool] | None = None, api: bool = True) -> None:
        """Register, schedule every trigger, serve the HTTP API, heartbeat, until `stop()` is
        true. The API answers only once the triggers are scheduled (never an empty list)."""
        server = None
        host = port = None
        if api:
            server = ApiServer(self)
            host, port = server.bind()
            self.api_url = f"http://{host}:{port}"
        self.store.register_agent(self.name, self.ctx.app.app, self.spec.role, os.getpid(),
                                  api_host=host, api_port=port)
        self.start()
        try:
            if server is not None:
                server.start()
            while not (stop and stop()):
                time.sleep(0.5)
                self.store.agent_heartbeat(self.name)
        finally:
            self.stop(wait=True)
            if server is not None:
                server.stop()
            self.store.agent_heartbeat(self.name, status="stopped")


def message_info(m: Any) -> dict[str, Any]:
    """A message as the API lists it (dead letters with their last error and tries)."""
    return {"id": m.id, "key": m.key, "kind": m.kind, "from": m.sender, "status": m.status,
            "attempts": m.attempts, "error": m.error, "sent": _iso(m.ts),
            "retry_at": _iso(m.retry_at), "handled_at": _iso(m.handled_at), "payload": m.payload}


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if isinstance(v, str | int | float | bool) and k != "trace"}
