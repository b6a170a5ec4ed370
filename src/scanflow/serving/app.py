"""The model server: one FastAPI app per replica (a gunicorn worker) serving one pinned version.

Configuration is a JSON file named by `SCANFLOW_SERVICE_CONFIG`, read in the lifespan of
each worker, so a worker started after the deployer rewrote the file (SIGHUP, SIGTTIN)
serves the new version. Each ready worker also announces itself in
`<workdir>/workers/<pid>.json`; the deployer and draining siblings read those files.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from scanflow.serving import metrics
from scanflow.serving.predlog import PredictionLogWriter
from scanflow.serving.validation import (
    InputSpec,
    RequestError,
    extract_instances,
    extract_labels,
    parse_body,
    spec_from_schema,
    to_model_input,
)
from scanflow.store import Store

CONFIG_ENV = "SCANFLOW_SERVICE_CONFIG"
log = logging.getLogger("scanflow.serving")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,40}$")


# -- configuration ------------------------------------------------------------------------------
class Limits(BaseModel):
    """Refuse oversized requests before parsing them."""

    max_instances: int = Field(default=10_000, ge=1, le=99_999)
    max_body_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    request_timeout_s: float = Field(default=30.0, gt=0, description="slower requests get 504")


class PredLogConfig(BaseModel):
    interval: float = Field(default=0.2, gt=0)
    batch_size: int = Field(default=500, ge=1)
    max_pending: int = Field(default=200_000, ge=1)


class DrainConfig(BaseModel):
    """How a worker told to stop hands over (see gunicorn_conf.DrainingServer)."""

    max_wait: float = Field(default=45.0, ge=0, description="wait this long for a successor")
    grace: float = Field(default=0.5, ge=0, description="answer with Connection: close")
    settle: float = Field(default=1.0, ge=0, description="let accepted connections finish")


class ServiceConfig(BaseModel):
    """Everything a worker needs; written by the deployer, read at worker start."""

    service: str
    app: str = ""
    team: str = ""
    model_name: str
    alias: str = "champion"
    model_version: str
    tracking_uri: str
    registry_uri: str | None = None
    store_url: str
    workdir: str
    replicas: int = Field(default=1, ge=1)
    preload: list[str] = Field(
        default_factory=list, description="modules the gunicorn master imports before forking"
    )
    limits: Limits = Field(default_factory=Limits)
    predlog: PredLogConfig = Field(default_factory=PredLogConfig)
    drain: DrainConfig = Field(default_factory=DrainConfig)

    @property
    def model_uri(self) -> str:
        return f"models:/{self.model_name}/{self.model_version}"

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ServiceConfig:
        return cls.model_validate_json(Path(path).read_text())

    def save(self, path: str | os.PathLike[str]) -> None:
        """Atomic: a worker starting at this moment reads the old or the new file, not half."""
        p = Path(path)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        tmp.write_text(self.model_dump_json(indent=2))
        os.replace(tmp, p)


# -- worker registry (files + /proc) ------------------------------------------------------------
def workers_dir(workdir: str | os.PathLike[str]) -> Path:
    return Path(workdir) / "workers"


def read_workers(workdir: str | os.PathLike[str]) -> dict[int, dict[str, Any]]:
    """Announcements of the workers of one service, by pid (may include dead ones)."""
    out: dict[int, dict[str, Any]] = {}
    d = workers_dir(workdir)
    if not d.is_dir():
        return out
    for f in d.glob("*.json"):
        try:
            info = json.loads(f.read_text())
            out[int(info["pid"])] = info
        except (OSError, ValueError, KeyError):
            continue  # being replaced right now, or a crash left half a file
    return out


class WorkerLifecycle:
    """This process's announcement and drain state (one per worker process)."""

    def __init__(self) -> None:
        self.config: ServiceConfig | None = None
        self.draining = False  # told to stop; siblings and deployer see it in the file
        self.close_connections = False  # answer with Connection: close
        self.info: dict[str, Any] = {}

    @property
    def path(self) -> Path | None:
        if self.config is None:
            return None
        return workers_dir(self.config.workdir) / f"{os.getpid()}.json"

    def announce(self, config: ServiceConfig) -> None:
        self.config = config
        self.info = {
            "pid": os.getpid(),
            "service": config.service,
            "model_version": config.model_version,
            "ready_at": time.time(),
            "draining": False,
        }
        self._write()

    def begin_drain(self) -> None:
        self.draining = True
        if self.info:
            self.info["draining"] = True
            self.info["draining_at"] = time.time()
            self._write()

    def retire(self) -> None:
        p = self.path
        if p is not None:
            p.unlink(missing_ok=True)

    def _write(self) -> None:
        p = self.path
        if p is None:
            return
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.info))
        os.replace(tmp, p)


