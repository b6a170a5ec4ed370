"""Schema migrations: a store made by the last release without Alembic (commit 15096dd) is
upgraded in place with every row intact, on SQLite and PostgreSQL, whether it is opened by a
process or upgraded with `scanflow db upgrade`; a store at head is opened without migrating;
processes opening one fresh store at once all succeed."""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import MetaData, create_engine, insert, select, text
from sqlalchemy.engine import Engine
from typer.testing import CliRunner

from scanflow.cli.main import app as cli_app
from scanflow.settings import Settings
from scanflow.store import Store
from scanflow.store.db import normalise_url
from scanflow.store.migrate import HEAD, VERSION_TABLE, SchemaError, ensure_schema, status

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "store_15096dd"
RUN_ID = "0123456789abcdef0123456789abcdef"
NOW = 1_760_000_000.125
F32 = np.asarray([0.5, 1.25, -2.0, 3.75], dtype=np.float32)

# One or two rows per table, written as the release at 15096dd wrote them (ids left to the database).
ROWS: dict[str, list[dict[str, Any]]] = {
    "workflow_runs": [dict(
        id=RUN_ID, app="mnist", team="ds", workflow="train", status="succeeded",
        params={"epochs": 3, "lr": 0.01}, trigger={"by": "agent", "agent": "planner"},
        mlflow_run_id="abc123", error=None, spec_path="/specs/mnist", use_cache=True, owner_pid=4242,
        cancel_requested=False, created_at=NOW, started_at=NOW + 1, ended_at=NOW + 60.5)],
    "step_runs": [
        dict(run_id=RUN_ID, step="load", status="succeeded", exit_code=0, log_path="/logs/load.log",
             mlflow_run_id="m1", outputs={"data": "/ws/data.npz"}, error=None, attempts=1,
             cache_key="k" * 64, cached_from=None, pid=100, started_at=NOW + 1, ended_at=NOW + 2),
        dict(run_id=RUN_ID, step="fit", status="failed", exit_code=3, log_path=None, mlflow_run_id=None,
             outputs={}, error="Traceback: boom", attempts=2, cache_key=None, cached_from="run:x/fit",
             pid=None, started_at=NOW + 2, ended_at=None)],
    "deployments": [dict(
        service="mnist-svc", app="mnist", team="ds", model_name="mnist", alias="champion",
        model_version="3", host="127.0.0.1", port=8501, pid=777, replicas=2, status="running",
        workdir="/ws/svc", updated_at=NOW, previous_version="2", canary_version="4",
        canary_share=0.25, shadow_version=None)],
    "predictions": [
        dict(request_id="r1", service="mnist-svc", model_version="3", ts=NOW + 10, inputs=None,
             inputs_f32=F32.tobytes(), outputs={"class": 7, "probs": [0.1, 0.9]}, latency_ms=4.5),
        dict(request_id="r2", service="mnist-svc", model_version="4", ts=NOW + 11,
             inputs={"text": "héllo"}, inputs_f32=None, outputs=[1, 2], latency_ms=0.75)],
    "shadow_predictions": [dict(request_id="r1", service="mnist-svc", model_version="5", ts=NOW + 10,
                                outputs={"class": 1}, latency_ms=6.0)],
    "labels": [dict(request_id="r1", label=7, ts=NOW + 20),
               dict(request_id="r9", label={"late": True}, ts=NOW + 21)],  # before its prediction
    "events": [dict(ts=NOW + 30, source="planner", kind="rollout_completed", service="mnist-svc",
                    payload={"from_version": "2", "to_version": "3", "actor": "planner"})],
    "decisions": [dict(key="planner:obs:1", ts=NOW + 29, agent="planner", sensor="window", rule="drift",
                       fired=True, service="mnist-svc", evidence={"reason": "drift", "p": 0.001},
                       actions=[{"kind": "rollout", "status": "succeeded"}]),
                  dict(key=None, ts=NOW + 31, agent="monitor", sensor="tick", rule="noop", fired=False,
                       service=None, evidence={}, actions=[])],
    "actions": [dict(key="planner:obs:1:rollout", agent="planner", kind="rollout", status="succeeded",
                     result={"attempt": 1, "to_version": "3"}, created_at=NOW + 29.5,
                     ended_at=NOW + 30)],
    "messages": [
        dict(key="m-1", ts=NOW + 5, sender="monitor", recipient="planner", kind="drift_report",
             payload={"drift": True, "first_id": 1}, status="pending", attempts=2, handled_at=None,
             error="ValueError: bad window", retry_at=NOW + 100),
        dict(key="m-2", ts=NOW + 6, sender="monitor", recipient="planner", kind="window", payload={},
             status="done", attempts=1, handled_at=NOW + 7, error=None, retry_at=None)],
    "agent_state": [dict(agent="planner", key="planner.watermark", value={"index": 12, "ids": [1, 2]},
                         updated_at=NOW + 8)],
    "agents": [dict(name="planner", app="mnist", role="planner", pid=555, status="running",
                    started_at=NOW, heartbeat=NOW + 9, api_host="127.0.0.1", api_port=9100)],
    "leases": [dict(name="service:mnist-svc", holder="planner", expires_at=NOW + 10_000,
                    acquired_at=NOW, generation=4, purpose="rollout")],
}
LEGACY_COLUMNS = ("error", "retry_at")  # added to `messages` by hand before Alembic


