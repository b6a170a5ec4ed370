"""Alembic migrations of the store (environment and revisions), shipped inside the package so
that `scanflow.store.migrate` runs them without an alembic.ini."""
