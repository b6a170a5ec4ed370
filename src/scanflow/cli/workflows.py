"""Workflow commands: `run`, `runs list|show`, `logs`, `cancel`, `resume`, `engine serve`."""

from __future__ import annotations

import json
import signal as _signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.live import Live
from rich.table import Table

from scanflow.cli import remote as via
from scanflow.cli.common import (
    AppPath,
    build_engine,
    context,
    err,
    fail,
    iso,
    load,
    load_noting,
    out,
    print_json,
    show,
    table,
    timed,
)

runs_app = typer.Typer(no_args_is_help=True, help="Inspect workflow runs.")
engine_app = typer.Typer(no_args_is_help=True, help="Run queued and triggered workflows.")


def run(
    path: AppPath,
    workflow: Annotated[str, typer.Argument(help="workflow name")],
    param: Annotated[
        list[str] | None, typer.Option("--param", "-p", help="name=value or step.name=value")
    ] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="re-execute every step")] = False,
    detach: Annotated[bool, typer.Option("--detach", help="ray backend: submit the run to the "
                                         "cluster (a Ray job runs its driver), print its id, return")]
    = False,
) -> None:
    """Run a workflow in the foreground, with progress (or on the cluster, with --detach)."""
    from scanflow.engine import ParamError  # lazy: the engine (SQLAlchemy, MLflow)
    from scanflow.engine.params import parse_assignments, resolve_params  # lazy: the engine

    spec = load(path)
    if workflow not in spec.workflows:
        fail(f"no workflow {workflow!r} in {spec.source} (known: {', '.join(sorted(spec.workflows))})")
    try:
        params = parse_assignments(param or [])
        resolve_params(spec.workflows[workflow], params)
    except ParamError as exc:
        fail(str(exc))
    if (api := via.remote()) is not None:
        _remote_run(api, path, spec, workflow, params, not no_cache, detach)
        return
    settings, store = context()
    if detach:
        _detach(settings, store, spec, workflow, params, not no_cache)
        return
    engine = build_engine(settings, store)
    try:
        run_id = engine.submit(spec, workflow, params, cache=not no_cache, status="running")
    except ParamError as exc:
        fail(str(exc))
    _follow_run(engine, run_id, spec, workflow, lambda progress: engine.execute(run_id, spec, progress))


def _remote_run(api: Any, path: Path, spec: Any, workflow: str, params: dict[str, Any],
                cache: bool, detach: bool) -> None:
    """`run` through the server: register the application (its path as the server sees it),
    queue the run, and (unless `detach`) wait for it, printing each step as it ends."""
    api.ensure_app(spec.app, spec.team, path)
    r = api.call("POST", "/api/v1/runs", body={"app": spec.app, "team": spec.team, "workflow": workflow,
                                                "params": params, "cache": cache})
    if detach:
        print(r["id"])
        err.print(f"queued on the server; follow it with `scanflow logs {r['id'][:12]} --follow`",
                  highlight=False)
        return
    _wait_remote(api, r["id"], lambda _run: True)


def _remote_resume(api: Any, run_id: str, detach: bool) -> None:
    """`resume` through the server (it resumes the run in its own engine); unless `detach`,
    wait for the resumed attempt to end (one whose end is not the end it had before)."""
    before = api.call("GET", f"/api/v1/runs/{run_id}")
    api.call("POST", f"/api/v1/runs/{run_id}/resume")
    if detach:
        print(before["id"])
        err.print(f"resuming on the server; follow it with `scanflow logs {before['id'][:12]} "
                  "--follow`", highlight=False)
        return
    def moved(run: dict[str, Any]) -> bool:
        return run["status"] != before["status"] or run["ended_at"] != before["ended_at"]

    deadline = time.monotonic() + RESUME_START_S
    while not moved(api.call("GET", f"/api/v1/runs/{before['id']}")):
        if time.monotonic() > deadline:
            fail(f"run {before['id'][:12]}: the server did not start resuming it within "
                 f"{RESUME_START_S:.0f} s (its log says why)", code=1)
        time.sleep(0.2)
    _wait_remote(api, before["id"], lambda run: run["ended_at"] != before["ended_at"])


RESUME_START_S = 30.0
"""How long `resume` through the server waits for the run to leave the state it ended in."""


