"""Traffic for the case study: digits sent one request each through the real HTTP service at a
fixed rate, and an oracle labeller that sends the true label of a sample of them later (the
stand-in for human labelling)."""

from __future__ import annotations

import heapq
import http.client
import json
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import numpy as np


@dataclass
class Served:
    t: float
    phase: str
    label: int
    prediction: int | None
    version: str | None
    status: int
    latency_ms: float
    request_id: str | None = None  # the prediction-log id of the (one) instance


class OracleLabeller:
    """Sends the true label of `fraction` of the served requests, `delay_s` after serving."""

    def __init__(self, url: str, fraction: float = 0.5, delay_s: float = 2.0, seed: int = 0) -> None:
        self.url = url.rstrip("/") + "/labels"
        self.fraction = fraction
        self.delay_s = delay_s
        self.rng = random.Random(seed)
        self._due: list[tuple[float, str, int]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.sent = 0
        self._thread = threading.Thread(target=self._loop, daemon=True, name="labeller")
        self._thread.start()

    def observe(self, request_id: str, label: int) -> None:
        if self.rng.random() < self.fraction:
            with self._lock:
                heapq.heappush(self._due, (time.time() + self.delay_s, request_id, label))

    def _loop(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                time.sleep(0.25)
                self._flush(client, time.time())
            self._flush(client, float("inf"))

    def _flush(self, client: httpx.Client, now: float) -> None:
        batch: dict[str, int] = {}
        with self._lock:
            while self._due and self._due[0][0] <= now:
                _, rid, lab = heapq.heappop(self._due)
                batch[rid] = lab
        if batch:
            r = client.post(self.url, json={"labels": batch})
            r.raise_for_status()
            self.sent += len(batch)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


class Traffic:
    """`concurrency` clients share a fixed request rate; every response is recorded.

    Each client opens a new connection every `reconnect_s` (as behind an L7 balancer with a
    maximum connection age): a keep-alive connection stays with the replica that accepted it,
    so clients that never reconnect would never reach a replica added after they connected.
    """

    def __init__(self, url: str, labeller: OracleLabeller, rate: float = 100.0,
                 concurrency: int = 4, reconnect_s: float = 1.0) -> None:
        self.url = url.rstrip("/") + "/predict"
        parts = urlsplit(self.url)
        self._host, self._port, self._path = parts.hostname or "127.0.0.1", parts.port or 80, parts.path
        self.labeller = labeller
        self.rate = rate
        self.concurrency = concurrency
        self.reconnect_s = reconnect_s
        self.served: list[Served] = []
        self._lock = threading.Lock()

    def phase(self, name: str, images: np.ndarray, labels: np.ndarray,
              stop: Callable[[], bool] | None = None, progress: Callable[[int], None] | None = None,
              timeout_s: float = 600.0, cycle: bool = False) -> list[Served]:
        """Send `images` in order (one per request) until done (or, with `cycle`, round and
        round), `stop()` or `timeout_s`."""
        flat = images.reshape(len(images), -1).astype(int)
        nxt = {"i": 0}
        start = time.time()
        interval = self.concurrency / self.rate
        out: list[Served] = []

        def take() -> int | None:
            with self._lock:
                i = nxt["i"]
                if (i >= len(flat) and not cycle) or (stop and stop()) or time.time() - start > timeout_s:
                    return None
                nxt["i"] = i + 1
                return i % len(flat)

        def connect() -> http.client.HTTPConnection:
            return http.client.HTTPConnection(self._host, self._port, timeout=30)

        def worker(k: int) -> None:
            # http.client rather than httpx: a quarter of the client CPU per request, which on
            # 2 shared cores decides whether 8 clients can offer 400 req/s at all.
            tick = start + k * interval / self.concurrency
            conn = connect()
            opened = time.time()
            headers = {"Content-Type": "application/json"}
            try:
                while (i := take()) is not None:
                    if time.time() - opened > self.reconnect_s:
                        conn.close()  # the next request may land on a replica added since
                        conn, opened = connect(), time.time()
                    tick += interval
                    time.sleep(max(0.0, tick - time.time()))
                    t0 = time.time()
                    try:
                        conn.request("POST", self._path, json.dumps({"instances": [flat[i].tolist()]}),
                                     headers)
                        r = conn.getresponse()
                        raw = r.read()
                        status = r.status
                        body = json.loads(raw) if status == 200 else {}
                    except (OSError, http.client.HTTPException, ValueError):
                        status, body = 0, {}
                        conn.close()
                        conn, opened = connect(), time.time()
                    rec = Served(t0, name, int(labels[i]),
                                 int(body["predictions"][0]) if body else None,
                                 body.get("model_version"), status, (time.time() - t0) * 1000,
                                 body["ids"][0] if body else None)
                    if body:
                        self.labeller.observe(body["ids"][0], int(labels[i]))
                    with self._lock:
                        out.append(rec)
                        n = len(out)
                    if progress and n % 100 == 0:
                        progress(n)
            finally:
                conn.close()

        threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(self.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out.sort(key=lambda s: s.t)
        self.served.extend(out)
        return out


def accuracy(records: list[Served]) -> float | None:
    ok = [r for r in records if r.status == 200]
    return float(np.mean([r.prediction == r.label for r in ok])) if ok else None
