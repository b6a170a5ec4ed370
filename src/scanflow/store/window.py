"""How prediction records are packed for the store and read back as a columnar window.

Agents read windows of thousands of records (drift on inputs, accuracy on labels, latency
percentiles), so the read path avoids per-row objects and per-value JSON: flat numeric inputs
travel as float32 bytes and come back as one (n, d) array.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


def pack_inputs(inputs: Any) -> tuple[Any, bytes | None]:
    """(json_inputs, f32_bytes): a flat list of plain numbers becomes bytes, the rest JSON."""
    if isinstance(inputs, list) and inputs and not isinstance(inputs[0], list | dict | str | bool):
        try:
            arr = np.asarray(inputs)  # one C pass; a per-value type check costs 5x more
        except (OverflowError, ValueError):
            return inputs, None
        if arr.ndim == 1 and arr.dtype.kind in "iuf":
            with np.errstate(over="ignore"):  # too large for float32: kept as JSON below
                f32 = arr.astype(np.float32)
            if np.isfinite(f32).all():
                return None, f32.tobytes()
    return inputs, None


def unpack_inputs(inputs: Any, f32: bytes | None) -> Any:
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


def stack_inputs(json_inputs: list[Any], blobs: list[bytes | None]) -> np.ndarray | list[Any]:
    if blobs and all(b is not None for b in blobs) and len({len(b) for b in blobs}) == 1:  # type: ignore[arg-type]
        out = np.empty((len(blobs), len(blobs[0]) // 4), dtype=np.float32)  # type: ignore[arg-type]
        for i, b in enumerate(blobs):
            out[i] = np.frombuffer(b, dtype=np.float32)  # type: ignore[arg-type]
        return out
    return [unpack_inputs(j, b) for j, b in zip(json_inputs, blobs, strict=True)]
