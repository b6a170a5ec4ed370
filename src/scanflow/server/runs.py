"""`/api/v1/runs`: submit a workflow run of a registered application, list and inspect runs,
read their logs (streamed with `follow`), cancel and resume them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import StreamingResponse

from scanflow.engine import ParamError
from scanflow.engine.logs import step_logs
from scanflow.engine.params import resolve_params
from scanflow.server.auth import Caller, authorize, readable_teams
from scanflow.server.errors import ERROR_RESPONSES, ApiError
from scanflow.server.models import Page, RunDetail, RunIn, RunOut, RunState, StepOut
from scanflow.server.platform import Platform, platform
from scanflow.spec import load_application
from scanflow.spec.errors import SpecError
from scanflow.store.identity import Identity

router = APIRouter(prefix="/api/v1/runs", tags=["runs"], responses=ERROR_RESPONSES)
Plat = Annotated[Platform, Depends(platform)]


def run_out(r: Any) -> RunOut:
    return RunOut(id=r.id, app=r.app, team=r.team, workflow=r.workflow, status=r.status,
                  params=r.params, trigger=r.trigger, mlflow_run_id=r.mlflow_run_id, error=r.error,
                  created_at=r.created_at, started_at=r.started_at, ended_at=r.ended_at)


def _run(plat: Platform, who: Identity, run_id: str, action: str) -> Any:
    """The run (a unique id prefix will do), if `who` may take `action` on it (else 403)."""
    r = plat.store.get_run(run_id)
    if r is None:
        raise ApiError(404, "not_found", f"no run {run_id!r}")
    authorize(who, action, r.team, r.app)
    return r


@router.post("", response_model=RunOut, status_code=202)
def submit(body: RunIn, who: Caller, plat: Plat) -> RunOut:
    """Queue a run; the server's run queue starts it (fairly across teams)."""
    spec, team = plat.spec_of(body.app, body.team)
    authorize(who, "run", team, body.app)
    if body.workflow not in spec.workflows:
        raise ApiError(404, "not_found", f"no workflow {body.workflow!r} in app {body.app!r} "
                       f"(known: {', '.join(sorted(spec.workflows))})")
    params = {k: str(v) if not isinstance(v, str) else v for k, v in body.params.items()}
    try:
        resolve_params(spec.workflows[body.workflow], params)
        run_id = plat.engine().submit(spec, body.workflow, params, {"by": who.who},
                                      cache=body.cache, status="queued")
    except ParamError as exc:
        raise ApiError(422, "invalid_params", str(exc)) from exc
    r = plat.store.get_run(run_id)
    assert r is not None
    return run_out(r)


@router.get("", response_model=Page[RunOut])
def list_runs(
    who: Caller, plat: Plat, workflow: str | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(pattern=r"^\d{1,9}$")] = None,
) -> Page[RunOut]:
    """The newest runs first, of the teams you may read."""
    offset = int(cursor or 0)
    rows = plat.store.runs.list_runs(workflow, limit + 1, teams=readable_teams(who), offset=offset)
    more = len(rows) > limit
    return Page[RunOut](items=[run_out(r) for r in rows[:limit]],
                        next=str(offset + limit) if more else None)


@router.get("/{run_id}", response_model=RunDetail)
def show(run_id: str, who: Caller, plat: Plat) -> RunDetail:
    r = _run(plat, who, run_id, "read")
    steps = [StepOut(step=s.step, status=s.status, exit_code=s.exit_code, attempts=s.attempts or 0,
                     cache_key=s.cache_key, cached_from=s.cached_from, mlflow_run_id=s.mlflow_run_id,
                     log_path=s.log_path,
                     outputs=s.outputs, error=s.error, started_at=s.started_at, ended_at=s.ended_at)
             for s in plat.store.list_steps(r.id)]
    return RunDetail(**run_out(r).model_dump(), steps=steps)


@router.get("/{run_id}/logs", response_class=StreamingResponse,
            responses={200: {"content": {"text/plain": {}}}})
def logs(run_id: str, who: Caller, plat: Plat, step: str | None = None,
         follow: bool = False) -> StreamingResponse:
    """The run's step logs as text, each step's under a `== step ==` line; with `follow`, new
    text as it is written until the run ends (each line prefixed `[step]`)."""
    r = _run(plat, who, run_id, "read")
    try:
        pieces = step_logs(plat.store, plat.settings.runs_dir, r.id, step, follow=follow)
        first = next(pieces, None)
    except (KeyError, ValueError) as exc:
        raise ApiError(404, "not_found", str(exc.args[0]) if exc.args else str(exc)) from exc

    def text() -> Iterator[str]:
        shown: set[str] = set()
        for piece in ([first] if first else []):
            yield from _render(piece, shown, follow)
        for piece in pieces:
            yield from _render(piece, shown, follow)

    return StreamingResponse(text(), media_type="text/plain; charset=utf-8")


def _render(piece: tuple[str, str], shown: set[str], follow: bool) -> Iterator[str]:
    name, body = piece
    if follow:
        yield "".join(f"[{name}] {line}\n" for line in body.splitlines())
        return
    if name not in shown:
        shown.add(name)
        yield f"== {name} ==\n"
    yield body


@router.post("/{run_id}/cancel", response_model=RunState)
def cancel(run_id: str, who: Caller, plat: Plat) -> RunState:
    r = _run(plat, who, run_id, "run")
    try:
        state = plat.engine().cancel(r.id)
    except (KeyError, ValueError) as exc:
        raise ApiError(409, "conflict", str(exc).strip("'\"")) from exc
    return RunState(id=r.id, status=state)


@router.post("/{run_id}/resume", response_model=RunState, status_code=202)
def resume(run_id: str, who: Caller, plat: Plat) -> RunState:
    """Resume a failed, cancelled or interrupted run in the server: only its unfinished steps
    re-run (follow it with the run's `logs?follow=true`)."""
    r = _run(plat, who, run_id, "run")
    if r.status not in {"failed", "cancelled", "interrupted"}:
        raise ApiError(409, "conflict", f"run {r.id[:12]} is {r.status}; only failed, cancelled "
                       "or interrupted runs resume")
    if not r.spec_path:
        raise ApiError(409, "conflict", f"run {r.id[:12]} was built in Python; it cannot resume here")
    try:  # read now, so a spec that no longer loads is the caller's 409, not a silent thread
        spec = load_application(r.spec_path)
    except (SpecError, OSError) as exc:
        raise ApiError(409, "spec_invalid", f"run {r.id[:12]}: its spec no longer loads from "
                       f"{r.spec_path}: {exc}") from None
    plat.resume(r.id, spec)
    return RunState(id=r.id, status="resuming")
