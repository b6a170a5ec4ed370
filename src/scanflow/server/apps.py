"""`/api/v1/apps`: register an application under its team, validate a spec, list them."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path, PurePosixPath
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from starlette.concurrency import run_in_threadpool

from scanflow.agents.registry import agent_issues
from scanflow.control import backends
from scanflow.engine.ray_task import MAX_PACKAGE, unpack_app
from scanflow.server.auth import Caller, authorize, readable_teams
from scanflow.server.errors import ERROR_RESPONSES, ApiError, ErrorBody
from scanflow.server.models import AppIn, AppOut, ValidateIn, Validation
from scanflow.server.platform import Platform, platform
from scanflow.spec import load_application
from scanflow.spec.access import Role
from scanflow.spec.errors import SpecError
from scanflow.store.identity import Identity

router = APIRouter(prefix="/api/v1/apps", tags=["applications"], responses=ERROR_RESPONSES)
Plat = Annotated[Platform, Depends(platform)]


def _load(path: str, *, imports: bool, known_models: set[str] | None = None) -> Any:
    """The spec at `path`; with `imports`, its steps' and agents' code is imported and checked
    too, which runs that code: only once the caller's role in the spec's team allows it."""
    p = Path(path)
    shown = path if len(path) <= 200 else path[:200] + "..."
    try:
        if not p.exists():
            raise ApiError(404, "not_found", f"no spec at {shown!r} on the server's machine")
        return load_application(p, check_imports=imports, known_models=known_models,
                                checks=[lambda app: agent_issues(app) if app.agents else []])
    except OSError as exc:
        raise ApiError(422, "invalid_request", f"cannot read a spec at {shown!r}: "
                       f"{exc.strerror or type(exc).__name__}") from None


def _out(row: Any, spec: Any | None) -> AppOut:
    return AppOut(name=row.name, team=row.team, spec_path=row.spec_path,
                  registered_by=row.registered_by, registered_at=row.registered_at,
                  workflows=sorted(spec.workflows) if spec else [],
                  services=sorted(spec.services) if spec else [],
                  agents=sorted(spec.agents) if spec else [])


@router.post("/validate", response_model=Validation)
def validate(body: ValidateIn, who: Caller, plat: Plat) -> Validation:
    """Check a spec without registering or running anything: its YAML for anyone with a token;
    its code (imported, so run) only for an operator of the spec's team; with `registry`, that
    its services' models are registered."""
    known = None
    if body.registry:
        try:
            known = backends.tracker(plat.settings).registered_models()
        except backends.UnknownBackend as exc:
            raise ApiError(503, "backend_unavailable", str(exc)) from exc
    try:
        spec = _load(body.path, imports=False, known_models=known)
        if who.may("run", spec.team, spec.app):
            spec = _load(body.path, imports=True, known_models=known)
    except SpecError as exc:
        return Validation(ok=False, problems=[str(i) for i in exc.issues])
    return Validation(ok=True, app=spec.app, team=spec.team, source=str(spec.source),
                      workflows=len(spec.workflows), services=len(spec.services),
                      agents=len(spec.agents))


@router.post("", response_model=AppOut, status_code=201)
def register(body: AppIn, who: Caller, plat: Plat) -> AppOut:
    """Register (or re-register) a team's spec of an application by its path on the server's
    machine: you must own the spec's team. Each team registers its own spec of a shared
    application (as the MNIST teams do)."""
    return _register(body.path, who, plat)


def _register(path: str, who: Identity, plat: Platform) -> AppOut:
    try:
        spec = _load(path, imports=False)  # the team first: no code runs for a stranger
        authorize(who, "register", spec.team, spec.app)
        spec = _load(path, imports=True)
    except SpecError as exc:
        raise ApiError(422, "spec_invalid", f"{len(exc.issues)} problem(s) in the spec: "
                       + "; ".join(str(i) for i in exc.issues[:5])) from exc
    row = plat.store.applications.register_app(spec.app, spec.team, str(Path(path).resolve()),
                                               who.who)
    plat.reload_triggers()  # its workflows' triggers fire from now on
    return _out(row, spec)


_ZIP_TYPES = ("application/zip", "application/octet-stream")
_ZIP = {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        "required": True, "description": "the application's folder, zipped (what `scanflow` "
        "uploads when the server cannot see the spec's path), as application/zip or "
        "application/octet-stream"}


@router.post("/package", response_model=AppOut, status_code=201,
             openapi_extra={"requestBody": _ZIP},
             responses={s: {"model": ErrorBody} for s in (413, 415)})
async def register_package(
    request: Request, who: Caller, plat: Plat,
    spec: Annotated[str, Query(min_length=1, max_length=255,
                               description="the spec file's path inside the folder")] = "scanflow.yaml",
) -> AppOut:
    """Register a team's spec from its application's folder, uploaded as a zip (at most
    `MAX_PACKAGE`, 64 MiB): unpacked under the server's workspace, one folder per content,
    then registered as by path (owner of the spec's team)."""
    if not who.admin and not any(r >= Role.owner for r in who.roles.values()):
        raise ApiError(403, "forbidden", f"{who.user} owns no team: only an owner registers "
                       "applications")
    inner = PurePosixPath(spec)
    if inner.is_absolute() or ".." in inner.parts:
        raise ApiError(422, "invalid_request", "spec: a path inside the uploaded folder, "
                       "without '..'")
    if request.headers.get("content-type", "").split(";")[0].strip().lower() not in _ZIP_TYPES:
        raise ApiError(415, "unsupported_media", "send the folder as application/zip")
    package = bytearray()
    async for chunk in request.stream():
        package += chunk
        if len(package) > MAX_PACKAGE:
            raise ApiError(413, "too_large", f"the package is over {MAX_PACKAGE // 2**20} MiB")
    home = await run_in_threadpool(_unpack, bytes(package), plat.settings.root / "apps")
    return await run_in_threadpool(_register, str(home / inner), who, plat)


def _unpack(package: bytes, into: Path) -> Path:
    """The package's folder under `into`, once its entries were checked (a zip, at most
    10,000 entries and 4 x `MAX_PACKAGE` unpacked: no zip bomb)."""
    try:
        with zipfile.ZipFile(io.BytesIO(package)) as zf:
            infos = zf.infolist()
    except zipfile.BadZipFile:
        raise ApiError(422, "invalid_request", "the body is not a zip file") from None
    if len(infos) > 10_000 or sum(i.file_size for i in infos) > 4 * MAX_PACKAGE:
        raise ApiError(413, "too_large", "the package unpacks to over 10,000 files or "
                       f"{4 * MAX_PACKAGE // 2**20} MiB")
    try:
        return unpack_app(package, into)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ApiError(422, "invalid_request", f"the package does not unpack: {exc}") from None


@router.get("", response_model=list[AppOut])
def list_apps(who: Caller, plat: Plat) -> list[AppOut]:
    """The applications of the teams you may read."""
    return [_out(r, None) for r in plat.store.applications.list_apps(readable_teams(who))]
