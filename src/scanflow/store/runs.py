"""Workflow runs and their step runs: what the engine writes and `scanflow runs` reads."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any, Protocol

from sqlalchemy import bindparam, insert, select, update

from scanflow.store.db import Database, rowcount
from scanflow.store.schema import StepLog, StepRun, WorkflowRun

TERMINAL = {"succeeded", "failed", "cancelled", "interrupted", "skipped"}

# cache key -> (run id, step name, outputs) of a successful earlier step run
CacheIndex = dict[str, tuple[str, str, dict[str, str]]]


class RunRepository(Protocol):
    """Runs and steps of workflows (in the spirit of Dagster's `RunStorage`)."""

    def create_run(
        self, app: str, team: str, workflow: str, params: dict[str, Any],
        trigger: dict[str, Any] | None = None, *, status: str = "pending",
        spec_path: str | None = None, use_cache: bool = True,
    ) -> WorkflowRun: ...

    def update_run(self, run_id: str, **fields: Any) -> None: ...

    def claim_run(self, run_id: str, expect: str, status: str) -> bool: ...

    def get_run(self, run_id: str) -> WorkflowRun | None: ...

    def list_runs(
        self, workflow: str | None = None, limit: int = 50, status: Sequence[str] | None = None,
        *, teams: Sequence[str] | None = None, offset: int = 0,
    ) -> Sequence[WorkflowRun]: ...

    def upsert_step(self, run_id: str, step: str, **fields: Any) -> None: ...

    def create_steps(self, run_id: str, names: Sequence[str]) -> dict[str, int]: ...

    def update_steps(self, rows: Sequence[dict[str, Any]]) -> None: ...

    def list_steps(self, run_id: str) -> Sequence[StepRun]: ...

    def cache_index(self, app: str, workflow: str, exclude_run: str | None = None) -> CacheIndex: ...

    def keep_step_logs(self, rows: Sequence[tuple[str, str, int, str]]) -> None: ...

    def step_attempt_logs(self, run_id: str, step: str) -> Sequence[tuple[int, str]]: ...


class SqlRunRepository:
    """`RunRepository` on SQLAlchemy (SQLite or PostgreSQL)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def create_run(
        self, app: str, team: str, workflow: str, params: dict[str, Any],
        trigger: dict[str, Any] | None = None, *, status: str = "pending",
        spec_path: str | None = None, use_cache: bool = True,
    ) -> WorkflowRun:
        run = WorkflowRun(
            id=uuid.uuid4().hex, app=app, team=team, workflow=workflow, status=status,
            params=params, trigger=trigger or {"by": "user"}, spec_path=spec_path,
            use_cache=use_cache, cancel_requested=False, created_at=time.time(),
        )
        with self.db.session() as s:
            s.add(run)
        return run

    def update_run(self, run_id: str, **fields: Any) -> None:
        with self.db.session() as s:
            s.execute(update(WorkflowRun).where(WorkflowRun.id == run_id).values(**fields))

    def claim_run(self, run_id: str, expect: str, status: str) -> bool:
        """Move a run from `expect` to `status` unless someone else moved it first (compare and
        set: of two run queues on one store, one takes a queued run). True if this call did."""
        with self.db.session() as s:
            return rowcount(s.execute(update(WorkflowRun).where(
                WorkflowRun.id == run_id, WorkflowRun.status == expect).values(status=status))) == 1

    def get_run(self, run_id: str) -> WorkflowRun | None:
        """By id, or by an unambiguous prefix (the CLI prints short ids)."""
        with self.db.session() as s:
            run = s.get(WorkflowRun, run_id)
            if run is None:
                rows = s.scalars(
                    select(WorkflowRun).where(WorkflowRun.id.startswith(run_id)).limit(2)
                ).all()
                run = rows[0] if len(rows) == 1 else None
            return run

    def list_runs(
        self, workflow: str | None = None, limit: int = 50, status: Sequence[str] | None = None,
        *, teams: Sequence[str] | None = None, offset: int = 0,
    ) -> Sequence[WorkflowRun]:
        """Newest first; `teams` keeps only those teams' runs, `offset` skips the newest few."""
        q = (select(WorkflowRun).order_by(WorkflowRun.created_at.desc(), WorkflowRun.id)
             .limit(limit).offset(offset))
        if teams is not None:
            q = q.where(WorkflowRun.team.in_(list(teams)))
        if workflow:
            q = q.where(WorkflowRun.workflow == workflow)
        if status:
            q = q.where(WorkflowRun.status.in_(list(status)))
        with self.db.session() as s:
            return s.scalars(q).all()

    def upsert_step(self, run_id: str, step: str, **fields: Any) -> None:
        with self.db.session() as s:
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
        with self.db.session() as s:
            have = dict(s.execute(q).tuples().all())
            new = [{"run_id": run_id, "step": n, "status": "pending", "attempts": 0, "outputs": {}}
                   for n in names if n not in have]
            if new:
                s.execute(insert(StepRun), new)
        with self.db.session() as s:
            return dict(s.execute(q).tuples().all())

    def update_steps(self, rows: Sequence[dict[str, Any]]) -> None:
        """Bulk update by primary key (`id` in each dict): one transaction for many steps, one
        Core executemany per set of columns (the ORM's bulk update cost ~3x more per row: it
        was a fifth of a Ray run's driver time)."""
        groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for row in rows:
            cols = tuple(sorted(k for k in row if k != "id"))
            groups.setdefault(cols, []).append({**row, "row_id": row["id"]})
        if not groups:
            return
        with self.db.session() as s:
            conn = s.connection()  # Core: no ORM bookkeeping per row
            for cols, batch in groups.items():
                stmt = (update(StepRun).where(StepRun.id == bindparam("row_id"))
                        .values({c: bindparam(c) for c in cols}))
                conn.execute(stmt, batch)

    def keep_step_logs(self, rows: Sequence[tuple[str, str, int, str]]) -> None:
        """Ended attempts' logs, (run id, step, attempt, text) each, in one transaction; an
        attempt kept before keeps its first text (an attempt ends once)."""
        if not rows:
            return
        with self.db.session() as s:
            texts = {(r, st, a): t for r, st, a, t in reversed(rows)}  # the first of each wins
            have = set(s.execute(select(StepLog.run_id, StepLog.step, StepLog.attempt)
                                 .where(StepLog.run_id.in_({r for r, _, _ in texts}))).tuples().all())
            new = [{"run_id": r, "step": st, "attempt": a, "text": t}
                   for (r, st, a), t in texts.items() if (r, st, a) not in have]
            if new:
                s.execute(insert(StepLog), new)

    def step_attempt_logs(self, run_id: str, step: str) -> Sequence[tuple[int, str]]:
        """(attempt, text) of a step's ended attempts kept in the store, in attempt order."""
        with self.db.session() as s:
            return s.execute(select(StepLog.attempt, StepLog.text)
                             .where(StepLog.run_id == run_id, StepLog.step == step)
                             .order_by(StepLog.attempt)).tuples().all()

    def list_steps(self, run_id: str) -> Sequence[StepRun]:
        with self.db.session() as s:
            return s.scalars(
                select(StepRun).where(StepRun.run_id == run_id).order_by(StepRun.id)
            ).all()

    def cache_index(self, app: str, workflow: str, exclude_run: str | None = None) -> CacheIndex:
        """Cache keys of the successful step runs of one app's workflow, in one query (the engine
        loads it once per run); a later run's entry wins over an earlier one."""
        q = (
            select(StepRun.cache_key, StepRun.run_id, StepRun.step, StepRun.outputs)
            .join(WorkflowRun, WorkflowRun.id == StepRun.run_id)
            .where(WorkflowRun.app == app, WorkflowRun.workflow == workflow,
                   StepRun.status == "succeeded", StepRun.cache_key.is_not(None))
            .order_by(StepRun.id)
        )
        if exclude_run is not None:
            q = q.where(StepRun.run_id != exclude_run)
        with self.db.session() as s:
            rows = s.execute(q).tuples().all()
        return {str(k): (r, n, o or {}) for k, r, n, o in rows}
