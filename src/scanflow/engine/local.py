"""The local backend: steps as subprocesses or in-process callables, in parallel on threads.

Durability: every step transition is journalled (one `os.write`) before it is acted on, and
the store is updated in batches; a killed engine leaves a journal that `recover()` replays.
Tracking: one MLflow parent run per workflow run, holding the lineage of every step (params,
status, attempts, cache key, input/output digests) in one batch at the end; a step gets its
own child run when it logs to MLflow (subprocess steps always do; callables on first use).
"""

from __future__ import annotations

import inspect
import json
import os
import queue
import random
import shlex
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scanflow.engine.backend import Engine, RunResult
from scanflow.engine.cache import cache_key, code_fingerprint, file_digest
from scanflow.engine.context import StepContext
from scanflow.engine.dag import downstream_of
from scanflow.engine.journal import Journal, replay
from scanflow.engine.params import ParamError, resolve_params
from scanflow.engine.resources import ResourcePool, default_pool
from scanflow.procs import kill_group, pid_alive
from scanflow.settings import Settings
from scanflow.spec.loader import load_application, resolve_callable
from scanflow.spec.models import Application, Step
from scanflow.store import Store
from scanflow.store.schema import WorkflowRun
from scanflow.tracking import Tracker
from scanflow.tracking.mlflow_tracking import (
    TAG_APP,
    TAG_RUN,
    TAG_STEP,
    TAG_TEAM,
    TAG_WORKFLOW,
    tracking_env,
)

ProgressFn = Callable[[str, str], None]
TAIL_LINES = 20
DONE = {"succeeded", "cached"}
RESUMABLE = {"failed", "cancelled", "interrupted"}
FLUSH_EVERY = 0.1  # seconds between batched store writes
CANCEL_POLL = 0.25  # seconds between checks of the run's cancel flag


def log_tail(path: Path, lines: int = TAIL_LINES) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 16384))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def command_for(step: Step, params: dict[str, Any], paths: dict[str, Path]) -> list[str]:
    """Scanflow-style executors: params (then inputs/outputs) become `--name value` options."""
    assert step.run is not None
    argv = shlex.split(step.run)
    if argv and argv[0] in {"python", "python3"}:
        argv[0] = sys.executable
    for k, v in params.items():
        argv += [f"--{k}", str(v).lower() if isinstance(v, bool) else str(v)]
    for k, p in paths.items():
        argv += [f"--{k}", str(p)]
    return argv


@dataclass
class _Outcome:
    status: str
    exit_code: int | None = None
    error: str | None = None
    attempts: int = 0
    cache_key: str | None = None
    cached_from: str | None = None
    outputs: dict[str, str] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    started_at: float | None = None
    ended_at: float | None = None
    timed_out: bool = False
    exception: str | None = None


