"""Applications registered with the control-plane server: where each one's spec is and which
team owns it; a run, service or agent of an application belongs to that team."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

from sqlalchemy import select

from scanflow.store.db import Database
from scanflow.store.schema import Application


class ApplicationRepository(Protocol):
    def register_app(self, name: str, team: str, spec_path: str, by: str) -> Application: ...

    def get_app(self, name: str) -> Application | None: ...

    def list_apps(self, teams: Sequence[str] | None = None) -> Sequence[Application]: ...


class SqlApplicationRepository:
    """`ApplicationRepository` on SQLAlchemy (SQLite or PostgreSQL)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def register_app(self, name: str, team: str, spec_path: str, by: str) -> Application:
        """Register or re-register `name`; the caller has checked `by` may act for `team`, and
        that an app registered by another team is not taken over."""
        with self.db.session() as s:
            row = s.get(Application, name)
            if row is None:
                row = Application(name=name, team=team, spec_path=spec_path, registered_by=by,
                                  registered_at=time.time())
                s.add(row)
            else:
                row.team, row.spec_path, row.registered_by = team, spec_path, by
                row.registered_at = time.time()
        return row

    def get_app(self, name: str) -> Application | None:
        with self.db.session() as s:
            return s.get(Application, name)

    def list_apps(self, teams: Sequence[str] | None = None) -> Sequence[Application]:
        with self.db.session() as s:
            q = select(Application).order_by(Application.name)
            if teams is not None:
                q = q.where(Application.team.in_(list(teams)))
            return s.scalars(q).all()
