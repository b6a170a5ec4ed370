"""The local backend: steps as subprocesses or in-process callables, in parallel on threads."""

from __future__ import annotations

import inspect
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scanflow.engine.backend import Engine, RunResult
from scanflow.engine.context import StepContext
from scanflow.engine.dag import dependants
from scanflow.engine.params import resolve_params
from scanflow.settings import Settings
from scanflow.spec.loader import resolve_callable
from scanflow.spec.models import Application, Step
from scanflow.store import Store
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


class LocalEngine(Engine):
    def __init__(
        self,
        settings: Settings,
        store: Store,
        tracker: Tracker | None = None,
        concurrency: int | None = None,
    ) -> None:
        self.settings = settings.ensure()
        self.store = store
        self.tracker = tracker or Tracker(settings)
        self.concurrency = concurrency or settings.concurrency
        # In-process steps use MLflow's fluent API too: point it at our store, never ./mlruns.
        import mlflow

        mlflow.set_tracking_uri(self.tracker.uri)
        if settings.registry_uri:
            mlflow.set_registry_uri(settings.registry_uri)
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()

    def run(
        self,
        app: Application,
        workflow: str,
        params: dict[str, Any] | None = None,
        trigger: dict[str, Any] | None = None,
        progress: ProgressFn | None = None,
    ) -> RunResult:
        wf = app.workflow(workflow)
        values = resolve_params(wf, params)  # refuses bad params before anything is recorded
        run = self.store.create_run(app.app, app.team, workflow, dict(params or {}), trigger)
        run_dir = self.settings.runs_dir / run.id
        run_dir.mkdir(parents=True, exist_ok=True)
        exp = self.tracker.experiment_id(app.app, app.team)
        tags = {TAG_RUN: run.id, TAG_WORKFLOW: workflow, TAG_APP: app.app, TAG_TEAM: app.team}
        parent = self.tracker.start_run(exp, workflow, tags, params=dict(params or {}))
        self.store.update_run(run.id, status="running", started_at=time.time(), mlflow_run_id=parent)
        for st in wf.steps:
            self.store.upsert_step(run.id, st.name, status="pending")

        outputs = {
            st.name: {o: run_dir / st.name / o for o in st.outputs} for st in wf.steps
        }
        downstream = dependants(wf)
        status: dict[str, str] = {st.name: "pending" for st in wf.steps}
        first_error: str | None = None
        notify = progress or (lambda _s, _st: None)

        def ready(st: Step) -> bool:
            return status[st.name] == "pending" and all(status[d] == "succeeded" for d in st.deps())

        pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="step")
        running: dict[Future[_Outcome], str] = {}
        try:
            while True:
                for st in wf.steps:
                    if len(running) >= self.concurrency:
                        break
                    if ready(st):
                        status[st.name] = "running"
                        notify(st.name, "running")
                        inputs = {
                            local: outputs[ref.split(".")[0]][ref.split(".")[1]]
                            for local, ref in st.inputs.items()
                        }
                        fut = pool.submit(
                            self._run_step, app, run.id, exp, parent, st, values[st.name],
                            inputs, outputs[st.name], run_dir,
                        )
                        running[fut] = st.name
                if not running:
                    break
                done, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for fut in done:
                    name = running.pop(fut)
                    outcome = fut.result()
                    status[name] = outcome.status
                    notify(name, outcome.status)
                    if outcome.status != "succeeded":
                        first_error = first_error or outcome.error
                        for dep in downstream[name]:
                            if status[dep] == "pending":
                                status[dep] = "skipped"
                                notify(dep, "skipped")
                                self.store.upsert_step(
                                    run.id, dep, status="skipped", error=f"upstream {name} failed"
                                )
        except KeyboardInterrupt:
            self._kill_all()
            for name, s in status.items():
                if s in {"pending", "running"}:
                    self.store.upsert_step(run.id, name, status="cancelled", ended_at=time.time())
            self.store.update_run(run.id, status="cancelled", ended_at=time.time(),
                                  error="interrupted by the user")
            self.tracker.end_run(parent, "cancelled")
            raise
        finally:
            pool.shutdown(wait=True)

        final = "succeeded" if all(s == "succeeded" for s in status.values()) else "failed"
        self.store.update_run(run.id, status=final, ended_at=time.time(), error=first_error)
        self.tracker.end_run(parent, final)
        return RunResult(run.id, final, parent, dict(status), first_error)

    # -- one step -----------------------------------------------------------------------------
    def _run_step(
        self,
        app: Application,
        run_id: str,
        exp: str,
        parent: str,
        step: Step,
        params: dict[str, Any],
        inputs: dict[str, Path],
        outputs: dict[str, Path],
        run_dir: Path,
    ) -> _Outcome:
        log_path = run_dir / f"{step.name}.log"
        (run_dir / step.name).mkdir(parents=True, exist_ok=True)
        tags = {TAG_RUN: run_id, TAG_STEP: step.name, TAG_APP: app.app, TAG_TEAM: app.team}
        child = self.tracker.start_run(exp, step.name, tags, params=params, parent=parent)
        self.store.upsert_step(
            run_id, step.name, status="running", started_at=time.time(), mlflow_run_id=child,
            log_path=str(log_path), outputs={k: str(v) for k, v in outputs.items()},
        )
        try:
            if step.run is not None:
                outcome = self._run_subprocess(app, run_id, exp, child, step, params, inputs,
                                               outputs, log_path)
            else:
                outcome = self._run_callable(app, run_id, exp, child, step, params, inputs,
                                             outputs, log_path)
            if outcome.status == "succeeded":
                missing = [k for k, p in outputs.items() if not p.exists()]
                if missing:
                    outcome = _Outcome("failed", outcome.exit_code,
                                       f"step {step.name} did not write its declared outputs "
                                       f"{missing}")
        except Exception as exc:  # noqa: BLE001 - the engine must record, not crash
            outcome = _Outcome("failed", None, f"step {step.name} could not start: {exc}")
            with open(log_path, "a") as f:
                traceback.print_exc(file=f)
        self.store.upsert_step(
            run_id, step.name, status=outcome.status, exit_code=outcome.exit_code,
            ended_at=time.time(), error=outcome.error,
        )
        self.tracker.end_run(child, outcome.status)
        return outcome

    def _run_subprocess(
        self, app: Application, run_id: str, exp: str, child: str, step: Step,
        params: dict[str, Any], inputs: dict[str, Path], outputs: dict[str, Path], log_path: Path,
    ) -> _Outcome:
        argv = command_for(step, params, {**inputs, **outputs})
        env = {
            **os.environ,
            **self.settings.child_env(),
            **tracking_env(self.tracker, exp, child),
            "SCANFLOW_RUN_ID": run_id,
            "SCANFLOW_STEP": step.name,
            "PYTHONUNBUFFERED": "1",
            **step.env,
        }
        with open(log_path, "ab") as logf:
            logf.write(f"$ {shlex.join(argv)}\n".encode())
            logf.flush()
            proc = subprocess.Popen(
                argv, cwd=app.base_dir, env=env, stdout=logf, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
            key = f"{run_id}/{step.name}"
            with self._lock:
                self._procs[key] = proc
            try:
                code = proc.wait()
            finally:
                with self._lock:
                    self._procs.pop(key, None)
        if code == 0:
            return _Outcome("succeeded", 0)
        return _Outcome(
            "failed", code,
            f"step {step.name} failed with exit code {code}; last lines of its log "
            f"({log_path}):\n{log_tail(log_path)}",
        )

    def _run_callable(
        self, app: Application, run_id: str, exp: str, child: str, step: Step,
        params: dict[str, Any], inputs: dict[str, Path], outputs: dict[str, Path], log_path: Path,
    ) -> _Outcome:
        assert step.call is not None
        fn = resolve_callable(step.call, app.base_dir)
        with open(log_path, "a") as logf:
            ctx = StepContext(run_id, step.name, child, exp, self.tracker, params, inputs,
                              outputs, logf)
            available: dict[str, Any] = {**params, **inputs, **outputs, "ctx": ctx}
            sig = inspect.signature(fn)
            if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
                kwargs = available
            else:
                kwargs = {k: v for k, v in available.items() if k in sig.parameters}
            try:
                result = fn(**kwargs)
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc(file=logf)
                logf.flush()
                return _Outcome(
                    "failed", 1,
                    f"step {step.name} raised {type(exc).__name__}: {exc}; last lines of its "
                    f"log ({log_path}):\n{log_tail(log_path)}",
                )
            if isinstance(result, dict):
                numeric = {k: float(v) for k, v in result.items()
                           if isinstance(v, int | float) and not isinstance(v, bool)}
                if numeric:
                    ctx.log_metrics(numeric)
        return _Outcome("succeeded", 0)

    def _kill_all(self) -> None:
        with self._lock:
            procs = list(self._procs.values())
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
