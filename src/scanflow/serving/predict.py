"""The prediction path of a worker: the served model versions, and one `PredictionService` that
every protocol (`/predict`, Open Inference V2 `infer`) calls with its own parsing and rendering."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from fastapi import Request, Response
from starlette.concurrency import run_in_threadpool

from scanflow.serving import metrics
from scanflow.serving.batching import MicroBatcher
from scanflow.serving.config import ServiceConfig
from scanflow.serving.label_auth import LabelGate
from scanflow.serving.predlog import PredictionLog, encode_prediction, encode_shadow
from scanflow.serving.validation import (
    InputSpec,
    RequestError,
    extract_instances,
    parse_body,
    spec_from_schema,
    to_model_input,
)
from scanflow.serving.workers import WorkerLifecycle
from scanflow.store import Store

log = logging.getLogger("scanflow.serving")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,40}$")


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
    label_gate: LabelGate | None = None  # who may POST /labels (label_auth.py)

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
    """In the master: load every version from its local copy; drop versions no longer served.
    (`suppress_warnings`, here and below: MLflow's requirements check scans every installed
    distribution, ~1.7 s a process, to warn of mismatches with the environment it runs in.)"""
    import mlflow.pyfunc  # lazy: MLflow (heavy) only where models load, not in the deployer

    for v in list(PRELOADED):
        if v not in cfg.versions:
            del PRELOADED[v]
    for v in cfg.versions:
        path = cfg.model_paths.get(v)
        if v not in PRELOADED and path:
            PRELOADED[v] = mlflow.pyfunc.load_model(path, suppress_warnings=True)


def load_models(cfg: ServiceConfig, arrivals: Arrivals) -> dict[str, Loaded]:
    """Load every version the config serves (champion, canary, shadow) with a batcher each."""
    import mlflow.pyfunc  # lazy: MLflow (heavy) only where models load, not in the deployer

    svc = cfg.service
    out: dict[str, Loaded] = {}
    for version in cfg.versions:
        uri = f"models:/{cfg.model_name}/{version}"
        model = PRELOADED.get(version) or mlflow.pyfunc.load_model(cfg.model_paths.get(version, uri),
                                                                   suppress_warnings=True)
        spec = spec_from_schema(model.metadata.get_input_schema())
        hist = metrics.BATCH_SIZE.labels(svc, version)

        def on_batch(items: int, _requests: int, hist: Any = hist) -> None:
            hist.observe(items)

        out[version] = Loaded(version, model, spec,
                              MicroBatcher(_model_call(model, uri), cfg.batching, on_batch,
                                           lambda: arrivals.count))
    return out


def new_request_id() -> str:
    """32 hex characters like a uuid4, but time-ordered (nanoseconds, then 64 random bits):
    the store's unique index on request ids then grows at its right edge. With random ids each
    insert dirtied a random page of that index, and the collector's cost per record grew with
    the log (24 -> 34 us of CPU at 100k -> 300k records, against 12 us flat with these)."""
    return f"{time.time_ns():016x}{os.urandom(8).hex()}"


def _request_base(header: str | None) -> str:
    if header is None:
        return new_request_id()
    if not _REQUEST_ID.match(header):
        raise RequestError(
            422, "X-Request-ID: expected 1 to 40 characters of A-Z a-z 0-9 . _ : -"
        )
    return header


def error_response(status: int, message: str) -> Response:
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
        await s.log.answered(encode_prediction(base, s.config.service, target.version, ts,
                                               latency_ms, x, instances, preds))
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
                s.log.add(encode_shadow(base, svc, shadow.version, ts,
                                        (time.perf_counter() - t0) * 1000.0, preds))
            metrics.SHADOW.labels(svc, shadow.version, "scored").inc()
        except Exception as exc:  # the shadow's failure is its own, never the client's
            metrics.SHADOW.labels(svc, shadow.version, "failed").inc()
            log.debug("shadow %s failed: %s", shadow.version, exc)
        finally:
            s.shadow_pending -= 1

    task = asyncio.get_running_loop().create_task(run())
    _SHADOW_TASKS.add(task)
    task.add_done_callback(_SHADOW_TASKS.discard)


class PredictionService:
    """The one path from a request to a logged prediction, handed to each protocol's routes.

    The app factory builds it empty and the worker's lifespan fills `served` once the models
    are loaded (requests are only accepted after that)."""

    def __init__(self, lifecycle: WorkerLifecycle) -> None:
        self.lifecycle = lifecycle
        self.served: Served | None = None

    @property
    def ready(self) -> bool:
        """Models loaded and not draining: what readiness probes report."""
        return self.served is not None and not self.lifecycle.draining

    def current(self) -> Served:
        if self.served is None:
            raise RuntimeError("the worker has not loaded its models yet")
        return self.served

    async def handle(
        self, request: Request, endpoint: str, extract: Extract,
        render: Callable[[dict[str, Any]], Any], version: str | None = None,
    ) -> Response:
        """Size limits, timeout, error bodies and metrics, for every protocol."""
        s = self.current()
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
            resp = error_response(exc.status, exc.message)
        except Exception as exc:  # a bug of ours must not become a dead worker either
            log.exception("predict failed")
            status = 500
            resp = error_response(500, f"internal error: {type(exc).__name__}: {exc}")
        metrics.REQUESTS.labels(s.config.service, endpoint, answered, str(status)).inc()
        metrics.LATENCY.labels(s.config.service, answered).observe(time.perf_counter() - t0)
        return resp
