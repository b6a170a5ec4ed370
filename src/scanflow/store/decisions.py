"""The audit trail: events (what happened), decisions (what an agent judged and why) and
actions (actuator calls, keyed so that a replay after a crash does not act twice)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Protocol

from sqlalchemy import delete, or_, select, update
from sqlalchemy.exc import IntegrityError

from scanflow.store.db import Database
from scanflow.store.schema import Action, AgentState, Decision, Event


class DecisionRepository(Protocol):
    """Events, decisions and actions; `record_decision` and `complete_decision` also write the
    deciding agent's state in the same transaction (all or nothing after a crash)."""

    def add_event(self, source: str, kind: str, service: str | None = None, **payload: Any) -> Event: ...

    def list_events(
        self, service: str | None = None, kinds: Sequence[str] | None = None,
        since: float | None = None, limit: int | None = 1000,
        *, services: Sequence[str] | None = None, after: int | None = None,
    ) -> Sequence[Event]: ...

    def recent_events(self, source: str, limit: int = 50) -> Sequence[Event]: ...

    def latest_events(self, service: str, kinds: Sequence[str], limit: int = 1) -> Sequence[Event]: ...

    def add_decision(
        self, agent: str, sensor: str, rule: str, fired: bool, evidence: dict[str, Any],
        service: str | None = None, actions: list[Any] | None = None, key: str | None = None,
    ) -> Decision: ...

    def record_decision(
        self, agent: str, sensor: str, rule: str, fired: bool, evidence: dict[str, Any],
        service: str | None, actions: list[Any], key: str, state: dict[str, Any] | None = None,
        pending: tuple[str, dict[str, Any]] | None = None, by: str | None = None,
    ) -> bool: ...

    def complete_decision(self, key: str, actions: list[Any], agent: str,
                          pending_key: str | None) -> None: ...

    def decision_by_key(self, key: str) -> Decision | None: ...

    def first_decision_ending(self, agent: str, key_suffix: str) -> Decision | None: ...

    def decision_agents(self) -> set[str]: ...

    def has_decision(self, key: str) -> bool: ...

    def list_decisions(
        self, agent: str | None = None, service: str | None = None, fired: bool | None = None,
        *, after: int | None = None, limit: int | None = None,
        services: Sequence[str] | None = None, agents: Sequence[str] | None = None,
    ) -> Sequence[Decision]: ...

    def recent_decisions(self, agent: str, limit: int = 50,
                         fired: bool | None = None) -> Sequence[Decision]: ...

    def begin_action(self, key: str, agent: str, kind: str) -> tuple[Action, bool]: ...

    def claim_action(
        self, key: str, agent: str, kind: str, retry_failed: bool = False,
    ) -> tuple[Action, int]: ...

    def finish_action(self, key: str, status: str, result: dict[str, Any]) -> None: ...

    def list_actions(self, agent: str | None = None) -> Sequence[Action]: ...

    def actions_around(self, ts: float, slack_s: float, agent: str | None = None,
                       limit: int = 50) -> Sequence[Action]: ...


