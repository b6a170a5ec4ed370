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
import random
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from fastapi import FastAPI, Request, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from scanflow.serving import metrics
from scanflow.serving.batching import BatchConfig, MicroBatcher
from scanflow.serving.predlog import PredictionLog, journal_dir
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
from scanflow.tracking import configure_mlflow

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
    """The prediction log (see predlog.py): journal on the request path, collector behind."""

    enabled: bool = Field(default=True, description="off: nothing is logged (benchmarks only)")
    interval: float = Field(default=0.2, gt=0, description="seconds between collector passes")
    batch_size: int = Field(default=500, ge=1, description="records per store insert")
    orphan_interval: float = Field(default=1.0, gt=0,
                                   description="seconds between looks for dead workers' segments")
    fsync: bool = Field(default=False, description="fsync each append: survive power loss, not "
                                                   "only kill -9 (costs a disk flush per request)")


class CanaryConfig(BaseModel):
    """A challenger answering a share of live traffic (its answers are returned and logged)."""

    version: str
    share: float = Field(gt=0, le=1, description="fraction of requests the challenger answers")


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
    batching: BatchConfig = Field(default_factory=BatchConfig)
    predlog: PredLogConfig = Field(default_factory=PredLogConfig)
    canary: CanaryConfig | None = None
    shadow_version: str | None = Field(
        default=None, description="scores a copy of every request; logged, never returned"
    )
    previous_version: str | None = Field(default=None, description="what `rollback` returns to")
    generation: int = Field(default=0, description="bumped by every change the workers must load")
    model_paths: dict[str, str] = Field(
        default_factory=dict,
        description="version -> local copy of the model (workers never need the registry)",
    )
    preload_models: bool = Field(
        default=True, description="load models in the gunicorn master, before forking workers"
    )
    drain: DrainConfig = Field(default_factory=DrainConfig)

    @property
    def model_uri(self) -> str:
        return f"models:/{self.model_name}/{self.model_version}"

    @property
    def versions(self) -> list[str]:
        """Every version a worker of this config loads: champion first."""
        out = [self.model_version]
        for v in (self.canary.version if self.canary else None, self.shadow_version):
            if v and v not in out:
                out.append(v)
        return out

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
        self.replica_labels: list[tuple[str, str, str]] = []

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
            "versions": config.versions,
            "generation": config.generation,
            "ready_at": time.time(),
            "draining": False,
        }
        self._write()

    def begin_drain(self) -> None:
        self.draining = True
        for labels in self.replica_labels:  # a draining worker is no longer a replica
            metrics.REPLICAS.labels(*labels).set(0)
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


# -- the served model(s) ------------------------------------------------------------------------
@dataclass
class Loaded:
    """One model version inside a worker, with its own signature and batcher."""

    version: str
    model: Any
    spec: InputSpec
    batcher: MicroBatcher


class Arrivals:
    """Requests being received or parsed: the batchers wait for them, never for nobody."""

    def __init__(self) -> None:
        self.count = 0

    def __enter__(self) -> None:
        self.count += 1

    def __exit__(self, *exc: object) -> None:
        self.count -= 1


@dataclass
class Served:
    config: ServiceConfig
    models: dict[str, Loaded]
    store: Store
    log: PredictionLog | None
    arrivals: Arrivals = field(default_factory=Arrivals)
    shadow_pending: int = 0

    @property
    def champion(self) -> Loaded:
        return self.models[self.config.model_version]

    @property
    def spec(self) -> InputSpec:
        return self.champion.spec

    def route(self, version: str | None = None) -> Loaded:
        """The model that answers: an explicit (served) version, else champion or canary."""
        if version is not None:
            return self.models[version]
        c = self.config.canary
        if c is not None and random.random() < c.share:
            return self.models[c.version]
        return self.champion

    @property
    def shadow(self) -> Loaded | None:
        v = self.config.shadow_version
        return self.models.get(v) if v and v != self.config.model_version else None


def _to_jsonable(v: Any) -> Any:
    if hasattr(v, "tolist"):
        return v.tolist()
    if hasattr(v, "item"):
        return v.item()
    if hasattr(v, "isoformat"):
        return v.isoformat()
    raise TypeError(f"{type(v).__name__} is not JSON serialisable")


def _outputs(y: Any, n: int) -> list[Any]:
    """Per-instance outputs of whatever the pyfunc returned, as plain JSON values."""
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
    return orjson.loads(orjson.dumps(out, default=_to_jsonable, option=orjson.OPT_SERIALIZE_NUMPY))


