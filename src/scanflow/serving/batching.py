"""Adaptive micro-batching: concurrent requests of one worker share one `model.predict` call.

A model call has a fixed cost (pyfunc schema checks, numpy set-up) that dwarfs the cost of
one more row, so under load one call on 32 rows is far cheaper than 32 calls on one row.
The batcher never makes a lone request wait: a batch leaves as soon as the model is free and
nobody else is on the way; it waits (at most `max_wait_ms` after its first item) only while
other requests are being received. While a batch runs, newcomers queue, so batches grow with
load by themselves. Sizes count instances, not requests. If a batch fails, each request is
run again alone, so one bad request gets its own error and the others their answers.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from starlette.concurrency import run_in_threadpool

from scanflow.spec.batching import BatchConfig  # the knobs live with the spec


@dataclass
class _Job:
    x: Any
    n: int
    fut: asyncio.Future[list[Any]]


def concat(parts: list[Any]) -> Any:
    """Join model inputs of several requests (arrays or DataFrames)."""
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts, axis=0)
    import pandas as pd  # lazy: pandas (~0.3 s), for DataFrame inputs only

    return pd.concat(parts, ignore_index=True)


class MicroBatcher:
    """One per (worker, model version). `predict(x, n)` returns n per-instance outputs."""

    def __init__(
        self,
        predict: Callable[[Any, int], list[Any]],
        config: BatchConfig,
        on_batch: Callable[[int, int], None] | None = None,
        arriving: Callable[[], int] = lambda: 0,
    ) -> None:
        self._predict = predict
        self._arriving = arriving  # requests being received or parsed right now
        self.config = config
        self._on_batch = on_batch  # (instances, requests) of each model call
        self._queue: deque[_Job] = deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self.queued_instances = 0

    # -- request side ------------------------------------------------------------------------
    async def submit(self, x: Any, n: int) -> list[Any]:
        if not self.config.enabled:
            return await run_in_threadpool(self._run_one, x, n)
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._loop())
        job = _Job(x, n, loop.create_future())
        self._queue.append(job)
        self.queued_instances += n
        assert self._wake is not None
        self._wake.set()
        return await job.fut

    def _run_one(self, x: Any, n: int) -> list[Any]:
        if self._on_batch:
            self._on_batch(n, 1)
        return self._predict(x, n)

    # -- the dispatcher ----------------------------------------------------------------------
    def _take(self) -> _Job | None:
        while self._queue:
            job = self._queue.popleft()
            self.queued_instances -= job.n
            if not job.fut.done():  # a request that timed out (504) is not computed
                return job
        return None

    async def _loop(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        slots = asyncio.Semaphore(self.config.max_concurrent_batches)
        while True:
            await slots.acquire()  # while every slot is busy, newcomers pile up: bigger batches
            first = self._take()
            if first is None:
                slots.release()
                self._wake.clear()
                await self._wake.wait()
                continue
            batch, items = [first], first.n
            deadline = loop.time() + self.config.max_wait_ms / 1000.0
            while items < self.config.max_batch_size:
                if self._queue:
                    if items + self._queue[0].n > self.config.max_batch_size:
                        break  # the next one starts the next batch
                    job = self._take()
                    if job is not None:
                        batch.append(job)
                        items += job.n
                    continue
                left = deadline - loop.time()
                if self._arriving() <= 0 or left <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), left)
                except TimeoutError:
                    break
            task = loop.create_task(self._run(batch, items))
            self._running.add(task)
            def finished(t: asyncio.Task[None]) -> None:
                self._running.discard(t)
                slots.release()

            task.add_done_callback(finished)

    async def _run(self, batch: list[_Job], items: int) -> None:
        try:
            x = concat([j.x for j in batch])
            if self._on_batch:
                self._on_batch(items, len(batch))
            out = await run_in_threadpool(self._predict, x, items)
        except Exception as exc:
            if len(batch) == 1:
                _settle(batch[0].fut, exc=exc)
                return
            for job in batch:  # find the culprit: everyone else still gets an answer
                try:
                    _settle(job.fut, await run_in_threadpool(self._run_one, job.x, job.n))
                except Exception as one_exc:
                    _settle(job.fut, exc=one_exc)
            return
        i = 0
        for job in batch:
            _settle(job.fut, out[i: i + job.n])
            i += job.n


def _settle(fut: asyncio.Future[list[Any]], result: list[Any] | None = None,
            exc: BaseException | None = None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result or [])
