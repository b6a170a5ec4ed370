"""The Open Inference (KServe V2) REST protocol over the same model, validation, prediction
log and metrics as `/predict`, so standard V2 clients work unchanged: its routes are given the
worker's `PredictionService` (`create_router`), the same object `/predict` calls."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request, Response

from scanflow.serving.predict import PredictionService, Served
from scanflow.serving.validation import RequestError, parse_body

_DATATYPES = {
    "float64": "FP64", "float32": "FP32", "float16": "FP16", "int64": "INT64", "int32": "INT32",
    "int16": "INT16", "int8": "INT8", "uint64": "UINT64", "uint32": "UINT32", "uint16": "UINT16",
    "uint8": "UINT8", "bool": "BOOL", "object": "BYTES", "str": "BYTES", "string": "BYTES",
    "double": "FP64", "float": "FP32", "long": "INT64", "integer": "INT32", "boolean": "BOOL",
    "binary": "BYTES",
}
_NUMERIC = {"FP64", "FP32", "FP16", "INT64", "INT32", "INT16", "INT8", "UINT64", "UINT32", "UINT16",
            "UINT8"}


def datatype(kind: str) -> str:
    return _DATATYPES.get(str(kind), "BYTES")


def _check_model(s: Served, name: str, version: str | None = None) -> None:
    if name not in (s.config.model_name, s.config.service):
        raise RequestError(404, f"model {name!r} is not served here (this service serves "
                                f"{s.config.model_name!r} version {s.config.model_version})")
    if version is not None and version not in s.models:
        raise RequestError(404, f"version {version!r} of {name!r} is not served here "
                                f"(serving versions {', '.join(s.models)})")


def _error(exc: RequestError) -> Response:
    return Response(json.dumps({"error": exc.message, "detail": exc.message}), exc.status,
                    media_type="application/json")


def _reshape(data: list[Any], shape: list[int]) -> list[Any]:
    """Row-major flat data -> nested lists of `shape`."""
    if len(shape) <= 1:
        return list(data)
    step = math.prod(shape[1:])
    return [_reshape(data[i * step:(i + 1) * step], shape[1:]) for i in range(shape[0])]


def _flatten(v: Any) -> list[Any]:
    if isinstance(v, list):
        return [x for item in v for x in _flatten(item)]
    return [v]


def v2_instances(body: Any, s: Served) -> list[Any]:
    """V2 `inputs` -> per-instance values in the layout `/predict` takes."""
    if not isinstance(body, dict):
        raise RequestError(422, "body: expected a JSON object with `inputs`")
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise RequestError(422, "inputs: required, a non-empty list of tensors")
    tensors = []
    for i, t in enumerate(inputs):
        where = f"inputs[{i}]"
        if not isinstance(t, dict):
            raise RequestError(422, f"{where}: expected an object with name, shape, datatype, data")
        for key in ("name", "shape", "datatype", "data"):
            if key not in t:
                raise RequestError(422, f"{where}.{key}: required")
        shape = t["shape"]
        if not (isinstance(shape, list) and shape and all(isinstance(d, int) and not isinstance(d, bool)
                                                          and d >= 0 for d in shape)):
            raise RequestError(422, f"{where}.shape: expected a non-empty list of sizes >= 0")
        if t["datatype"] not in _NUMERIC | {"BOOL", "BYTES"}:
            raise RequestError(422, f"{where}.datatype: unknown datatype {t['datatype']!r}")
        try:
            data = _flatten(t["data"]) if isinstance(t["data"], list) else None
        except RecursionError:  # valid JSON (up to 1024 levels) but far deeper than any shape
            raise RequestError(422, f"{where}.data: nested deeper than its shape {shape}") from None
        if data is None:
            raise RequestError(422, f"{where}.data: expected a list")
        if len(data) != math.prod(shape):
            raise RequestError(422, f"{where}: shape {shape} needs {math.prod(shape)} values, "
                                    f"got {len(data)}")
        tensors.append((str(t["name"]), shape, data))
    n = tensors[0][1][0]
    if any(shape[0] != n for _, shape, _ in tensors):
        raise RequestError(422, "inputs: every tensor must have the same first dimension (batch)")
    if s.spec.kind == "columns" or len(tensors) > 1:
        rows: list[dict[str, Any]] = [{} for _ in range(n)]
        for name, shape, data in tensors:
            per = _reshape(data, shape)
            for r in range(n):
                rows[r][name] = per[r]
        return rows
    _, shape, data = tensors[0]
    return _reshape(data, shape)


def _extract_v2(s: Served, raw: bytes, ctype: str | None, rid: str | None) -> tuple[list[Any], str | None]:
    body = parse_body(raw, ctype)
    instances = v2_instances(body, s)
    if len(instances) > s.config.limits.max_instances:
        raise RequestError(413, f"inputs: more than {s.config.limits.max_instances} instances")
    return instances, rid or (body.get("id") if isinstance(body.get("id"), str) else None)


def _render(s: Served) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def render(result: dict[str, Any]) -> dict[str, Any]:
        preds = result["predictions"]
        flat = _flatten(preds)
        shape = [len(preds)] + ([len(preds[0])] if preds and isinstance(preds[0], list) else [])
        sample = flat[0] if flat else 0.0
        dt = ("BOOL" if isinstance(sample, bool) else "INT64" if isinstance(sample, int)
              else "FP64" if isinstance(sample, float) else "BYTES")
        return {
            "model_name": s.config.model_name,
            "model_version": result["model_version"],
            "id": result["request_id"],
            "outputs": [{"name": "predictions", "datatype": dt, "shape": shape, "data": flat}],
            "parameters": {"ids": result["ids"]},
        }
    return render


def create_router(predictions: PredictionService) -> APIRouter:
    """The `/v2` routes over `predictions` (the worker's models, limits, log and metrics)."""
    router = APIRouter(prefix="/v2")

    @router.get("/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @router.get("/health/ready")
    async def ready() -> Response:
        ok = predictions.ready
        return Response('{"ready": %s}' % ("true" if ok else "false"), 200 if ok else 503,
                        media_type="application/json")

    @router.get("/models/{name}")
    @router.get("/models/{name}/versions/{version}")
    async def metadata(name: str, version: str | None = None) -> Any:
        s = predictions.current()
        try:
            _check_model(s, name, version)
        except RequestError as exc:
            return _error(exc)
        spec = s.spec.describe()
        if spec["kind"] == "tensor":
            inputs = [{"name": "input", "datatype": datatype(spec["dtype"]), "shape": spec["shape"]}]
        elif spec["kind"] == "columns":
            inputs = [{"name": c["name"], "datatype": datatype(c["type"]), "shape": [-1]}
                      for c in spec["columns"]]
        else:
            inputs = []
        return {"name": s.config.model_name, "versions": list(s.models),
                "platform": "mlflow_pyfunc", "inputs": inputs,
                "outputs": [{"name": "predictions", "datatype": "BYTES", "shape": [-1]}]}

    @router.get("/models/{name}/ready")
    @router.get("/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str | None = None) -> Response:
        try:
            _check_model(predictions.current(), name, version)
        except RequestError as exc:
            return _error(exc)
        return await ready()

    @router.post("/models/{name}/infer")
    @router.post("/models/{name}/versions/{version}/infer")
    async def infer(request: Request, name: str, version: str | None = None) -> Response:
        s = predictions.current()
        try:
            _check_model(s, name, version)
        except RequestError as exc:
            return _error(exc)
        return await predictions.handle(request, "v2_infer", _extract_v2, _render(s), version)

    return router