@dataclass
class _RunState:
    app: Application
    run: WorkflowRun
    run_dir: Path
    journal: Journal
    exp: str | None
    parent: str | None
    use_cache: bool
    cancel: threading.Event
    cache_index: dict[str, tuple[str, str, dict[str, str]]]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    fingerprints: dict[str, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


class LocalEngine(Engine):
    def __init__(
        self,
        settings: Settings,
        store: Store,
        tracker: Tracker | None = None,
        concurrency: int | None = None,
        *,
        track: bool = True,
        pool: ResourcePool | None = None,
    ) -> None:
        self.settings = settings.ensure()
        self.store = store
        self.track = track
        self.tracker = tracker or Tracker(settings)
        self.concurrency = concurrency or settings.concurrency
        self.pool = pool or default_pool(settings.max_cpus, settings.max_memory)
        self._apps: dict[str, Application] = {}
        # In-process steps use MLflow's fluent API too: point it at our store, never ./mlruns.
        import mlflow

        mlflow.set_tracking_uri(self.tracker.uri)
        if settings.registry_uri:
            mlflow.set_registry_uri(settings.registry_uri)
        self.recover()

    # -- public API ---------------------------------------------------------------------------
    def run(
        self,
        app: Application,
        workflow: str,
        params: dict[str, Any] | None = None,
        trigger: dict[str, Any] | None = None,
        progress: ProgressFn | None = None,
        cache: bool = True,
    ) -> RunResult:
        run_id = self.submit(app, workflow, params, trigger, cache=cache, status="running")
        return self.execute(run_id, progress=progress)

    def submit(
        self,
        app: Application,
        workflow: str,
        params: dict[str, Any] | None = None,
        trigger: dict[str, Any] | None = None,
        *,
        cache: bool = True,
        status: str = "queued",
    ) -> str:
        """Record a run (queued by default, for `serve`) after checking everything about it."""
        wf = app.workflow(workflow)
        resolve_params(wf, params)  # refuses bad params before anything is recorded
        for st in wf.steps:
            why = self.pool.check(st.resources.cpus, st.resources.memory)
            if why:
                raise ParamError(f"step {st.name} {why}")
        run = self.store.create_run(app.app, app.team, workflow, dict(params or {}), trigger,
                                    status=status, spec_path=app.source, use_cache=cache)
        self._apps[run.id] = app
        return run.id

    def execute(self, run_id: str, app: Application | None = None,
                progress: ProgressFn | None = None) -> RunResult:
        run = self.store.get_run(run_id)
        if run is None:
            raise KeyError(f"no run {run_id!r}")
        app = app or self._apps.pop(run.id, None) or self._load(run)
        wf = app.workflow(run.workflow)
        values = resolve_params(wf, run.params)
        return self._execute(app, run, values, {}, progress)

    def resume(self, run_id: str, app: Application | None = None,
               progress: ProgressFn | None = None) -> RunResult:
        """Re-run only the failed, cancelled, interrupted or never-started steps of a run."""
        self.recover()
        run = self.store.get_run(run_id)
        if run is None:
            raise KeyError(f"no run {run_id!r}")
        if run.status not in RESUMABLE:
            raise ValueError(f"run {run.id[:12]} is {run.status}; only failed, cancelled or "
                             "interrupted runs can be resumed")
        app = app or self._load(run)
        wf = app.workflow(run.workflow)
        values = resolve_params(wf, run.params)
        done: dict[str, dict[str, str]] = {}
        for s in self.store.list_steps(run.id):
            if s.status in DONE and all(Path(p).exists() for p in (s.outputs or {}).values()):
                done[s.step] = dict(s.outputs or {})
        return self._execute(app, run, values, done, progress)

    def cancel(self, run_id: str) -> str:
        """Ask a run to stop: running steps are killed, pending ones never start."""
        run = self.store.get_run(run_id)
        if run is None:
            raise KeyError(f"no run {run_id!r}")
        if run.status in {"queued", "pending"} or (
            run.status == "running" and not pid_alive(run.owner_pid)
        ):
            self.store.update_run(run.id, status="cancelled", ended_at=time.time(),
                                  error="cancelled before it ran")
            return "cancelled"
        if run.status != "running":
            raise ValueError(f"run {run.id[:12]} is already {run.status}")
        self.store.update_run(run.id, cancel_requested=True)
        return "cancelling"

    def recover(self) -> list[str]:
        """Mark runs whose engine process died as `interrupted`, from their journals: steps
        that finished keep their outputs; steps that were running are killed and marked."""
        found = []
        for run in self.store.list_runs(status=["running"], limit=10_000):
            if run.owner_pid is None or run.owner_pid == os.getpid() or pid_alive(run.owner_pid):
                continue
            journal = replay(self.settings.runs_dir / run.id / "journal.jsonl")
            rows = []
            ids = {s.step: s.id for s in self.store.list_steps(run.id)}
            for step, rec in journal.items():
                if step not in ids:
                    continue
                status = rec["status"]
                if status == "running":
                    if rec.get("pgid") and pid_alive(rec.get("pid")):
                        kill_group(int(rec["pgid"]), grace=1.0)
                    status = "interrupted"
                rows.append({"id": ids[step], "status": status,
                             "exit_code": rec.get("exit_code"), "error": rec.get("error"),
                             "outputs": rec.get("outputs") or {}, "cache_key": rec.get("cache_key"),
                             "cached_from": rec.get("cached_from"),
                             "attempts": rec.get("attempts", 0),
                             "ended_at": rec.get("ended_at")})
            for s in self.store.list_steps(run.id):
                if s.step not in journal and s.status == "running":
                    rows.append({"id": s.id, "status": "interrupted"})
            self.store.update_steps(rows)
            self.store.update_run(
                run.id, status="interrupted", ended_at=time.time(),
                error=f"the engine process {run.owner_pid} died; `scanflow resume {run.id[:12]}`",
            )
            if self.track and run.mlflow_run_id:
                try:
                    self.tracker.end_run(run.mlflow_run_id, "interrupted")
                except Exception:  # noqa: BLE001 - tracking must not block recovery
                    pass
            found.append(run.id)
        return found

    def serve(self, stop: Callable[[], bool], max_runs: int = 2, poll: float = 0.5) -> None:
        """Run queued runs until `stop()`: at most `max_runs` at once, the next one taken from
        the team that has had the fewest runs started (round-robin; oldest first in a team)."""
        inflight: dict[str, tuple[threading.Thread, str]] = {}
        served: dict[str, int] = {}  # runs started per team: round-robin between teams
        while not stop():
            for rid in [r for r, (t, _) in inflight.items() if not t.is_alive()]:
                inflight.pop(rid)
            if len(inflight) < max_runs:
                queued = sorted(self.store.list_runs(status=["queued"], limit=10_000),
                                key=lambda r: r.created_at)
                for r in queued:
                    if r.team not in served:  # a newcomer joins at the current level
                        served[r.team] = min(served.values(), default=0)
                if queued:
                    nxt = min(queued, key=lambda r: (served[r.team], r.created_at))
                    served[nxt.team] += 1
                    self.store.update_run(nxt.id, status="running")
                    t = threading.Thread(target=self._serve_one, args=(nxt.id,), daemon=True)
                    inflight[nxt.id] = (t, nxt.team)
                    t.start()
                    continue
            time.sleep(poll)
        for t, _ in inflight.values():
            t.join()

    def _serve_one(self, run_id: str) -> None:
        try:
            self.execute(run_id)
        except Exception as exc:  # noqa: BLE001 - a broken run must not stop the queue
            self.store.update_run(run_id, status="failed", ended_at=time.time(),
                                  error=f"could not start: {exc}")

    def _load(self, run: WorkflowRun) -> Application:
        if not run.spec_path:
            raise ValueError(f"run {run.id[:12]} was built in Python; pass its Application")
        return load_application(run.spec_path)

    # -- one run ------------------------------------------------------------------------------
    def _execute(
        self,
        app: Application,
        run: WorkflowRun,
        values: dict[str, dict[str, Any]],
        done: dict[str, dict[str, str]],
        progress: ProgressFn | None,
    ) -> RunResult:
        wf = app.workflow(run.workflow)
        run_dir = self.settings.runs_dir / run.id
        run_dir.mkdir(parents=True, exist_ok=True)
        names = [s.name for s in wf.steps]
        ids = self.store.create_steps(run.id, names)
        exp = parent = None
        if self.track:
            exp = self.tracker.experiment_id(app.app, app.team)
            parent = run.mlflow_run_id
            if parent is None:
                tags = {TAG_RUN: run.id, TAG_WORKFLOW: run.workflow, TAG_APP: app.app,
                        TAG_TEAM: app.team}
                parent = self.tracker.start_run(exp, run.workflow, tags, params=dict(run.params))
        started = time.time()
        self.store.update_run(run.id, status="running", started_at=run.started_at or started,
                              mlflow_run_id=parent, owner_pid=os.getpid(), ended_at=None,
                              error=None, cancel_requested=False)
        st = _RunState(app, run, run_dir, Journal(run_dir / "journal.jsonl"), exp, parent,
                       run.use_cache, threading.Event(), self._cache_index(run) if run.use_cache else {})
        outputs: dict[str, dict[str, Path]] = {
            s.name: {o: run_dir / s.name / o for o in s.outputs} for s in wf.steps
        }
        status: dict[str, str] = {n: "pending" for n in names}
        records: dict[str, _Outcome] = {}
        for name, outs in done.items():
            status[name] = "succeeded"
            outputs[name] = {k: Path(v) for k, v in outs.items()}
        pending_rows: dict[str, dict[str, Any]] = {
            n: {"id": ids[n], "status": "pending", "exit_code": None, "error": None}
            for n in names if n not in done
        }
        notify = progress or (lambda _s, _st: None)
        first_error: str | None = None
        last_flush = last_cancel = time.time()
        # In-degree counting: a step becomes ready when its last dependency is done.
        deps = {s.name: s.deps() for s in wf.steps}
        children: dict[str, list[str]] = {n: [] for n in names}
        for n, ds in deps.items():
            for d in ds:
                children[d].append(n)
        waiting = {n: sum(1 for d in deps[n] if status[d] not in DONE) for n in names}
        ready = [s for s in wf.steps if status[s.name] == "pending" and waiting[s.name] == 0]
        by_name = {s.name: s for s in wf.steps}
        todo: queue.Queue[Step | None] = queue.Queue()
        finished: queue.Queue[tuple[str, _Outcome]] = queue.Queue()

        def inputs_of(s: Step) -> dict[str, Path]:
            return {local: outputs[ref.split(".")[0]][ref.split(".")[1]] for local, ref in s.inputs.items()}

        def worker() -> None:
            while (s := todo.get()) is not None:
                try:
                    out = self._run_step(st, s, values[s.name], inputs_of(s), outputs[s.name])
                except Exception as exc:  # noqa: BLE001 - recorded as the step's failure
                    out = _Outcome("failed", None, f"step {s.name} crashed the engine: {exc!r}")
                finished.put((s.name, out))

        def flush() -> None:
            self.store.update_steps(list(pending_rows.values()))
            pending_rows.clear()

        def settle(name: str, out: _Outcome) -> None:
            nonlocal first_error
            records[name] = out
            status[name] = out.status
            if out.status == "cached":
                outputs[name] = {k: Path(v) for k, v in out.outputs.items()}
            notify(name, out.status)
            pending_rows[name] = {
                "id": ids[name], "status": out.status, "exit_code": out.exit_code,
                "error": out.error, "attempts": out.attempts, "cache_key": out.cache_key,
                "cached_from": out.cached_from, "outputs": out.outputs,
                "mlflow_run_id": out.mlflow_run_id, "started_at": out.started_at,
                "ended_at": out.ended_at, "log_path": str(run_dir / f"{name}.log"),
            }
            if out.status in DONE:
                for c in children[name]:
                    waiting[c] -= 1
                    if waiting[c] == 0 and status[c] == "pending":
                        ready.append(by_name[c])
                return
            if out.status != "cancelled":
                first_error = first_error or out.error
            mark = "cancelled" if out.status == "cancelled" else "skipped"
            for dep in downstream_of(wf, name):
                if status[dep] == "pending":
                    status[dep] = mark
                    notify(dep, mark)
                    st.journal.write(dep, mark)
                    pending_rows[dep] = {"id": ids[dep], "status": mark,
                                         "error": f"upstream {name} {out.status}"}

        flush()
        threads = [threading.Thread(target=worker, daemon=True, name=f"step-{i}")
                   for i in range(self.concurrency)]
        for t in threads:
            t.start()
        in_flight = 0
        try:
            while True:
                while ready and not st.cancel.is_set():
                    s = ready.pop(0)
                    if status[s.name] != "pending":
                        continue
                    status[s.name] = "running"
                    notify(s.name, "running")
                    if in_flight == 0 and not ready and s.call is not None:
                        # Alone and in-process (a chain): run it here, no thread hand-off.
                        settle(s.name, self._run_step(st, s, values[s.name], inputs_of(s),
                                                      outputs[s.name]))
                        continue
                    if in_flight >= self.concurrency:
                        status[s.name] = "pending"
                        ready.insert(0, s)
                        break
                    todo.put(s)
                    in_flight += 1
                if in_flight == 0 and not ready:
                    break
                if in_flight:
                    try:
                        name, out = finished.get(timeout=FLUSH_EVERY)
                        in_flight -= 1
                        settle(name, out)
                        while True:
                            name, out = finished.get_nowait()
                            in_flight -= 1
                            settle(name, out)
                    except queue.Empty:
                        pass
                now = time.time()
                if now - last_cancel >= CANCEL_POLL:
                    last_cancel = now
                    if not st.cancel.is_set() and self._cancel_requested(run.id):
                        st.cancel.set()
                        self._kill_all(st)
                if now - last_flush >= FLUSH_EVERY:
                    last_flush = now
                    flush()
                if st.cancel.is_set() and in_flight == 0:
                    break
        except KeyboardInterrupt:
            st.cancel.set()
            self._kill_all(st)
            raise
        finally:
            for _ in threads:
                todo.put(None)
            for t in threads:
                t.join()
            while not finished.empty():
                name, out = finished.get_nowait()
                settle(name, out)
            if st.cancel.is_set():
                for name, stt in status.items():
                    if stt in ("pending", "running"):
                        status[name] = "cancelled"
                        pending_rows[name] = {"id": ids[name], "status": "cancelled",
                                              "error": "the run was cancelled before it started"}
            flush()
            st.journal.close()

        if st.cancel.is_set():
            final = "cancelled"
            first_error = first_error or "cancelled by request"
        else:
            final = "succeeded" if all(s in DONE for s in status.values()) else "failed"
        if self.track and parent:
            self._track_lineage(st, wf.steps, values, status, records, outputs, started)
            self.tracker.end_run(parent, final)
        self.store.update_run(run.id, status=final, ended_at=time.time(), error=first_error)
        return RunResult(run.id, final, parent, dict(status), first_error)

    def _cache_index(self, run: WorkflowRun) -> dict[str, tuple[str, str, dict[str, str]]]:
        """Cache keys of successful earlier step runs of this app's workflow, loaded once."""
        return self.store.runs.cache_index(run.app, run.workflow, exclude_run=run.id)

    def _cancel_requested(self, run_id: str) -> bool:
        run = self.store.get_run(run_id)
        return bool(run and run.cancel_requested)

    def _kill_all(self, st: _RunState) -> None:
        with st.lock:
            procs = list(st.procs.values())
        for p in procs:
            threading.Thread(target=kill_group, args=(p.pid,), daemon=True).start()

    def _track_lineage(self, st: _RunState, steps: list[Step], values: dict[str, dict[str, Any]],
                       status: dict[str, str], records: dict[str, _Outcome],
                       outputs: dict[str, dict[str, Path]], started: float) -> None:
        """Every step's lineage on the parent run, in a few batched calls."""
        lineage = []
        for s in steps:
            rec = records.get(s.name)
            outs = {}
            for k, p in outputs[s.name].items():
                outs[k] = {"path": str(p), "sha256": file_digest(p) if p.exists() else None}
            ins = {local: ref for local, ref in s.inputs.items()}
            lineage.append({
                "step": s.name, "status": status[s.name], "params": values[s.name],
                "inputs": ins, "outputs": outs,
                "attempts": rec.attempts if rec else 0,
                "cache_key": rec.cache_key if rec else None,
                "cached_from": rec.cached_from if rec else None,
                "mlflow_run_id": rec.mlflow_run_id if rec else None,
                "exit_code": rec.exit_code if rec else None,
                "seconds": (rec.ended_at - rec.started_at) if rec and rec.ended_at and rec.started_at
                else None,
            })
        counts = {f"steps_{k}": float(sum(1 for v in status.values() if v == k))
                  for k in ("succeeded", "cached", "failed", "skipped", "cancelled")}
        assert st.parent is not None
        self.tracker.log_metrics(st.parent, {**counts, "duration_s": time.time() - started})
        self.tracker.client.log_text(st.parent, json.dumps(lineage, indent=1, default=str),
                                     "scanflow/steps.json")

    # -- one step -----------------------------------------------------------------------------
    def _run_step(self, st: _RunState, step: Step, params: dict[str, Any], inputs: dict[str, Path],
                  outputs: dict[str, Path]) -> _Outcome:
        if st.cancel.is_set():
            return _Outcome("cancelled", error="the run was cancelled before it started")
        team = st.app.team
        res = step.resources
        if not self.pool.acquire(team, res.cpus, res.memory, st.cancel):
            return _Outcome("cancelled", error="the run was cancelled before it started")
        try:
            return self._run_step_admitted(st, step, params, inputs, outputs)
        finally:
            self.pool.release(team, res.cpus, res.memory)

    def _run_step_admitted(self, st: _RunState, step: Step, params: dict[str, Any],
                           inputs: dict[str, Path], outputs: dict[str, Path]) -> _Outcome:
        started = time.time()
        fn = resolve_callable(step.call, st.app.base_dir) if step.call is not None else None
        key = None
        if st.use_cache and step.cache:
            code = st.fingerprints.get(step.name)
            if code is None:
                code = st.fingerprints[step.name] = code_fingerprint(step, st.app.base_dir, fn)
            key = cache_key(code, params, inputs, step.env)
            hit = st.cache_index.get(key)
            if hit is not None and all(Path(p).exists() for p in hit[2].values()):
                out = _Outcome("cached", 0, cache_key=key, cached_from=f"{hit[0]}/{hit[1]}",
                               outputs=dict(hit[2]), started_at=started, ended_at=time.time())
                st.journal.write(step.name, "cached", cache_key=key, cached_from=out.cached_from,
                                 outputs=out.outputs, ended_at=out.ended_at)
                return out
        if outputs:
            (st.run_dir / step.name).mkdir(parents=True, exist_ok=True)
        log_path = st.run_dir / f"{step.name}.log"
        policy = step.retries
        attempt = 0
        child: list[str] = []

        def make_child() -> str:
            if not child:
                assert st.exp is not None and st.parent is not None
                tags = {TAG_RUN: st.run.id, TAG_STEP: step.name, TAG_APP: st.app.app,
                        TAG_TEAM: st.app.team}
                child.append(self.tracker.start_run(st.exp, step.name, tags, params=params,
                                                    parent=st.parent))
            return child[0]

        while True:
            attempt += 1
            st.journal.write(step.name, "running", attempt=attempt, started_at=started)
            if step.run is not None:
                out = self._run_subprocess(st, step, params, inputs, outputs, log_path, attempt,
                                           make_child if self.track else None)
            else:
                assert fn is not None
                out = self._run_callable(st, step, fn, params, inputs, outputs, log_path, attempt,
                                         make_child if self.track else None)
            if out.status == "succeeded":
                missing = [k for k, p in outputs.items() if not p.exists()]
                if missing:
                    out = _Outcome("failed", out.exit_code,
                                   f"step {step.name} did not write its declared outputs {missing}")
            if out.status == "succeeded" or st.cancel.is_set() or attempt > policy.count:
                break
            if not _retryable(policy, out):
                break
            delay = min(policy.max_backoff, policy.backoff * 2 ** (attempt - 1))
            delay += delay * policy.jitter * random.random()
            with open(log_path, "a") as f:
                f.write(f"\n--- attempt {attempt} {out.status}: retrying in {delay:.2f}s ---\n")
            if st.cancel.wait(delay):
                break
        if st.cancel.is_set() and out.status != "succeeded":
            out = _Outcome("cancelled", out.exit_code, "cancelled by request")
        if child and self.track:
            self.tracker.end_run(child[0], out.status)
        out.attempts = attempt
        out.cache_key = key
        out.started_at = started
        out.ended_at = time.time()
        out.mlflow_run_id = child[0] if child else None
        out.outputs = {k: str(v) for k, v in outputs.items()}
        st.journal.write(step.name, out.status, exit_code=out.exit_code, error=out.error,
                         attempts=attempt, cache_key=key, outputs=out.outputs, ended_at=out.ended_at)
        return out

    def _run_subprocess(self, st: _RunState, step: Step, params: dict[str, Any],
                        inputs: dict[str, Path], outputs: dict[str, Path], log_path: Path,
                        attempt: int, make_child: Callable[[], str] | None) -> _Outcome:
        argv = command_for(step, params, {**inputs, **outputs})
        env = {**os.environ, **self.settings.child_env(), "SCANFLOW_RUN_ID": st.run.id,
               "SCANFLOW_STEP": step.name, "SCANFLOW_ATTEMPT": str(attempt), "PYTHONUNBUFFERED": "1"}
        if make_child is not None:
            assert st.exp is not None
            env.update(tracking_env(self.tracker, st.exp, make_child()))
        env.update(step.env)
        with open(log_path, "ab") as logf:
            logf.write(f"$ {shlex.join(argv)}\n".encode())
            logf.flush()
            try:
                proc = subprocess.Popen(argv, cwd=st.app.base_dir, env=env, stdout=logf,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True)
            except OSError as exc:
                return _Outcome("failed", None, f"step {step.name} could not start: {exc}")
            st.journal.write(step.name, "running", attempt=attempt, pid=proc.pid, pgid=proc.pid)
            with st.lock:
                st.procs[step.name] = proc
            timed_out = False
            try:
                code = proc.wait(timeout=step.timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                kill_group(proc.pid)
                code = proc.wait()
            finally:
                with st.lock:
                    st.procs.pop(step.name, None)
            # Nothing of the step's process tree may outlive it.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if timed_out:
            return _Outcome("failed", code, f"step {step.name} timed out after {step.timeout:g}s "
                            f"(process tree killed); last lines of its log ({log_path}):\n"
                            f"{log_tail(log_path)}", timed_out=True)
        if code == 0:
            return _Outcome("succeeded", 0)
        return _Outcome("failed", code, f"step {step.name} failed with exit code {code}; last "
                        f"lines of its log ({log_path}):\n{log_tail(log_path)}")

    def _run_callable(self, st: _RunState, step: Step, fn: Callable[..., Any], params: dict[str, Any],
                      inputs: dict[str, Path], outputs: dict[str, Path], log_path: Path,
                      attempt: int, make_child: Callable[[], str] | None) -> _Outcome:
        def no_tracking() -> str:
            raise RuntimeError("MLflow tracking is off for this engine")

        ctx = StepContext(st.run.id, step.name, st.exp or "", self.tracker, params, inputs,
                          outputs, log_path, make_child or no_tracking, attempt)
        try:
            kwargs = _kwargs_for(fn, {**params, **inputs, **outputs, "ctx": ctx})
            box: dict[str, Any] = {}

            def target() -> None:
                try:
                    box["result"] = fn(**kwargs)
                except BaseException as exc:  # noqa: BLE001 - reported as the step's failure
                    box["error"] = exc
                    traceback.print_exc(file=ctx.log_file)
                    ctx.log_file.flush()

            if step.timeout is None:
                target()
            else:
                t = threading.Thread(target=target, daemon=True, name=f"step-{step.name}")
                t.start()
                t.join(step.timeout)
                if t.is_alive():
                    return _Outcome("failed", None, f"step {step.name} timed out after "
                                    f"{step.timeout:g}s (an in-process step cannot be killed; "
                                    "use `run:` for a hard kill)", timed_out=True)
            if "error" in box:
                exc = box["error"]
                return _Outcome("failed", 1, f"step {step.name} raised {type(exc).__name__}: {exc}; "
                                f"last lines of its log ({log_path}):\n{log_tail(log_path)}",
                                exception=type(exc).__name__)
            result = box.get("result")
            if isinstance(result, dict) and make_child is not None:
                numeric = {k: float(v) for k, v in result.items()
                           if isinstance(v, int | float) and not isinstance(v, bool)}
                if numeric:
                    ctx.log_metrics(numeric)
        finally:
            ctx.close()
        return _Outcome("succeeded", 0)


_sig_memo: dict[Any, tuple[bool, frozenset[str]]] = {}


def _kwargs_for(fn: Callable[..., Any], available: dict[str, Any]) -> dict[str, Any]:
    try:
        var_kw, names = _sig_memo[fn]
    except (KeyError, TypeError):
        sig = inspect.signature(fn)
        var_kw = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
        names = frozenset(sig.parameters)
        try:
            _sig_memo[fn] = (var_kw, names)
        except TypeError:
            pass
    return available if var_kw else {k: v for k, v in available.items() if k in names}


def _retryable(policy: Any, out: _Outcome) -> bool:
    if out.timed_out:
        return bool(policy.on_timeout)
    if out.exception is not None:
        return policy.on_exceptions is None or out.exception in policy.on_exceptions
    if policy.on_exit_codes is not None:
        return out.exit_code in policy.on_exit_codes
    return True
