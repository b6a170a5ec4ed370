"""Request validation against an MLflow model signature, before the model sees anything.

Pure functions: bad input becomes a `RequestError(status, message)` whose message names the
offending field (`instances[3]: expected 784 values, got 780`), so the server answers 4xx
instead of a 500 or a traceback from deep inside a model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import orjson

Kind = Literal["tensor", "columns", "any"]

_NUMERIC_COLS = {"double": np.float64, "float": np.float32, "long": np.int64, "integer": np.int32}


class RequestError(Exception):
    """A client error with the HTTP status to answer and a message naming the problem."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Column:
    """One named field of a column-based signature."""

    name: str
    type: str  # mlflow DataType name ("double", "long", "string", ...) or "other"
    required: bool = True


@dataclass(frozen=True)
class InputSpec:
    """What one instance must look like; derived once from the signature at worker start."""

    kind: Kind = "any"
    dtype: str = "float64"
    shape: tuple[int, ...] = ()  # per-instance dims for tensors, -1 = any length
    columns: tuple[Column, ...] = field(default_factory=tuple)

    @property
    def size(self) -> int | None:
        """Values per instance for a fixed-shape tensor, else None."""
        if self.kind != "tensor" or not self.shape or any(d < 0 for d in self.shape):
            return None
        return math.prod(self.shape)

    def describe(self) -> dict[str, Any]:
        """JSON view for /health and error messages."""
        if self.kind == "tensor":
            return {"kind": "tensor", "dtype": self.dtype, "shape": [-1, *self.shape]}
        if self.kind == "columns":
            return {
                "kind": "columns",
                "columns": [
                    {"name": c.name, "type": c.type, "required": c.required} for c in self.columns
                ],
            }
        return {"kind": "any"}


def spec_from_schema(schema: Any) -> InputSpec:
    """Translate an MLflow input `Schema` (or None) into an InputSpec."""
    if schema is None or not schema.inputs:
        return InputSpec()
    if schema.is_tensor_spec():
        if len(schema.inputs) != 1:
            # Several named tensors: no per-instance layout to check; let the model judge.
            return InputSpec()
        t = schema.inputs[0]
        shape = tuple(int(d) for d in (t.shape or (-1,)))
        return InputSpec(kind="tensor", dtype=str(np.dtype(t.type)), shape=shape[1:] or ())
    if not schema.has_input_names():
        return InputSpec()
    cols = []
    for c in schema.inputs:
        tname = getattr(c.type, "name", None)
        cols.append(Column(name=c.name, type=tname if isinstance(tname, str) else "other",
                           required=bool(getattr(c, "required", True))))
    return InputSpec(kind="columns", columns=tuple(cols))


# -- body ---------------------------------------------------------------------------------------
MAX_DEPTH = 1024  # orjson's nesting limit; deeper bodies are refused (400), never decoded
def parse_body(raw: bytes, content_type: str | None) -> Any:
    """JSON body or RequestError: 415 for a non-JSON content type, 400 for bad JSON."""
    if content_type:
        mime = content_type.split(";", 1)[0].strip().lower()
        if mime != "application/json" and not mime.endswith("+json"):
            raise RequestError(
                415, f"content type {mime!r} is not supported: send application/json"
            )
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if str(exc).startswith("depth limit exceeded"):  # json.loads would hit RecursionError
            raise RequestError(400, f"body is not valid JSON: nested deeper than {MAX_DEPTH} "
                                    f"levels ({exc})") from None
        # else NaN/Infinity (refused by orjson, named later by the validation) or broken JSON
    try:
        return json.loads(raw)
    except RecursionError:
        raise RequestError(400, f"body is not valid JSON: nested deeper than {MAX_DEPTH} "
                                f"levels") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"body is not valid JSON: {exc}") from None


def extract_instances(body: Any, max_instances: int) -> list[Any]:
    """The `instances` (or `inputs`) list of a predict body."""
    if not isinstance(body, dict):
        raise RequestError(
            422, f"body must be an object with an 'instances' list, got {_kind(body)}"
        )
    key = "instances" if "instances" in body else "inputs" if "inputs" in body else None
    if key is None:
        raise RequestError(422, "body: missing field 'instances' (a list of instances)")
    instances = body[key]
    if not isinstance(instances, list):
        raise RequestError(422, f"{key}: expected a list of instances, got {_kind(instances)}")
    if not instances:
        raise RequestError(422, f"{key}: empty list, send at least one instance")
    if len(instances) > max_instances:
        raise RequestError(
            413, f"{key}: at most {max_instances} instances per request, got {len(instances)}"
        )
    return instances


