"""Alembic environment of the store. scanflow runs it programmatically (`scanflow.store.migrate`)
on the connection it holds under the upgrade lock, passed as `config.attributes["connection"]`;
with `sqlalchemy.url` set instead (a developer's `alembic revision --autogenerate`), it connects
itself."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from scanflow.store.db import make_engine
from scanflow.store.migrate import VERSION_TABLE
from scanflow.store.schema import Base


def _run(connection: Connection) -> None:
    # Batch mode: SQLite alters a table by copying it, which Alembic does only in batch mode.
    context.configure(connection=connection, target_metadata=Base.metadata, version_table=VERSION_TABLE,
                      render_as_batch=True, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


def main() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = context.config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no connection: run `scanflow db upgrade`, or set sqlalchemy.url")
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            _run(conn)
            conn.commit()
    finally:
        engine.dispose()


main()
