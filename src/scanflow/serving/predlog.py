"""The prediction log writer: records leave the request path at once, reach the store in batches.

A request only appends to an in-memory queue (microseconds); a background thread writes
batches with `Store.add_predictions` every `interval` seconds or as soon as `batch_size`
records wait. A failed write is retried with back-off and never reaches the request or kills
the worker; `close()` flushes what is left at shutdown.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from sqlalchemy.exc import IntegrityError

from scanflow.store import Store

log = logging.getLogger("scanflow.serving.predlog")

Hook = Callable[[int], None]


class PredictionLogWriter:
    """Per-process batched writer of prediction records (open it after fork)."""

    def __init__(
        self,
        store: Store,
        *,
        interval: float = 0.2,
        batch_size: int = 500,
        max_pending: int = 200_000,
        on_written: Hook | None = None,
        on_dropped: Callable[[int, str], None] | None = None,
    ) -> None:
        self.store = store
        self.interval = interval
        self.batch_size = batch_size
        self.max_pending = max_pending
        self._on_written = on_written
        self._on_dropped = on_dropped
        self._queue: deque[dict[str, Any]] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._close_deadline = 0.0
        self._queued = 0  # records ever accepted
        self._done = 0  # records written or given up on
        self.written = 0
        self.dropped = 0
        self.failures = 0
        self._thread = threading.Thread(target=self._run, name="predlog-writer", daemon=True)

    # -- request side ------------------------------------------------------------------------
    def start(self) -> PredictionLogWriter:
        self._thread.start()
        return self

    def add(self, records: list[dict[str, Any]]) -> None:
        """Queue records; never blocks on the store, never raises."""
        overflow = 0
        with self._cond:
            self._queue.extend(records)
            self._queued += len(records)
            while len(self._queue) > self.max_pending:
                # The store has been down for long: keep the newest, count what is lost.
                self._queue.popleft()
                overflow += 1
            self._done += overflow
            if len(self._queue) >= self.batch_size:
                self._cond.notify()
        if overflow:
            self._drop(overflow, "overflow")

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued so far is written; True if it was in time."""
        with self._cond:
            target = self._queued
            self._cond.notify()
            end = time.monotonic() + timeout
            while self._done < target:
                left = end - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return False
                self._cond.wait(min(left, 0.05))
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread after a last flush (bounded by `timeout`)."""
        with self._cond:
            self._stopping = True
            self._close_deadline = time.monotonic() + timeout
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout + 1.0)
        if self.pending:
            log.error("prediction log: %d records not written at shutdown", self.pending)

    # -- writer thread -----------------------------------------------------------------------
    def _run(self) -> None:
        backoff = self.interval
        while True:
            with self._cond:
                if not self._stopping and len(self._queue) < self.batch_size:
                    self._cond.wait(self.interval)
                if self._stopping and (not self._queue or time.monotonic() > self._close_deadline):
                    return
                n = min(len(self._queue), self.batch_size)
                batch = [self._queue.popleft() for _ in range(n)]
            if not batch:
                continue
            try:
                self._write(batch)
                backoff = self.interval
            except Exception as exc:  # any store error: keep the data, retry
                self.failures += 1
                log.warning("prediction log: write of %d failed (%s), retrying in %.1fs",
                            len(batch), exc, backoff)
                with self._cond:
                    self._queue.extendleft(reversed(batch))
                    self._cond.wait(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            with self._cond:
                self._done += len(batch)
                self._cond.notify_all()

    def _write(self, batch: list[dict[str, Any]]) -> None:
        try:
            self.store.add_predictions(batch)
            ok = len(batch)
        except IntegrityError:
            # One reused request id poisons the batch: write row by row, skip the duplicates.
            ok = 0
            for rec in batch:
                try:
                    self.store.add_predictions([rec])
                    ok += 1
                except IntegrityError:
                    log.warning("prediction log: duplicate id %r dropped", rec.get("request_id"))
                    self._drop(1, "duplicate_id")
        self.written += ok
        if ok and self._on_written:
            self._on_written(ok)

    def _drop(self, n: int, reason: str) -> None:
        self.dropped += n
        if self._on_dropped:
            try:
                self._on_dropped(n, reason)
            except Exception:  # metrics must not break logging
                pass
