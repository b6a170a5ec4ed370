"""Running one step of a local run: admission against the resource pool, the cache, retries
with backoff, and the step itself, as a subprocess (`run:`, killed with its process tree on
timeout or cancel) or an in-process callable (`call:`). Every transition is journalled before
it is acted on; the run loop (`engine.loop`) decides what runs when.
"""

from __future__ import annotations

import inspect
import os
import random
import shlex
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scanflow.engine.cache import cache_key, code_fingerprint, file_digest
from scanflow.engine.context import StepContext
from scanflow.engine.journal import Journal
from scanflow.engine.resources import ResourcePool
from scanflow.procs import GroupReaper, kill_group
from scanflow.settings import Settings
from scanflow.spec.code import importable, pythonpath
from scanflow.spec.loader import resolve_callable
from scanflow.spec.models import Application, Step
from scanflow.store.schema import WorkflowRun
from scanflow.tracking import Tracker
from scanflow.tracking.base import TAG_APP, TAG_BY, TAG_RUN, TAG_STEP, TAG_TEAM

TAIL_LINES = 20


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
class Outcome:
    """How one step ended (what the journal, the store and the lineage record)."""

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
    digests: dict[str, str] = field(default_factory=dict)  # output -> sha256, taken where it was written


@dataclass
class RunState:
    """What every step of one run shares: where it writes, its tracking runs, its cancel flag."""

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
    code_dir: Path | None = None  # the app's code_paths, staged for step processes
    # Each step's MLflow child run, made ahead by `ChildRuns` (None: made when the step starts)
    children: ChildRuns | None = None


# MLflow calls in flight at once: a tracking server answers several together (each takes it
# ~10-20 ms); a SQLite tracking file takes one writer at a time, and threads only contend.
SERVER_CHILD_RUN_THREADS = 4


class ChildRuns:
    """The MLflow child runs of one run's `run:` steps, made ahead of their steps and closed
    behind them, by one background thread.

    Why: a tracked step needs its child run's id before it starts (the step logs into it), and
    making one costs a few MLflow calls (~8 ms on SQLite); made on the step's launch path, that
    was most of a tracked `run:` step's overhead (a `call:` step makes one only when it logs,
    so none is made ahead for it). Made in the run's step order while the steps before
    run, it is ready when its step starts; a step's `end_run` is queued behind it, so the next
    step does not wait for it either. For a tracking server a few threads make them (in step
    order; a step's run is made before it is ended, as its end is queued only once its step
    has it), so that steps shorter than a round trip to the server do not wait on one thread;
    for a SQLite file one thread does (its writers queue anyway). `close()` waits for all
    of them and deletes the runs made for steps that never ran (cached, skipped or cancelled),
    before the parent run's lineage is written."""

    def __init__(self, tracker: Tracker, exp: str, parent: str,
                 ahead: list[tuple[str, dict[str, str], dict[str, Any]]]) -> None:
        self.tracker = tracker
        threads = SERVER_CHILD_RUN_THREADS if tracker.uri.startswith(("http://", "https://")) else 1
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="mlflow-child-runs")
        self._made = {name: self._pool.submit(tracker.start_run, exp, name, tags, params=params,
                                              parent=parent)
                      for name, tags, params in ahead}
        self._used: set[str] = set()

    def take(self, step: str) -> str | None:
        """The child run made ahead for `step` (waiting for it if it is still being made)."""
        made = self._made.get(step)
        if made is None:
            return None
        self._used.add(step)
        return made.result()

    def end(self, run_id: str, status: str) -> None:
        self._pool.submit(self.tracker.end_run, run_id, status)

    def close(self) -> None:
        for step, made in self._made.items():
            if step not in self._used:
                self._pool.submit(self._delete, made)
        self._pool.shutdown(wait=True)

    def _delete(self, made: Future[str]) -> None:
        self.tracker.delete_run(made.result())


class StepChild:
    """A step's MLflow child run, made on first call (`make`) and shared by its attempts; a
    backend whose step made its run elsewhere (on a Ray node) records its id in `id`."""

    def __init__(self, make: Callable[[], str]) -> None:
        self.id: str | None = None
        self._make = make

    def __call__(self) -> str:
        if self.id is None:
            self.id = self._make()
        return self.id


