"""`scanflow server`: the control plane's REST API for every team, on one process.

Everything the CLI does, over HTTP, under per-team roles (`scanflow.spec.access`): one FastAPI
app built from small routers (apps, runs, services, audit), one error shape
(`scanflow.server.errors`), bearer tokens (`scanflow.server.auth`). OpenAPI 3 at `/openapi.json`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version

from fastapi import FastAPI

from scanflow.control import backends
from scanflow.server import admin, agents, apps, audit, errors, runs, services
from scanflow.server.auth import Caller, FailedLogins
from scanflow.server.models import Health, StoreSchema
from scanflow.server.platform import Platform
from scanflow.settings import Settings, get_settings
from scanflow.store.migrate import status as schema_status


def _version() -> str:
    try:
        return version("scanflow")
    except PackageNotFoundError:
        return "0"


def create_app(settings: Settings | None = None, *, run_queue: bool = True,
               max_runs: int = 2) -> FastAPI:
    """The server's app on `settings`' store; `run_queue` runs submitted runs in this process."""
    settings = (settings or get_settings()).ensure()
    store = backends.store(settings)
    plat = Platform(settings, store, run_queue=run_queue, max_runs=max_runs)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        plat.start()
        try:
            yield
        finally:
            plat.stop()

    app = FastAPI(title="scanflow", version=_version(), lifespan=lifespan,
                  description="The control plane of scanflow: applications, workflow runs, "
                  "services, agents and their audit trail, per team. Every route but /health "
                  "needs `Authorization: Bearer <token>`.")
    app.state.platform = plat
    app.state.store = store
    app.state.failed_logins = FailedLogins(limit=settings.auth_failure_limit)
    errors.install(app)
    for router in (apps.router, runs.router, services.router, audit.router, agents.router,
                   admin.router):
        app.include_router(router)

    @app.get("/health", response_model=Health, tags=["health"])
    def health() -> Health:
        return Health(status="ok", version=_version())

    @app.get("/api/v1/store", response_model=StoreSchema, tags=["health"],
             responses=errors.ERROR_RESPONSES)
    def store_schema(_who: Caller) -> StoreSchema:
        """The store's schema revision against this release's head (any token)."""
        st = schema_status(store.engine)
        return StoreSchema(backend=store.engine.dialect.name, revision=st.revision, head=st.head,
                           at_head=st.at_head)

    return app
