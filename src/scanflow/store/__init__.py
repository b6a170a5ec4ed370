"""Control-plane state: runs, step runs, deployments, prediction log, agent events, decisions,
actions and messages. SQLAlchemy 2; SQLite (WAL) by default, PostgreSQL by URL; the schema is
migrated with Alembic when a store is opened (`scanflow.store.migrate`).

`Store` is the one object callers hold; it composes one repository per aggregate, each behind
a Protocol: `store.runs` (RunRepository), `store.deployments` (DeploymentRepository),
`store.prediction_log` (PredictionRepository), `store.agents` (AgentRepository: messages,
state, processes, leases), `store.decisions` (DecisionRepository: events, decisions, actions).
"""

from scanflow.store.agents import AgentRepository
from scanflow.store.decisions import DecisionRepository
from scanflow.store.deployments import DeploymentRepository
from scanflow.store.predictions import PredictionRepository
from scanflow.store.runs import RunRepository
from scanflow.store.store import Store, open_store

__all__ = [
    "AgentRepository",
    "DecisionRepository",
    "DeploymentRepository",
    "PredictionRepository",
    "RunRepository",
    "Store",
    "open_store",
]