def child_tags(st: RunState, step: str) -> dict[str, str]:
    """The tags of a step's MLflow child run."""
    return {TAG_RUN: st.run.id, TAG_STEP: step, TAG_APP: st.app.app, TAG_TEAM: st.app.team,
            TAG_BY: str((st.run.trigger or {}).get("by", ""))}


class StepRunner:
    """Runs the steps of local runs; one per engine, shared by its worker threads."""

    # Kills the steps' process groups if this process dies (a Ray node's worker: `ray_task`);
    # none locally, where the engine's journal lets `recover`/`resume` find them.
    reaper: GroupReaper | None = None

    def __init__(self, settings: Settings, tracker: Tracker, pool: ResourcePool, track: bool) -> None:
        self.settings = settings
        self.tracker = tracker
        self.pool = pool
        self.track = track

    def outputs_exist(self, paths: Iterable[str | Path]) -> bool:
        """Whether outputs recorded earlier are still there (for the cache and resume)."""
        return all(Path(p).exists() for p in paths)

    def input_identities(self, inputs: dict[str, Path]) -> dict[str, str]:
        """What a step's inputs are, for its cache key: their content's digest."""
        return {k: file_digest(p) for k, p in inputs.items()}

    def child_run_at_start(self, step: Step) -> bool:
        """Whether `step` always needs its MLflow child run when it starts (so it is worth making
        ahead): a `run:` step's process gets its id; a `call:` step makes one only if it logs."""
        return step.run is not None

    def runs_here(self, step: Step) -> bool:
        """Whether `step` runs in this process (a `call:`): alone, the run loop runs it on its
        own thread, with no hand-off (it could not be killed on a cancel anyway)."""
        return step.call is not None

    def run_ended(self, st: RunState) -> None:
        """Called when a run's loop ended, before its result is recorded: what this runner
        still writes for the run in the background is written by the time it returns."""

    def missing_outputs(self, outputs: dict[str, Path]) -> list[str]:
        """The declared outputs a step that succeeded did not write."""
        return [k for k, p in outputs.items() if not p.exists()]

    def run_step(self, st: RunState, step: Step, params: dict[str, Any], inputs: dict[str, Path],
                  outputs: dict[str, Path]) -> Outcome:
        if st.cancel.is_set():
            return Outcome("cancelled", error="the run was cancelled before it started")
        team = st.app.team
        res = step.resources
        if not self.pool.acquire(team, res.cpus, res.memory, st.cancel):
            return Outcome("cancelled", error="the run was cancelled before it started")
        try:
            return self._run_step_admitted(st, step, params, inputs, outputs)
        finally:
            self.pool.release(team, res.cpus, res.memory)

    def _run_step_admitted(self, st: RunState, step: Step, params: dict[str, Any],
                           inputs: dict[str, Path], outputs: dict[str, Path]) -> Outcome:
        started = time.time()
        if step.call is not None:
            importable(st.app)  # its code_paths, for a step that runs in this process
        fn = resolve_callable(step.call, st.app.base_dir) if step.call is not None else None
        key = None
        if st.use_cache and step.cache:
            key, hit = self._cache_lookup(st, step, fn, params, inputs, started)
            if hit is not None:
                return hit
        if outputs:
            (st.run_dir / step.name).mkdir(parents=True, exist_ok=True)
        log_path = st.run_dir / f"{step.name}.log"
        policy = step.retries
        attempt = 0

        def make() -> str:
            assert st.exp is not None and st.parent is not None
            made = st.children.take(step.name) if st.children is not None else None
            return made or self.tracker.start_run(st.exp, step.name, child_tags(st, step.name),
                                                  params=params, parent=st.parent)

        make_child = StepChild(make)

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
                missing = self.missing_outputs(outputs)
                if missing:
                    out = Outcome("failed", out.exit_code,
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
            out = Outcome("cancelled", out.exit_code, "cancelled by request")
        if make_child.id and self.track:
            if st.children is not None:
                st.children.end(make_child.id, out.status)  # off the path of the steps after it
            else:
                self.tracker.end_run(make_child.id, out.status)
        out.attempts = attempt
        out.cache_key = key
        out.started_at = started
        out.ended_at = time.time()
        out.mlflow_run_id = make_child.id
        out.outputs = {k: str(v) for k, v in outputs.items()}
        st.journal.write(step.name, out.status, exit_code=out.exit_code, error=out.error,
                         attempts=attempt, cache_key=key, outputs=out.outputs, ended_at=out.ended_at)
        return out

    def _cache_lookup(self, st: RunState, step: Step, fn: Callable[..., Any] | None,
                      params: dict[str, Any], inputs: dict[str, Path],
                      started: float) -> tuple[str, Outcome | None]:
        """The step's cache key, and a journalled `cached` outcome when an earlier run of the
        same key left its outputs in place."""
        code = st.fingerprints.get(step.name)
        if code is None:
            code = st.fingerprints[step.name] = code_fingerprint(step, st.app.base_dir, fn)
        key = cache_key(code, params, self.input_identities(inputs), step.env)
        hit = st.cache_index.get(key)
        if hit is None or not self.outputs_exist(hit[2].values()):
            return key, None
        out = Outcome("cached", 0, cache_key=key, cached_from=f"{hit[0]}/{hit[1]}",
                      outputs=dict(hit[2]), started_at=started, ended_at=time.time())
        st.journal.write(step.name, "cached", cache_key=key, cached_from=out.cached_from,
                         outputs=out.outputs, ended_at=out.ended_at)
        return key, out

    def _run_subprocess(self, st: RunState, step: Step, params: dict[str, Any],
                        inputs: dict[str, Path], outputs: dict[str, Path], log_path: Path,
                        attempt: int, make_child: StepChild | None) -> Outcome:
        argv = command_for(step, params, {**inputs, **outputs})
        env = {**os.environ, **self.settings.child_env(), "SCANFLOW_RUN_ID": st.run.id,
               "SCANFLOW_STEP": step.name, "SCANFLOW_ATTEMPT": str(attempt), "PYTHONUNBUFFERED": "1"}
        if make_child is not None:
            assert st.exp is not None
            env.update(self.tracker.step_env(st.exp, make_child()))
        env.update(step.env)
        env = pythonpath(st.code_dir, env)
        with open(log_path, "ab") as logf:
            logf.write(f"$ {shlex.join(argv)}\n".encode())
            logf.flush()
            try:
                proc = subprocess.Popen(argv, cwd=st.app.base_dir, env=env, stdout=logf,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True)
            except OSError as exc:
                return Outcome("failed", None, f"step {step.name} could not start: {exc}")
            st.journal.write(step.name, "running", attempt=attempt, pid=proc.pid, pgid=proc.pid)
            if self.reaper is not None:
                self.reaper.add(proc.pid)
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
            if self.reaper is not None:
                self.reaper.remove(proc.pid)
        if timed_out:
            return Outcome("failed", code, f"step {step.name} timed out after {step.timeout:g}s "
                           f"(process tree killed); last lines of its log ({log_path}):\n"
                           f"{log_tail(log_path)}", timed_out=True)
        if code == 0:
            return Outcome("succeeded", 0)
        return Outcome("failed", code, f"step {step.name} failed with exit code {code}; last "
                       f"lines of its log ({log_path}):\n{log_tail(log_path)}")

    def _run_callable(self, st: RunState, step: Step, fn: Callable[..., Any], params: dict[str, Any],
                      inputs: dict[str, Path], outputs: dict[str, Path], log_path: Path,
                      attempt: int, make_child: StepChild | None) -> Outcome:
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
                    return Outcome("failed", None, f"step {step.name} timed out after "
                                   f"{step.timeout:g}s (an in-process step cannot be killed; "
                                   "use `run:` for a hard kill)", timed_out=True)
            if "error" in box:
                exc = box["error"]
                return Outcome("failed", 1, f"step {step.name} raised {type(exc).__name__}: {exc}; "
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
        return Outcome("succeeded", 0)


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


def _retryable(policy: Any, out: Outcome) -> bool:
    if out.timed_out:
        return bool(policy.on_timeout)
    if out.exception is not None:
        return policy.on_exceptions is None or out.exception in policy.on_exceptions
    if policy.on_exit_codes is not None:
        return out.exit_code in policy.on_exit_codes
    return True