def extract_labels(body: Any) -> dict[str, Any]:
    """The `labels` mapping of a /labels body: request id -> JSON label."""
    if not isinstance(body, dict) or "labels" not in body:
        raise RequestError(422, "body: missing field 'labels' (an object id -> label)")
    labels = body["labels"]
    if not isinstance(labels, dict) or not labels:
        raise RequestError(422, "labels: expected a non-empty object mapping id -> label")
    for rid, lab in labels.items():
        if not rid or len(rid) > 64:
            raise RequestError(422, f"labels: id {rid!r} must have 1 to 64 characters")
        if isinstance(lab, (dict, list)) or (isinstance(lab, float) and not math.isfinite(lab)):
            raise RequestError(422, f"labels[{rid!r}]: expected a number, string or bool")
    return labels


# -- instances ----------------------------------------------------------------------------------
def to_model_input(instances: list[Any], spec: InputSpec) -> Any:
    """Check every instance against the spec and build the array/DataFrame the model wants."""
    if spec.kind == "tensor":
        return _tensor(instances, spec)
    if spec.kind == "columns":
        return _columns(instances, spec.columns)
    if all(isinstance(i, dict) for i in instances):
        names = sorted({k for i in instances for k in i})
        cols = tuple(Column(n, "other", required=False) for n in names)
        return _columns(instances, cols)
    first = instances[0]
    n = len(first) if isinstance(first, list) else -1
    return _tensor(instances, InputSpec(kind="tensor", dtype="float64", shape=(n,)))


def _tensor(instances: list[Any], spec: InputSpec) -> np.ndarray:
    dtype = np.dtype(spec.dtype)
    integer = dtype.kind in "iu"
    boolean = dtype.kind == "b"
    shape = spec.shape
    flat = spec.size
    ref_len: int | None = None
    rows: list[Any] = []
    for i, inst in enumerate(instances):
        path = f"instances[{i}]"
        if not shape:  # scalar per instance
            rows.append(_number(inst, path, integer, boolean))
            continue
        if not isinstance(inst, list):
            want = f"a list of {flat} numbers" if flat else "a list of numbers"
            raise RequestError(422, f"{path}: expected {want}, got {_kind(inst)}")
        if len(shape) > 1 and inst and isinstance(inst[0], list):
            rows.append(_nested(inst, shape, path, integer, boolean))
            continue
        want_len = flat if flat is not None else ref_len
        if want_len is not None and len(inst) != want_len:
            raise RequestError(422, f"{path}: expected {want_len} values, got {len(inst)}")
        if want_len is None and not inst:
            raise RequestError(422, f"{path}: empty list, expected numbers")
        ref_len = len(inst)
        _check_flat(inst, path, integer, boolean)
        rows.append(inst)
    try:
        arr = np.asarray(rows, dtype=dtype)
    except (ValueError, OverflowError) as exc:
        raise RequestError(422, f"instances: cannot convert to {dtype}: {exc}") from None
    if shape and arr.ndim == 2 and len(shape) > 1 and flat is not None:
        arr = arr.reshape((len(rows), *shape))
    return arr


def _check_flat(values: list[Any], path: str, integer: bool, boolean: bool) -> None:
    """Hot loop: 64..784 values per instance, so plain type checks, no per-value calls."""
    if boolean:
        for j, v in enumerate(values):
            if type(v) is not bool:
                raise RequestError(422, f"{path}[{j}]: expected true or false, got {v!r}")
        return
    for j, v in enumerate(values):
        t = type(v)
        if t is int:
            continue
        if t is float:
            if v - v != 0.0:  # NaN or +-inf
                raise RequestError(422, f"{path}[{j}]: expected a finite number, got {v!r}")
            if integer and not v.is_integer():
                raise RequestError(422, f"{path}[{j}]: expected an integer, got {v!r}")
            continue
        raise RequestError(422, f"{path}[{j}]: expected a number, got {_show(v)}")


