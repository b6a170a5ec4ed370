"""How prediction records are packed for the store and read back as a columnar window.

Agents read windows of thousands of records (drift on inputs, accuracy on labels, latency
percentiles), so the read path avoids per-row objects and per-value JSON: flat numeric inputs
travel as float32 bytes and come back as one (n, d) array.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


def exact_u8(rows: np.ndarray) -> np.ndarray | None:
    """`rows` as uint8 when every value is an integer in 0..255, so nothing is lost (pixels:
    a quarter of float32's bytes), else None. NaN and infinities never equal their cast, so a
    result also says every value was finite."""
    with np.errstate(invalid="ignore", over="ignore"):
        u8 = rows.astype(np.uint8)
    return u8 if bool((u8 == rows).all()) else None


def pack_inputs(inputs: Any) -> tuple[Any, bytes | None, bytes | None]:
    """(json_inputs, f32_bytes, u8_bytes): a flat list of plain numbers becomes bytes (uint8 when
    exact, else float32), the rest JSON."""
    if isinstance(inputs, list) and inputs and not isinstance(inputs[0], list | dict | str | bool):
        try:
            arr = np.asarray(inputs)  # one C pass; a per-value type check costs 5x more
        except (OverflowError, ValueError):
            return inputs, None, None
        if arr.ndim == 1 and arr.dtype.kind in "iuf":
            u8 = exact_u8(arr)
            if u8 is not None:
                return None, None, u8.tobytes()
            with np.errstate(over="ignore"):  # too large for float32: kept as JSON below
                f32 = arr.astype(np.float32)
            if np.isfinite(f32).all():
                return None, f32.tobytes(), None
    return inputs, None, None


def unpack_inputs(inputs: Any, f32: bytes | None, u8: bytes | None = None) -> Any:
    if u8 is not None:
        return np.frombuffer(u8, dtype=np.uint8).astype(np.float32).tolist()
    if f32 is not None:
        return np.frombuffer(f32, dtype=np.float32).tolist()
    return inputs


@dataclass
class PredictionWindow:
    """A window of one service's prediction log, oldest first, one array/list per column.

    `inputs` is an (n, d) float32 array when every record's input was a flat numeric vector
    of one length, else a list of the JSON inputs. `labels[i]` is None until a label joined.
    """

    ids: np.ndarray
    request_ids: list[str]
    model_versions: list[str | None]
    ts: np.ndarray
    latency_ms: np.ndarray
    outputs: list[Any]
    labels: list[Any]
    inputs: np.ndarray | list[Any] | None = None
    shadow_versions: list[str | None] = field(default_factory=list)
    shadow_outputs: list[Any] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.request_ids)

    @property
    def labelled(self) -> np.ndarray:
        """Boolean mask of the records that have a label."""
        return np.array([lab is not None for lab in self.labels], dtype=bool)

    def select(self, mask: np.ndarray) -> PredictionWindow:
        idx = np.flatnonzero(mask)

        def pick(seq: list[Any]) -> list[Any]:
            return [seq[i] for i in idx] if seq else []

        inputs: Any = self.inputs
        if isinstance(inputs, np.ndarray):
            inputs = inputs[idx]
        elif isinstance(inputs, list):
            inputs = pick(inputs)
        return PredictionWindow(
            ids=self.ids[idx], request_ids=pick(self.request_ids),
            model_versions=pick(self.model_versions), ts=self.ts[idx],
            latency_ms=self.latency_ms[idx], outputs=pick(self.outputs), labels=pick(self.labels),
            inputs=inputs, shadow_versions=pick(self.shadow_versions),
            shadow_outputs=pick(self.shadow_outputs),
        )


def _width(f32: bytes | None, u8: bytes | None) -> int | None:
    """Values in a record's input bytes (None: its input is JSON)."""
    return len(u8) if u8 is not None else None if f32 is None else len(f32) // 4


def stack_inputs(json_inputs: list[Any], f32_blobs: list[bytes | None],
                 u8_blobs: list[bytes | None] | None = None) -> np.ndarray | list[Any]:
    """One (n, d) float32 array when every record's input was bytes of one width (uint8 and
    float32 rows mix: a store written before uint8 rows existed), else a list of the inputs."""
    u8s = u8_blobs if u8_blobs is not None else [None] * len(f32_blobs)
    widths = {_width(f, u) for f, u in zip(f32_blobs, u8s, strict=True)}
    width = widths.pop() if len(widths) == 1 else None
    if f32_blobs and width is not None:
        out = np.empty((len(f32_blobs), width), dtype=np.float32)
        for i, (f, u) in enumerate(zip(f32_blobs, u8s, strict=True)):
            if u is not None:
                out[i] = np.frombuffer(u, dtype=np.uint8)
            elif f is not None:
                out[i] = np.frombuffer(f, dtype=np.float32)
        return out
    return [unpack_inputs(j, f, u) for j, f, u in zip(json_inputs, f32_blobs, u8s, strict=True)]
