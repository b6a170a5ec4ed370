"""Tables of the store. Times are UNIX seconds (float): portable, indexable, cheap to window.

A change here needs a new Alembic revision in `migrations/versions/` (tests/store/test_migrations.py
fails when the revisions and these tables disagree)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, Any: JSON}


class WorkflowRun(Base):
    __tablename__ = "workflow_runs"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    app: Mapped[str] = mapped_column(String(200))
    team: Mapped[str] = mapped_column(String(200))
    workflow: Mapped[str] = mapped_column(String(200), index=True)
    status: Mapped[str] = mapped_column(String(20), index=True)
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    trigger: Mapped[dict[str, Any]] = mapped_column(default=dict)
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    spec_path: Mapped[str | None] = mapped_column(Text)
    use_cache: Mapped[bool] = mapped_column(default=True)
    owner_pid: Mapped[int | None] = mapped_column(Integer)
    owner_host: Mapped[str | None] = mapped_column(String(255))  # where owner_pid runs
    heartbeat_at: Mapped[float | None] = mapped_column(Float)  # the owner's last sign of life
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[float] = mapped_column(Float, index=True)
    started_at: Mapped[float | None] = mapped_column(Float)
    ended_at: Mapped[float | None] = mapped_column(Float)


class StepRun(Base):
    __tablename__ = "step_runs"
    __table_args__ = (UniqueConstraint("run_id", "step"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("workflow_runs.id", ondelete="CASCADE"), index=True)
    step: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20))
    exit_code: Mapped[int | None] = mapped_column(Integer)
    log_path: Mapped[str | None] = mapped_column(Text)
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64))
    outputs: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cache_key: Mapped[str | None] = mapped_column(String(64), index=True)
    cached_from: Mapped[str | None] = mapped_column(String(300))
    pid: Mapped[int | None] = mapped_column(Integer)
    started_at: Mapped[float | None] = mapped_column(Float)
    ended_at: Mapped[float | None] = mapped_column(Float)


class StepLog(Base):
    """One ended attempt's log, as its node wrote it: kept in the shared store for a step that
    ran on another machine (the ray backend), where any `scanflow logs` reads it."""

    __tablename__ = "step_logs"
    run_id: Mapped[str] = mapped_column(ForeignKey("workflow_runs.id", ondelete="CASCADE"),
                                        primary_key=True)
    step: Mapped[str] = mapped_column(String(200), primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True)
    text: Mapped[str] = mapped_column(Text)


class Deployment(Base):
    __tablename__ = "deployments"
    service: Mapped[str] = mapped_column(String(200), primary_key=True)
    app: Mapped[str] = mapped_column(String(200))
    team: Mapped[str] = mapped_column(String(200))
    model_name: Mapped[str] = mapped_column(String(200))
    alias: Mapped[str] = mapped_column(String(100))
    model_version: Mapped[str | None] = mapped_column(String(50))
    host: Mapped[str] = mapped_column(String(100))
    port: Mapped[int] = mapped_column(Integer)
    pid: Mapped[int | None] = mapped_column(Integer)
    replicas: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(20))
    workdir: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[float] = mapped_column(Float)
    previous_version: Mapped[str | None] = mapped_column(String(50), default=None)
    canary_version: Mapped[str | None] = mapped_column(String(50), default=None)
    canary_share: Mapped[float] = mapped_column(Float, default=0.0)
    shadow_version: Mapped[str | None] = mapped_column(String(50), default=None)
    # The service config served now, where a backend keeps it in the store (ray: its replicas
    # and deployers run on any machine); None where it is a file of the service's folder (local).
    config: Mapped[Any] = mapped_column(JSON, nullable=True, default=None)


class Prediction(Base):
    """One answered instance. A flat numeric input is kept as bytes so an agent reads a 10k
    window in milliseconds: as uint8 (`inputs_u8`) when every value is an integer in 0..255
    (exact; 784 bytes for an MNIST digit), else as float32 (`inputs_f32`, 3 KB for MNIST instead
    of ~14 KB of JSON); anything else stays JSON in `inputs`."""

    __tablename__ = "predictions"
    __table_args__ = (
        Index("ix_predictions_service_ts", "service", "ts"),
        Index("ix_predictions_service_version_ts", "service", "model_version", "ts"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(64), unique=True)
    service: Mapped[str] = mapped_column(String(200))
    model_version: Mapped[str | None] = mapped_column(String(50))
    ts: Mapped[float] = mapped_column(Float)
    inputs: Mapped[Any] = mapped_column(JSON, nullable=True)
    inputs_f32: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    inputs_u8: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    outputs: Mapped[Any] = mapped_column(JSON)
    latency_ms: Mapped[float] = mapped_column(Float)


class ShadowPrediction(Base):
    """The answer a shadow version gave to a live request (never returned to the client)."""

    __tablename__ = "shadow_predictions"
    request_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    service: Mapped[str] = mapped_column(String(200), index=True)
    model_version: Mapped[str] = mapped_column(String(50))
    ts: Mapped[float] = mapped_column(Float)
    outputs: Mapped[Any] = mapped_column(JSON)
    latency_ms: Mapped[float] = mapped_column(Float)


class Label(Base):
    """Labels arrive later than predictions (and may beat a batched write): kept apart, joined."""

    __tablename__ = "labels"
    request_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    label: Mapped[Any] = mapped_column(JSON)
    ts: Mapped[float] = mapped_column(Float)


class Event(Base):
    __tablename__ = "events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    ts: Mapped[float] = mapped_column(Float, index=True)
    source: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(100), index=True)
    service: Mapped[str | None] = mapped_column(String(200), index=True)
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)


class Decision(Base):
    __tablename__ = "decisions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    key: Mapped[str | None] = mapped_column(String(300), unique=True)
    ts: Mapped[float] = mapped_column(Float, index=True)
    agent: Mapped[str] = mapped_column(String(200), index=True)
    sensor: Mapped[str] = mapped_column(String(200))
    rule: Mapped[str] = mapped_column(String(200))
    fired: Mapped[bool]
    service: Mapped[str | None] = mapped_column(String(200))
    evidence: Mapped[dict[str, Any]] = mapped_column(default=dict)
    actions: Mapped[list[Any]] = mapped_column(default=list)
    by: Mapped[str | None] = mapped_column(String(200), default=None)  # the identity it acted as


class Action(Base):
    """An actuator call, keyed so that a replay after a crash does not act twice."""

    __tablename__ = "actions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(String(300), unique=True)
    agent: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20))
    result: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[float] = mapped_column(Float)
    ended_at: Mapped[float | None] = mapped_column(Float)


class Message(Base):
    __tablename__ = "messages"
    __table_args__ = (Index("ix_messages_inbox", "recipient", "status", "id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(String(300), unique=True)
    ts: Mapped[float] = mapped_column(Float)
    sender: Mapped[str] = mapped_column(String(200))
    recipient: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(100))
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[str] = mapped_column(String(20))  # pending | done | dead (dead-lettered)
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # handling tries started
    handled_at: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text, default=None)  # of the last failed try
    retry_at: Mapped[float | None] = mapped_column(Float, default=None)  # not delivered before
    by: Mapped[str | None] = mapped_column(String(200), default=None)  # the sender's identity
    signature: Mapped[str | None] = mapped_column(String(100), default=None)  # `store.signing`


class AgentState(Base):
    __tablename__ = "agent_state"
    agent: Mapped[str] = mapped_column(String(200), primary_key=True)
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    value: Mapped[Any] = mapped_column(JSON)
    updated_at: Mapped[float] = mapped_column(Float)


class AgentProcess(Base):
    __tablename__ = "agents"
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    app: Mapped[str] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(50))
    pid: Mapped[int | None] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(20))
    started_at: Mapped[float] = mapped_column(Float)
    heartbeat: Mapped[float | None] = mapped_column(Float)
    api_host: Mapped[str | None] = mapped_column(String(100), default=None)  # the agent's HTTP API
    api_port: Mapped[int | None] = mapped_column(Integer, default=None)


class Lease(Base):
    """Who may act on a resource (a service) now. A lease expires on its own, so a holder
    killed with -9 blocks nobody for longer than its TTL; `generation` grows on every change
    of holder (a fencing token for the audit trail)."""

    __tablename__ = "leases"
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    holder: Mapped[str] = mapped_column(String(200))
    expires_at: Mapped[float] = mapped_column(Float)
    acquired_at: Mapped[float] = mapped_column(Float)
    generation: Mapped[int] = mapped_column(Integer, default=1)
    purpose: Mapped[str] = mapped_column(Text, default="")


class Team(Base):
    """A team of the project: owns applications, runs, services, model aliases and agents."""

    __tablename__ = "teams"
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    created_at: Mapped[float] = mapped_column(Float)


class User(Base):
    """A person, or an agent's identity (`kind` = agent); `admin` may do everything."""

    __tablename__ = "users"
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    kind: Mapped[str] = mapped_column(String(20), default="person")  # person | agent
    admin: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[float] = mapped_column(Float)


