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

What sensors, rules and actuators are handed lives in `scanflow.agents.context`, the
scheduling of triggers in `scanflow.agents.scheduling` (a mixin of `Agent`); their public
names are importable from here too.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from scanflow.agents.api import ApiServer, key_file, write_key
from scanflow.agents.context import (
    FAILPOINT_ENV,
    ActionCall,
    ActionFailed,
    AgentContext,
    Observation,
    SensorMessageError,
    _failpoint,
    _intent_key,
    _Part,
    _pending_key,
    bounded_key,
)
from scanflow.agents.credentials import issue as issue_credentials
from scanflow.agents.errors import UnknownMessage, UnknownSensor
from scanflow.agents.registry import agent_issues, name_of, resolve
from scanflow.agents.scheduling import OVERRIDES, TriggerScheduling
from scanflow.control.events import EventSource
from scanflow.control.triggers import TriggerEvent, manual_event
from scanflow.jsonsafe import json_safe
from scanflow.settings import Settings
from scanflow.spec.loader import validate_application
from scanflow.spec.models import AgentSpec, Application, SensorSpec, Trigger
from scanflow.store import Store
from scanflow.times import iso_utc

log = logging.getLogger("scanflow.agents")

HEALTH = "_health"
"""The agent's state key holding its failing sensors (see `Agent.health`), which
`scanflow agents list` reads from the store."""
FAILING_AFTER = 3
"""A sensor whose last tick failed is failing after this many failed ticks in a row, or at
once if none of its ticks succeeded since the agent started."""

__all__ = ["FAILING_AFTER", "FAILPOINT_ENV", "HEALTH", "OVERRIDES", "ActionCall", "ActionFailed", "Agent",
           "AgentContext", "Observation", "SensorMessageError", "bounded_key", "message_info"]


