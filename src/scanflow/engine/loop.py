"""The loop of one local run: hand ready steps to worker threads and record what they report
(the journal, progress callbacks, the store in batches, a cancel request). What may run next
is the `Scheduler`'s decision; running a step is the `StepRunner`'s."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scanflow.engine.backend import ProgressFn
from scanflow.engine.dag import DONE, Scheduler
from scanflow.engine.steps import Outcome, RunState, StepRunner
from scanflow.procs import kill_group
from scanflow.spec.models import Step
from scanflow.store import Store
from scanflow.store.db import again_if_disconnected

FLUSH_EVERY = 0.1  # seconds between batched store writes
CANCEL_POLL = 0.25  # seconds between checks of the run's cancel flag


class RunLoop:
    """Dispatches one run's steps on `concurrency` threads until all settled or it is cancelled.

    A lone in-process step (a chain) runs on the loop's own thread: no hand-off per step.
    `records` and `first_error` hold what the run's result and lineage need afterwards.
    """

    def __init__(self, store: Store, runner: StepRunner, st: RunState, sched: Scheduler, *,
                 step_ids: dict[str, int], values: dict[str, dict[str, Any]],
                 outputs: dict[str, dict[str, Path]], concurrency: int,
                 progress: ProgressFn | None, cancel_requested: Callable[[], bool]) -> None:
        self.store, self.runner, self.st, self.sched = store, runner, st, sched
        self.ids, self.values, self.outputs = step_ids, values, outputs
        self.concurrency = concurrency
        self.notify: ProgressFn = progress or (lambda _s, _st: None)
        self.cancel_requested = cancel_requested
        self.records: dict[str, Outcome] = {}
        self.first_error: str | None = None
        self._rows: dict[str, dict[str, Any]] = {  # store updates not written yet
            n: {"id": step_ids[n], "status": "pending", "exit_code": None, "error": None}
            for n, s in sched.status.items() if s == "pending"
        }
        self._todo: queue.Queue[Step | None] = queue.Queue()
        self._finished: queue.Queue[tuple[str, Outcome]] = queue.Queue()
        self._in_flight = 0

    def run(self) -> None:
        self._flush()
        threads = [threading.Thread(target=self._worker, daemon=True, name=f"step-{i}")
                   for i in range(self.concurrency)]
        for t in threads:
            t.start()
        last_flush = last_cancel = time.time()
        try:
            while True:
                self._dispatch()
                if self._in_flight == 0 and not self.sched.has_ready():
                    break
                if self._in_flight:
                    self._collect(FLUSH_EVERY)
                now = time.time()
                if now - last_cancel >= CANCEL_POLL:
                    last_cancel = now
                    self._poll_cancel()
                if now - last_flush >= FLUSH_EVERY:
                    last_flush = now
                    self._flush()
                if self.st.cancel.is_set() and self._in_flight == 0:
                    break
        except KeyboardInterrupt:
            self.st.cancel.set()
            self._kill_all()
            raise
        finally:
            self._finish(threads)

    # -- dispatch -------------------------------------------------------------------------------
    def _dispatch(self) -> None:
        while self._in_flight < self.concurrency and not self.st.cancel.is_set():
            step = self.sched.take()
            if step is None:
                return
            self.notify(step.name, "running")
            # In the store too (next batch), for `runs show` from another shell or machine.
            self._rows[step.name] = {"id": self.ids[step.name], "status": "running",
                                     "started_at": time.time()}
            if self._in_flight == 0 and not self.sched.has_ready() and self.runner.runs_here(step):
                # Alone and in-process (a chain): run it here, no thread hand-off.
                self._settle(step.name, self._run(step))
                continue
            self._todo.put(step)
            self._in_flight += 1

    def _worker(self) -> None:
        while (step := self._todo.get()) is not None:
            self._finished.put((step.name, self._run(step)))

    def _run(self, step: Step) -> Outcome:
        inputs = {local: self.outputs[ref.split(".")[0]][ref.split(".")[1]]
                  for local, ref in step.inputs.items()}
        try:
            return self.runner.run_step(self.st, step, self.values[step.name], inputs,
                                        self.outputs[step.name])
        except Exception as exc:  # noqa: BLE001 - recorded as the step's failure
            return Outcome("failed", None, f"step {step.name} crashed the engine: {exc!r}")

    def _collect(self, timeout: float) -> None:
        """Settle the steps that finished, waiting up to `timeout` for the first one."""
        try:
            name, out = self._finished.get(timeout=timeout)
            while True:
                self._in_flight -= 1
                self._settle(name, out)
                name, out = self._finished.get_nowait()
        except queue.Empty:
            pass

    # -- record ---------------------------------------------------------------------------------
    def _settle(self, name: str, out: Outcome) -> None:
        self.records[name] = out
        if out.status == "cached":
            self.outputs[name] = {k: Path(v) for k, v in out.outputs.items()}
        self.notify(name, out.status)
        self._rows[name] = {
            "id": self.ids[name], "status": out.status, "exit_code": out.exit_code,
            "error": out.error, "attempts": out.attempts, "cache_key": out.cache_key,
            "cached_from": out.cached_from, "outputs": out.outputs,
            "mlflow_run_id": out.mlflow_run_id, "started_at": out.started_at,
            "ended_at": out.ended_at, "log_path": str(self.st.run_dir / f"{name}.log"),
        }
        if out.status not in DONE and out.status != "cancelled":
            self.first_error = self.first_error or out.error
        for dep in self.sched.settle(name, out.status):
            mark = self.sched.status[dep]
            self.notify(dep, mark)
            self.st.journal.write(dep, mark)
            self._rows[dep] = {"id": self.ids[dep], "status": mark,
                               "error": f"upstream {name} {out.status}"}

    def _flush(self) -> None:
        rows = list(self._rows.values())
        again_if_disconnected(lambda: self.store.update_steps(rows))
        self._rows.clear()

    def _poll_cancel(self) -> None:
        if not self.st.cancel.is_set() and self.cancel_requested():
            self.st.cancel.set()
            self._kill_all()

    def _kill_all(self) -> None:
        with self.st.lock:
            procs = list(self.st.procs.values())
        for p in procs:
            threading.Thread(target=kill_group, args=(p.pid,), daemon=True).start()

    def _finish(self, threads: list[threading.Thread]) -> None:
        """Stop the workers, settle what they still report, record the rest as cancelled when
        the run was, and write everything down."""
        for _ in threads:
            self._todo.put(None)
        for t in threads:
            t.join()
        while not self._finished.empty():
            name, out = self._finished.get_nowait()
            self._settle(name, out)
        if self.st.cancel.is_set():
            for name in self.sched.cancel_rest():
                self._rows[name] = {"id": self.ids[name], "status": "cancelled",
                                    "error": "the run was cancelled before it started"}
        self._flush()
        self.st.journal.close()
