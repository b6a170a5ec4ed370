"""The one store interface every layer talks to; the backend is chosen by the SQLAlchemy URL."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import create_engine, delete, event, func, insert, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from scanflow.store.schema import (
    Action,
    AgentProcess,
    AgentState,
    Base,
    Decision,
    Deployment,
    Event,
    Label,
    Message,
    Prediction,
    StepRun,
    WorkflowRun,
)

TERMINAL = {"succeeded", "failed", "cancelled", "interrupted", "skipped"}


def normalise_url(url: str) -> str:
    """Use psycopg 3 for PostgreSQL URLs given without a driver."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def _make_engine(url: str) -> Engine:
    url = normalise_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)


class Store:
    """Control-plane state behind one interface (SQLite or PostgreSQL)."""

    def __init__(self, url: str) -> None:
        self.url = normalise_url(url)
        self.engine = _make_engine(self.url)
        Base.metadata.create_all(self.engine)
        self._session = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._session.begin() as s:
            yield s

    def close(self) -> None:
        self.engine.dispose()

    # -- workflow runs -------------------------------------------------------------------------
    def create_run(
        self,
        app: str,
        team: str,
        workflow: str,
        params: dict[str, Any],
        trigger: dict[str, Any] | None = None,
        *,
        status: str = "pending",
        spec_path: str | None = None,
        use_cache: bool = True,
    ) -> WorkflowRun:
        run = WorkflowRun(
            id=uuid.uuid4().hex,
            app=app,
            team=team,
            workflow=workflow,
            status=status,
            params=params,
            trigger=trigger or {"by": "user"},
            spec_path=spec_path,
            use_cache=use_cache,
            cancel_requested=False,
            created_at=time.time(),
        )
        with self.session() as s:
            s.add(run)
        return run

    def update_run(self, run_id: str, **fields: Any) -> None:
        with self.session() as s:
            s.execute(update(WorkflowRun).where(WorkflowRun.id == run_id).values(**fields))

    def get_run(self, run_id: str) -> WorkflowRun | None:
        with self.session() as s:
            run = s.get(WorkflowRun, run_id)
            if run is None:
                # Allow the short prefixes the CLI prints.
                rows = s.scalars(
                    select(WorkflowRun).where(WorkflowRun.id.startswith(run_id)).limit(2)
                ).all()
                run = rows[0] if len(rows) == 1 else None
            return run

    def list_runs(
        self, workflow: str | None = None, limit: int = 50, status: Sequence[str] | None = None
    ) -> Sequence[WorkflowRun]:
        q = select(WorkflowRun).order_by(WorkflowRun.created_at.desc()).limit(limit)
        if workflow:
            q = q.where(WorkflowRun.workflow == workflow)
        if status:
            q = q.where(WorkflowRun.status.in_(list(status)))
        with self.session() as s:
            return s.scalars(q).all()

    def upsert_step(self, run_id: str, step: str, **fields: Any) -> None:
        with self.session() as s:
            row = s.scalars(
                select(StepRun).where(StepRun.run_id == run_id, StepRun.step == step)
            ).first()
            if row is None:
                s.add(StepRun(run_id=run_id, step=step, **{"status": "pending", **fields}))
            else:
                for k, v in fields.items():
                    setattr(row, k, v)

    def create_steps(self, run_id: str, names: Sequence[str]) -> dict[str, int]:
        """All step rows of a run in one transaction (existing rows are kept): name -> row id."""
        q = select(StepRun.step, StepRun.id).where(StepRun.run_id == run_id)
        with self.session() as s:
            have = dict(s.execute(q).tuples().all())
            new = [{"run_id": run_id, "step": n, "status": "pending", "attempts": 0, "outputs": {}}
                   for n in names if n not in have]
            if new:
                s.execute(insert(StepRun), new)
        with self.session() as s:
            return dict(s.execute(q).tuples().all())

    def update_steps(self, rows: Sequence[dict[str, Any]]) -> None:
        """Bulk update by primary key (`id` in each dict): one transaction for many steps."""
        if rows:
            with self.session() as s:
                s.execute(update(StepRun), list(rows))

    def find_cached(self, cache_key: str) -> StepRun | None:
        """The newest successful step run with this cache key (not itself a cache hit)."""
        with self.session() as s:
            return s.scalars(
                select(StepRun)
                .where(StepRun.cache_key == cache_key, StepRun.status == "succeeded")
                .order_by(StepRun.id.desc())
                .limit(1)
            ).first()

    def list_steps(self, run_id: str) -> Sequence[StepRun]:
        with self.session() as s:
            return s.scalars(
                select(StepRun).where(StepRun.run_id == run_id).order_by(StepRun.id)
            ).all()

    # -- deployments ---------------------------------------------------------------------------
    def put_deployment(self, **fields: Any) -> Deployment:
        fields["updated_at"] = time.time()
        with self.session() as s:
            dep = s.get(Deployment, fields["service"])
            if dep is None:
                dep = Deployment(**fields)
                s.add(dep)
            else:
                for k, v in fields.items():
                    setattr(dep, k, v)
        return dep

    def update_deployment(self, service: str, **fields: Any) -> None:
        fields["updated_at"] = time.time()
        with self.session() as s:
            s.execute(update(Deployment).where(Deployment.service == service).values(**fields))

    def get_deployment(self, service: str) -> Deployment | None:
        with self.session() as s:
            return s.get(Deployment, service)

    def list_deployments(self) -> Sequence[Deployment]:
        with self.session() as s:
            return s.scalars(select(Deployment).order_by(Deployment.service)).all()

    # -- prediction log ------------------------------------------------------------------------
    def add_predictions(self, records: Iterable[dict[str, Any]]) -> int:
        rows = [Prediction(**r) for r in records]
        if not rows:
            return 0
        with self.session() as s:
            s.add_all(rows)
        return len(rows)

    def add_labels(self, labels: dict[str, Any]) -> int:
        """Idempotent: a label sent twice for one request keeps the latest value."""
        now = time.time()
        with self.session() as s:
            existing = set(
                s.scalars(select(Label.request_id).where(Label.request_id.in_(list(labels)))).all()
            )
            for rid, lab in labels.items():
                if rid in existing:
                    s.execute(update(Label).where(Label.request_id == rid).values(label=lab, ts=now))
                else:
                    s.add(Label(request_id=rid, label=lab, ts=now))
        return len(labels)

    def predictions(
        self,
        service: str,
        *,
        after_id: int | None = None,
        upto_id: int | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int | None = None,
        labelled_only: bool = False,
    ) -> list[dict[str, Any]]:
        """A window of the prediction log, oldest first, with labels joined where known."""
        q = (
            select(Prediction, Label.label)
            .join(Label, Label.request_id == Prediction.request_id, isouter=not labelled_only)
            .where(Prediction.service == service)
            .order_by(Prediction.id)
        )
        if after_id is not None:
            q = q.where(Prediction.id > after_id)
        if upto_id is not None:
            q = q.where(Prediction.id <= upto_id)
        if since is not None:
            q = q.where(Prediction.ts >= since)
        if until is not None:
            q = q.where(Prediction.ts < until)
        if limit is not None:
            q = q.limit(limit)
        with self.session() as s:
            return [
                {
                    "id": p.id,
                    "request_id": p.request_id,
                    "service": p.service,
                    "model_version": p.model_version,
                    "ts": p.ts,
                    "inputs": p.inputs,
                    "outputs": p.outputs,
                    "latency_ms": p.latency_ms,
                    "label": lab,
                }
                for p, lab in s.execute(q).all()
            ]

    def prediction_ids(
        self, service: str, after_id: int = 0, before_ts: float | None = None, limit: int = 100_000
    ) -> list[tuple[int, float]]:
        """(id, ts) after a watermark, without loading payloads: how monitors cut windows."""
        q = (
            select(Prediction.id, Prediction.ts)
            .where(Prediction.service == service, Prediction.id > after_id)
            .order_by(Prediction.id)
            .limit(limit)
        )
        if before_ts is not None:
            q = q.where(Prediction.ts < before_ts)
        with self.session() as s:
            return [(int(i), float(t)) for i, t in s.execute(q).all()]

    def count_predictions(self, service: str, after_id: int | None = None) -> tuple[int, int]:
        """(count, max id) of the log of one service after a watermark."""
        q = select(func.count(Prediction.id), func.max(Prediction.id)).where(
            Prediction.service == service
        )
        if after_id is not None:
            q = q.where(Prediction.id > after_id)
        with self.session() as s:
            n, mx = s.execute(q).one()
        return int(n), int(mx or 0)

    # -- events and decisions ------------------------------------------------------------------
    def add_event(
        self, source: str, kind: str, service: str | None = None, **payload: Any
    ) -> Event:
        ev = Event(ts=time.time(), source=source, kind=kind, service=service, payload=payload)
        with self.session() as s:
            s.add(ev)
        return ev

    def list_events(
        self,
        service: str | None = None,
        kinds: Sequence[str] | None = None,
        since: float | None = None,
        limit: int = 1000,
    ) -> Sequence[Event]:
        q = select(Event).order_by(Event.id).limit(limit)
        if service:
            q = q.where(Event.service == service)
        if kinds:
            q = q.where(Event.kind.in_(list(kinds)))
        if since is not None:
            q = q.where(Event.ts >= since)
        with self.session() as s:
            return s.scalars(q).all()

    def add_decision(
        self,
        agent: str,
        sensor: str,
        rule: str,
        fired: bool,
        evidence: dict[str, Any],
        service: str | None = None,
        actions: list[Any] | None = None,
        key: str | None = None,
    ) -> Decision:
        """Record a judgement; with a key, the same judgement replayed is recorded once."""
        if key is not None:
            with self.session() as s:
                old = s.scalars(select(Decision).where(Decision.key == key)).first()
            if old is not None:
                return old
        d = Decision(
            key=key,
            ts=time.time(),
            agent=agent,
            sensor=sensor,
            rule=rule,
            fired=fired,
            evidence=evidence,
            service=service,
            actions=actions or [],
        )
        with self.session() as s:
            s.add(d)
        return d

    def has_decision(self, key: str) -> bool:
        with self.session() as s:
            return s.scalars(select(Decision.id).where(Decision.key == key)).first() is not None

    def list_decisions(
        self, agent: str | None = None, service: str | None = None, fired: bool | None = None
    ) -> Sequence[Decision]:
        q = select(Decision).order_by(Decision.id)
        if agent:
            q = q.where(Decision.agent == agent)
        if service:
            q = q.where(Decision.service == service)
        if fired is not None:
            q = q.where(Decision.fired == fired)
        with self.session() as s:
            return s.scalars(q).all()

    # -- actions (idempotency) -----------------------------------------------------------------
    def begin_action(self, key: str, agent: str, kind: str) -> tuple[Action, bool]:
        """Claim an action key; returns (action, True) only for the first claimant."""
        try:
            with self.session() as s:
                a = Action(
                    key=key, agent=agent, kind=kind, status="running", created_at=time.time()
                )
                s.add(a)
            return a, True
        except IntegrityError:
            with self.session() as s:
                a = s.scalars(select(Action).where(Action.key == key)).one()
            if a.status == "running":
                # A claimant that died mid-action: let the caller redo it (it holds the key).
                return a, True
            return a, False

    def finish_action(self, key: str, status: str, result: dict[str, Any]) -> None:
        with self.session() as s:
            s.execute(
                update(Action)
                .where(Action.key == key)
                .values(status=status, result=result, ended_at=time.time())
            )

    def list_actions(self, agent: str | None = None) -> Sequence[Action]:
        q = select(Action).order_by(Action.id)
        if agent:
            q = q.where(Action.agent == agent)
        with self.session() as s:
            return s.scalars(q).all()

    # -- messages ------------------------------------------------------------------------------
    def send_message(
        self,
        sender: str,
        recipient: str,
        kind: str,
        payload: dict[str, Any],
        key: str | None = None,
    ) -> bool:
        """Durable send; a message with a key already sent is not sent twice. True if new."""
        msg = Message(
            key=key or uuid.uuid4().hex,
            ts=time.time(),
            sender=sender,
            recipient=recipient,
            kind=kind,
            payload=payload,
            status="pending",
            attempts=0,
        )
        try:
            with self.session() as s:
                s.add(msg)
            return True
        except IntegrityError:
            return False

    def inbox(self, recipient: str, kinds: Sequence[str] | None = None, limit: int = 100) -> list[Message]:
        """Messages not yet acknowledged, oldest first (re-delivered after a crash)."""
        q = (
            select(Message)
            .where(Message.recipient == recipient, Message.status == "pending")
            .order_by(Message.id)
            .limit(limit)
        )
        if kinds:
            q = q.where(Message.kind.in_(list(kinds)))
        with self.session() as s:
            msgs = list(s.scalars(q).all())
            if msgs:
                s.execute(
                    update(Message)
                    .where(Message.id.in_([m.id for m in msgs]))
                    .values(attempts=Message.attempts + 1)
                )
        return msgs

    def ack_message(self, message_id: int) -> None:
        with self.session() as s:
            s.execute(
                update(Message)
                .where(Message.id == message_id)
                .values(status="done", handled_at=time.time())
            )

    def list_messages(self, recipient: str | None = None) -> Sequence[Message]:
        q = select(Message).order_by(Message.id)
        if recipient:
            q = q.where(Message.recipient == recipient)
        with self.session() as s:
            return s.scalars(q).all()

    # -- agent state ---------------------------------------------------------------------------
    def get_state(self, agent: str, key: str, default: Any = None) -> Any:
        with self.session() as s:
            row = s.get(AgentState, (agent, key))
            return default if row is None else row.value

    def set_state(self, agent: str, key: str, value: Any) -> None:
        with self.session() as s:
            row = s.get(AgentState, (agent, key))
            if row is None:
                s.add(AgentState(agent=agent, key=key, value=value, updated_at=time.time()))
            else:
                row.value = value
                row.updated_at = time.time()

    def register_agent(self, name: str, app: str, role: str, pid: int) -> None:
        now = time.time()
        with self.session() as s:
            s.execute(delete(AgentProcess).where(AgentProcess.name == name))
            s.add(
                AgentProcess(
                    name=name, app=app, role=role, pid=pid, status="running",
                    started_at=now, heartbeat=now,
                )
            )

    def agent_heartbeat(self, name: str, status: str = "running") -> None:
        with self.session() as s:
            s.execute(
                update(AgentProcess)
                .where(AgentProcess.name == name)
                .values(heartbeat=time.time(), status=status)
            )

    def list_agents(self) -> Sequence[AgentProcess]:
        with self.session() as s:
            return s.scalars(select(AgentProcess).order_by(AgentProcess.name)).all()


def open_store(url: str | None = None) -> Store:
    from scanflow.settings import get_settings

    settings = get_settings()
    if url is None:
        settings.ensure()
    return Store(url or settings.store)