LIFECYCLE = WorkerLifecycle()


# -- the served model ---------------------------------------------------------------------------
@dataclass
class Served:
    config: ServiceConfig
    model: Any
    spec: InputSpec
    store: Store
    writer: PredictionLogWriter


def _to_jsonable(v: Any) -> Any:
    if hasattr(v, "tolist"):
        return v.tolist()
    if hasattr(v, "item"):
        return v.item()
    if hasattr(v, "isoformat"):
        return v.isoformat()
    raise TypeError(f"{type(v).__name__} is not JSON serialisable")


def _outputs(y: Any, n: int) -> list[Any]:
    """Per-instance outputs of whatever the pyfunc returned."""
    if hasattr(y, "columns") and hasattr(y, "to_dict"):  # DataFrame
        out = y.to_dict(orient="records")
    elif hasattr(y, "tolist"):  # ndarray, Series
        out = y.tolist()
    elif isinstance(y, dict):
        cols = {k: (v.tolist() if hasattr(v, "tolist") else list(v)) for k, v in y.items()}
        out = [{k: v[i] for k, v in cols.items()} for i in range(n)]
    else:
        out = list(y)
    if len(out) != n:
        raise RequestError(500, f"model returned {len(out)} predictions for {n} instances")
    return out


def _request_base(header: str | None) -> str:
    if header is None:
        return uuid.uuid4().hex
    if not _REQUEST_ID.match(header):
        raise RequestError(
            422, "X-Request-ID: expected 1 to 40 characters of A-Z a-z 0-9 . _ : -"
        )
    return header


def _error(status: int, message: str) -> Response:
    return Response(json.dumps({"detail": message}), status, media_type="application/json")


def _predict_sync(s: Served, raw: bytes, ctype: str | None, rid: str | None) -> dict[str, Any]:
    """Parse, validate, predict: one hop to the thread pool for all the CPU work."""
    instances = extract_instances(parse_body(raw, ctype), s.config.limits.max_instances)
    return predict_instances(s, instances, rid)


def predict_instances(s: Served, instances: list[Any], rid: str | None) -> dict[str, Any]:
    """Validate, predict and log a list of instances, whatever protocol brought them."""
    t0 = time.perf_counter()
    ts = time.time()
    base = _request_base(rid)
    x = to_model_input(instances, s.spec)
    try:
        y = s.model.predict(x)
    except Exception as exc:
        log.exception("model %s failed on %d instances", s.config.model_uri, len(instances))
        raise RequestError(500, f"model failed: {type(exc).__name__}: {exc}") from None
    preds = json.loads(json.dumps(_outputs(y, len(instances)), default=_to_jsonable))
    ids = [f"{base}-{i}" for i in range(len(instances))]
    latency_ms = (time.perf_counter() - t0) * 1000.0
    version = s.config.model_version
    s.writer.add(
        [
            {
                "request_id": ids[i],
                "service": s.config.service,
                "model_version": version,
                "ts": ts,
                "inputs": instances[i],
                "outputs": preds[i],
                "latency_ms": latency_ms,
            }
            for i in range(len(instances))
        ]
    )
    return {"predictions": preds, "ids": ids, "model_version": version}


# -- app ----------------------------------------------------------------------------------------
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
                   Awaitable[None]]


