"""Group commit: an answered request's log record reaches the shared store before its response
leaves, so losing the node (and its disk) loses no record of an answer a client got.

On one machine the journal (`predlog`) is enough: a record on disk survives `kill -9`. On a
cluster a node can die with its disk, and a record only journaled there is gone although its
client got an answer. Here each waiting request hands its record to one committer thread that
writes everything queued meanwhile in one insert, so N concurrent requests pay one round trip
to the store, not N, and the event loop never blocks on it.

When the store does not answer within `timeout`, or fails, the record goes to the node's journal
instead (its collector inserts it later; request ids are unique, so a late commit and the
collector's insert make one row) and, after a failure, the store is left alone for `backoff`
seconds: the service stays available, each fallback counted (`on_fallback`).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable

log = logging.getLogger("scanflow.serving.group_commit")

_Item = tuple[bytes, "asyncio.Future[bool]", asyncio.AbstractEventLoop]


def _settle(fut: asyncio.Future[bool], committed: bool) -> None:
    if not fut.done():
        fut.set_result(committed)


class GroupCommit:
    """`await commit(record)`: in the store (one insert shared by all waiting records) or, if
    the store is slow or failing, handed to `fallback` (the node's journal) — durable either way
    when it returns. `insert(buf)` writes the concatenated records of `buf`, raising on error."""

    def __init__(
        self,
        insert: Callable[[bytes], object],
        fallback: Callable[[bytes], None],
        *,
        timeout: float = 1.0,
        backoff: float = 2.0,
        max_batch: int = 500,
        on_fallback: Callable[[int, str], None] | None = None,
    ) -> None:
        self._insert = insert
        self._fallback = fallback
        self.timeout = timeout
        self.backoff = backoff
        self.max_batch = max_batch
        self._on_fallback = on_fallback
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._down_until = 0.0
        self._waiting = 0
        self._thread = threading.Thread(target=self._run, name="predlog-commit", daemon=True)

    def start(self) -> GroupCommit:
        self._thread.start()
        return self

    @property
    def pending(self) -> int:
        """Records handed over and not yet settled."""
        return self._waiting

    async def commit(self, record: bytes) -> None:
        if time.monotonic() < self._down_until or not self._thread.is_alive():
            self._fall_back(record, "store_failing")
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        self._waiting += 1
        self._queue.put((record, fut, loop))
        try:
            committed = await asyncio.wait_for(asyncio.shield(fut), self.timeout)
        except TimeoutError:
            committed = False
            self._fall_back(record, "store_slow")
        else:
            if not committed:
                self._fall_back(record, "store_failing")
        finally:
            self._waiting -= 1

    def close(self, timeout: float = 5.0) -> None:
        """Commit what is queued, then stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _fall_back(self, record: bytes, reason: str) -> None:
        self._fallback(record)  # on the event loop's thread, like every journal append
        if self._on_fallback is not None:
            self._on_fallback(1, reason)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            stop = False
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            ok = self._write(batch)
            for _, fut, loop in batch:
                try:
                    loop.call_soon_threadsafe(_settle, fut, ok)
                except RuntimeError:  # that loop is closed: its request is gone with it
                    pass
            if stop:
                return

    def _write(self, batch: list[_Item]) -> bool:
        try:
            self._insert(b"".join(rec for rec, _, _ in batch))
            return True
        except Exception as exc:  # any store error: the records go to the journal instead
            self._down_until = time.monotonic() + self.backoff
            log.warning("prediction log: store insert failed (%s); journaling on this node for "
                        "%.0fs", type(exc).__name__, self.backoff)
            return False