class Membership(Base):
    """A user's role in one team (viewer, operator, owner)."""

    __tablename__ = "memberships"
    user: Mapped[str] = mapped_column(ForeignKey("users.name", ondelete="CASCADE"), primary_key=True)
    team: Mapped[str] = mapped_column(ForeignKey("teams.name", ondelete="CASCADE"), primary_key=True)
    role: Mapped[str] = mapped_column(String(20))


class TeamGrant(Base):
    """`team` lets every member of `grantee` read what it owns (the data team shares its
    dataset runs with data science)."""

    __tablename__ = "team_grants"
    team: Mapped[str] = mapped_column(ForeignKey("teams.name", ondelete="CASCADE"), primary_key=True)
    grantee: Mapped[str] = mapped_column(ForeignKey("teams.name", ondelete="CASCADE"), primary_key=True)


class Token(Base):
    """An API token: only the SHA-256 of its secret is kept, so the store's rows cannot be
    replayed; `scopes` (JSON list, or null for all) narrows what it may do below its user's roles."""

    __tablename__ = "tokens"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user: Mapped[str] = mapped_column(ForeignKey("users.name", ondelete="CASCADE"), index=True)
    secret_sha256: Mapped[str] = mapped_column(String(64))
    scopes: Mapped[Any] = mapped_column(JSON, nullable=True, default=None)
    note: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float | None] = mapped_column(Float, default=None)
    revoked_at: Mapped[float | None] = mapped_column(Float, default=None)
    last_used_at: Mapped[float | None] = mapped_column(Float, default=None)


class Application(Base):
    """An application registered with the control-plane server: the spec it runs from and the
    team that owns it (and so its runs, services and agents)."""

    __tablename__ = "applications"
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    team: Mapped[str] = mapped_column(String(200), primary_key=True)  # one app, a spec per team
    spec_path: Mapped[str] = mapped_column(Text)
    registered_by: Mapped[str] = mapped_column(String(200))
    registered_at: Mapped[float] = mapped_column(Float)
