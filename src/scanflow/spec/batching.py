"""Micro-batching knobs of a service: declared in the spec, applied by each serving worker
(`scanflow.serving.batching`). Here so that loading a spec does not import the server."""

from __future__ import annotations

from pydantic import BaseModel, Field


class BatchConfig(BaseModel):
    """Micro-batching knobs of a service (per worker)."""

    enabled: bool = Field(default=True, description="off: one model call per request")
    max_batch_size: int = Field(default=64, ge=1, le=100_000,
                                description="instances per model call (a bigger request runs alone)")
    max_wait_ms: float = Field(default=2.0, ge=0, le=1000,
                               description="longest a batch waits for more requests being received")
    max_concurrent_batches: int = Field(
        default=2, ge=1, le=64,
        description="model calls in flight per worker: 2 lets one slow batch not stall the rest",
    )


__all__ = ["BatchConfig"]
