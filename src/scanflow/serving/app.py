"""The model server: one FastAPI app per replica (a gunicorn worker) serving one pinned version.

Configuration is a JSON file named by `SCANFLOW_SERVICE_CONFIG`, read in the lifespan of
each worker, so a worker started after the deployer rewrote the file (SIGHUP, SIGTTIN)
serves the new version. Each ready worker also announces itself in
`<workdir>/workers/<pid>.json`; the deployer and draining siblings read those files.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI, Request, Response
from starlette.concurrency import run_in_threadpool

from scanflow.serving import metrics, v2
from scanflow.serving.config import (
    CONFIG_ENV,
    CanaryConfig,
    DrainConfig,
    Limits,
    PredLogConfig,
    ServiceConfig,
)
from scanflow.serving.label_auth import LabelDenied, LabelGate
from scanflow.serving.predict import (
    PRELOADED,
    Arrivals,
    PredictionService,
    Served,
    error_response,
    extract_predict,
    load_models,
    preload_models,
)
from scanflow.serving.predlog import PredictionLog, journal_dir
from scanflow.serving.validation import RequestError, extract_labels, parse_body
from scanflow.serving.workers import LIFECYCLE, WorkerLifecycle, read_workers, workers_dir
from scanflow.store import Store
from scanflow.tracking import configure_mlflow

# Re-exported: the deployer, gunicorn_conf and users import these from here.
__all__ = [
    "CONFIG_ENV", "LIFECYCLE", "PRELOADED", "CanaryConfig", "DrainConfig", "Limits", "PredLogConfig",
    "ServiceConfig", "WorkerLifecycle", "create_app", "preload_models", "read_workers", "workers_dir",
]
log = logging.getLogger("scanflow.serving")


# -- app ----------------------------------------------------------------------------------------
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
                   Awaitable[None]]


class CloseWhenDraining:
    """ASGI middleware: tell keep-alive clients to reconnect (`Connection: close` on a response)
    once a successor serves, and on a connection older than `limits.keepalive_max_s`.

    A client whose idle keep-alive connection is closed by a stopping worker while it sends
    the next request sees a failed request; `Connection: close` on every response of a
    draining worker makes clients leave it cleanly first. The age limit spreads connections
    over the replicas: a keep-alive connection stays with the worker that accepted it, so
    without it a replica added under load would get no share of the clients already connected
    (measured with wrk: all 8 connections on one of two replicas in one turn of five).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._born: dict[Any, float] = {}  # connection (client address) -> first request

    def _too_old(self, scope: Scope) -> bool:
        cfg = LIFECYCLE.config
        max_age = cfg.limits.keepalive_max_s if cfg is not None else 0.0
        key = scope.get("client")
        if not max_age or key is None:
            return False
        now = time.monotonic()
        if len(self._born) > 4096:  # connections the client closed first
            self._born = {k: t for k, t in self._born.items() if now - t < 10 * max_age}
        if now - self._born.setdefault(key, now) < max_age:
            return False
        del self._born[key]
        return True

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        close = LIFECYCLE.close_connections or self._too_old(scope)

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start" and (close or LIFECYCLE.close_connections):
                message["headers"] = [*message.get("headers", []), (b"connection", b"close")]
            await send(message)

        await self.app(scope, receive, send_wrapper)


def _freeze_heap() -> None:
    """Move everything loaded so far (libraries, the models) out of the cyclic collector's
    reach. Otherwise its full collections walk those ~250k long-lived objects every few
    seconds under load (70-150 ms each on this machine): a stall of the worker's event loop that
    every request in flight waits out, the p99 of a loaded service. Garbage made while serving
    is still collected."""
    gc.collect()
    gc.freeze()


