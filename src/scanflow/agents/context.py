"""What an agent's sensors, rules and actuators are handed: the `AgentContext` (the current
call, state that survives restarts, messages, events, the backends) and the values they pass on
(`Observation`, `ActionCall`), with the keys that make a replay recognisable."""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal

from scanflow.agents.credentials import AgentCredentials
from scanflow.control import backends
from scanflow.control.operations import Actor
from scanflow.control.triggers import TriggerEvent
from scanflow.jsonsafe import json_safe
from scanflow.settings import Settings
from scanflow.spec.models import AgentSpec, Application, CallSpec
from scanflow.store import Store

if TYPE_CHECKING:
    from scanflow.engine import Engine
    from scanflow.serving import Deployer
    from scanflow.tracking import Tracker

log = logging.getLogger("scanflow.agents")

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
        # the applications its params name (`app: ../datascience/scanflow.yaml`), by that value,
        # when they travelled with the agent (a Ray actor: `ray_agents`); else read from disk
        self.named_apps: dict[str, Application] = {}
        # the token it acts with, once this installation has identities (`agents.credentials`)
        self.credentials: AgentCredentials | None = None
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
            txn[key] = json_safe(value)
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
        value = json_safe(compute())
        self.store.set_state(self.name, key, {**saved, name: value})
        self._local.remembered = True
        return value

    def send(self, to: str, kind: str, payload: dict[str, Any], key: str | None = None) -> bool:
        return self.store.send_message(self.name, to, kind, payload, key=key, by=self.by)

    # -- who it acts as ----------------------------------------------------------------------------
    @property
    def by(self) -> str | None:
        """The identity its acts are recorded as (`agent:<team>.<agent>`); None without one."""
        return self.credentials.who if self.credentials is not None else None

    def require(self, action: str, team: str, resource: str | None = None) -> None:
        """Raise `NotAllowed` unless its identity may take `action` in `team` now."""
        if self.credentials is not None:
            self.credentials.authorize(action, team, resource)

    def actor(self, kind: Literal["agent", "policy"] = "agent") -> Actor:
        """The actor its service operations run as: checked against and recorded with its identity."""
        base = Actor.agent(self.name) if kind == "agent" else Actor.policy(self.name)
        if self.credentials is None:
            return base
        return replace(base, by=self.credentials.who, authorize=self.credentials.authorize)

    def event(self, kind: str, **payload: Any) -> None:
        self.store.add_event(self.name, kind, self.service, **json_safe(payload))
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
