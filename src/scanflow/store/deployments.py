"""Deployments: the desired and observed state of each service, one row per service."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Protocol

from sqlalchemy import select, update

from scanflow.store.db import Database
from scanflow.store.schema import Deployment


class DeploymentRepository(Protocol):
    """One row per service; `updated_at` is stamped on every write."""

    def put_deployment(self, **fields: Any) -> Deployment: ...

    def update_deployment(self, service: str, **fields: Any) -> None: ...

    def get_deployment(self, service: str) -> Deployment | None: ...

    def list_deployments(self) -> Sequence[Deployment]: ...


class SqlDeploymentRepository:
    """`DeploymentRepository` on SQLAlchemy (SQLite or PostgreSQL)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def put_deployment(self, **fields: Any) -> Deployment:
        """Create or replace the fields given (`service` is the key)."""
        fields["updated_at"] = time.time()
        with self.db.session() as s:
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
        with self.db.session() as s:
            s.execute(update(Deployment).where(Deployment.service == service).values(**fields))

    def get_deployment(self, service: str) -> Deployment | None:
        with self.db.session() as s:
            return s.get(Deployment, service)

    def list_deployments(self) -> Sequence[Deployment]:
        with self.db.session() as s:
            return s.scalars(select(Deployment).order_by(Deployment.service)).all()
