"""The local backend: steps as subprocesses or in-process callables, in parallel on threads.

Durability: every step transition is journalled (one `os.write`) before it is acted on, and
the store is updated in batches; a killed engine leaves a journal that `recover()` replays.
Tracking: one parent run per workflow run, holding the lineage of every step (params,
status, attempts, cache key, input/output digests) in one batch at the end; a step gets its
own child run when it logs (subprocess steps always do; callables on first use).
Layout: `dag.Scheduler` decides what may run, `loop.RunLoop` dispatches and records,
`steps.StepRunner` runs one step; this module is the `Engine` API around them.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from scanflow.engine.backend import Engine, ProgressFn, RunResult
from scanflow.engine.cache import file_digest
from scanflow.engine.dag import DONE, Scheduler
from scanflow.engine.journal import Journal, replay
from scanflow.engine.logs import step_logs
from scanflow.engine.loop import RunLoop
from scanflow.engine.params import ParamError, resolve_params
from scanflow.engine.resources import ResourcePool, default_pool
from scanflow.engine.steps import ChildRuns, Outcome, RunState, StepRunner, child_tags
from scanflow.procs import kill_group, pid_alive
from scanflow.settings import Settings
from scanflow.spec.code import stage
from scanflow.spec.loader import load_application
from scanflow.spec.models import Application, Step
from scanflow.store import Store
from scanflow.store.db import again_if_disconnected
from scanflow.store.schema import WorkflowRun
from scanflow.tracking import MlflowTracker, Tracker
from scanflow.tracking.base import TAG_APP, TAG_BY, TAG_RUN, TAG_TEAM, TAG_WORKFLOW

RESUMABLE = {"failed", "cancelled", "interrupted"}
HEARTBEAT_EVERY = 10.0  # seconds between a running run's heartbeats (at most a quarter of stale_after)


def this_host() -> str:
    """The name a run's owner records for its host: pids mean something on their host only."""
    return socket.gethostname()


