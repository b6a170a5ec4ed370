"""A PostgreSQL store whose server ends a session (a restart, a failover, an administrator):
the engine sees a disconnect, and a run's driver tries its transaction again on a fresh
connection instead of failing the run."""

from __future__ import annotations

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, ProgrammingError

from scanflow.store.db import Database, again_if_disconnected


def _terminate(pg_url: str, pid: int) -> None:
    """What a fast shutdown does to each session: FATAL 57P01 (admin_shutdown), then close."""
    raw = pg_url.split("?")[0].replace("+psycopg", "")
    with psycopg.connect(raw, autocommit=True) as c:
        c.execute("SELECT pg_terminate_backend(%s)", (pid,))


def test_a_transaction_cut_by_the_server_is_a_disconnect_and_runs_again(pg_url: str) -> None:
    db = Database(pg_url)
    backends: list[int] = []

    def read_twice() -> int:
        """Two statements in one transaction; the server ends the session between them the
        first two times."""
        with db.session() as s:
            pid = int(s.execute(text("SELECT pg_backend_pid()")).scalar_one())
            if len(backends) < 2:
                _terminate(pg_url, pid)
            backends.append(pid)
            return int(s.execute(text("SELECT 41 + 1")).scalar_one())

    try:
        with pytest.raises(DBAPIError) as cut:  # alone: the caller sees the cut
            read_twice()
        assert cut.value.connection_invalidated
        assert again_if_disconnected(read_twice) == 42  # cut once more, then done
        assert len(backends) == 3 and len(set(backends)) == 3  # a new session each time
    finally:
        db.dispose()


def test_other_store_errors_are_not_tried_again(pg_url: str) -> None:
    db = Database(pg_url)
    calls = []

    def bad_sql() -> None:
        calls.append(1)
        with db.session() as s:
            s.execute(text("SELECT * FROM no_such_table"))

    try:
        with pytest.raises(ProgrammingError):
            again_if_disconnected(bad_sql)
        assert len(calls) == 1
    finally:
        db.dispose()
