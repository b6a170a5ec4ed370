"""Schema migrations of the store: Alembic, run programmatically, serialised between processes.

Every process that opens a store (agents, gunicorn workers, the engine) calls `ensure_schema`.
At head it costs one small query and never imports Alembic. Behind head it takes a lock held
by the database itself (PostgreSQL: a transaction-level advisory lock; SQLite: BEGIN IMMEDIATE,
the write lock), reads the revision again (another process may have just upgraded), and runs
the missing revisions in that same transaction, so a crash leaves the old schema, not half of
the new one. A database made before Alembic (tables, no version table) is brought to the
baseline in place and upgraded; an empty one is built by the same revisions.
"""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, inspect, text
from sqlalchemy.engine import Engine

from scanflow.store.db import make_engine

log = logging.getLogger("scanflow.store")

BASELINE = "0001_baseline"  # the schema at commit 15096dd
# The newest revision: tests/store/test_migrations.py checks it is Alembic's head.
HEAD = "0007_agent_identity"
SCRIPT_LOCATION = "scanflow.store:migrations"
# Not Alembic's default `alembic_version`: MLflow keeps its own there, and one PostgreSQL database
# may well hold both the MLflow tables and the store.
VERSION_TABLE = "scanflow_alembic_version"
# Columns releases before 15096dd added to `messages` by hand (all nullable): a database made
# before them gets them before it is brought to the baseline.
LEGACY_MESSAGE_COLUMNS = {"error": "TEXT", "retry_at": "FLOAT"}


class SchemaError(RuntimeError):
    """The store's schema cannot be brought to this release's head (e.g. it is newer)."""


@dataclass(frozen=True)
class SchemaStatus:
    """Where a store's schema stands (what `scanflow db current` prints)."""

    revision: str | None  # None: no version table (empty, or made before Alembic)
    head: str
    legacy: bool  # scanflow tables present but never stamped

    @property
    def at_head(self) -> bool:
        return self.revision == self.head


def revision_of(conn: Connection) -> str | None:
    """The revision stamped in the database, None if it was never stamped."""
    if not inspect(conn).has_table(VERSION_TABLE):
        return None
    return conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()


def status(engine: Engine) -> SchemaStatus:
    """Where the store's schema is, against this release's head (reads only)."""
    with engine.connect() as conn:
        rev = revision_of(conn)
        legacy = rev is None and inspect(conn).has_table("workflow_runs")
    return SchemaStatus(rev, _script_head(), legacy)


def ensure_schema(engine: Engine) -> SchemaStatus | None:
    """Bring the store to head if it is behind; None when it already was (the fast path)."""
    with engine.connect() as conn:
        if revision_of(conn) == HEAD:
            return None
    return upgrade(engine)


def upgrade(engine: Engine) -> SchemaStatus:
    """Upgrade to head under the lock; returns the status found before (a no-op at head)."""
    with _locked(engine) as conn:
        rev = revision_of(conn)
        legacy = rev is None and inspect(conn).has_table("workflow_runs")
        before = SchemaStatus(rev, _script_head(), legacy)
        if before.at_head:
            return before
        _check_known(rev)
        url = engine.url.render_as_string(hide_password=True)
        if legacy:
            then = "" if before.head == BASELINE else f", then upgrading it to {before.head}"
            log.warning("store %s was made before schema migrations: bringing it to the baseline "
                        "(%s) in place%s", url, BASELINE, then)
        elif rev is None:
            log.info("store %s is new: creating its schema at %s", url, before.head)
        else:
            log.warning("store %s has schema %s: upgrading it to %s", url, rev, before.head)
        if rev is None:  # never stamped: whatever tables it has are kept by the baseline
            _add_legacy_message_columns(conn)
        _alembic_upgrade(conn)
        return before


@contextmanager
def _locked(engine: Engine) -> Iterator[Connection]:
    """A connection in a transaction that no other process can migrate in at the same time."""
    with engine.connect() as conn:
        dialect = engine.dialect.name
        if dialect == "sqlite":
            # Table copies in batch migrations must not cascade (off is a no-op in a transaction,
            # so it is set before BEGIN); the write lock makes other openers wait (busy_timeout).
            conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        elif dialect == "postgresql":
            # Per schema, released with the transaction: a crashed migrator leaves no lock.
            conn.execute(text("SELECT pg_advisory_xact_lock(hashtext('scanflow.store.migrate:' "
                              "|| current_schema()))"))
        try:
            yield conn
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
        finally:
            if dialect == "sqlite":
                conn.exec_driver_sql("PRAGMA foreign_keys=ON")


def _add_legacy_message_columns(conn: Connection) -> None:
    if not inspect(conn).has_table("messages"):
        return
    have = {c["name"] for c in inspect(conn).get_columns("messages")}
    for name, sql_type in LEGACY_MESSAGE_COLUMNS.items():
        if name not in have:
            conn.exec_driver_sql(f"ALTER TABLE messages ADD COLUMN {name} {sql_type}")


def _config(conn: Connection | None = None) -> Any:
    # Alembic is imported only here: it costs ~0.1 s, and a process opening a store at head
    # (every agent, worker and engine) never needs it.
    from alembic.config import Config  # lazy: Alembic (~0.1 s), see the comment above

    cfg = Config()
    cfg.set_main_option("script_location", SCRIPT_LOCATION)
    if conn is not None:
        cfg.attributes["connection"] = conn
    return cfg


def _script_head() -> str:
    from alembic.script import ScriptDirectory  # ~0.1 s, see _config

    head = ScriptDirectory.from_config(_config()).get_current_head()
    assert head is not None, "the store has no migration scripts"
    return head


def _check_known(rev: str | None) -> None:
    from alembic.script import ScriptDirectory  # ~0.1 s, see _config
    from alembic.util import CommandError  # lazy: Alembic (~0.1 s), see _config

    if rev is None:
        return
    try:
        ScriptDirectory.from_config(_config()).get_revision(rev)
    except CommandError as e:
        raise SchemaError(f"the store has schema revision {rev!r}, unknown to this scanflow "
                          "(made by a newer release?): upgrade scanflow") from e


def _alembic_upgrade(conn: Connection) -> None:
    from alembic import command  # ~0.1 s, see _config

    command.upgrade(_config(conn), "head")


def draft_revision(message: str) -> str:
    """Write a new revision (autogenerated: the models against a scratch SQLite store at head)
    into the package's versions folder; returns its path. For developers: review it, then set
    `HEAD` above to its id."""
    from alembic import command  # ~0.1 s, see _config
    from alembic.script import ScriptDirectory  # lazy: Alembic (~0.1 s), see _config

    n = len(list(ScriptDirectory.from_config(_config()).walk_revisions()))
    slug = re.sub(r"[^a-z0-9]+", "_", message.lower()).strip("_")[:40]
    rev_id = f"{n + 1:04d}_{slug}"  # ordered and readable, like 0001_baseline
    with tempfile.TemporaryDirectory() as tmp:
        engine = make_engine(f"sqlite:///{Path(tmp) / 'head.db'}")
        try:
            upgrade(engine)
            with engine.connect() as conn:
                cfg = _config(conn)
                cfg.set_main_option("file_template", "%%(rev)s")
                script = command.revision(cfg, message, autogenerate=True, rev_id=rev_id)
                conn.commit()
        finally:
            engine.dispose()
    assert script is not None and not isinstance(script, list)
    return str(script.path)