def _wait_remote(api: Any, run_id: str, new: Callable[[dict[str, Any]], bool]) -> None:
    """Print each step as it ends until the run ends (`new`: an end of this attempt, not an
    earlier one); exit 1 unless it succeeded."""
    seen: dict[str, str] = {}
    while True:
        run = api.call("GET", f"/api/v1/runs/{run_id}")
        ended = run["status"] in {"succeeded", "failed", "cancelled", "interrupted"} and new(run)
        for st in run["steps"]:
            if new(run) and st["status"] != seen.get(st["step"]) \
                    and st["status"] not in {"pending", "running"}:
                out.print(f"  {st['step']}: {st['status']}", highlight=False)
            seen[st["step"]] = st["status"]
        if ended:
            break
        time.sleep(0.5)
    out.print(f"run [bold]{run['id']}[/] {run['status']}")
    if run["status"] != "succeeded":
        err.print(run.get("error") or "", highlight=False, markup=False)
        raise typer.Exit(1)


def _detach(settings: Any, store: Any, spec: Any, workflow: str, params: dict[str, Any],
            cache: bool) -> None:
    """Record the run as pending and submit its driver to the Ray cluster as a job; print its id."""
    from scanflow.engine import ParamError  # lazy: the engine

    if settings.backend.strip().lower() != "ray":
        fail("--detach runs the workflow's driver on a Ray cluster: set SCANFLOW_BACKEND=ray (on "
             "the local backend, run it in the background: `nohup scanflow run ... &`)")
    from scanflow.engine.ray_jobs import dashboard_url, submit  # lazy: ray

    try:
        dashboard_url(settings.ray_address)  # refused before anything is recorded
    except ValueError as exc:
        fail(str(exc))
    engine = build_engine(settings, store)
    try:
        run_id = engine.submit(spec, workflow, params, {"by": "user", "detached": True}, cache=cache,
                               status="pending")
    except ParamError as exc:
        fail(str(exc))
    try:
        job = submit(engine, spec, run_id)
    except Exception as exc:  # noqa: BLE001 - the run is recorded: say it failed to go, and why
        store.update_run(run_id, status="failed", ended_at=time.time(),
                         error=f"could not submit it to the Ray cluster: {exc}")
        fail(f"run {run_id}: could not submit it to the Ray cluster: {exc}", code=1)
    print(run_id)
    err.print(f"submitted as Ray job {job}; follow it with `scanflow logs {run_id[:12]} --follow`, "
              f"see it with `scanflow runs show {run_id[:12]}`", highlight=False)


def _follow_run(engine: Any, run_id: str, spec: Any, workflow: str, go: Any) -> None:
    states = {s.name: "pending" for s in spec.workflows[workflow].steps}
    for row in engine.store.list_steps(run_id):
        states[row.step] = row.status
    started = time.time()

    def table() -> Table:
        t = Table(title=f"{spec.app}/{workflow} {run_id[:12]}  {time.time() - started:5.1f}s",
                  expand=False)
        t.add_column("step")
        t.add_column("status")
        colours = {"succeeded": "green", "failed": "red", "running": "yellow", "skipped": "dim",
                   "cached": "cyan", "cancelled": "magenta"}
        for k, v in states.items():
            t.add_row(k, f"[{colours.get(v, 'white')}]{v}[/]")
        return t

    with Live(table(), console=out, refresh_per_second=4, transient=False) as live:
        def progress(step: str, status: str) -> None:
            states[step] = status
            live.update(table())

        try:
            result = go(progress)
        except KeyboardInterrupt:
            err.print(f"interrupted; `scanflow resume {run_id[:12]}` continues it")
            raise typer.Exit(130) from None
        live.update(table())
    out.print(f"run [bold]{result.run_id}[/] {result.status}")
    if not result.ok:
        err.print(result.error or "", highlight=False, markup=False)
        raise typer.Exit(1)


def _run_row(r: Any) -> dict[str, Any]:
    """A run for `--json` (times ISO 8601 UTC to the millisecond, epochs as `<field>_ts`)."""
    return timed({"id": r.id, "app": r.app, "team": r.team, "workflow": r.workflow, "status": r.status,
                  "params": r.params, "trigger": r.trigger, "mlflow_run_id": r.mlflow_run_id,
                  "error": r.error, "created_at": r.created_at, "started_at": r.started_at,
                  "ended_at": r.ended_at}, "created_at", "started_at", "ended_at")


def _step_row(s: Any) -> dict[str, Any]:
    return timed({"step": s.step, "status": s.status, "exit_code": s.exit_code, "attempts": s.attempts or 0,
                  "cache_key": s.cache_key, "cached_from": s.cached_from, "log_path": s.log_path,
                  "mlflow_run_id": s.mlflow_run_id, "outputs": s.outputs, "error": s.error,
                  "started_at": s.started_at, "ended_at": s.ended_at}, "started_at", "ended_at")


