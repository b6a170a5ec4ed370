"""`Store`: the one object callers hold, composed of one repository per aggregate.

Each aggregate has a typed interface (a Protocol, in the spirit of Dagster's `RunStorage` /
`EventLogStorage` and MLflow's `AbstractStore`) and a SQLAlchemy implementation; the backend is
chosen by the URL. New code should reach a repository through its attribute (`store.runs`,
`store.deployments`, `store.predictions`, `store.agents`, `store.decisions`); the flat methods
below are the same calls, kept so that every caller written before the split works unchanged.
Composition rather than mixins: a repository can be replaced on its own (another backend, a
test double for one aggregate) without a class hierarchy, and each stays a small module.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from scanflow.jsonsafe import json_safe
from scanflow.store.agents import AgentRepository, SqlAgentRepository
from scanflow.store.applications import ApplicationRepository, SqlApplicationRepository
from scanflow.store.db import Database, normalise_url
from scanflow.store.decisions import DecisionRepository, SqlDecisionRepository
from scanflow.store.deployments import DeploymentRepository, SqlDeploymentRepository
from scanflow.store.identity import IdentityRepository, SqlIdentityRepository
from scanflow.store.migrate import ensure_schema
from scanflow.store.predictions import PredictionRepository, SqlPredictionRepository
from scanflow.store.runs import TERMINAL, RunRepository, SqlRunRepository
from scanflow.store.schema import (
    Action,
    AgentProcess,
    Decision,
    Deployment,
    Event,
    Lease,
    Message,
    StepRun,
    WorkflowRun,
)
from scanflow.store.signing import MessageSigner, load_or_create_key
from scanflow.store.window import PredictionWindow

__all__ = ["TERMINAL", "Store", "normalise_url", "open_store"]


class Store:
    """Control-plane state behind one interface (SQLite or PostgreSQL). Opening it brings the
    schema to head (see `scanflow.store.migrate`); at head that is one small query."""

    runs: RunRepository
    deployments: DeploymentRepository
    prediction_log: PredictionRepository
    agents: AgentRepository
    decisions: DecisionRepository
    identities: IdentityRepository
    applications: ApplicationRepository

    def __init__(self, url: str, *, signer: MessageSigner | None = None) -> None:
        self.signer = signer  # signs messages sent, checks those received (`store.signing`)
        self.db = Database(url)
        self.url = self.db.url
        self.engine: Engine = self.db.engine
        ensure_schema(self.engine)
        self.runs = SqlRunRepository(self.db)
        self.deployments = SqlDeploymentRepository(self.db)
        self.prediction_log = SqlPredictionRepository(self.db)
        self.agents = SqlAgentRepository(self.db)
        self.decisions = SqlDecisionRepository(self.db)
        self.identities = SqlIdentityRepository(self.db)
        self.applications = SqlApplicationRepository(self.db)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A raw ORM session (one transaction): for the store's own modules and tests."""
        with self.db.session() as s:
            yield s

    def close(self) -> None:
        self.db.dispose()

    # -- workflow runs (store.runs) -------------------------------------------------------------
    def create_run(
        self, app: str, team: str, workflow: str, params: dict[str, Any],
        trigger: dict[str, Any] | None = None, *, status: str = "pending",
        spec_path: str | None = None, use_cache: bool = True,
    ) -> WorkflowRun:
        return self.runs.create_run(app, team, workflow, params, trigger, status=status,
                                    spec_path=spec_path, use_cache=use_cache)

    def update_run(self, run_id: str, **fields: Any) -> None:
        self.runs.update_run(run_id, **fields)

    def get_run(self, run_id: str) -> WorkflowRun | None:
        return self.runs.get_run(run_id)

    def list_runs(
        self, workflow: str | None = None, limit: int = 50, status: Sequence[str] | None = None
    ) -> Sequence[WorkflowRun]:
        return self.runs.list_runs(workflow, limit, status)

    def upsert_step(self, run_id: str, step: str, **fields: Any) -> None:
        self.runs.upsert_step(run_id, step, **fields)

    def create_steps(self, run_id: str, names: Sequence[str]) -> dict[str, int]:
        return self.runs.create_steps(run_id, names)

    def update_steps(self, rows: Sequence[dict[str, Any]]) -> None:
        self.runs.update_steps(rows)

    def list_steps(self, run_id: str) -> Sequence[StepRun]:
        return self.runs.list_steps(run_id)

    def keep_step_logs(self, rows: Sequence[tuple[str, str, int, str]]) -> None:
        self.runs.keep_step_logs(rows)

    def step_attempt_logs(self, run_id: str, step: str) -> Sequence[tuple[int, str]]:
        return self.runs.step_attempt_logs(run_id, step)

    # -- deployments (store.deployments) --------------------------------------------------------
    def put_deployment(self, **fields: Any) -> Deployment:
        return self.deployments.put_deployment(**fields)

    def update_deployment(self, service: str, **fields: Any) -> None:
        self.deployments.update_deployment(service, **fields)

    def get_deployment(self, service: str) -> Deployment | None:
        return self.deployments.get_deployment(service)

    def list_deployments(self) -> Sequence[Deployment]:
        return self.deployments.list_deployments()

    # -- prediction log (store.prediction_log) -------------------------------------------------
    def add_predictions(
        self, records: Iterable[dict[str, Any]], *, ignore_duplicates: bool = False
    ) -> int:
        return self.prediction_log.add_predictions(records, ignore_duplicates=ignore_duplicates)

    def add_shadow_predictions(self, records: Iterable[dict[str, Any]]) -> int:
        return self.prediction_log.add_shadow_predictions(records)

    def add_labels(self, labels: dict[str, Any]) -> int:
        return self.prediction_log.add_labels(labels)

    def prediction_window(
        self, service: str, *, model_version: str | None = None, after_id: int | None = None,
        upto_id: int | None = None, since: float | None = None, until: float | None = None,
        limit: int | None = None, labelled_only: bool = False, with_inputs: bool = True,
        with_shadow: bool = False,
    ) -> PredictionWindow:
        return self.prediction_log.prediction_window(
            service, model_version=model_version, after_id=after_id, upto_id=upto_id, since=since,
            until=until, limit=limit, labelled_only=labelled_only, with_inputs=with_inputs,
            with_shadow=with_shadow)

    def predictions(
        self, service: str, *, after_id: int | None = None, upto_id: int | None = None,
        since: float | None = None, until: float | None = None, limit: int | None = None,
        labelled_only: bool = False,
    ) -> list[dict[str, Any]]:
        return self.prediction_log.predictions(service, after_id=after_id, upto_id=upto_id,
                                                since=since, until=until, limit=limit,
                                                labelled_only=labelled_only)

    def prediction_ids(
        self, service: str, after_id: int = 0, before_ts: float | None = None, limit: int = 100_000
    ) -> list[tuple[int, float]]:
        return self.prediction_log.prediction_ids(service, after_id, before_ts, limit)

    def count_predictions(self, service: str, after_id: int | None = None) -> tuple[int, int]:
        return self.prediction_log.count_predictions(service, after_id)

    # -- events, decisions, actions (store.decisions) -------------------------------------------
    def add_event(self, source: str, kind: str, service: str | None = None, **payload: Any) -> Event:
        return self.decisions.add_event(source, kind, service, **payload)

    def list_events(
        self, service: str | None = None, kinds: Sequence[str] | None = None,
        since: float | None = None, limit: int | None = 1000,
    ) -> Sequence[Event]:
        return self.decisions.list_events(service, kinds, since, limit)

    def recent_events(self, source: str, limit: int = 50) -> Sequence[Event]:
        return self.decisions.recent_events(source, limit)

    def latest_events(self, service: str, kinds: Sequence[str], limit: int = 1) -> Sequence[Event]:
        return self.decisions.latest_events(service, kinds, limit)

    def add_decision(
        self, agent: str, sensor: str, rule: str, fired: bool, evidence: dict[str, Any],
        service: str | None = None, actions: list[Any] | None = None, key: str | None = None,
    ) -> Decision:
        return self.decisions.add_decision(agent, sensor, rule, fired, evidence, service, actions, key)

    def record_decision(
        self, agent: str, sensor: str, rule: str, fired: bool, evidence: dict[str, Any],
        service: str | None, actions: list[Any], key: str, state: dict[str, Any] | None = None,
        pending: tuple[str, dict[str, Any]] | None = None, by: str | None = None,
    ) -> bool:
        return self.decisions.record_decision(agent, sensor, rule, fired, evidence, service,
                                              actions, key, state, pending, by=by)

    def complete_decision(self, key: str, actions: list[Any], agent: str, pending_key: str | None) -> None:
        self.decisions.complete_decision(key, actions, agent, pending_key)

    def has_decision(self, key: str) -> bool:
        return self.decisions.has_decision(key)

    def list_decisions(
        self, agent: str | None = None, service: str | None = None, fired: bool | None = None
    ) -> Sequence[Decision]:
        return self.decisions.list_decisions(agent, service, fired)

    def recent_decisions(self, agent: str, limit: int = 50, fired: bool | None = None) -> Sequence[Decision]:
        return self.decisions.recent_decisions(agent, limit, fired)

    def begin_action(self, key: str, agent: str, kind: str) -> tuple[Action, bool]:
        return self.decisions.begin_action(key, agent, kind)

    def claim_action(
        self, key: str, agent: str, kind: str, retry_failed: bool = False,
    ) -> tuple[Action, int]:
        return self.decisions.claim_action(key, agent, kind, retry_failed)

    def finish_action(self, key: str, status: str, result: dict[str, Any]) -> None:
        self.decisions.finish_action(key, status, result)

    def list_actions(self, agent: str | None = None) -> Sequence[Action]:
        return self.decisions.list_actions(agent)

    # -- messages, agent state, processes, leases (store.agents) --------------------------------
    def send_message(self, sender: str, recipient: str, kind: str, payload: dict[str, Any],
                     key: str | None = None, *, by: str | None = None) -> bool:
        """Durable send, signed with the store's `signer` when it has one; `by` is the
        sender's identity (an agent's token's user). True if new."""
        key = key or uuid.uuid4().hex
        payload = json_safe(payload)
        signature = (self.signer.sign(key, sender, recipient, kind, payload, by)
                     if self.signer is not None else None)
        return self.agents.send_message(sender, recipient, kind, payload, key,
                                        by=by, signature=signature)

    def inbox(self, recipient: str, kinds: Sequence[str] | None = None, limit: int = 100) -> list[Message]:
        """The recipient's deliverable messages. With a `signer`, only those whose signature
        verifies: any other is dead-lettered on the spot as `message_rejected` (never
        retried, never acted on) and left out."""
        msgs = self.agents.inbox(recipient, kinds, limit)
        if self.signer is None:
            return msgs
        good = []
        for m in msgs:
            if self.signer.verify(m.signature, m.key, m.sender, m.recipient, m.kind, m.payload, m.by):
                good.append(m)
                continue
            why = "unsigned" if not m.signature else "signature does not verify"
            self.agents.fail_message(m.id, f"rejected: {why}", dead_letter=(recipient, {
                "message_id": m.id, "key": m.key, "sender": m.sender, "by": m.by,
                "message_kind": m.kind, "rejected": why}), event_kind="message_rejected")
        return good

    def ack_message(self, message_id: int) -> None:
        self.agents.ack_message(message_id)

    def start_message_attempt(self, message_id: int, max_attempts: int) -> int:
        return self.agents.start_message_attempt(message_id, max_attempts)

    def fail_message(self, message_id: int, error: str, *, retry_at: float | None = None,
                     dead_letter: tuple[str, dict[str, Any]] | None = None) -> None:
        self.agents.fail_message(message_id, error, retry_at=retry_at, dead_letter=dead_letter)

    def requeue_message(self, recipient: str, message_id: int) -> Message:
        return self.agents.requeue_message(recipient, message_id)

    def get_message(self, message_id: int) -> Message | None:
        return self.agents.get_message(message_id)

    def messages_by_ids(self, ids: Sequence[int]) -> list[Message]:
        return self.agents.messages_by_ids(ids)

    def list_messages(self, recipient: str | None = None, status: str | None = None,
                      limit: int | None = None) -> Sequence[Message]:
        return self.agents.list_messages(recipient, status, limit)

    def count_messages(self, recipient: str) -> dict[str, int]:
        return self.agents.count_messages(recipient)

    def get_state(self, agent: str, key: str, default: Any = None) -> Any:
        return self.agents.get_state(agent, key, default)

    def set_state(self, agent: str, key: str, value: Any) -> None:
        self.agents.set_state(agent, key, value)

    def state_items(self, agent: str, prefix: str) -> dict[str, Any]:
        return self.agents.state_items(agent, prefix)

    def delete_state(self, agent: str, key: str) -> None:
        self.agents.delete_state(agent, key)

    def register_agent(self, name: str, app: str, role: str, pid: int,
                       api_host: str | None = None, api_port: int | None = None) -> None:
        self.agents.register_agent(name, app, role, pid, api_host, api_port)

    def agent_heartbeat(self, name: str, status: str = "running") -> None:
        self.agents.agent_heartbeat(name, status)

    def list_agents(self) -> Sequence[AgentProcess]:
        return self.agents.list_agents()

    def acquire_lease(self, name: str, holder: str, ttl_s: float, *, purpose: str = "",
                      now: float | None = None) -> bool:
        return self.agents.acquire_lease(name, holder, ttl_s, purpose=purpose, now=now)

    def renew_lease(self, name: str, holder: str, ttl_s: float, *, now: float | None = None) -> bool:
        return self.agents.renew_lease(name, holder, ttl_s, now=now)

    def release_lease(self, name: str, holder: str, *, now: float | None = None) -> bool:
        return self.agents.release_lease(name, holder, now=now)

    def get_lease(self, name: str, *, now: float | None = None) -> Lease | None:
        return self.agents.get_lease(name, now=now)


def open_store(url: str | None = None) -> Store:
    from scanflow.settings import get_settings  # lazy: pydantic-settings (~0.1 s), only without a URL

    settings = get_settings()
    if url is None:
        settings.ensure()
    return Store(url or settings.store, signer=MessageSigner(load_or_create_key(settings.message_key_path)))
