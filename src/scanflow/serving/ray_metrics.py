"""`/metrics` of a service on Ray Serve summed over its replicas, as a local service's is over its
workers (prometheus-client's multiprocess mode): any replica answers for all of them.

Replicas share no disk, so each one publishes its own exposition text to the cluster's key-value
store (the GCS, which Serve itself keeps its state in) every `PUBLISH_S` seconds and when it
answers `/metrics`; the answering replica sums every snapshot of the service. As in multiprocess
mode, counters and histograms of replicas that have exited still count (a snapshot stays after
its replica; a replica's own last one is marked final when Serve stops it), while gauges count
only live replicas (a snapshot not refreshed for `STALE_S` seconds is a dead replica's). The
deployer deletes a service's snapshots when it stops the service.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

PUBLISH_S = 1.0
STALE_S = 5.0
PREFIX = "scanflow/metrics/"
# kept for replicas that have exited (their counts happened), like multiprocess mode's files
CUMULATIVE = {"counter", "histogram", "summary"}


def service_prefix(service_key: str) -> bytes:
    return f"{PREFIX}{service_key}/".encode()


def merge(snapshots: Iterable[tuple[bool, str]]) -> bytes:
    """One exposition of many replicas' (`live`, text): samples of the same name and labels
    summed; a dead replica's gauges left out."""
    families: dict[str, Metric] = {}
    sums: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for live, text in snapshots:
        for fam in text_string_to_metric_families(text):
            if not live and fam.type not in CUMULATIVE:
                continue
            families.setdefault(fam.name, Metric(fam.name, fam.documentation, fam.type))
            acc = sums.setdefault(fam.name, {})
            for s in fam.samples:
                if s.name.endswith("_created"):  # a creation time: not a sum of anything
                    continue
                key = (s.name, tuple(sorted(s.labels.items())))
                acc[key] = acc.get(key, 0.0) + s.value
    for name, fam in families.items():
        for (sample, labels), value in sums[name].items():
            fam.add_sample(sample, dict(labels), value)

    class _Merged:
        def collect(self) -> Iterator[Metric]:
            yield from families.values()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged())
    return generate_latest(registry)


class ReplicaMetrics:
    """One replica's side: publishes its registry under its own key, renders the service's sum."""

    def __init__(self, service_key: str) -> None:
        import ray  # lazy: on a replica only

        node = ray.get_runtime_context().get_node_id()[:12]
        self.prefix = service_prefix(service_key)
        self.key = self.prefix + f"{node}-{os.getpid()}".encode()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics-publish", daemon=True)

    def start(self) -> ReplicaMetrics:
        self.publish()
        self._thread.start()
        return self

    def publish(self, final: bool = False) -> None:
        from ray.experimental import internal_kv  # Ray's KV client (what Serve uses)

        snap = {"ts": time.time(), "final": final, "text": generate_latest(REGISTRY).decode()}
        internal_kv._internal_kv_put(self.key, json.dumps(snap).encode(), overwrite=True)

    def render(self) -> bytes:
        """Every replica's snapshot of the service, summed (this one's refreshed first)."""
        from ray.experimental import internal_kv  # Ray's KV client (what Serve uses)

        self.publish()
        now = time.time()
        snaps: list[tuple[bool, str]] = []
        for key in internal_kv._internal_kv_list(self.prefix):
            raw = internal_kv._internal_kv_get(key)
            if not raw:
                continue
            snap: dict[str, Any] = json.loads(raw)
            snaps.append((not snap.get("final") and now - float(snap["ts"]) < STALE_S,
                          str(snap["text"])))
        return merge(snaps)

    def close(self) -> None:
        self._stop.set()
        try:
            self.publish(final=True)
        except Exception:  # noqa: BLE001 - the cluster going away: the snapshot goes stale instead
            pass

    def _run(self) -> None:
        while not self._stop.wait(PUBLISH_S):
            try:
                self.publish()
            except Exception:  # noqa: BLE001 - GCS unreachable a moment: the next round retries
                pass


def delete_service(service_key: str) -> None:
    """Forget a stopped service's snapshots (the deployer's `stop`)."""
    from ray.experimental import internal_kv  # Ray's KV client (what Serve uses)

    for key in internal_kv._internal_kv_list(service_prefix(service_key)):
        internal_kv._internal_kv_del(key)
