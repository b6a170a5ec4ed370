"""A running Ray step's log, streamed live from whichever node runs it.

Each attempt writes its log under its node's Ray logs folder (`live_log_name`), and publishes
its node in Ray's KV store under `RUN/STEP/ATTEMPT` (`ray_task.Placement`, the same record the
driver's lost-node check reads). A reader finds the node there and streams the file through Ray's
own log API (the dashboard's `/api/v0/logs/stream`, served from the node by its dashboard agent),
so any machine that reaches the cluster's GCS and dashboard can follow it; the driver is not in
the way. When the attempt ends, the reader goes on with the driver's copy (`logs.step_logs`), or
for a run whose driver is elsewhere, with the attempt's log as the driver kept it in the store
(`StepLogKeeper`, `StoreStepLogs`).
This module joins no cluster (no `ray.init`): it talks to the GCS and the dashboard only.
"""

from __future__ import annotations

import codecs
import logging
import queue
import socket
import tempfile
import threading
from pathlib import Path
from typing import Any

import httpx

from scanflow.engine.ray_address import gcs_and_dashboard
from scanflow.engine.ray_task import LOGS_DIR, PLACEMENTS, live_log_name

CONNECT_TIMEOUT = 5.0  # seconds to reach the dashboard
log = logging.getLogger(__name__)


class LiveStream:
    """One node file followed through the dashboard, read without blocking; a thread holds the
    HTTP stream, `close` shuts its socket (the agent never ends a followed stream itself)."""

    def __init__(self, url: str, node_id: str, filename: str) -> None:
        self._chunks: queue.Queue[bytes | None] = queue.Queue()
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._sock: socket.socket | None = None
        self._closed = threading.Event()
        self.error: str | None = None  # why the stream could not be opened or broke
        params: dict[str, Any] = {"node_id": node_id, "filename": filename, "lines": -1,
                                  "media_type": "stream", "interval": 0.2}
        self._thread = threading.Thread(target=self._pump, args=(url, params), daemon=True,
                                        name=f"live-log-{filename}")
        self._thread.start()

    def _pump(self, url: str, params: dict[str, Any]) -> None:
        try:
            timeout = httpx.Timeout(CONNECT_TIMEOUT, read=None)
            with httpx.Client(timeout=timeout) as client, \
                    client.stream("GET", f"{url}/api/v0/logs/stream", params=params) as r:
                if r.status_code != 200:
                    self.error = r.read().decode(errors="replace")[:500] or f"HTTP {r.status_code}"
                    return
                stream = r.extensions.get("network_stream")
                self._sock = stream.get_extra_info("socket") if stream is not None else None
                if self._closed.is_set():
                    return
                for chunk in r.iter_raw():
                    self._chunks.put(chunk)
        except (httpx.HTTPError, OSError) as exc:
            if not self._closed.is_set():
                self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self._chunks.put(None)

    @property
    def ended(self) -> bool:
        """The stream stopped (an error, or closed) and everything it got was read."""
        return not self._thread.is_alive() and self._chunks.empty()

    def read(self) -> str:
        """What arrived since the last read (may be empty)."""
        parts = []
        while True:
            try:
                chunk = self._chunks.get_nowait()
            except queue.Empty:
                break
            if chunk is not None:
                parts.append(self._decoder.decode(chunk))
        return "".join(parts)

    def close(self) -> None:
        self._closed.set()
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in recv
            except OSError:
                pass