def _url(request: pytest.FixtureRequest, settings: Settings) -> str:
    return settings.store if request.param == "sqlite" else request.getfixturevalue("pg_url")


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, settings: Settings) -> str:
    return _url(request, settings)


@pytest.fixture
def raw(url: str) -> Iterator[Engine]:
    """A plain engine on the store's database (no scanflow code in between)."""
    engine = create_engine(normalise_url(url))
    yield engine
    engine.dispose()


def _create_old_store(engine: Engine, *, before_message_columns: bool = False) -> None:
    """The tables as 15096dd's `create_all` made them; optionally as an older release left them
    (no message `error`/`retry_at` columns, no `leases` table)."""
    ddl = (FIXTURES / f"{engine.dialect.name}.sql").read_text()
    with engine.begin() as conn:
        for stmt in filter(str.strip, ddl.split(";\n")):
            conn.exec_driver_sql(stmt)
        if before_message_columns:
            for col in LEGACY_COLUMNS:
                conn.exec_driver_sql(f"ALTER TABLE messages DROP COLUMN {col}")
            conn.exec_driver_sql("DROP TABLE leases")


def _fill(engine: Engine, *, before_message_columns: bool = False) -> None:
    meta = MetaData()
    meta.reflect(engine)
    with engine.begin() as conn:
        for table, rows in ROWS.items():
            if table not in meta.tables:
                continue
            cols = set(meta.tables[table].c.keys())
            conn.execute(insert(meta.tables[table]),
                         [{k: v for k, v in r.items() if k in cols} for r in rows])


def _dump(engine: Engine) -> dict[str, list[dict[str, Any]]]:
    """Every row of every scanflow table, in primary-key order, as plain values."""
    meta = MetaData()
    meta.reflect(engine)
    out = {}
    with engine.connect() as conn:
        for name in ROWS:
            if name not in meta.tables:
                continue
            t = meta.tables[name]
            q = select(t).order_by(*t.primary_key.columns)
            out[name] = [dict(r._mapping) for r in conn.execute(q)]
    return out


def _assert_rows_as_written(dump: dict[str, list[dict[str, Any]]], *, legacy: bool = False) -> None:
    """Each row written before the upgrade is there with every value it had."""
    for table, rows in ROWS.items():
        got = dump[table]
        if legacy and table == "leases":
            assert got == []
            continue
        assert len(got) >= len(rows), table  # rows added after the upgrade come last
        for want, have in zip(rows, got[: len(rows)], strict=True):
            if legacy and table == "messages":
                want = {**want, **dict.fromkeys(LEGACY_COLUMNS)}
            assert {k: have[k] for k in want} == want, table


def _assert_store_reads(store: Store) -> None:
    """The upgraded store answers through its public methods, and takes new rows."""
    run = store.get_run(RUN_ID[:8])
    assert run is not None and run.params == {"epochs": 3, "lr": 0.01} and run.ended_at == NOW + 60.5
    assert [(s.step, s.status, s.outputs) for s in store.list_steps(RUN_ID)] == [
        ("load", "succeeded", {"data": "/ws/data.npz"}), ("fit", "failed", {})]
    dep = store.get_deployment("mnist-svc")
    assert dep is not None and (dep.model_version, dep.canary_share, dep.replicas) == ("3", 0.25, 2)
    preds = store.predictions("mnist-svc")
    assert [(p["request_id"], p["inputs"], p["outputs"], p["label"]) for p in preds] == [
        ("r1", F32.tolist(), {"class": 7, "probs": [0.1, 0.9]}, 7), ("r2", {"text": "héllo"}, [1, 2], None)]
    win = store.prediction_window("mnist-svc", with_shadow=True)
    assert win.shadow_versions == ["5", None] and win.shadow_outputs[0] == {"class": 1}
    assert [(d.key, d.fired, d.evidence) for d in store.list_decisions()] == [
        ("planner:obs:1", True, {"reason": "drift", "p": 0.001}), (None, False, {})]
    assert [e.payload["to_version"] for e in store.list_events(service="mnist-svc")] == ["3"]
    assert [(a.key, a.result) for a in store.list_actions()] == [
        ("planner:obs:1:rollout", {"attempt": 1, "to_version": "3"})]
    assert store.get_state("planner", "planner.watermark") == {"index": 12, "ids": [1, 2]}
    assert [a.api_port for a in store.list_agents()] == [9100]
    assert [m.key for m in store.list_messages("planner")] == ["m-1", "m-2"]
    # Sequences and constraints work after the upgrade.
    assert store.send_message("monitor", "planner", "window", {"n": 2}, key="m-3")
    assert not store.send_message("monitor", "planner", "window", {"n": 2}, key="m-3")
    store.add_predictions([{"request_id": "r3", "service": "mnist-svc", "model_version": "3",
                            "ts": NOW + 40, "inputs": [1.0, 2.0], "outputs": 1, "latency_ms": 1.0}])
    assert store.count_predictions("mnist-svc") == (3, max(p["id"] for p in preds) + 1)
    assert store.acquire_lease("service:other", "ops", 30.0)
    assert not store.acquire_lease("service:mnist-svc", "ops", 30.0, now=NOW + 1)  # still planner's


