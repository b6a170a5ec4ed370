"""The one store interface every layer talks to; the backend is chosen by the SQLAlchemy URL."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import orjson
from sqlalchemy import (
    Text,
    create_engine,
    delete,
    event,
    func,
    insert,
    inspect,
    or_,
    select,
    text,
    type_coerce,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from scanflow.store.schema import (
    MESSAGE_COLUMNS_ADDED,
    Action,
    AgentProcess,
    AgentState,
    Base,
    Decision,
    Deployment,
    Event,
    Label,
    Lease,
    Message,
    Prediction,
    ShadowPrediction,
    StepRun,
    WorkflowRun,
)
from scanflow.store.window import PredictionWindow, pack_inputs, stack_inputs

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
            cur.execute("PRAGMA page_size=16384")  # new files only: rows of 3 KB inputs
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)


def _json_values(values: Sequence[Any]) -> list[Any]:
    """JSON text (SQLite) or already-decoded values (psycopg decodes json itself)."""
    return [orjson.loads(v) if isinstance(v, str | bytes) else v for v in values]


class Store:
    """Control-plane state behind one interface (SQLite or PostgreSQL)."""

    def __init__(self, url: str) -> None:
        self.url = normalise_url(url)
        self.engine = _make_engine(self.url)
        Base.metadata.create_all(self.engine)
        self._add_message_columns()
        self._session = sessionmaker(self.engine, expire_on_commit=False)

    def _add_message_columns(self) -> None:
        """A database made before messages had `error`/`retry_at` gets them (nullable), so an
        existing workspace keeps working; a concurrent process adding them first is fine."""
        have = {c["name"] for c in inspect(self.engine).get_columns("messages")}
        for name, sql_type in MESSAGE_COLUMNS_ADDED.items():
            if name in have:
                continue
            try:
                with self.engine.begin() as conn:
                    conn.execute(text(f"ALTER TABLE messages ADD COLUMN {name} {sql_type}"))
            except DBAPIError:
                if name not in {c["name"] for c in inspect(self.engine).get_columns("messages")}:
                    raise

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
    def _insert_ignoring_duplicates(self, table: Any, rows: list[dict[str, Any]]) -> int:
        """Rows inserted (those whose key already existed are skipped)."""
        if self.engine.dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as dialect_insert
        else:
            from sqlalchemy.dialects.sqlite import insert as dialect_insert
        with self.session() as s:
            res = s.execute(dialect_insert(table).on_conflict_do_nothing(), rows)
        n = getattr(res, "rowcount", -1)
        return len(rows) if n is None or n < 0 else int(n)

    def add_predictions(
        self, records: Iterable[dict[str, Any]], *, ignore_duplicates: bool = False
    ) -> int:
        """Insert prediction records. With `ignore_duplicates` a request id already stored is
        skipped, which makes re-collecting a journal after a crash harmless."""
        rows = []
        for r in records:
            row = dict(r)
            row["inputs"], row["inputs_f32"] = pack_inputs(row.get("inputs"))
            rows.append(row)
        if not rows:
            return 0
        if ignore_duplicates:
            return self._insert_ignoring_duplicates(Prediction.__table__, rows)
        else:
            with self.session() as s:
                s.execute(insert(Prediction), rows)
        return len(rows)

    def add_shadow_predictions(self, records: Iterable[dict[str, Any]]) -> int:
        rows = [dict(r) for r in records]
        return self._insert_ignoring_duplicates(ShadowPrediction.__table__, rows) if rows else 0

    def prediction_window(
        self,
        service: str,
        *,
        model_version: str | None = None,
        after_id: int | None = None,
        upto_id: int | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int | None = None,
        labelled_only: bool = False,
        with_inputs: bool = True,
        with_shadow: bool = False,
    ) -> PredictionWindow:
        """A window of the log as columns (what agents read): one query, no row objects."""
        p, lab = Prediction.__table__.c, Label.__table__.c
        # JSON columns come back as text and are decoded here in one pass (SQLAlchemy's
        # per-value JSON processing costs more than the query itself).
        cols = [p.id, p.request_id, p.model_version, p.ts, p.latency_ms,
                type_coerce(p.outputs, Text), type_coerce(lab.label, Text)]
        if with_inputs:
            cols += [type_coerce(p.inputs, Text), p.inputs_f32]
        frm = Prediction.__table__.join(
            Label.__table__, lab.request_id == p.request_id, isouter=not labelled_only
        )
        if with_shadow:
            sh = ShadowPrediction.__table__.c
            cols += [sh.model_version.label("shadow_version"),
                     type_coerce(sh.outputs, Text).label("shadow_outputs")]
            frm = frm.join(ShadowPrediction.__table__, sh.request_id == p.request_id, isouter=True)
        q = select(*cols).select_from(frm).where(p.service == service)
        if model_version is not None:
            q = q.where(p.model_version == model_version)
        if after_id is not None:
            q = q.where(p.id > after_id)
        if upto_id is not None:
            q = q.where(p.id <= upto_id)
        if since is not None:
            q = q.where(p.ts >= since)
        if until is not None:
            q = q.where(p.ts < until)
        if limit is not None:
            q = q.order_by(p.id).limit(limit)
        with self.engine.connect() as conn:
            rows = conn.execute(q).all()
        # Sorted here, not by the database: an ORDER BY makes SQLite sort the input blobs.
        rows.sort(key=lambda r: r[0])
        cols_ = list(zip(*rows, strict=True)) if rows else [()] * len(cols)
        win = PredictionWindow(
            ids=np.asarray(cols_[0], dtype=np.int64), request_ids=list(cols_[1]),
            model_versions=list(cols_[2]), ts=np.asarray(cols_[3], dtype=np.float64),
            latency_ms=np.asarray(cols_[4], dtype=np.float64), outputs=_json_values(cols_[5]),
            labels=_json_values(cols_[6]),
        )
        if with_inputs:
            win.inputs = stack_inputs(_json_values(cols_[7]), list(cols_[8]))
        if with_shadow:
            win.shadow_versions, win.shadow_outputs = list(cols_[-2]), _json_values(cols_[-1])
        return win

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
        """A window of the prediction log as one dict per record (see `prediction_window`)."""
        w = self.prediction_window(service, after_id=after_id, upto_id=upto_id, since=since,
                                   until=until, limit=limit, labelled_only=labelled_only)
        inputs = w.inputs.tolist() if isinstance(w.inputs, np.ndarray) else (w.inputs or [])
        return [
            {"id": int(w.ids[i]), "request_id": w.request_ids[i], "service": service,
             "model_version": w.model_versions[i], "ts": float(w.ts[i]), "inputs": inputs[i],
             "outputs": w.outputs[i], "latency_ms": float(w.latency_ms[i]), "label": w.labels[i]}
            for i in range(len(w))
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

    def record_decision(
        self,
        agent: str,
        sensor: str,
        rule: str,
        fired: bool,
        evidence: dict[str, Any],
        service: str | None,
        actions: list[Any],
        key: str,
        state: dict[str, Any] | None = None,
        pending: tuple[str, dict[str, Any]] | None = None,
    ) -> bool:
        """A judgement, the agent state its rule wrote and (if it must act) a pending marker,
        in one transaction: a crash leaves all or none. False if the key was recorded before."""
        now = time.time()
        try:
            with self.session() as s:
                s.add(Decision(key=key, ts=now, agent=agent, sensor=sensor, rule=rule, fired=fired,
                               evidence=evidence, service=service, actions=actions))
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
        with self.session() as s:
            s.execute(update(Decision).where(Decision.key == key).values(actions=actions))
            if pending_key is not None:
                s.execute(delete(AgentState).where(AgentState.agent == agent,
                                                   AgentState.key == pending_key))

    def get_decision(self, key: str) -> Decision | None:
        with self.session() as s:
            return s.scalars(select(Decision).where(Decision.key == key)).first()

    def recent_decisions(self, agent: str, limit: int = 50, fired: bool | None = None) -> Sequence[Decision]:
        """Newest first."""
        q = select(Decision).where(Decision.agent == agent).order_by(Decision.id.desc()).limit(limit)
        if fired is not None:
            q = q.where(Decision.fired == fired)
        with self.session() as s:
            return s.scalars(q).all()

    def recent_events(self, source: str, limit: int = 50) -> Sequence[Event]:
        """Newest first."""
        q = select(Event).where(Event.source == source).order_by(Event.id.desc()).limit(limit)
        with self.session() as s:
            return s.scalars(q).all()

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

    def claim_action(
        self, key: str, agent: str, kind: str, retry_failed: bool = False,
    ) -> tuple[Action, int]:
        """Claim an action key: (action, attempt) where attempt is 1 for a new action, 2, 3 ...
        when an earlier claimant died while running it, and 0 when it already finished. With
        `retry_failed`, a failed action is claimed again too (its result says `retry: failed`:
        the earlier call ended in an error, it was not cut off)."""
        try:
            with self.session() as s:
                a = Action(key=key, agent=agent, kind=kind, status="running", created_at=time.time(),
                           result={"attempt": 1})
                s.add(a)
            return a, 1
        except IntegrityError:
            with self.session() as s:
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
        with self.session() as s:
            return list(s.scalars(q).all())

    def ack_message(self, message_id: int) -> None:
        with self.session() as s:
            s.execute(
                update(Message)
                .where(Message.id == message_id)
                .values(status="done", handled_at=time.time(), retry_at=None)
            )

    def start_message_attempt(self, message_id: int, max_attempts: int) -> int:
        """Count one more try at handling a message, durably and before it starts (a message
        that kills its agent is counted too); returns this try's number (1, 2, ...), or 0 when
        `max_attempts` tries were started already (the last one was cut off)."""
        with self.session() as s:
            done = s.execute(update(Message).where(Message.id == message_id,
                                                   Message.attempts < max_attempts)
                             .values(attempts=Message.attempts + 1)).rowcount
            if not done:
                return 0
            return int(s.scalars(select(Message.attempts).where(Message.id == message_id)).one())

    def fail_message(
        self, message_id: int, error: str, *, retry_at: float | None = None,
        dead_letter: tuple[str, dict[str, Any]] | None = None,
    ) -> None:
        """Record a failed try: the message waits until `retry_at`, or is dead-lettered with
        `dead_letter` = (agent, event payload) stored as a `message_dead_lettered` event in the
        same transaction."""
        values: dict[str, Any] = {"error": error[:4000], "retry_at": retry_at}
        if dead_letter is not None:
            values.update(status="dead", handled_at=time.time(), retry_at=None)
        with self.session() as s:
            s.execute(update(Message).where(Message.id == message_id, Message.status == "pending")
                      .values(**values))
            if dead_letter is not None:
                s.add(Event(ts=time.time(), source=dead_letter[0], kind="message_dead_lettered",
                            service=None, payload=dead_letter[1]))

    def requeue_message(self, recipient: str, message_id: int) -> Message:
        """Deliver a dead-lettered message again, with its tries counted from zero. KeyError
        if `recipient` has no such message, ValueError if it is not dead-lettered."""
        with self.session() as s:
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
        with self.session() as s:
            return s.get(Message, message_id)

    def list_messages(
        self, recipient: str | None = None, status: str | None = None, limit: int | None = None,
    ) -> Sequence[Message]:
        """Oldest first; with `limit`, the newest `limit` of them."""
        q = select(Message)
        if recipient:
            q = q.where(Message.recipient == recipient)
        if status:
            q = q.where(Message.status == status)
        if limit is not None:
            q = q.order_by(Message.id.desc()).limit(limit)
        else:
            q = q.order_by(Message.id)
        with self.session() as s:
            rows = list(s.scalars(q).all())
        return rows[::-1] if limit is not None else rows

    def count_messages(self, recipient: str) -> dict[str, int]:
        """{status: n} of a recipient's messages."""
        with self.session() as s:
            rows = s.execute(select(Message.status, func.count()).where(Message.recipient == recipient)
                             .group_by(Message.status)).all()
        return {str(st): int(n) for st, n in rows}

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

    def state_items(self, agent: str, prefix: str) -> dict[str, Any]:
        with self.session() as s:
            rows = s.scalars(select(AgentState).where(
                AgentState.agent == agent, AgentState.key.startswith(prefix, autoescape=True))).all()
            return {r.key: r.value for r in rows}

    def delete_state(self, agent: str, key: str) -> None:
        with self.session() as s:
            s.execute(delete(AgentState).where(AgentState.agent == agent, AgentState.key == key))

    def register_agent(
        self, name: str, app: str, role: str, pid: int,
        api_host: str | None = None, api_port: int | None = None,
    ) -> None:
        now = time.time()
        with self.session() as s:
            s.execute(delete(AgentProcess).where(AgentProcess.name == name))
            s.add(
                AgentProcess(
                    name=name, app=app, role=role, pid=pid, status="running",
                    started_at=now, heartbeat=now, api_host=api_host, api_port=api_port,
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

    # -- leases (one actor per service at a time) ----------------------------------------------
    def acquire_lease(
        self, name: str, holder: str, ttl_s: float, *, purpose: str = "", now: float | None = None
    ) -> bool:
        """Take `name` for `ttl_s` seconds if it is free, expired, or already `holder`'s (then
        it is extended). Each step is one atomic statement, so of two racing claimants on
        SQLite or PostgreSQL exactly one wins."""
        if ttl_s <= 0:
            raise ValueError(f"a lease needs a positive ttl, got {ttl_s}")
        t = time.time() if now is None else now
        with self.session() as s:
            took = s.execute(  # expired (or released): whoever asks first takes it over
                update(Lease)
                .where(Lease.name == name, Lease.expires_at <= t)
                .values(holder=holder, expires_at=t + ttl_s, acquired_at=t, purpose=purpose,
                        generation=Lease.generation + 1)
            ).rowcount or s.execute(  # still ours: extend it
                update(Lease)
                .where(Lease.name == name, Lease.holder == holder)
                .values(expires_at=t + ttl_s, purpose=purpose)
            ).rowcount
        if took:
            return True
        try:  # never leased: the primary key lets one of two racing inserts through
            with self.session() as s:
                s.add(Lease(name=name, holder=holder, expires_at=t + ttl_s, acquired_at=t,
                            generation=1, purpose=purpose))
            return True
        except IntegrityError:
            return False

    def renew_lease(self, name: str, holder: str, ttl_s: float, *, now: float | None = None) -> bool:
        """Extend a lease `holder` still has (not one that expired and was taken over)."""
        t = time.time() if now is None else now
        with self.session() as s:
            return bool(s.execute(
                update(Lease)
                .where(Lease.name == name, Lease.holder == holder, Lease.expires_at > t)
                .values(expires_at=t + ttl_s)
            ).rowcount)

    def release_lease(self, name: str, holder: str, *, now: float | None = None) -> bool:
        """Give a lease back early (the row stays, so `generation` keeps counting); False if
        `holder` did not hold it."""
        t = time.time() if now is None else now
        with self.session() as s:
            return bool(s.execute(
                update(Lease)
                .where(Lease.name == name, Lease.holder == holder, Lease.expires_at > t)
                .values(expires_at=t)
            ).rowcount)

    def get_lease(self, name: str, *, now: float | None = None) -> Lease | None:
        """The live lease on `name`, or None when it is free or expired."""
        t = time.time() if now is None else now
        with self.session() as s:
            row = s.get(Lease, name)
            return row if row is not None and row.expires_at > t else None


def open_store(url: str | None = None) -> Store:
    from scanflow.settings import get_settings

    settings = get_settings()
    if url is None:
        settings.ensure()
    return Store(url or settings.store)
