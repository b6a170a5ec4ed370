"""The prediction log with commit=store (the ray backend's default): a request's record is in the
shared store when its response may leave, so nothing depends on the node's disk; a slow or
failing store costs a fallback to the node's journal, never a record or the service."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import psycopg

from scanflow.serving.predlog import PredictionLog, encode_prediction
from scanflow.store import Store
from support.waiting import wait_for


def _record(rid: str) -> bytes:
    inst = [[1.0, 2.0]]
    return encode_prediction(rid, "s", "1", time.time(), 1.0, np.asarray(inst), inst, [7])


def _journaled(d: Path) -> int:
    """Bytes of records on this node's disk."""
    return sum(p.stat().st_size for p in d.glob("*.plog")) if d.is_dir() else 0


async def _answer(plog: PredictionLog, rids: list[str]) -> float:
    """All `rids` answered concurrently, as many clients would; the slowest wait in seconds."""
    t0 = time.perf_counter()
    await asyncio.gather(*(plog.answered(_record(r)) for r in rids))
    return time.perf_counter() - t0


def _committing(store: Store, d: Path, **kw: float) -> tuple[PredictionLog, list[str]]:
    """A started log that commits to `store` before answering; the fallback reasons it reports."""
    fallbacks: list[str] = []
    plog = PredictionLog(store, d, process=False, commit_to_store=True,
                         on_fallback=lambda n, why: fallbacks.append(why), **kw).start()
    return plog, fallbacks


def test_records_are_in_the_store_when_the_response_may_leave(tmp_path: Path,
                                                                store_url: str) -> None:
    store = Store(store_url)
    d = tmp_path / "predlog"
    plog, fallbacks = _committing(store, d, interval=30)
    try:
        rids = [f"r{i}" for i in range(300)]
        asyncio.run(_answer(plog, rids))
        # no flush, no collector pass (interval 30 s): already in the store, nothing on the disk
        assert store.count_predictions("s")[0] == 300
        assert _journaled(d) == 0 and plog.pending == 0 and not fallbacks
        asyncio.run(_answer(plog, ["r5"]))  # a client reusing an X-Request-ID: still one row
        assert store.count_predictions("s")[0] == 300
    finally:
        plog.close()
        store.close()


def _psql(url: str, sql: str) -> psycopg.Connection:
    raw, _, query = url.replace("+psycopg", "").partition("?")
    schema = query.split("search_path%3D")[1]
    c = psycopg.connect(raw, autocommit=True)
    c.execute(f"SET search_path TO {schema}")
    c.execute(sql)
    return c


def test_a_failing_store_falls_back_to_the_journal_and_loses_nothing(tmp_path: Path,
                                                                      pg_url: str) -> None:
    """The predictions table gone (as a store that refuses writes): answers still leave at once,
    their records journaled on the node; once the store is back they reach it, each once."""
    store = Store(pg_url)
    d = tmp_path / "predlog"
    plog, fallbacks = _committing(store, d, interval=0.1)
    try:
        asyncio.run(_answer(plog, ["before"]))
        _psql(pg_url, "ALTER TABLE predictions RENAME TO predictions_away").close()
        waited = asyncio.run(_answer(plog, [f"f{i}" for i in range(50)]))
        assert waited < 1.0  # failed fast: not the commit timeout
        assert len(fallbacks) == 50 and set(fallbacks) == {"store_failing"}
        assert _journaled(d) > 0
        asyncio.run(_answer(plog, ["during"]))  # in the backoff: journaled without trying
        assert len(fallbacks) == 51
        _psql(pg_url, "ALTER TABLE predictions_away RENAME TO predictions").close()
        wait_for(lambda: store.count_predictions("s")[0] == 52, timeout=30,
                 what="the journaled records collected once the store is back")
    finally:
        plog.close()
        store.close()
    rids = {p["request_id"] for p in Store(pg_url).predictions("s")}
    assert rids == {"before-0", "during-0", *(f"f{i}-0" for i in range(50))}


def test_a_slow_store_costs_at_most_the_timeout_and_no_double_row(tmp_path: Path,
                                                                  pg_url: str) -> None:
    """The predictions table locked by another session: each answer waits `commit_timeout`,
    then leaves with its record journaled; once the lock goes, the late commit and the
    collector's insert of the same record make one row."""
    store = Store(pg_url)
    d = tmp_path / "predlog"
    plog, fallbacks = _committing(store, d, interval=0.1, commit_timeout=0.5)
    try:
        asyncio.run(_answer(plog, ["warm"]))
        locker = _psql(pg_url, "BEGIN")
        locker.execute("LOCK TABLE predictions IN ACCESS EXCLUSIVE MODE")
        try:
            waited = asyncio.run(_answer(plog, [f"slow{i}" for i in range(20)]))
            assert 0.5 <= waited < 5, waited
            assert fallbacks == ["store_slow"] * 20 and _journaled(d) > 0
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        wait_for(lambda: plog.pending == 0 and store.count_predictions("s")[0] == 21, timeout=30,
                 what="the slow records in the store")
    finally:
        plog.close()
        store.close()
    rows = [p["request_id"] for p in Store(pg_url).predictions("s")]
    assert sorted(rows) == sorted(["warm-0", *(f"slow{i}-0" for i in range(20))])