class Agent(TriggerScheduling):
    """Runs the sensors of one agent spec; `tick` is one fire of one sensor."""

    def __init__(self, settings: Settings, store: Store, app: Application, name: str) -> None:
        if name not in app.agents:
            known = ", ".join(sorted(app.agents)) or "none"
            raise KeyError(f"no agent {name!r} in app {app.app!r} (known: {known})")
        self.ctx = AgentContext(settings, store, app, name)
        # its token, once this installation has identities: what it does is checked and recorded as it
        self.ctx.credentials = issue_credentials(store, app.team, name)
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
            s: {"ticks": 0, "observations": 0, "last_tick": None, "last_error": None, "last_error_at": None,
                "failed_ticks": 0, "failing_since": None, "succeeded": False} for s in self._sensors
        }
        self._health_lock = threading.Lock()
        self._health_written: tuple[list[tuple[str, Any]], float] = ([], -1e9)  # (failing, when)
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
                self._tick_outcome(sensor_name, ok=False)
                raise
            stats["ticks"] += 1
            stats["observations"] += len(items)
            stats["last_tick"] = time.time()
            if all_ok:  # a message that failed alone keeps its error visible in `agents status`
                stats["last_error"] = None
            self._tick_outcome(sensor_name, ok=all_ok)
        return len(items)

    # -- health: failing sensors -------------------------------------------------------------------
    def _tick_outcome(self, sensor: str, ok: bool) -> None:
        """Count a tick in its sensor's run of failures (one that raised, or whose message
        failed); store the agent's health when that run starts, grows or ends."""
        stats = self._stats[sensor]
        if ok:
            stats["succeeded"] = True
            if not stats["failed_ticks"]:
                return  # the common case writes nothing
            stats["failed_ticks"], stats["failing_since"] = 0, None
        else:
            if not stats["failed_ticks"]:
                stats["failing_since"] = time.time()
            stats["failed_ticks"] += 1
        with self._health_lock:
            health = self.health()
            brief = [(f["sensor"], f["error"]) for f in health["failing"]]
            if brief == self._health_written[0] and time.monotonic() - self._health_written[1] < 1.0:
                return  # only the count grew: a sensor failing every 0.1 s writes once a second
            self.store.set_state(self.name, HEALTH, health)
            self._health_written = (brief, time.monotonic())

    def sensor_failing(self, sensor: str) -> bool:
        """Its last tick failed, and so did `FAILING_AFTER` in a row or every one since start."""
        stats = self._stats[sensor]
        n = stats["failed_ticks"]
        return bool(n) and (n >= FAILING_AFTER or not stats["succeeded"])

    def health(self) -> dict[str, Any]:
        """`{"status": "failing" | "running", "failing": [...]}`: each failing sensor with its
        last error, since when its ticks fail and how many failed in a row."""
        failing = [{"sensor": name, "error": stats["last_error"], "since": iso_utc(stats["failing_since"]),
                    "failed_ticks": stats["failed_ticks"]}
                   for name, stats in self._stats.items() if self.sensor_failing(name)]
        return {"status": "failing" if failing else "running", "failing": failing}

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
        rule_name = name_of(spec.rule.func, "rule") if spec.rule else "always"
        reason = ""
        txn: dict[str, Any] = {}
        with self.ctx._scope(txn=txn):
            if rule_fn is None:
                fired = True
            else:
                verdict = rule_fn(obs, self.ctx, **(spec.rule.params if spec.rule else {}))
                fired, reason = verdict if isinstance(verdict, tuple) else (bool(verdict), "")
        reason = str(reason or _default_reason(obs.evidence, rule_name, bool(fired)))
        evidence = json_safe({**obs.evidence, "reason": reason})
        parts = self._actuators[spec.name] if fired else []
        planned = [{"action": p.name, "key": bounded_key(f"{dkey}:{p.name}"), "status": "pending"}
                   for p in parts]
        pending = None
        if parts:
            pending = (_pending_key(dkey), {"decision": dkey, "sensor": spec.name, "key": obs.key,
                                            "evidence": evidence, "data": json_safe(obs.data),
                                            "message_id": self._message_of(obs)})
        _failpoint("before_decision")
        self.store.record_decision(self.name, spec.name, rule_name, bool(fired), evidence,
                                   self.ctx.service, planned, dkey, state=txn, pending=pending,
                                   by=self.ctx.by)
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
        self.store.finish_action(key, status, json_safe(result))
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
        payload = json_safe({"message_id": message_id, "key": msg.key if msg else None,
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

    def recent_decisions(self, limit: int = 20, fired: bool | None = None) -> list[dict[str, Any]]:
        return [{"id": d.id, "time": iso_utc(d.ts), "sensor": d.sensor, "key": d.key, "rule": d.rule,
                 "fired": d.fired, "evidence": d.evidence, "actions": d.actions, "by": d.by}
                for d in self.store.recent_decisions(self.name, limit, fired)]

    def recent_events(self, limit: int = 20) -> list[dict[str, Any]]:
        return [{"id": e.id, "time": iso_utc(e.ts), "kind": e.kind, "service": e.service, **e.payload}
                for e in self.store.recent_events(self.name, limit)]

    # -- the process loop --------------------------------------------------------------------
    def run_forever(self, stop: Callable[[], bool] | None = None, api: bool = True) -> None:
        """Register, schedule every trigger, serve the HTTP API, heartbeat, until `stop()` is
        true. The API answers only once the triggers are scheduled (never an empty list)."""
        server = None
        host = port = None
        if api:
            server = ApiServer(self, key=write_key(key_file(self.settings.agents_dir, self.name)))
            host, port = server.bind()
            self.api_url = f"http://{host}:{port}"
        self.store.delete_state(self.name, HEALTH)  # a new process: its sensors have not failed yet
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
            "attempts": m.attempts, "error": m.error, "sent": iso_utc(m.ts),
            "retry_at": iso_utc(m.retry_at), "handled_at": iso_utc(m.handled_at), "payload": m.payload}


def _default_reason(evidence: dict[str, Any], rule: str, fired: bool) -> str:
    """The reason of a rule that gave none (a bare bool): what the sensor said of its
    observation (`summary`, else `reason`), so that `scanflow decisions` always says why."""
    for key in ("summary", "reason"):
        if evidence.get(key):
            return str(evidence[key])
    return f"rule {rule}: {'fired' if fired else 'not fired'}"


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if isinstance(v, str | int | float | bool) and k != "trace"}
