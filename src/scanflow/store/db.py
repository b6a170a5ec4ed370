"""The connection every repository shares: engine, sessions and the SQLite pragmas.

Repositories hold a `Database` rather than an engine so that several of them share one pool
and one session factory (and so one `Store` is still one set of connections).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

import orjson
from sqlalchemy import create_engine, event, make_url
from sqlalchemy.engine import CursorResult, Engine, Result
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError
from sqlalchemy.orm import Session, sessionmaker

_log = logging.getLogger("scanflow.store")
T = TypeVar("T")


def normalise_url(url: str) -> str:
    """Use psycopg 3 for PostgreSQL URLs given without a driver."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


# PostgreSQL SQLSTATEs by which the server says it ended the session: admin_shutdown,
# crash_shutdown, cannot_connect_now (class 08, connection exceptions, is matched too).
SERVER_GONE = frozenset({"57P01", "57P02", "57P03"})


def make_engine(url: str) -> Engine:
    """An engine for `url`; SQLite in WAL mode with a long busy timeout, since agents, the
    engine and serving workers all write to one file."""
    url = normalise_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA busy_timeout=60000")
            cur.execute("PRAGMA page_size=16384")  # new files only: rows of 3 KB inputs
            _switch_to_wal(cur)
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    engine = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)
    reached = [False]  # this engine has connected once: from then on, an outage is waited out

    @event.listens_for(engine, "handle_error")
    def _server_gone(ctx: Any) -> None:
        # The server's own word that it dropped the connection (a shutdown or restart) counts as
        # a disconnect even when the driver has not yet seen the socket close: the pool is then
        # discarded and a pre-ping replaces the connection, where otherwise, depending on
        # timing, the ping's error reached the caller.
        state = str(getattr(ctx.original_exception, "sqlstate", "") or "")
        if state in SERVER_GONE or state.startswith("08"):
            ctx.is_disconnect = True

    @event.listens_for(engine, "do_connect")
    def _connect(dialect: Any, _record: Any, cargs: Any, cparams: Any) -> Any:
        conn = _patient_connect(dialect, cargs, cparams, patient=reached[0])
        reached[0] = True
        return conn

    return engine


def _patient_connect(dialect: Any, cargs: Any, cparams: Any, *, patient: bool) -> Any:
    """A new connection to a server that answered before and does not now is tried again for
    `store_wait` seconds (a PostgreSQL restart or failover) before it fails; with
    `pool_pre_ping` a pooled connection the restart broke is replaced through here too. So a
    run, an agent or a collector waits out a short outage of its store instead of dying in the
    middle of it, while a store that never answered (a wrong URL) fails at once."""
    from scanflow.settings import get_settings  # (the lowest layer; read once per connection)

    wait = get_settings().store_wait if patient else 0.0
    deadline, pause, warned = time.monotonic() + wait, 0.1, False
    while True:
        try:
            return dialect.loaded_dbapi.connect(*cargs, **cparams)
        except dialect.loaded_dbapi.OperationalError as exc:
            if time.monotonic() + pause > deadline:
                raise
            if not warned:
                where = f"{cparams.get('host', '?')}:{cparams.get('port', '?')}"
                _log.warning("store at %s does not answer (%s): waiting up to %.0f s for it",
                             where, str(exc).strip().splitlines()[-1][:200], wait)
                warned = True
            time.sleep(pause)
            pause = min(pause * 2, 2.0)


def _switch_to_wal(cur: Any, wait_s: float = 60.0) -> None:
    """Put the file in WAL mode (persistent, so a no-op once done). On a fresh file that
    several processes open at once the switch fails with "database is locked" without
    calling the busy handler, so it is retried here until `wait_s` has passed."""
    deadline = time.monotonic() + wait_s
    pause = 0.005
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
        time.sleep(pause)  # another opener holds the file for its own switch: ms at most
        pause = min(pause * 2, 0.1)


class StoreUrlError(ValueError):
    """A store URL that does not parse, names an unknown driver, or whose database does not answer."""


def connect_engine(url: str, *, must_exist: bool = False) -> tuple[Engine, str]:
    """An engine that has connected once, and the URL to print (password hidden). With
    `must_exist`, a SQLite file that is not there is an error rather than a new empty store."""
    shown = url
    try:
        parsed = make_url(normalise_url(url))
        shown = parsed.render_as_string(hide_password=True)
        db_file = parsed.database if parsed.get_backend_name() == "sqlite" else None
        if must_exist and db_file and db_file != ":memory:" and not Path(db_file).exists():
            raise StoreUrlError(f"no store at {shown} (the file does not exist)")
        engine = make_engine(url)
        with engine.connect():
            pass
    except (ArgumentError, NoSuchModuleError) as e:
        raise StoreUrlError(f"bad store URL {url!r}: {e}") from e
    except DBAPIError as e:
        raise StoreUrlError(f"cannot open the store at {shown}: {e.orig}") from e
    return engine, shown


def json_values(values: Sequence[Any]) -> list[Any]:
    """JSON text (SQLite) or already-decoded values (psycopg decodes json itself)."""
    return [orjson.loads(v) if isinstance(v, str | bytes) else v for v in values]


def rowcount(result: Result[Any]) -> int:
    """Rows an UPDATE/DELETE matched (its result is a cursor result; the type says less)."""
    return int(cast(CursorResult[Any], result).rowcount or 0)


def again_if_disconnected(fn: Callable[[], T], tries: int = 3) -> T:
    """`fn()`, called again when the server dropped the connection under it (a restart or
    failover: the pool is discarded, and the next connection waits for the server, see
    `_patient_connect`). Only for an `fn` that is one transaction and safe to repeat, such as
    a read or an update to given values; the failed try was rolled back."""
    for left in range(tries - 1, -1, -1):
        try:
            return fn()
        except DBAPIError as exc:
            if not exc.connection_invalidated or not left:
                raise
            _log.warning("store connection lost (%s); trying again",
                         str(exc.orig).strip().splitlines()[0][:200])
    raise AssertionError("unreachable")  # the loop returns or raises


class Database:
    """One engine and session factory, shared by every repository of a store."""

    def __init__(self, url: str, engine: Engine | None = None) -> None:
        self.url = normalise_url(url)
        self.engine = engine if engine is not None else make_engine(self.url)
        self._session = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction: committed when the block ends, rolled back on an exception."""
        with self._session.begin() as s:
            yield s

    def dispose(self) -> None:
        self.engine.dispose()