class RayLiveLogs:
    """Where a run's steps run now (Ray's KV store) and their logs as live streams (the
    dashboard). Connects on first use; `unavailable` says why it cannot (the caller then shows
    the driver's copy only)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._gcs: Any = None
        self._url: str | None = None
        self.unavailable: str | None = None

    def _connect(self) -> bool:
        if self._gcs is not None:
            return True
        if self.unavailable is not None:
            return False
        try:
            self._gcs, self._url = gcs_and_dashboard(self.address)
            return True
        except Exception as exc:  # noqa: BLE001 - live logs are a convenience: say why, go on
            self.unavailable = (f"live logs from the Ray cluster at {self.address!r} are not "
                                f"available ({exc}); showing the driver's copy")
            return False

    def running(self, run_id: str, step: str) -> dict[int, str]:
        """Attempt -> node id of the attempts of `step` running now."""
        if not self._connect():
            return {}
        prefix = f"{run_id}/{step}/"
        found = {}
        try:
            for key in self._gcs.internal_kv_keys(prefix.encode(), PLACEMENTS.encode()):
                node = self._gcs.internal_kv_get(key, PLACEMENTS.encode())
                attempt = key.decode()[len(prefix):]
                if node and attempt.isdigit():
                    found[int(attempt)] = node.decode()
        except Exception:  # noqa: BLE001 - the GCS away for a moment: try again next poll
            return {}
        return found

    def open(self, run_id: str, step: str, attempt: int, node_id: str) -> LiveStream | None:
        if not self._connect():
            return None
        assert self._url is not None
        return LiveStream(self._url, node_id, live_log_name(run_id, step, attempt))


class StepLogKeeper:
    """Writes the ended attempts' logs that nodes report to the shared store, in batches, from
    one background thread: off the steps' path, and one transaction for the many attempts that
    end together (an upload to MLflow per attempt cost more than a small step itself)."""

    MAX_CHARS = 8 * 2**20  # of one attempt's log kept in the store: its tail beyond that
    BATCH = 500

    def __init__(self, store: Any) -> None:
        self.store = store
        self._queue: queue.Queue[tuple[str, str, int, str]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._starting = threading.Lock()

    def keep(self, run_id: str, step: str, attempt: int, text: str) -> None:
        if len(text) > self.MAX_CHARS:
            text = f"[... the first {len(text) - self.MAX_CHARS} characters left out ...]\n" \
                   + text[-self.MAX_CHARS:]
        with self._starting:
            if self._thread is None:
                self._thread = threading.Thread(target=self._write, daemon=True,
                                                name="scanflow-step-logs")
                self._thread.start()
        self._queue.put((run_id, step, attempt, text))

    def flush(self) -> None:
        """Return once every log handed to `keep` so far is written (or failed to be)."""
        self._queue.join()

    def _write(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < self.BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self.store.keep_step_logs(batch)
            except Exception as exc:  # noqa: BLE001 - the driver's copy still holds them
                log.warning("could not keep %d step logs in the store: %s", len(batch), exc)
            finally:
                for _ in batch:
                    self._queue.task_done()


class StoreStepLogs:
    """A step's log for a run whose driver is on another machine (`scanflow run --detach`):
    the driver's whole copy, which it keeps on the parent MLflow run when it ends
    (`scanflow/logs/STEP.log`), else each ended attempt's log as kept in the store
    (`StepLogKeeper`)."""

    def __init__(self, tracker: Any, store: Any) -> None:
        self.tracker = tracker
        self.store = store

    def whole(self, run_id: str, parent: str, step: str) -> str | None:
        try:
            if f"{LOGS_DIR}/{step}.log" not in self.tracker.list_artifacts(parent, LOGS_DIR):
                return None
            with tempfile.TemporaryDirectory(prefix="scanflow-log-") as tmp:
                path = self.tracker.download(parent, f"{LOGS_DIR}/{step}.log", tmp)
                return Path(path).read_text(errors="replace")
        except Exception:  # noqa: BLE001 - MLflow away for a moment: nothing yet
            return None

    def attempts(self, run_id: str, parent: str, step: str) -> str:
        """The ended attempts' logs so far, each under a line that says which it is."""
        try:
            kept = self.store.step_attempt_logs(run_id, step)
        except Exception:  # noqa: BLE001 - the store away for a moment: nothing yet
            return ""
        return "".join(f"--- attempt {n} ended (its log as kept in the store) ---\n{text}"
                       for n, text in kept)


__all__ = ["LiveStream", "RayLiveLogs", "StepLogKeeper", "StoreStepLogs"]
