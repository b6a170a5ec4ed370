"""Applications registered with the control-plane server: where each team's spec of an
application is (one application may have a spec per team, as the MNIST case study's data, data
science and data engineering teams do); a run, service or agent from a spec belongs to its team."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

from sqlalchemy import select

from scanflow.store.db import Database
from scanflow.store.schema import Application


class ApplicationRepository(Protocol):
    def register_app(self, name: str, team: str, spec_path: str, by: str) -> Application: ...

    def get_app(self, name: str, team: str | None = None) -> Application | None: ...

    def list_apps(self, teams: Sequence[str] | None = None) -> Sequence[Application]: ...


class SqlApplicationRepository:
    """`ApplicationRepository` on SQLAlchemy (SQLite or PostgreSQL)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def register_app(self, name: str, team: str, spec_path: str, by: str) -> Application:
        """Register or re-register team `team`'s spec of `name` (the caller has checked that `by`
        may act for `team`)."""
        with self.db.session() as s:
            row = s.get(Application, (name, team))
            if row is None:
                row = Application(name=name, team=team, spec_path=spec_path, registered_by=by,
                                  registered_at=time.time())
                s.add(row)
            else:
                row.spec_path, row.registered_by = spec_path, by
                row.registered_at = time.time()
        return row

    def get_app(self, name: str, team: str | None = None) -> Application | None:
        """Team `team`'s spec of `name`; without a team, the one spec if only one team has one."""
        with self.db.session() as s:
            if team is not None:
                return s.get(Application, (name, team))
            rows = s.scalars(select(Application).where(Application.name == name).limit(2)).all()
            return rows[0] if len(rows) == 1 else None

    def list_apps(self, teams: Sequence[str] | None = None) -> Sequence[Application]:
        with self.db.session() as s:
            q = select(Application).order_by(Application.name, Application.team)
            if teams is not None:
                q = q.where(Application.team.in_(list(teams)))
            return s.scalars(q).all()
