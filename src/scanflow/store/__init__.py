"""Control-plane state: runs, step runs, deployments, prediction log, agent events, decisions,
actions and messages. SQLAlchemy 2; SQLite (WAL) by default, PostgreSQL by URL."""

from scanflow.store.store import Store, open_store

__all__ = ["Store", "open_store"]