def _nested(value: Any, shape: tuple[int, ...], path: str, integer: bool, boolean: bool) -> Any:
    if len(shape) == 1:
        if not isinstance(value, list):
            raise RequestError(422, f"{path}: expected a list, got {_kind(value)}")
        if shape[0] >= 0 and len(value) != shape[0]:
            raise RequestError(422, f"{path}: expected {shape[0]} values, got {len(value)}")
        _check_flat(value, path, integer, boolean)
        return value
    if not isinstance(value, list) or (shape[0] >= 0 and len(value) != shape[0]):
        got = len(value) if isinstance(value, list) else _kind(value)
        raise RequestError(422, f"{path}: expected {shape[0]} rows, got {got}")
    return [_nested(v, shape[1:], f"{path}[{k}]", integer, boolean) for k, v in enumerate(value)]


def _number(v: Any, path: str, integer: bool, boolean: bool) -> Any:
    """One scalar instance (signature shape (-1,))."""
    try:
        _check_flat([v], "", integer, boolean)
    except RequestError as exc:
        raise RequestError(exc.status, path + exc.message[len("[0]"):]) from None
    return v


def _columns(instances: list[Any], columns: tuple[Column, ...]) -> Any:
    import pandas as pd  # mlflow loads pandas anyway; keep it off the import path of tensors

    data: dict[str, list[Any]] = {c.name: [] for c in columns}
    names = ", ".join(c.name for c in columns)
    for i, inst in enumerate(instances):
        path = f"instances[{i}]"
        if not isinstance(inst, dict):
            raise RequestError(422, f"{path}: expected an object with fields {names}, "
                                    f"got {_kind(inst)}")
        for c in columns:
            if c.name not in inst or inst[c.name] is None:
                if c.required:
                    raise RequestError(422, f"{path}: missing field {c.name!r}")
                data[c.name].append(None)
                continue
            data[c.name].append(_cell(inst[c.name], c, f"{path}.{c.name}"))
    frame = {}
    for c in columns:
        vals = data[c.name]
        np_type = _NUMERIC_COLS.get(c.type)
        if np_type is not None and None not in vals:
            frame[c.name] = np.asarray(vals, dtype=np_type)
        elif c.type == "boolean" and None not in vals:
            frame[c.name] = np.asarray(vals, dtype=bool)
        elif c.type == "datetime":
            frame[c.name] = pd.to_datetime(pd.Series(vals), errors="raise")
        else:
            frame[c.name] = pd.Series(vals, dtype=object if np_type is None else "float64")
    return pd.DataFrame(frame)


def _cell(v: Any, c: Column, path: str) -> Any:
    t = c.type
    if t in ("double", "float", "long", "integer"):
        if type(v) is bool or not isinstance(v, (int, float)):
            raise RequestError(422, f"{path}: expected a number, got {_show(v)}")
        if isinstance(v, float) and not math.isfinite(v):
            raise RequestError(422, f"{path}: expected a finite number, got {v!r}")
        if t in ("long", "integer") and isinstance(v, float) and not v.is_integer():
            raise RequestError(422, f"{path}: expected an integer, got {v!r}")
        return v
    if t == "boolean" and type(v) is not bool:
        raise RequestError(422, f"{path}: expected true or false, got {_show(v)}")
    if t in ("string", "binary", "datetime") and not isinstance(v, str):
        raise RequestError(422, f"{path}: expected a string, got {_show(v)}")
    if t == "datetime":
        import pandas as pd  # lazy: pandas (~0.3 s), for datetime columns only

        try:
            pd.Timestamp(v)
        except (ValueError, TypeError):
            raise RequestError(422, f"{path}: expected an ISO date-time, got {v!r}") from None
    if isinstance(v, float) and not math.isfinite(v):
        raise RequestError(422, f"{path}: expected a finite number, got {v!r}")
    return v


def _kind(v: Any) -> str:
    if isinstance(v, dict):
        return "an object"
    if isinstance(v, list):
        return "a list"
    if v is None:
        return "null"
    return f"{type(v).__name__} {_show(v)}"


def _show(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 40 else s[:37] + "..."