def _model_call(model: Any, uri: str) -> Callable[[Any, int], list[Any]]:
    def call(x: Any, n: int) -> list[Any]:
        try:
            y = model.predict(x)
        except Exception as exc:
            log.exception("model %s failed on %d instances", uri, n)
            raise RequestError(500, f"model failed: {type(exc).__name__}: {exc}") from None
        return _outputs(y, n)
    return call


# Models the gunicorn master loaded before forking (see gunicorn_conf): a worker forked to
# replace a dead one serves in milliseconds instead of loading the model again.
PRELOADED: dict[str, Any] = {}


def preload_models(cfg: ServiceConfig) -> None:
    """In the master: load every version from its local copy; drop versions no longer served."""
    import mlflow.pyfunc

    for v in list(PRELOADED):
        if v not in cfg.versions:
            del PRELOADED[v]
    for v in cfg.versions:
        path = cfg.model_paths.get(v)
        if v not in PRELOADED and path:
            PRELOADED[v] = mlflow.pyfunc.load_model(path)


def load_models(cfg: ServiceConfig, arrivals: Arrivals) -> dict[str, Loaded]:
    """Load every version the config serves (champion, canary, shadow) with a batcher each."""
    import mlflow.pyfunc

    svc = cfg.service
    out: dict[str, Loaded] = {}
    for version in cfg.versions:
        uri = f"models:/{cfg.model_name}/{version}"
        model = PRELOADED.get(version) or mlflow.pyfunc.load_model(cfg.model_paths.get(version, uri))
        spec = spec_from_schema(model.metadata.get_input_schema())
        hist = metrics.BATCH_SIZE.labels(svc, version)

        def on_batch(items: int, _requests: int, hist: Any = hist) -> None:
            hist.observe(items)

        out[version] = Loaded(version, model, spec,
                              MicroBatcher(_model_call(model, uri), cfg.batching, on_batch,
                                           lambda: arrivals.count))
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
    return Response(orjson.dumps({"detail": message}), status, media_type="application/json")


Extract = Callable[[Served, bytes, "str | None", "str | None"], tuple[list[Any], "str | None"]]


def extract_predict(
    s: Served, raw: bytes, ctype: str | None, rid: str | None
) -> tuple[list[Any], str | None]:
    """`/predict` bodies: {"instances": [...]}, {"inputs": ...}, or a bare list."""
    return extract_instances(parse_body(raw, ctype), s.config.limits.max_instances), rid


INLINE_BODY = 256 * 1024  # parse smaller bodies on the event loop: a thread hop costs more


async def predict_request(
    s: Served, raw: bytes, ctype: str | None, rid: str | None, extract: Extract,
    version: str | None = None,
) -> dict[str, Any]:
    """Parse, route, validate, predict (batched), log durably; the result a protocol renders."""
    ts = time.time()
    t0 = time.perf_counter()
    with s.arrivals:
        if len(raw) <= INLINE_BODY:
            instances, rid = extract(s, raw, ctype, rid)
        else:
            instances, rid = await run_in_threadpool(extract, s, raw, ctype, rid)
        base = _request_base(rid)
        target = s.route(version)
        if len(instances) * (target.spec.size or 1) <= 100_000:
            x = to_model_input(instances, target.spec)
        else:
            x = await run_in_threadpool(to_model_input, instances, target.spec)
    n = len(instances)
    metrics.QUEUE_DEPTH.labels(s.config.service).set(target.batcher.queued_instances + n)
    preds = await target.batcher.submit(x, n)
    latency_ms = (time.perf_counter() - t0) * 1000.0
    if s.log is not None:
        s.log.add([{"k": "p", "rid": base, "svc": s.config.service, "v": target.version, "ts": ts,
                    "lat": latency_ms, "in": instances, "out": preds}])
    shadow = s.shadow
    if shadow is not None and target is s.champion:
        _shadow_score(s, shadow, instances, base, ts)
    return {"predictions": preds, "ids": [f"{base}-{i}" for i in range(n)],
            "model_version": target.version, "request_id": base}


_SHADOW_TASKS: set[asyncio.Task[None]] = set()