class Heartbeat:
    """Says in the store, every few seconds, that a run's driver is alive (its own thread: a
    long in-process step on the run loop's thread must not silence it)."""

    def __init__(self, store: Store, run_id: str, every: float) -> None:
        self.store, self.run_id, self.every = store, run_id, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name=f"heartbeat-{run_id[:8]}")

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.store.update_run(self.run_id, heartbeat_at=time.time())
            except Exception:  # noqa: BLE001 - the store away for a moment: beat again later
                pass


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
        self.tracker: Tracker = tracker or MlflowTracker(settings)
        self.concurrency = concurrency or settings.concurrency
        self.pool = pool or default_pool(settings.max_cpus, settings.max_memory)
        self.runner = StepRunner(self.settings, self.tracker, self.pool, track)
        self._apps: dict[str, Application] = {}
        # In-process steps use the tracker's fluent API too: point it at our store.
        self.tracker.use_in_process()
        self.recover()

    # -- public API ---------------------------------------------------------------------------
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
        unfit = self._unfit_check()
        for st in wf.steps:
            why = unfit(st)
            if why:
                raise ParamError(f"step {st.name} {why}")
        run = self.store.create_run(app.app, app.team, workflow, dict(params or {}), trigger,
                                    status=status, spec_path=app.source, use_cache=cache)
        # Its steps, pending, from now: `logs RUN STEP` and `runs show` know them before a
        # driver starts it (a queued or detached run's starts elsewhere, later).
        self.store.create_steps(run.id, [s.name for s in wf.steps])
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
            if s.status in DONE and self.runner.outputs_exist((s.outputs or {}).values()):
                done[s.step] = dict(s.outputs or {})
        return self._execute(app, run, values, done, progress)

    def cancel(self, run_id: str) -> str:
        """Ask a run to stop: running steps are killed, pending ones never start."""
        run = self.store.get_run(run_id)
        if run is None:
            raise KeyError(f"no run {run_id!r}")
        if run.status in {"queued", "pending"} or (
            run.status == "running" and (run.owner_pid is None or self._owner_gone(run) is not None)
        ):
            self.store.update_run(run.id, status="cancelled", ended_at=time.time(),
                                  error="cancelled before it ran")
            return "cancelled"
        if run.status != "running":
            raise ValueError(f"run {run.id[:12]} is already {run.status}")
        self.store.update_run(run.id, cancel_requested=True)
        return "cancelling"

    def _owner_gone(self, run: WorkflowRun) -> str | None:
        """Why a running run's driver is dead, or None while it is alive (or never started).
        On this host: its pid is gone. On another host (drivers on several machines share
        the store): its heartbeat is older than `run_stale_after` — a pid here says nothing
        about a process there. A run recorded before owners had hosts counts as this host's."""
        if run.owner_pid is None:
            return None
        if run.owner_host in (None, this_host()):
            if run.owner_pid == os.getpid() or pid_alive(run.owner_pid):
                return None
            return f"the engine process {run.owner_pid} died"
        beat = run.heartbeat_at or run.started_at or run.created_at
        silent = time.time() - beat
        if silent <= self.settings.run_stale_after:
            return None
        return (f"the engine process {run.owner_pid} on {run.owner_host} stopped its heartbeat "
                f"{silent:.0f}s ago")

    def recover(self) -> list[str]:
        """Mark runs whose engine process died as `interrupted`, from their journals: steps
        that finished keep their outputs; steps that were running are killed and marked.
        Only this host's dead drivers, and other hosts' silent ones (`_owner_gone`): a run
        another machine's live driver owns is left alone."""
        found = []
        for run in self.store.list_runs(status=["running"], limit=10_000):
            why = self._owner_gone(run)
            if why is None:
                continue
            # The journal and the step processes are on the owner's host: on another host the
            # store's rows are what is known (its steps' processes died with it, or are its own).
            journal = replay(self.settings.runs_dir / run.id / "journal.jsonl")
            here = run.owner_host in (None, this_host())
            rows = []
            ids = {s.step: s.id for s in self.store.list_steps(run.id)}
            for step, rec in journal.items():
                if step not in ids:
                    continue
                status = rec["status"]
                if status == "running":
                    if here and rec.get("pgid") and pid_alive(rec.get("pid")):
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
                error=f"{why}; `scanflow resume {run.id[:12]}`",
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
                    if not self.store.runs.claim_run(nxt.id, "queued", "running"):
                        continue  # another queue on this store took it (or it was cancelled)
                    served[nxt.team] += 1
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

    def status(self, run_id: str) -> RunResult:
        run = self.store.get_run(run_id)
        if run is None:
            raise KeyError(f"no run {run_id!r}")
        steps = {s.step: s.status for s in self.store.list_steps(run.id)}
        return RunResult(run.id, run.status, run.mlflow_run_id, steps, run.error)

    def logs(self, run_id: str, step: str | None = None, *, follow: bool = False,
             poll: float = 0.3) -> Iterator[tuple[str, str]]:
        return step_logs(self.store, self.settings.runs_dir, run_id, step, follow=follow, poll=poll)

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
        ids = self.store.create_steps(run.id, [s.name for s in wf.steps])
        exp, parent = self._open_tracking(app, run)
        started = time.time()
        self.store.update_run(run.id, status="running", started_at=run.started_at or started,
                              mlflow_run_id=parent, owner_pid=os.getpid(), owner_host=this_host(),
                              heartbeat_at=started, ended_at=None, error=None, cancel_requested=False)
        st = RunState(app, run, run_dir, Journal(run_dir / "journal.jsonl"), exp, parent,
                      run.use_cache, threading.Event(), self._cache_index(run) if run.use_cache else {},
                      code_dir=stage(app, run_dir))
        outputs: dict[str, dict[str, Path]] = {
            s.name: self._output_paths(run_dir, parent, s) for s in wf.steps
        }
        for name, outs in done.items():
            outputs[name] = {k: Path(v) for k, v in outs.items()}
        if self.track and exp and parent:  # the steps' child runs, made ahead in step order
            st.children = ChildRuns(self.tracker, exp, parent,
                                    [(s.name, child_tags(st, s.name), values[s.name])
                                     for s in wf.steps
                                     if s.name not in done and self.runner.child_run_at_start(s)])
        sched = Scheduler(wf, done)
        loop = RunLoop(self.store, self.runner, st, sched, step_ids=ids, values=values,
                       outputs=outputs, concurrency=self.concurrency, progress=progress,
                       cancel_requested=lambda: self._cancel_requested(run.id))
        try:
            with Heartbeat(self.store, run.id, min(HEARTBEAT_EVERY, self.settings.run_stale_after / 4)):
                loop.run()
        finally:
            if st.children is not None:
                st.children.close()  # every child run ended, the unused ones deleted
            self.runner.run_ended(st)
        first_error = loop.first_error
        if st.cancel.is_set():
            final = "cancelled"
            first_error = first_error or "cancelled by request"
        else:
            final = sched.outcome()
        if self.track and parent:
            self._track_lineage(st, wf.steps, values, sched.status, loop.records, outputs, started)
            self.tracker.end_run(parent, final)
        ended = time.time()
        again_if_disconnected(lambda: self.store.update_run(run.id, status=final, ended_at=ended,
                                                            error=first_error))
        return RunResult(run.id, final, parent, dict(sched.status), first_error)

    def _unfit_check(self) -> Callable[[Step], str | None]:
        """What tells, for each step of a run being submitted, why no machine this engine runs
        on could ever run it (None: some could)."""
        def unfit(step: Step) -> str | None:
            res = step.resources
            if res.gpus or res.custom:
                wants = ", ".join([f"gpus: {res.gpus:g}"] * bool(res.gpus) + sorted(res.custom))
                return (f"asks for {wants}, which the local backend does not schedule; run it on "
                        "the ray backend (SCANFLOW_BACKEND=ray)")
            return self.pool.check(res.cpus, res.memory)

        return unfit

    def _output_paths(self, run_dir: Path, parent: str | None, step: Step) -> dict[str, Path]:
        """Where a step of this run writes its declared outputs (local: the runs folder)."""
        return {o: run_dir / step.name / o for o in step.outputs}

    def _cache_index(self, run: WorkflowRun) -> dict[str, tuple[str, str, dict[str, str]]]:
        """Cache keys of successful earlier step runs of this app's workflow, loaded once."""
        return self.store.runs.cache_index(run.app, run.workflow, exclude_run=run.id)

    def _cancel_requested(self, run_id: str) -> bool:
        run = again_if_disconnected(lambda: self.store.get_run(run_id))
        return bool(run and run.cancel_requested)

    def _open_tracking(self, app: Application, run: WorkflowRun) -> tuple[str | None, str | None]:
        """The run's experiment and parent run (kept from an earlier attempt on resume)."""
        if not self.track:
            return None, None
        exp = self.tracker.experiment_id(app.app, app.team)
        parent = run.mlflow_run_id
        if parent is None:
            tags = {TAG_RUN: run.id, TAG_WORKFLOW: run.workflow, TAG_APP: app.app, TAG_TEAM: app.team,
                    TAG_BY: str((run.trigger or {}).get("by", ""))}
            parent = self.tracker.start_run(exp, run.workflow, tags, params=dict(run.params))
        return exp, parent

    def _track_lineage(self, st: RunState, steps: list[Step], values: dict[str, dict[str, Any]],
                       status: dict[str, str], records: dict[str, Outcome],
                       outputs: dict[str, dict[str, Path]], started: float) -> None:
        """Every step's lineage on the parent run, in a few batched calls."""
        lineage = []
        for s in steps:
            rec = records.get(s.name)
            outs = {}
            for k, p in outputs[s.name].items():
                taken = rec.digests.get(k) if rec else None  # on the node that wrote it (ray)
                outs[k] = {"path": str(p), "sha256": taken or (file_digest(p) if p.exists() else None)}
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
        self.tracker.log_text(st.parent, json.dumps(lineage, indent=1, default=str),
                              "scanflow/steps.json")

