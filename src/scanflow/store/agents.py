"""What agents keep between ticks and processes: their durable messages (inbox, retries,
dead letters), key-value state, process registry, and the leases that let one actor at a time
act on a service."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any, Protocol

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError

from scanflow.store.db import Database, rowcount
from scanflow.store.schema import AgentProcess, AgentState, Event, Lease, Message


class AgentRepository(Protocol):
    """Messages, agent state, the agent process registry and service leases."""

    def send_message(self, sender: str, recipient: str, kind: str, payload: dict[str, Any],
                     key: str | None = None, *, by: str | None = None,
                     signature: str | None = None) -> bool: ...

    def inbox(self, recipient: str, kinds: Sequence[str] | None = None,
              limit: int = 100) -> list[Message]: ...

    def ack_message(self, message_id: int) -> None: ...

    def start_message_attempt(self, message_id: int, max_attempts: int) -> int: ...

    def fail_message(self, message_id: int, error: str, *, retry_at: float | None = None,
                     dead_letter: tuple[str, dict[str, Any]] | None = None,
                     event_kind: str = "message_dead_lettered") -> None: ...

    def requeue_message(self, recipient: str, message_id: int) -> Message: ...

    def get_message(self, message_id: int) -> Message | None: ...

    def message_by_key(self, key: str) -> Message | None: ...

    def messages_by_ids(self, ids: Sequence[int]) -> list[Message]: ...

    def list_messages(self, recipient: str | None = None, status: str | None = None,
                      limit: int | None = None) -> Sequence[Message]: ...

    def count_messages(self, recipient: str) -> dict[str, int]: ...

    def get_state(self, agent: str, key: str, default: Any = None) -> Any: ...

    def set_state(self, agent: str, key: str, value: Any) -> None: ...

    def state_items(self, agent: str, prefix: str) -> dict[str, Any]: ...

    def delete_state(self, agent: str, key: str) -> None: ...

    def register_agent(self, name: str, app: str, role: str, pid: int,
                       api_host: str | None = None, api_port: int | None = None) -> None: ...

    def agent_heartbeat(self, name: str, status: str = "running") -> None: ...

    def list_agents(self) -> Sequence[AgentProcess]: ...

    def acquire_lease(self, name: str, holder: str, ttl_s: float, *, purpose: str = "",
                      now: float | None = None) -> bool: ...

    def renew_lease(self, name: str, holder: str, ttl_s: float, *, now: float | None = None) -> bool: ...

    def release_lease(self, name: str, holder: str, *, now: float | None = None) -> bool: ...

    def get_lease(self, name: str, *, now: float | None = None) -> Lease | None: ...


class SqlMessages:
    """Durable messages between agents (SQLAlchemy half of `AgentRepository`)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def send_message(self, sender: str, recipient: str, kind: str, payload: dict[str, Any],
                     key: str | None = None, *, by: str | None = None,
                     signature: str | None = None) -> bool:
        """Durable send; a message with a key already sent is not sent twice. True if new."""
        msg = Message(key=key or uuid.uuid4().hex, ts=time.time(), sender=sender, recipient=recipient,
                      kind=kind, payload=payload, status="pending", attempts=0, by=by,
                      signature=signature)
        try:
            with self.db.session() as s:
                s.add(msg)
            return True
        except IntegrityError:
            return False

    def inbox(self, recipient: str, kinds: Sequence[str] | None = None, limit: int = 100) -> list[Message]:
        """Messages not yet acknowledged, oldest first (re-delivered after a crash); one that
        failed waits until its `retry_at`, and a dead-lettered one is not delivered."""
        now = time.time()
        q = (
            select(Message)
            .where(Message.recipient == recipient, Message.status == "pending",
                   or_(Message.retry_at.is_(None), Message.retry_at <= now))
            .order_by(Message.id)
            .limit(limit)
        )
        if kinds:
            q = q.where(Message.kind.in_(list(kinds)))
        with self.db.session() as s:
            return list(s.scalars(q).all())

    def ack_message(self, message_id: int) -> None:
        with self.db.session() as s:
            s.execute(update(Message).where(Message.id == message_id)
                      .values(status="done", handled_at=time.time(), retry_at=None))

    def start_message_attempt(self, message_id: int, max_attempts: int) -> int:
        """Count one more try at handling a message, durably and before it starts (a message
        that kills its agent is counted too); returns this try's number (1, 2, ...), or 0 when
        `max_attempts` tries were started already (the last one was cut off)."""
        with self.db.session() as s:
            done = rowcount(s.execute(update(Message).where(Message.id == message_id,
                                                            Message.attempts < max_attempts)
                                      .values(attempts=Message.attempts + 1)))
            if not done:
                return 0
            return int(s.scalars(select(Message.attempts).where(Message.id == message_id)).one())

    def fail_message(self, message_id: int, error: str, *, retry_at: float | None = None,
                     dead_letter: tuple[str, dict[str, Any]] | None = None,
                     event_kind: str = "message_dead_lettered") -> None:
        """Record a failed try: the message waits until `retry_at`, or is dead-lettered with
        `dead_letter` = (agent, event payload) stored as an `event_kind` event in the same
        transaction."""
        values: dict[str, Any] = {"error": error[:4000], "retry_at": retry_at}
        if dead_letter is not None:
            values.update(status="dead", handled_at=time.time(), retry_at=None)
        with self.db.session() as s:
            s.execute(update(Message).where(Message.id == message_id, Message.status == "pending")
                      .values(**values))
            if dead_letter is not None:
                s.add(Event(ts=time.time(), source=dead_letter[0], kind=event_kind,
                            service=None, payload=dead_letter[1]))

    def requeue_message(self, recipient: str, message_id: int) -> Message:
        """Deliver a dead-lettered message again, with its tries counted from zero. KeyError
        if `recipient` has no such message, ValueError if it is not dead-lettered."""
        with self.db.session() as s:
            m = s.get(Message, message_id)
            if m is None or m.recipient != recipient:
                raise KeyError(f"agent {recipient!r} has no message {message_id}")
            if m.status != "dead":
                raise ValueError(f"message {message_id} is {m.status}, not dead-lettered: "
                                 "only a dead-lettered message can be requeued")
            s.add(Event(ts=time.time(), source=recipient, kind="message_requeued", service=None,
                        payload={"message_id": m.id, "key": m.key, "message_kind": m.kind,
                                 "attempts": m.attempts, "last_error": m.error}))
            m.status, m.attempts, m.retry_at, m.handled_at, m.error = "pending", 0, None, None, None
            s.flush()
            return m

    def get_message(self, message_id: int) -> Message | None:
        with self.db.session() as s:
            return s.get(Message, message_id)

    def message_by_key(self, key: str) -> Message | None:
        with self.db.session() as s:
            return s.scalars(select(Message).where(Message.key == key)).first()

    def messages_by_ids(self, ids: Sequence[int]) -> list[Message]:
        """These messages (whatever their status), oldest first; unknown ids are left out."""
        if not ids:
            return []
        with self.db.session() as s:
            return list(s.scalars(select(Message).where(Message.id.in_(list(ids))).order_by(Message.id)))

    def list_messages(self, recipient: str | None = None, status: str | None = None,
                      limit: int | None = None) -> Sequence[Message]:
        """Oldest first; with `limit`, the newest `limit` of them."""
        q = select(Message)
        if recipient:
            q = q.where(Message.recipient == recipient)
        if status:
            q = q.where(Message.status == status)
        q = q.order_by(Message.id.desc()).limit(limit) if limit is not None else q.order_by(Message.id)
        with self.db.session() as s:
            rows = list(s.scalars(q).all())
        return rows[::-1] if limit is not None else rows

    def count_messages(self, recipient: str) -> dict[str, int]:
        """{status: n} of a recipient's messages."""
        with self.db.session() as s:
            rows = s.execute(select(Message.status, func.count()).where(Message.recipient == recipient)
                             .group_by(Message.status)).all()
        return {str(st): int(n) for st, n in rows}


