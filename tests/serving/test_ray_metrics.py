"""`/metrics` of a service on Ray Serve: the replicas' snapshots summed as prometheus-client's
multiprocess mode sums a local service's workers (the live cluster case is in test_ray_serve)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from scanflow.serving.ray_metrics import merge

REPLICA = """\
# HELP scanflow_requests_total HTTP requests answered.
# TYPE scanflow_requests_total counter
scanflow_requests_total{service="web",status="200"} 3.0
scanflow_requests_created{service="web",status="200"} 1.7e9
# HELP scanflow_replicas Live replicas.
# TYPE scanflow_replicas gauge
scanflow_replicas{service="web",role="champion"} 1.0
# HELP scanflow_request_latency_seconds Time to answer.
# TYPE scanflow_request_latency_seconds histogram
scanflow_request_latency_seconds_bucket{le="0.01",service="web"} 2.0
scanflow_request_latency_seconds_bucket{le="+Inf",service="web"} 3.0
scanflow_request_latency_seconds_count{service="web"} 3.0
scanflow_request_latency_seconds_sum{service="web"} 0.05
"""


def _samples(text: bytes) -> dict[str, float]:
    return {s.name + (f"{{le={s.labels['le']}}}" if "le" in s.labels else ""): s.value
            for fam in text_string_to_metric_families(text.decode()) for s in fam.samples}


def test_counts_of_every_replica_add_up_and_only_live_replicas_are_gauged() -> None:
    """Two live replicas and one that exited: its requests still count (they happened), it is
    no longer a live replica; creation times are not summed."""
    got = _samples(merge([(True, REPLICA), (True, REPLICA), (False, REPLICA)]))
    assert got["scanflow_requests_total"] == 9.0
    assert got["scanflow_replicas"] == 2.0
    assert got["scanflow_request_latency_seconds_bucket{le=0.01}"] == 6.0
    assert got["scanflow_request_latency_seconds_count"] == 9.0
    assert abs(got["scanflow_request_latency_seconds_sum"] - 0.15) < 1e-9
    assert not any(name.endswith("_created") for name in got)


def test_no_replica_yet_is_an_empty_exposition() -> None:
    assert merge([]) == b""