class SqlDecisionRepository:
    """`DecisionRepository` on SQLAlchemy (SQLite or PostgreSQL)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # -- events ---------------------------------------------------------------------------------
    def add_event(self, source: str, kind: str, service: str | None = None, **payload: Any) -> Event:
        ev = Event(ts=time.time(), source=source, kind=kind, service=service, payload=payload)
        with self.db.session() as s:
            s.add(ev)
        return ev

    def list_events(
        self, service: str | None = None, kinds: Sequence[str] | None = None,
        since: float | None = None, limit: int | None = 1000,
        *, services: Sequence[str] | None = None, after: int | None = None,
    ) -> Sequence[Event]:
        """Oldest first; `limit` None for all of them; `services` keeps only those services'
        events, `after` only events with a larger id (the next page)."""
        q = select(Event).order_by(Event.id).limit(limit)
        if services is not None:
            q = q.where(Event.service.in_(list(services)))
        if after is not None:
            q = q.where(Event.id > after)
        if service:
            q = q.where(Event.service == service)
        if kinds:
            q = q.where(Event.kind.in_(list(kinds)))
        if since is not None:
            q = q.where(Event.ts >= since)
        with self.db.session() as s:
            return s.scalars(q).all()

    def recent_events(self, source: str, limit: int = 50) -> Sequence[Event]:
        """Newest first."""
        q = select(Event).where(Event.source == source).order_by(Event.id.desc()).limit(limit)
        with self.db.session() as s:
            return s.scalars(q).all()

    def latest_events(self, service: str, kinds: Sequence[str], limit: int = 1) -> Sequence[Event]:
        """A service's newest events of some kinds, newest first (e.g. the last rollout)."""
        q = (select(Event).where(Event.service == service, Event.kind.in_(list(kinds)))
             .order_by(Event.id.desc()).limit(limit))
        with self.db.session() as s:
            return s.scalars(q).all()

    # -- decisions ------------------------------------------------------------------------------
    def add_decision(
        self, agent: str, sensor: str, rule: str, fired: bool, evidence: dict[str, Any],
        service: str | None = None, actions: list[Any] | None = None, key: str | None = None,
    ) -> Decision:
        """Record a judgement; with a key, the same judgement replayed is recorded once."""
        if key is not None:
            old = self.decision_by_key(key)
            if old is not None:
                return old
        d = Decision(key=key, ts=time.time(), agent=agent, sensor=sensor, rule=rule, fired=fired,
                     evidence=evidence, service=service, actions=actions or [])
        with self.db.session() as s:
            s.add(d)
        return d

    def record_decision(
        self, agent: str, sensor: str, rule: str, fired: bool, evidence: dict[str, Any],
        service: str | None, actions: list[Any], key: str, state: dict[str, Any] | None = None,
        pending: tuple[str, dict[str, Any]] | None = None, by: str | None = None,
    ) -> bool:
        """A judgement, the agent state its rule wrote and (if it must act) a pending marker,
        in one transaction: a crash leaves all or none. False if the key was recorded before."""
        now = time.time()
        try:
            with self.db.session() as s:
                s.add(Decision(key=key, ts=now, agent=agent, sensor=sensor, rule=rule, fired=fired,
                               evidence=evidence, service=service, actions=actions, by=by))
                s.flush()
                items = dict(state or {})
                if pending is not None:
                    items[pending[0]] = pending[1]
                for k, v in items.items():
                    row = s.get(AgentState, (agent, k))
                    if row is None:
                        s.add(AgentState(agent=agent, key=k, value=v, updated_at=now))
                    else:
                        row.value, row.updated_at = v, now
        except IntegrityError:
            return False
        return True

    def complete_decision(self, key: str, actions: list[Any], agent: str, pending_key: str | None) -> None:
        """Store the outcome of a decision's actions and drop its pending marker, atomically
        (`pending_key` None: the outcome so far, the decision stays pending)."""
        with self.db.session() as s:
            s.execute(update(Decision).where(Decision.key == key).values(actions=actions))
            if pending_key is not None:
                s.execute(delete(AgentState).where(AgentState.agent == agent,
                                                   AgentState.key == pending_key))

    def decision_by_key(self, key: str) -> Decision | None:
        with self.db.session() as s:
            return s.scalars(select(Decision).where(Decision.key == key)).first()

    def first_decision_ending(self, agent: str, key_suffix: str) -> Decision | None:
        """An agent's oldest decision whose key ends with `key_suffix` (how the audit finds the
        judgement behind a message keyed by its observation)."""
        q = (select(Decision).where(Decision.agent == agent, Decision.key.endswith(key_suffix))
             .order_by(Decision.id).limit(1))
        with self.db.session() as s:
            return s.scalars(q).first()

    def decision_agents(self) -> set[str]:
        """Every agent that recorded a decision."""
        with self.db.session() as s:
            return set(s.scalars(select(Decision.agent).distinct()).all())

    def has_decision(self, key: str) -> bool:
        with self.db.session() as s:
            return s.scalars(select(Decision.id).where(Decision.key == key)).first() is not None

    def list_decisions(
        self, agent: str | None = None, service: str | None = None, fired: bool | None = None,
        *, after: int | None = None, limit: int | None = None,
        services: Sequence[str] | None = None, agents: Sequence[str] | None = None,
    ) -> Sequence[Decision]:
        """Oldest first; `after` an id (a page's cursor), at most `limit`. With `services` or
        `agents` (or both), only decisions about one of those services or by one of those
        agents (what a caller may read)."""
        q = select(Decision).order_by(Decision.id)
        if after is not None:
            q = q.where(Decision.id > after)
        if services is not None or agents is not None:
            q = q.where(or_(Decision.service.in_(list(services or [])),
                            Decision.agent.in_(list(agents or []))))
        if limit is not None:
            q = q.limit(limit)
        if agent:
            q = q.where(Decision.agent == agent)
        if service:
            q = q.where(Decision.service == service)
        if fired is not None:
            q = q.where(Decision.fired == fired)
        with self.db.session() as s:
            return s.scalars(q).all()

    def recent_decisions(self, agent: str, limit: int = 50, fired: bool | None = None) -> Sequence[Decision]:
        """Newest first."""
        q = select(Decision).where(Decision.agent == agent).order_by(Decision.id.desc()).limit(limit)
        if fired is not None:
            q = q.where(Decision.fired == fired)
        with self.db.session() as s:
            return s.scalars(q).all()

    # -- actions (idempotency) ------------------------------------------------------------------
    def begin_action(self, key: str, agent: str, kind: str) -> tuple[Action, bool]:
        """Claim an action key; returns (action, True) only for the first claimant."""
        try:
            with self.db.session() as s:
                a = Action(key=key, agent=agent, kind=kind, status="running", created_at=time.time())
                s.add(a)
            return a, True
        except IntegrityError:
            with self.db.session() as s:
                a = s.scalars(select(Action).where(Action.key == key)).one()
            if a.status == "running":
                # A claimant that died mid-action: let the caller redo it (it holds the key).
                return a, True
            return a, False

    def claim_action(
        self, key: str, agent: str, kind: str, retry_failed: bool = False,
    ) -> tuple[Action, int]:
        """Claim an action key: (action, attempt) where attempt is 1 for a new action, 2, 3 ...
        when an earlier claimant died while running it, and 0 when it already finished. With
        `retry_failed`, a failed action is claimed again too (its result says `retry: failed`:
        the earlier call ended in an error, it was not cut off)."""
        try:
            with self.db.session() as s:
                a = Action(key=key, agent=agent, kind=kind, status="running", created_at=time.time(),
                           result={"attempt": 1})
                s.add(a)
            return a, 1
        except IntegrityError:
            with self.db.session() as s:
                a = s.scalars(select(Action).where(Action.key == key)).one()
                last = dict(a.result or {})
                attempt = int(last.get("attempt", 1)) + 1
                if a.status == "failed" and retry_failed:
                    a.status, a.ended_at = "running", None
                    a.result = {"attempt": attempt, "retry": "failed"}
                elif a.status != "running":
                    return a, 0
                else:  # cut off by a crash (also while retrying a failure)
                    a.result = {"attempt": attempt}
            return a, attempt

    def finish_action(self, key: str, status: str, result: dict[str, Any]) -> None:
        with self.db.session() as s:
            s.execute(update(Action).where(Action.key == key)
                      .values(status=status, result=result, ended_at=time.time()))

    def list_actions(self, agent: str | None = None) -> Sequence[Action]:
        q = select(Action).order_by(Action.id)
        if agent:
            q = q.where(Action.agent == agent)
        with self.db.session() as s:
            return s.scalars(q).all()

    def actions_around(self, ts: float, slack_s: float, agent: str | None = None,
                       limit: int = 50) -> Sequence[Action]:
        """Actions that were running at `ts` (give or take `slack_s`), newest first."""
        q = (select(Action).where(Action.created_at <= ts + slack_s)
             .where((Action.ended_at.is_(None)) | (Action.ended_at >= ts - slack_s))
             .order_by(Action.created_at.desc()).limit(limit))
        if agent is not None:
            q = q.where(Action.agent == agent)
        with self.db.session() as s:
            return s.scalars(q).all()