class SqlAgentRepository(SqlMessages):
    """`AgentRepository` on SQLAlchemy (SQLite or PostgreSQL)."""

    def get_state(self, agent: str, key: str, default: Any = None) -> Any:
        with self.db.session() as s:
            row = s.get(AgentState, (agent, key))
            return default if row is None else row.value

    def set_state(self, agent: str, key: str, value: Any) -> None:
        with self.db.session() as s:
            row = s.get(AgentState, (agent, key))
            if row is None:
                s.add(AgentState(agent=agent, key=key, value=value, updated_at=time.time()))
            else:
                row.value = value
                row.updated_at = time.time()

    def state_items(self, agent: str, prefix: str) -> dict[str, Any]:
        with self.db.session() as s:
            rows = s.scalars(select(AgentState).where(
                AgentState.agent == agent, AgentState.key.startswith(prefix, autoescape=True))).all()
            return {r.key: r.value for r in rows}

    def delete_state(self, agent: str, key: str) -> None:
        with self.db.session() as s:
            s.execute(delete(AgentState).where(AgentState.agent == agent, AgentState.key == key))

    def register_agent(self, name: str, app: str, role: str, pid: int,
                       api_host: str | None = None, api_port: int | None = None) -> None:
        now = time.time()
        with self.db.session() as s:
            s.execute(delete(AgentProcess).where(AgentProcess.name == name))
            s.add(AgentProcess(name=name, app=app, role=role, pid=pid, status="running",
                               started_at=now, heartbeat=now, api_host=api_host, api_port=api_port))

    def agent_heartbeat(self, name: str, status: str = "running") -> None:
        with self.db.session() as s:
            s.execute(update(AgentProcess).where(AgentProcess.name == name)
                      .values(heartbeat=time.time(), status=status))

    def list_agents(self) -> Sequence[AgentProcess]:
        with self.db.session() as s:
            return s.scalars(select(AgentProcess).order_by(AgentProcess.name)).all()

    # -- leases (one actor per service at a time) ----------------------------------------------
    def acquire_lease(self, name: str, holder: str, ttl_s: float, *, purpose: str = "",
                      now: float | None = None) -> bool:
        """Take `name` for `ttl_s` seconds if it is free, expired, or already `holder`'s (then
        it is extended). Each step is one atomic statement, so of two racing claimants on
        SQLite or PostgreSQL exactly one wins."""
        if ttl_s <= 0:
            raise ValueError(f"a lease needs a positive ttl, got {ttl_s}")
        t = time.time() if now is None else now
        with self.db.session() as s:
            took = rowcount(s.execute(  # expired (or released): whoever asks first takes it over
                update(Lease)
                .where(Lease.name == name, Lease.expires_at <= t)
                .values(holder=holder, expires_at=t + ttl_s, acquired_at=t, purpose=purpose,
                        generation=Lease.generation + 1)
            )) or rowcount(s.execute(  # still ours: extend it
                update(Lease)
                .where(Lease.name == name, Lease.holder == holder)
                .values(expires_at=t + ttl_s, purpose=purpose)
            ))
        if took:
            return True
        try:  # never leased: the primary key lets one of two racing inserts through
            with self.db.session() as s:
                s.add(Lease(name=name, holder=holder, expires_at=t + ttl_s, acquired_at=t,
                            generation=1, purpose=purpose))
            return True
        except IntegrityError:
            return False

    def renew_lease(self, name: str, holder: str, ttl_s: float, *, now: float | None = None) -> bool:
        """Extend a lease `holder` still has (not one that expired and was taken over)."""
        t = time.time() if now is None else now
        with self.db.session() as s:
            return bool(rowcount(s.execute(
                update(Lease).where(Lease.name == name, Lease.holder == holder, Lease.expires_at > t)
                .values(expires_at=t + ttl_s)
            )))

    def release_lease(self, name: str, holder: str, *, now: float | None = None) -> bool:
        """Give a lease back early (the row stays, so `generation` keeps counting); False if
        `holder` did not hold it."""
        t = time.time() if now is None else now
        with self.db.session() as s:
            return bool(rowcount(s.execute(
                update(Lease).where(Lease.name == name, Lease.holder == holder, Lease.expires_at > t)
                .values(expires_at=t)
            )))

    def get_lease(self, name: str, *, now: float | None = None) -> Lease | None:
        """The live lease on `name`, or None when it is free or expired."""
        t = time.time() if now is None else now
        with self.db.session() as s:
            row = s.get(Lease, name)
            return row if row is not None and row.expires_at > t else None