def _shadow_score(s: Served, shadow: Loaded, instances: list[Any], base: str, ts: float) -> None:
    """Score a copy off the response path; skipped (and counted) when the shadow lags."""
    svc = s.config.service
    if s.shadow_pending >= 4 * s.config.batching.max_batch_size:
        metrics.SHADOW.labels(svc, shadow.version, "skipped_busy").inc()
        return

    async def run() -> None:
        s.shadow_pending += 1
        t0 = time.perf_counter()
        try:
            x = to_model_input(instances, shadow.spec)
            preds = await shadow.batcher.submit(x, len(instances))
            if s.log is not None:
                s.log.add([{"k": "s", "rid": base, "svc": svc, "v": shadow.version, "ts": ts,
                            "lat": (time.perf_counter() - t0) * 1000.0, "out": preds}])
            metrics.SHADOW.labels(svc, shadow.version, "scored").inc()
        except Exception as exc:  # the shadow's failure is its own, never the client's
            metrics.SHADOW.labels(svc, shadow.version, "failed").inc()
            log.debug("shadow %s failed: %s", shadow.version, exc)
        finally:
            s.shadow_pending -= 1

    task = asyncio.get_running_loop().create_task(run())
    _SHADOW_TASKS.add(task)
    task.add_done_callback(_SHADOW_TASKS.discard)


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
                fsync=cfg.predlog.fsync,
                on_written=lambda n: metrics.PREDLOG_WRITTEN.labels(svc).inc(n),
                on_dropped=lambda n, why: metrics.PREDLOG_DROPPED.labels(svc, why).inc(n),
            ).start()
        app.state.served = Served(cfg, models, store, plog, arrivals)
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
                await run_in_threadpool(plog.close)
            store.close()
            LIFECYCLE.retire()

    app = FastAPI(title="scanflow model server", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(CloseWhenDraining)

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        return await serve_prediction(request, "predict", extract_predict, _render_predict)

    from scanflow.serving.v2 import router as v2_router

    app.include_router(v2_router)

    async def serve_prediction(
        request: Request, endpoint: str, extract: Extract,
        render: Callable[[dict[str, Any]], Any], version: str | None = None,
    ) -> Response:
        """Size limits, timeout, error bodies and metrics, for every protocol."""
        s: Served = request.app.state.served
        t0 = time.perf_counter()
        answered = version or s.config.model_version
        status = 200
        try:
            length = request.headers.get("content-length")
            if length and length.isdigit() and int(length) > s.config.limits.max_body_bytes:
                raise RequestError(413, f"body: larger than {s.config.limits.max_body_bytes} bytes")
            with s.arrivals:
                raw = await request.body()
            if len(raw) > s.config.limits.max_body_bytes:
                raise RequestError(413, f"body: larger than {s.config.limits.max_body_bytes} bytes")
            try:
                result = await asyncio.wait_for(
                    predict_request(s, raw, request.headers.get("content-type"),
                                    request.headers.get("x-request-id"), extract, version),
                    timeout=s.config.limits.request_timeout_s,
                )
            except TimeoutError:
                raise RequestError(504, f"the request took longer than "
                                        f"{s.config.limits.request_timeout_s:g}s") from None
            answered = result["model_version"]
            metrics.INSTANCES.labels(s.config.service, answered).inc(len(result["ids"]))
            resp = Response(orjson.dumps(render(result)), media_type="application/json",
                            headers={"X-Model-Version": answered})
        except RequestError as exc:
            status = exc.status
            resp = _error(exc.status, exc.message)
        except Exception as exc:  # a bug of ours must not become a dead worker either
            log.exception("predict failed")
            status = 500
            resp = _error(500, f"internal error: {type(exc).__name__}: {exc}")
        metrics.REQUESTS.labels(s.config.service, endpoint, answered, str(status)).inc()
        metrics.LATENCY.labels(s.config.service, answered).observe(time.perf_counter() - t0)
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
            resp = Response(orjson.dumps({"count": n}), media_type="application/json")
        except RequestError as exc:
            status = exc.status
            resp = _error(exc.status, exc.message)
        metrics.REQUESTS.labels(s.config.service, "labels", s.config.model_version,
                                str(status)).inc()
        return resp

    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        s: Served = request.app.state.served
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
        return Response(metrics.render(), media_type=metrics.CONTENT_TYPE)

    return app


def _render_predict(result: dict[str, Any]) -> dict[str, Any]:
    return {"predictions": result["predictions"], "ids": result["ids"],
            "model_version": result["model_version"]}