def _upgrade_by_opening(url: str) -> None:
    store = Store(url)
    try:
        _assert_store_reads(store)
    finally:
        store.close()


def _upgrade_by_cli(url: str) -> None:
    res = CliRunner().invoke(cli_app, ["db", "upgrade", "--url", url])
    assert res.exit_code == 0, res.output
    assert f"to {HEAD}" in res.output
    res = CliRunner().invoke(cli_app, ["db", "current", "--url", url, "--check"])
    assert res.exit_code == 0 and f"{HEAD} (head)" in res.output, res.output
    _upgrade_by_opening(url)  # now a no-op; the store reads as before


UPGRADES: dict[str, Callable[[str], None]] = {"open": _upgrade_by_opening, "cli": _upgrade_by_cli}


@pytest.mark.parametrize("how", UPGRADES)
def test_a_store_from_15096dd_is_upgraded_with_every_row_intact(
    url: str, raw: Engine, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    _create_old_store(raw)
    _fill(raw)
    before = _dump(raw)
    _assert_rows_as_written(before)
    with caplog.at_level(logging.INFO, logger="scanflow.store"):
        UPGRADES[how](url)
    if how == "open":
        assert any("made before schema migrations" in r.getMessage() for r in caplog.records)
    after = _dump(raw)
    with raw.connect() as conn:
        assert conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars().all() == [HEAD]
    # Every row as it was (ids included); new ones only from _assert_store_reads; the columns
    # later revisions added are empty (NULL) on the old rows.
    for table, rows in before.items():
        kept = after[table][: len(rows)]
        assert [{k: r[k] for k in old} for r, old in zip(kept, rows, strict=True)] == rows, table
        assert all(v is None for r, old in zip(kept, rows, strict=True)
                   for k, v in r.items() if k not in old), table
    _assert_rows_as_written(after)


def test_a_store_older_than_the_message_columns_is_upgraded(url: str, raw: Engine) -> None:
    """A release before 15096dd: no message `error`/`retry_at` columns, no leases table."""
    if raw.dialect.name == "sqlite" and sqlite3.sqlite_version_info < (3, 35):
        pytest.skip("this SQLite cannot drop a column to build the old schema")
    _create_old_store(raw, before_message_columns=True)
    _fill(raw, before_message_columns=True)
    store = Store(url)
    try:
        _assert_rows_as_written(_dump(raw), legacy=True)
        store.fail_message(store.list_messages("planner")[0].id, "oops", retry_at=NOW)
        assert store.list_messages("planner")[0].error == "oops"
        assert store.acquire_lease("service:x", "me", 5.0)
    finally:
        store.close()


def test_migrations_build_the_tables_the_models_declare(url: str, raw: Engine) -> None:
    """An empty database upgraded to head has exactly the schema of `scanflow.store.schema`
    (a change to the models without a revision fails here)."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from alembic.script import ScriptDirectory

    from scanflow.store.migrate import _config
    from scanflow.store.schema import Base

    assert ScriptDirectory.from_config(_config()).get_current_head() == HEAD
    Store(url).close()
    with raw.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert [d for d in diff if not (isinstance(d, tuple) and d[0] == "remove_table"
                                    and d[1].name == VERSION_TABLE)] == []


def test_a_store_at_head_is_opened_without_migrating(url: str, caplog: pytest.LogCaptureFixture) -> None:
    Store(url).close()
    with caplog.at_level(logging.INFO):
        store = Store(url)
    try:
        assert [r for r in caplog.records if r.name.startswith(("alembic", "scanflow.store"))] == []
        assert ensure_schema(store.engine) is None  # the fast path: at head, nothing to do
        st = status(store.engine)
        assert st.at_head and st.revision == HEAD and not st.legacy
    finally:
        store.close()


def test_a_store_from_a_newer_release_is_refused(url: str, raw: Engine) -> None:
    Store(url).close()
    with raw.begin() as conn:
        conn.execute(text(f"UPDATE {VERSION_TABLE} SET version_num = '9999_future'"))
    with pytest.raises(SchemaError, match="9999_future"):
        Store(url)
    res = CliRunner().invoke(cli_app, ["db", "upgrade", "--url", url])
    assert res.exit_code == 1 and "newer release" in res.output


_OPENER = """
import logging, os, sys, time
logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
from scanflow.store import Store
go = sys.argv[2]
open(go + "." + sys.argv[3], "w").close()  # ready
while not os.path.exists(go):
    time.sleep(0.01)
store = Store(sys.argv[1])
assert store.send_message("p", "q", "k", {}, key=sys.argv[3])
store.close()
"""


def test_processes_opening_one_fresh_store_at_once_all_succeed(url: str, raw: Engine,
                                                               tmp_path: Path) -> None:
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _OPENER, url, str(go), f"opener-{i}"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for i in range(4)]
    ready = [tmp_path / f"go.opener-{i}" for i in range(4)]
    deadline = time.monotonic() + 120
    while not all(r.exists() for r in ready) and time.monotonic() < deadline:
        time.sleep(0.02)  # the openers import scanflow, then all wait for `go`
    go.touch()
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, outs
    assert sum("Running upgrade" in o for o in outs) == 1, outs  # one migrated, the others waited
    with raw.connect() as conn:
        assert conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars().all() == [HEAD]
        assert conn.execute(text("SELECT count(*) FROM messages")).scalar() == 4


def test_db_current_on_an_old_and_on_a_missing_store(url: str, raw: Engine, settings: Settings) -> None:
    _create_old_store(raw)
    res = CliRunner().invoke(cli_app, ["db", "current", "--url", url, "--check"])
    assert res.exit_code == 1 and "made before migrations" in res.output, res.output
    missing = f"sqlite:///{settings.root / 'nope.db'}"
    res = CliRunner().invoke(cli_app, ["db", "current", "--url", missing])
    assert res.exit_code == 2 and "no store" in res.output
    assert not (settings.root / "nope.db").exists()
    res = CliRunner().invoke(cli_app, ["db", "upgrade", "--url", "nosuchdb://x"])
    assert res.exit_code == 2 and "bad store URL" in res.output


_PROBE_REVISION = '''
import sqlalchemy as sa
from alembic import op

revision = "9999_probe"
down_revision = "0001_baseline"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # SQLite copies the table, at which a foreign key with ON DELETE CASCADE points
    recreate = "always" if op.get_bind().dialect.name == "sqlite" else "auto"
    with op.batch_alter_table("workflow_runs", recreate=recreate) as batch:
        batch.add_column(sa.Column("probe", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("workflow_runs") as batch:
        batch.drop_column("probe")
'''


def test_a_store_behind_head_is_upgraded_on_open_with_a_message(
    url: str, raw: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A release that adds a revision: a store at the previous head is upgraded when opened,
    in place (a table copied in SQLite's batch mode keeps its rows, and the rows that point at
    it are not cascaded away)."""
    import shutil

    import scanflow.store.migrate as migrate

    store = Store(url)
    run = store.create_run("app", "team", "wf", {"a": 1})
    store.create_steps(run.id, ["s1", "s2"])
    store.close()
    scripts = tmp_path / "migrations"
    shutil.copytree(Path(migrate.__file__).parent / "migrations", scripts)
    (scripts / "versions" / "9999_probe.py").write_text(  # the release after this one's head
        _PROBE_REVISION.replace('"0001_baseline"', f'"{HEAD}"'))
    monkeypatch.setattr(migrate, "SCRIPT_LOCATION", str(scripts))
    monkeypatch.setattr(migrate, "HEAD", "9999_probe")
    with caplog.at_level(logging.INFO, logger="scanflow.store"):
        store = Store(url)
    try:
        assert [r.getMessage().split(": ", 1)[1] for r in caplog.records if r.name == "scanflow.store"] == [
            "upgrading it to 9999_probe"]
        assert [s.step for s in store.list_steps(run.id)] == ["s1", "s2"]
        with raw.connect() as conn:
            assert conn.execute(text("SELECT id, probe FROM workflow_runs")).all() == [(run.id, None)]
        assert ensure_schema(store.engine) is None
    finally:
        store.close()


def test_a_database_shared_with_mlflow_keeps_both_versions(url: str, raw: Engine) -> None:
    """MLflow stamps its own Alembic revision in `alembic_version`; one database may hold both."""
    with raw.begin() as conn:
        conn.execute(text("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)"))
        conn.execute(text("INSERT INTO alembic_version VALUES ('mlflow_rev_1')"))
    Store(url).close()
    with raw.connect() as conn:
        mlflow_rev = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
        assert mlflow_rev == ["mlflow_rev_1"]
        assert conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars().all() == [HEAD]