@runs_app.command("list")
def runs_list(
    workflow: Annotated[str | None, typer.Option(help="only this workflow")] = None,
    limit: int = 20,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """The newest runs first: status, when they started, who or what started them."""
    if (api := via.remote()) is not None:
        rows = [via.row(r) for r in api.pages("/api/v1/runs", {"workflow": workflow,
                                                           "limit": min(limit, 500)}, limit=limit)]
    else:
        rows = context()[1].list_runs(workflow, limit)
    if as_json:
        print_json([_run_row(r) for r in rows])
        return
    t = table("run", "app/team", "workflow", "status", "started", "by")
    for r in rows:
        t.add_row(r.id[:12], f"{r.app}/{r.team}", r.workflow, r.status, iso(r.started_at),
                  str(r.trigger.get("by", "")))
    show(t)


@runs_app.command("show")
def runs_show(run_id: str, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """One run: its params, what triggered it, and each step (status, exit, tries, cache)."""
    if (api := via.remote()) is not None:
        r = via.row(api.call("GET", f"/api/v1/runs/{run_id}"))
        steps = [via.row(s) for s in r.steps]
    else:
        store = context()[1]
        r = store.get_run(run_id)
        if r is None:
            fail(f"no run {run_id!r}")
        steps = store.list_steps(r.id)
    if as_json:
        print_json({**_run_row(r), "steps": [_step_row(s) for s in steps]})
        return
    out.print(f"run {r.id}  {r.app}/{r.team}  workflow {r.workflow}  [bold]{r.status}[/]")
    out.print(f"started {iso(r.started_at)}  ended {iso(r.ended_at)}  mlflow {r.mlflow_run_id}")
    out.print(f"params {json.dumps(r.params)}  trigger {json.dumps(r.trigger)}")
    t = table("step", "status", "exit", "tries", "secs", "cache key", "cached from")
    for s in steps:
        secs = f"{s.ended_at - s.started_at:.2f}" if s.ended_at and s.started_at else "-"
        src = s.cached_from.split("/") if s.cached_from else None
        t.add_row(s.step, s.status, str(s.exit_code if s.exit_code is not None else "-"),
                  str(s.attempts or 0), secs, (s.cache_key or "-")[:12],
                  f"{src[0][:12]}/{src[1]}" if src else "-")
    show(t)
    for s in steps:
        out.print(f"  {s.step}: log {s.log_path or '-'}  mlflow run {s.mlflow_run_id or '-'}",
                  highlight=False, soft_wrap=True)
    if r.error:
        err.print(r.error, markup=False, highlight=False)


def logs(
    run_id: str,
    step: Annotated[str | None, typer.Argument()] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing until the run ends")]
    = False,
) -> None:
    """Print a run's step logs."""
    from scanflow.engine.logs import step_logs  # lazy: the store (SQLAlchemy, ~0.5 s)

    if (api := via.remote()) is not None:
        _remote_logs(api, run_id, step, follow)
        return

    settings, store = context()
    live = remote = None
    if settings.backend.strip().lower() == "ray":
        from scanflow.engine.ray_logs import RayLiveLogs, StoreStepLogs  # lazy: ray's clients
        from scanflow.tracking import MlflowTracker  # lazy: MLflow (~1.5 s)

        if follow:
            live = RayLiveLogs(settings.ray_address)  # a running attempt's log, from its node
        remote = StoreStepLogs(MlflowTracker(settings), store)  # a detached run's: store, MLflow
    try:
        pieces = step_logs(store, settings.runs_dir, run_id, step, follow=follow, live=live,
                           remote=remote)
    except (KeyError, ValueError) as exc:
        fail(str(exc.args[0]) if exc.args else str(exc))
    noted = False
    shown: set[str] = set()
    for name, text in pieces:
        if live is not None and live.unavailable and not noted:
            err.print(live.unavailable, markup=False, highlight=False)
            noted = True
        if follow:  # interleaved pieces of several steps: each line says whose it is
            for line in text.splitlines():
                sys.stdout.write(f"[{name}] {line}\n" if not step else line + "\n")
        else:
            if name not in shown:
                out.rule(name)
                shown.add(name)
            sys.stdout.write(text)
        sys.stdout.flush()


def _remote_logs(api: Any, run_id: str, step: str | None, follow: bool) -> None:
    """`logs` through the server: the same text, each step's under its rule."""
    for line in api.stream(f"/api/v1/runs/{run_id}/logs", {"step": step, "follow": follow}):
        if not follow and line.startswith("== ") and line.endswith(" =="):
            out.rule(line[3:-3])
            continue
        if follow and step and line.startswith(f"[{step}] "):
            line = line[len(step) + 3:]
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def cancel(run_id: str) -> None:
    """Stop a running (or queued) run: running steps are killed, pending ones never start."""
    from scanflow.control import backends  # lazy: the store (SQLAlchemy, ~0.5 s)

    if (api := via.remote()) is not None:
        out.print(f"run {run_id}: {api.call('POST', f'/api/v1/runs/{run_id}/cancel')['status']}")
        return

    settings, store = context()
    try:
        state = backends.engine(settings, store).cancel(run_id)
    except (KeyError, ValueError) as exc:
        fail(str(exc).strip("'\""))
    out.print(f"run {run_id}: {state}")


def resume(
    run_id: str,
    detach: Annotated[bool, typer.Option("--detach", help="ray backend: resume it on the cluster "
                                         "(a Ray job runs its driver), return at once")] = False,
) -> None:
    """Re-run only the failed, cancelled, interrupted or never-started steps of a run."""
    if (api := via.remote()) is not None:
        _remote_resume(api, run_id, detach)
        return
    settings, store = context()
    if detach and settings.backend.strip().lower() != "ray":
        fail("--detach resumes the run's driver on a Ray cluster: set SCANFLOW_BACKEND=ray")
    engine = build_engine(settings, store)  # recovers runs of dead engines first
    r = store.get_run(run_id)
    if r is None:
        fail(f"no run {run_id!r}")
    if r.status not in {"failed", "cancelled", "interrupted"}:
        fail(f"run {r.id[:12]} is {r.status}; only failed, cancelled or interrupted runs resume")
    if not r.spec_path:
        fail(f"run {r.id[:12]} was built in Python: resume it with LocalEngine.resume(run, app)")
    spec = load(Path(r.spec_path))
    if detach:
        from scanflow.engine.ray_jobs import dashboard_url, submit  # lazy: ray

        try:
            dashboard_url(settings.ray_address)
            job = submit(engine, spec, r.id, resume=True)
        except Exception as exc:  # noqa: BLE001 - nothing was changed: say why it did not go
            fail(f"run {r.id[:12]}: could not submit its resume to the Ray cluster: {exc}", code=1)
        print(r.id)
        err.print(f"resuming as Ray job {job}; follow it with `scanflow logs {r.id[:12]} --follow`",
                  highlight=False)
        return
    _follow_run(engine, r.id, spec, r.workflow, lambda progress: engine.resume(r.id, spec, progress))


@engine_app.command("serve")
def engine_serve(
    paths: Annotated[list[Path], typer.Argument(help="specs whose workflow triggers to watch")],
    max_runs: Annotated[int, typer.Option(min=1, help="runs at once")] = 2,
) -> None:
    """Fire the specs' workflow triggers (interval, cron, date; a workflow run finished, a model
    version registered or an alias moved, a prediction window full) and run queued runs fairly
    across teams, until Ctrl-C. What happened while it was down fires when it starts."""
    from scanflow.control.workflow_triggers import WorkflowTriggers  # lazy: the store, APScheduler

    specs = [load_noting(p) for p in paths]
    if (api := via.remote()) is not None:  # the server is the engine: register, it fires them
        for path, spec in zip(paths, specs, strict=True):
            api.register(path)
            n = sum(len(wf.triggers) for wf in spec.workflows.values())
            out.print(f"{spec.app} ({spec.team}): registered; the server at {api.url} fires its "
                      f"{n} trigger(s) and runs queued runs", highlight=False, soft_wrap=True)
        return
    settings, store = context()
    engine = build_engine(settings, store)
    triggers = WorkflowTriggers(engine, specs)
    stopping = {"flag": False}
    _signal.signal(_signal.SIGTERM, lambda *_: stopping.update(flag=True))
    caught_up = triggers.start()
    out.print(f"watching {triggers.triggers} trigger(s) in {len(specs)} spec(s); caught up: "
              f"{len(caught_up)} run(s) queued for what happened while down; running queued runs "
              "(Ctrl-C stops)")
    try:
        engine.serve(lambda: stopping["flag"], max_runs=max_runs)
    except KeyboardInterrupt:
        pass
    finally:
        triggers.stop()