class CloseWhenDraining:
    """ASGI middleware: once a successor serves, tell keep-alive clients to reconnect.

    A client whose idle keep-alive connection is closed by a stopping worker while it sends
    the next request sees a failed request; `Connection: close` on every response of a
    draining worker makes clients leave it cleanly first.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start" and LIFECYCLE.close_connections:
                message["headers"] = [*message.get("headers", []), (b"connection", b"close")]
            await send(message)

        await self.app(scope, receive, send_wrapper)


def create_app(config_path: str | None = None) -> FastAPI:
    """App factory (`gunicorn 'scanflow.serving.app:create_app()'`); config read at startup."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        path = config_path or os.environ.get(CONFIG_ENV)
        if not path:
            raise RuntimeError(f"no service config: set {CONFIG_ENV}")
        cfg = ServiceConfig.load(path)
        import mlflow.pyfunc

        mlflow.set_tracking_uri(cfg.tracking_uri)
        if cfg.registry_uri:
            mlflow.set_registry_uri(cfg.registry_uri)
        model = await run_in_threadpool(mlflow.pyfunc.load_model, cfg.model_uri)
        spec = spec_from_schema(model.metadata.get_input_schema())
        store = Store(cfg.store_url)
        svc = cfg.service
        writer = PredictionLogWriter(
            store,
            interval=cfg.predlog.interval,
            batch_size=cfg.predlog.batch_size,
            max_pending=cfg.predlog.max_pending,
            on_written=lambda n: metrics.PREDLOG_WRITTEN.labels(svc).inc(n),
            on_dropped=lambda n, why: metrics.PREDLOG_DROPPED.labels(svc, why).inc(n),
        ).start()
        app.state.served = Served(cfg, model, spec, store, writer)
        LIFECYCLE.announce(cfg)
        log.info("worker %d serving %s (%s)", os.getpid(), cfg.model_uri, spec.describe()["kind"])
        try:
            yield
        finally:
            await run_in_threadpool(writer.close)
            store.close()
            LIFECYCLE.retire()

    app = FastAPI(title="scanflow model server", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(CloseWhenDraining)

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        return await serve_prediction(request, "predict", _predict_sync, lambda r: r)

    from scanflow.serving.v2 import router as v2_router

    app.include_router(v2_router)

    async def serve_prediction(
        request: Request, endpoint: str, work: Callable[..., dict[str, Any]],
        render: Callable[[dict[str, Any]], Any],
    ) -> Response:
        """Size limits, the thread-pool hop, error bodies and metrics, for every protocol."""
        s: Served = request.app.state.served
        t0 = time.perf_counter()
        version = s.config.model_version
        status = 200
        try:
            length = request.headers.get("content-length")
            if length and length.isdigit() and int(length) > s.config.limits.max_body_bytes:
                raise RequestError(413, f"body: larger than {s.config.limits.max_body_bytes} bytes")
            raw = await request.body()
            if len(raw) > s.config.limits.max_body_bytes:
                raise RequestError(413, f"body: larger than {s.config.limits.max_body_bytes} bytes")
            try:
                result = await asyncio.wait_for(
                    run_in_threadpool(work, s, raw, request.headers.get("content-type"),
                                      request.headers.get("x-request-id")),
                    timeout=s.config.limits.request_timeout_s,
                )
            except TimeoutError:
                raise RequestError(504, f"the request took longer than "
                                        f"{s.config.limits.request_timeout_s:g}s") from None
            metrics.INSTANCES.labels(s.config.service, version).inc(len(result["ids"]))
            resp = Response(
                json.dumps(render(result)), media_type="application/json",
                headers={"X-Model-Version": version},
            )
        except RequestError as exc:
            status = exc.status
            resp = _error(exc.status, exc.message)
        except Exception as exc:  # a bug of ours must not become a dead worker either
            log.exception("predict failed")
            status = 500
            resp = _error(500, f"internal error: {type(exc).__name__}: {exc}")
        metrics.REQUESTS.labels(s.config.service, endpoint, version, str(status)).inc()
        metrics.LATENCY.labels(s.config.service, version).observe(time.perf_counter() - t0)
        return resp

    app.state.serve_prediction = serve_prediction

    @app.post("/labels")
    async def labels(request: Request) -> Response:
        s: Served = request.app.state.served
        status = 200
        try:
            body = parse_body(await request.body(), request.headers.get("content-type"))
            lab = extract_labels(body)
            try:
                n = await run_in_threadpool(s.store.add_labels, lab)
            except Exception as exc:
                log.exception("labels write failed")
                raise RequestError(503, f"store unavailable: {type(exc).__name__}") from None
            resp = Response(json.dumps({"count": n}), media_type="application/json")
        except RequestError as exc:
            status = exc.status
            resp = _error(exc.status, exc.message)
        metrics.REQUESTS.labels(s.config.service, "labels", s.config.model_version,
                                str(status)).inc()
        return resp

    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        s: Served = request.app.state.served
        return {
            "status": "ok",
            "service": s.config.service,
            "model_name": s.config.model_name,
            "model_version": s.config.model_version,
            "pid": os.getpid(),
            "draining": LIFECYCLE.draining,
            "signature": s.spec.describe(),
            "predlog_pending": s.writer.pending,
        }

    @app.get("/metrics")
    async def get_metrics() -> Response:
        return Response(metrics.render(), media_type=metrics.CONTENT_TYPE)

    return app
