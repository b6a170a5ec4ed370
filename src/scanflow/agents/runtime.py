"""One agent = sensors (on triggers) -> rule -> actuators; every judgement is a stored decision.

Crash safety comes from three keys: an observation's `key` (a window or a message, so a replay
is recognised), the decision stored under it, and an idempotency key per action.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from scanflow.settings import Settings
from scanflow.spec.loader import resolve_callable
from scanflow.spec.models import AgentSpec, Application, CallSpec, SensorSpec
from scanflow.store import Store

log = logging.getLogger("scanflow.agents")


@dataclass
class Observation:
    """What a sensor saw. `key` names it uniquely (e.g. a window's id range, a message key)."""

    key: str
    evidence: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    message_id: int | None = None
    commit: Callable[[], None] | None = None  # advances a watermark once judged


class AgentContext:
    """What sensors, rules and actuators may use: the store, state, messaging, the platform."""

    def __init__(self, settings: Settings, store: Store, app: Application, name: str) -> None:
        self.settings = settings
        self.store = store
        self.app = app
        self.name = name
        self.spec: AgentSpec = app.agents[name]
        self.service = self.spec.service

    # state survives restarts because it lives in the store
    def get(self, key: str, default: Any = None) -> Any:
        return self.store.get_state(self.name, key, default)

    def set(self, key: str, value: Any) -> None:
        self.store.set_state(self.name, key, value)

    def send(self, to: str, kind: str, payload: dict[str, Any], key: str | None = None) -> bool:
        return self.store.send_message(self.name, to, kind, payload, key=key)

    def event(self, kind: str, **payload: Any) -> None:
        self.store.add_event(self.name, kind, self.service, **payload)
        log.info("event %s %s", kind, payload)

    @cached_property
    def tracker(self) -> Any:
        from scanflow.tracking import Tracker

        return Tracker(self.settings)

    @cached_property
    def deployer(self) -> Any:
        from scanflow.serving import LocalDeployer

        return LocalDeployer(self.settings, self.store)

    def engine(self) -> Any:
        from scanflow.engine import LocalEngine

        return LocalEngine(self.settings, self.store, self.tracker)


def _name_of(call: CallSpec | SensorSpec) -> str:
    fn = call.func
    return fn if isinstance(fn, str) else getattr(fn, "__qualname__", repr(fn))


class Agent:
    """Runs the sensors of one agent spec; `tick` is one fire of one sensor."""

    def __init__(self, settings: Settings, store: Store, app: Application, name: str) -> None:
        if name not in app.agents:
            known = ", ".join(sorted(app.agents)) or "none"
            raise KeyError(f"no agent {name!r} in app {app.app!r} (known: {known})")
        self.ctx = AgentContext(settings, store, app, name)
        self.name = name
        self.spec = app.agents[name]
        self.store = store
        base = app.base_dir
        self._sensors = {s.name: (s, resolve_callable(s.func, base)) for s in self.spec.sensors}
        self._rules = {
            s.name: (resolve_callable(s.rule.func, base) if s.rule else None) for s in self.spec.sensors
        }
        self._actuators = {
            s.name: [(a, resolve_callable(a.func, base)) for a in s.actuators] for s in self.spec.sensors
        }

    def tick(self, sensor_name: str) -> int:
        """Fire one sensor; returns the number of observations judged."""
        spec, fn = self._sensors[sensor_name]
        observed = fn(self.ctx, **spec.params)
        if observed is None:
            return 0
        items = observed if isinstance(observed, list) else [observed]
        for obs in items:
            self._judge(spec, obs)
        return len(items)

    def _judge(self, spec: SensorSpec, obs: Observation) -> None:
        dkey = f"{self.name}:{spec.name}:{obs.key}"
        if self.store.has_decision(dkey):
            # Judged before a crash: never judge (or act) twice, only finish the bookkeeping.
            self._finish(obs)
            return
        rule_fn = self._rules[spec.name]
        reason = ""
        if rule_fn is None:
            fired = True
        else:
            verdict = rule_fn(obs, self.ctx, **(spec.rule.params if spec.rule else {}))
            fired, reason = verdict if isinstance(verdict, tuple) else (bool(verdict), "")
        actions: list[dict[str, Any]] = []
        if fired:
            for call, act in self._actuators[spec.name]:
                actions.append(self._act(dkey, call, act, obs))
        evidence = {**obs.evidence, **({"reason": reason} if reason else {})}
        self.store.add_decision(
            self.name, spec.name, _name_of(spec.rule) if spec.rule else "always", bool(fired),
            evidence, self.ctx.service, actions, key=dkey,
        )
        self._finish(obs)

    def _act(self, dkey: str, call: CallSpec, act: Callable[..., Any], obs: Observation) -> dict[str, Any]:
        name = _name_of(call)
        key = f"{dkey}:{name}"
        action, first = self.store.begin_action(key, self.name, name)
        if not first:
            return {"action": name, "key": key, "status": action.status, "replayed": True}
        try:
            result = act(obs, self.ctx, **call.params) or {}
            status = "succeeded"
        except Exception as exc:  # noqa: BLE001 - an actuator failure is a recorded outcome
            log.error("actuator %s failed: %s", name, exc)
            result = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc(limit=5)}
            status = "failed"
        result = result if isinstance(result, dict) else {"result": result}
        self.store.finish_action(key, status, result)
        return {"action": name, "key": key, "status": status, **_summary(result)}

    def _finish(self, obs: Observation) -> None:
        if obs.commit is not None:
            obs.commit()
        if obs.message_id is not None:
            self.store.ack_message(obs.message_id)

    # -- the process loop ------------------------------------------------------------------
    def run_forever(self, stop: Callable[[], bool] | None = None) -> None:
        """Schedule every sensor on its trigger (APScheduler) until `stop()` or a signal."""
        from apscheduler.schedulers.background import BackgroundScheduler
        from apscheduler.triggers.interval import IntervalTrigger

        self.store.register_agent(self.name, self.ctx.app.app, self.spec.role, os.getpid())
        sched = BackgroundScheduler(timezone="UTC")
        for s in self.spec.sensors:
            assert s.trigger.interval is not None
            sched.add_job(
                self._safe_tick, IntervalTrigger(seconds=s.trigger.interval), args=[s.name],
                id=s.name, max_instances=1, coalesce=True, next_run_time=_now(),
            )
        sched.start()
        try:
            while not (stop and stop()):
                time.sleep(0.5)
                self.store.agent_heartbeat(self.name)
        finally:
            sched.shutdown(wait=True)
            self.store.agent_heartbeat(self.name, status="stopped")

    def _safe_tick(self, sensor: str) -> None:
        try:
            self.tick(sensor)
        except Exception:  # noqa: BLE001 - a failing sensor must not kill the agent
            log.exception("sensor %s failed", sensor)


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if isinstance(v, str | int | float | bool) and k != "trace"}


def _now() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)