def create_app(config_path: str | None = None) -> FastAPI:
    """App factory (`gunicorn 'scanflow.serving.app:create_app()'`); config read at startup."""
    predictions = PredictionService(LIFECYCLE)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        path = config_path or os.environ.get(CONFIG_ENV)
        if not path:
            raise RuntimeError(f"no service config: set {CONFIG_ENV}")
        cfg = ServiceConfig.load(path)
        configure_mlflow(cfg.tracking_uri, cfg.registry_uri)
        arrivals = Arrivals()
        models = await run_in_threadpool(load_models, cfg, arrivals)
        store = Store(cfg.store_url)
        svc = cfg.service
        plog = None
        if cfg.predlog.enabled:
            plog = PredictionLog(
                store, journal_dir(cfg.workdir), interval=cfg.predlog.interval,
                batch_size=cfg.predlog.batch_size, orphan_interval=cfg.predlog.orphan_interval,
                fsync=cfg.predlog.fsync, service=svc,
                on_written=lambda n: metrics.PREDLOG_WRITTEN.labels(svc).inc(n),
                on_dropped=lambda n, why: metrics.PREDLOG_DROPPED.labels(svc, why).inc(n),
                commit_to_store=cfg.predlog.commit == "store",
                commit_timeout=cfg.predlog.commit_timeout,
                on_fallback=lambda n, why: metrics.PREDLOG_NODE_ONLY.labels(svc, why).inc(n),
            ).start()
        predictions.served = Served(cfg, models, store, plog, arrivals,
                                    label_gate=LabelGate(store, svc, cfg.team))
        _freeze_heap()
        for v in cfg.versions:
            role = ("champion" if v == cfg.model_version else
                    "canary" if cfg.canary and v == cfg.canary.version else "shadow")
            metrics.REPLICAS.labels(svc, v, role).set(1)
            LIFECYCLE.replica_labels.append((svc, v, role))
        LIFECYCLE.announce(cfg)
        log.info("worker %d serving %s (versions %s)", os.getpid(), cfg.model_uri, cfg.versions)
        try:
            yield
        finally:
            if plog is not None:
                await run_in_threadpool(plog.close, 3.0)
            store.close()
            LIFECYCLE.retire()

    app = FastAPI(title="scanflow model server", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(CloseWhenDraining)
    _routes(app, predictions)
    return app


def _routes(app: FastAPI, predictions: PredictionService) -> None:
    """`/predict` and the V2 protocol (both through `predictions`), `/labels`, `/health`, `/metrics`."""

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        return await predictions.handle(request, "predict", extract_predict, _render_predict)

    app.include_router(v2.create_router(predictions))

    @app.post("/labels")
    async def labels(request: Request) -> Response:
        s = predictions.current()
        status = 200
        try:
            if s.label_gate is not None:
                try:
                    await run_in_threadpool(s.label_gate.check, request.headers.get("authorization"))
                except LabelDenied as exc:
                    raise RequestError(exc.status, exc.message) from None
            body = parse_body(await request.body(), request.headers.get("content-type"))
            lab = extract_labels(body)
            try:
                n = await run_in_threadpool(s.store.add_labels, lab)
            except Exception as exc:
                log.exception("labels write failed")
                raise RequestError(503, f"store unavailable: {type(exc).__name__}") from None
            resp = Response(orjson.dumps({"count": n}), media_type="application/json")
        except RequestError as exc:
            status = exc.status
            resp = error_response(exc.status, exc.message)
        metrics.REQUESTS.labels(s.config.service, "labels", s.config.model_version,
                                str(status)).inc()
        return resp

    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        s = predictions.current()
        c = s.config
        return {
            "status": "ok",
            "service": c.service,
            "model_name": c.model_name,
            "model_version": c.model_version,
            "canary": c.canary.model_dump() if c.canary else None,
            "shadow_version": c.shadow_version,
            "pid": os.getpid(),
            "draining": LIFECYCLE.draining,
            "signature": s.spec.describe(),
            "batching": c.batching.model_dump(),
            "predlog_pending": s.log.pending if s.log else 0,
        }

    @app.get("/metrics")
    async def get_metrics() -> Response:
        # off the event loop: on Ray Serve it reads the other replicas' figures over the network
        return Response(await run_in_threadpool(metrics.render), media_type=metrics.CONTENT_TYPE)


def _render_predict(result: dict[str, Any]) -> dict[str, Any]:
    return {"predictions": result["predictions"], "ids": result["ids"],
            "model_version": result["model_version"]}
