"""Prometheus metrics of a model server.

Every gunicorn worker is a replica, so counters live in prometheus-client's multiprocess
mode (files in `PROMETHEUS_MULTIPROC_DIR`, set by the deployer) and `/metrics` on any worker
shows the sum over all of them, including workers that have already exited. On Ray Serve the
replicas share no disk: `ray_metrics` sums them through the cluster's key-value store.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

REQUESTS = Counter(
    "scanflow_requests",
    "HTTP requests answered, by endpoint, status code and model version.",
    ["service", "endpoint", "model_version", "status"],
)
LATENCY = Histogram(
    "scanflow_request_latency_seconds",
    "Time to answer /predict, from body received to response built.",
    ["service", "model_version"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
INSTANCES = Counter(
    "scanflow_instances",
    "Instances predicted (a request may carry many).",
    ["service", "model_version"],
)
BATCH_SIZE = Histogram(
    "scanflow_batch_size",
    "Instances per model call (micro-batching groups concurrent requests).",
    ["service", "model_version"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096),
)
QUEUE_DEPTH = Gauge(
    "scanflow_queue_depth",
    "Instances waiting for a model call, summed over live replicas (sampled per request).",
    ["service"],
    multiprocess_mode="livesum",
)
REPLICAS = Gauge(
    "scanflow_replicas",
    "Live, non-draining replicas (workers) serving each version, by role.",
    ["service", "model_version", "role"],
    multiprocess_mode="livesum",
)
SHADOW = Counter(
    "scanflow_shadow_requests",
    "Requests copied to the shadow version, by outcome (scored, failed, skipped_busy).",
    ["service", "model_version", "outcome"],
)
PREDLOG_WRITTEN = Counter(
    "scanflow_predlog_written", "Prediction-log records written to the store.", ["service"]
)
PREDLOG_DROPPED = Counter(
    "scanflow_predlog_dropped",
    "Prediction-log records given up on (duplicate id, unreadable or torn journal line).",
    ["service", "reason"],
)
PREDLOG_NODE_ONLY = Counter(
    "scanflow_predlog_node_only",
    "With commit=store: records journaled on the node instead, the store being slow or failing "
    "(collected later; lost if the node is lost first).",
    ["service", "reason"],
)

CONTENT_TYPE = CONTENT_TYPE_LATEST


_render_all: Callable[[], bytes] | None = None


def render_with(renderer: Callable[[], bytes] | None) -> None:
    """Where all replicas' metrics come from when not multiprocess files (a Ray Serve replica:
    `ray_metrics`)."""
    global _render_all
    _render_all = renderer


def render() -> bytes:
    """Text exposition of all workers' metrics (or this process's when not multiprocess)."""
    if _render_all is not None:
        return _render_all()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest(REGISTRY)
