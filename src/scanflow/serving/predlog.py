"""The prediction log: on disk before the response leaves, in the store a moment later.

Each worker appends one JSON line per answered request to its own segment file under
`<workdir>/predlog/` *before* the response is sent (one `write(2)`; the page cache survives
`kill -9` of the process, `fsync=True` also survives the machine). A collector thread in the
same worker tails its segments and inserts the records into the store in batches, keeping
the byte offset it reached in a side file; the journal is the queue, so a slow or absent
store costs disk, never records. Segments of a dead worker (its pid gone, or reused by a
newer process) are adopted by any live sibling, and by the deployer when the service stops.
Re-collecting after a crash is harmless: inserts skip request ids already stored.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson

from scanflow.procs import start_time
from scanflow.store import Store

log = logging.getLogger("scanflow.serving.predlog")

SUFFIX = ".jsonl"
Hook = Callable[[int], None]


def journal_dir(workdir: str | os.PathLike[str]) -> Path:
    return Path(workdir) / "predlog"


def _owner(path: Path) -> tuple[int, int]:
    pid, start, _seq = path.name[: -len(SUFFIX)].split("-")
    return int(pid), int(start)


def _owner_alive(path: Path) -> bool:
    try:
        pid, start = _owner(path)
    except ValueError:
        return False
    return start_time(pid) == start


def _offset_path(seg: Path) -> Path:
    return seg.with_suffix(".offset")


def _read_offset(seg: Path) -> int:
    try:
        return int(_offset_path(seg).read_text() or 0)
    except (OSError, ValueError):
        return 0


def _write_offset(seg: Path, offset: int) -> None:
    p = _offset_path(seg)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(str(offset))
    os.replace(tmp, p)


def expand(line: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """One journal line (a request) -> ("p" | "s", store records, one per instance)."""
    kind = line["k"]
    base, outs = line["rid"], line["out"]
    if kind == "s":
        return kind, [
            {"request_id": f"{base}-{i}", "service": line["svc"], "model_version": line["v"],
             "ts": line["ts"], "outputs": o, "latency_ms": line["lat"]}
            for i, o in enumerate(outs)
        ]
    ins = line["in"]
    return kind, [
        {"request_id": f"{base}-{i}", "service": line["svc"], "model_version": line["v"],
         "ts": line["ts"], "inputs": ins[i], "outputs": o, "latency_ms": line["lat"]}
        for i, o in enumerate(outs)
    ]


class PredictionJournal:
    """This process's append-only segments (thread-safe; open it after fork)."""

    def __init__(self, directory: Path, *, segment_bytes: int = 64 << 20, fsync: bool = False) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self._prefix = f"{os.getpid()}-{start_time(os.getpid()) or 0}"
        self._seq = 0
        self._lock = threading.Lock()
        self.appended = 0  # request lines written by this process
        self._fd = -1
        self._size = 0
        self.path = self._open_next()

    def _open_next(self) -> Path:
        self._seq += 1
        path = self.dir / f"{self._prefix}-{self._seq:06d}{SUFFIX}"
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._size = os.fstat(self._fd).st_size
        return path

    def append(self, lines: list[dict[str, Any]]) -> None:
        """Write request lines; returns once the bytes are in the OS (or on disk with fsync)."""
        data = b"".join(orjson.dumps(line, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n" for line in lines)
        with self._lock:
            if self._size >= self.segment_bytes:
                os.close(self._fd)
                self.path = self._open_next()
            view = memoryview(data)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
            if self.fsync:
                os.fsync(self._fd)
            self._size += len(data)
            self.appended += len(lines)

    def segments(self) -> list[Path]:
        """This process's segments, oldest first."""
        return sorted(self.dir.glob(f"{self._prefix}-*{SUFFIX}"))

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


@contextmanager
def _exclusive(seg: Path) -> Iterator[bool]:
    """Only one collector per orphan segment at a time (siblings race for it)."""
    try:
        fh = open(seg, "rb")
    except OSError:
        yield False
        return
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        yield False
        return
    try:
        yield True
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


class Collector:
    """Moves journal lines into the store: this worker's segments, then orphans."""

    def __init__(
        self,
        store: Store,
        directory: Path,
        journal: PredictionJournal | None = None,
        *,
        batch_size: int = 500,
        on_written: Hook | None = None,
        on_dropped: Callable[[int, str], None] | None = None,
    ) -> None:
        self.store = store
        self.dir = Path(directory)
        self.journal = journal
        self.batch_size = batch_size
        self._on_written = on_written
        self._on_dropped = on_dropped
        self.collected_lines = 0  # of this process's journal
        self.written = 0
        self.dropped = 0

    def own_pending(self) -> int:
        return (self.journal.appended - self.collected_lines) if self.journal else 0

    def collect(self, orphans: bool = True) -> int:
        """One pass; returns records written. Store errors propagate (the caller retries)."""
        n = 0
        if self.journal is not None:
            current = self.journal.path
            for seg in self.journal.segments():
                got, lines = self._collect_segment(seg)
                n += got
                self.collected_lines += lines
                if seg != current and _read_offset(seg) >= seg.stat().st_size:
                    self._remove(seg)  # rotated and fully collected
        if orphans:
            mine = set(self.journal.segments()) if self.journal is not None else set()
            for seg in sorted(self.dir.glob(f"*{SUFFIX}")):
                if seg in mine or _owner_alive(seg):
                    continue
                with _exclusive(seg) as ok:
                    if not ok:
                        continue
                    got, _ = self._collect_segment(seg, final=True)
                    n += got
                    self._remove(seg)
        return n

    def _collect_segment(self, seg: Path, final: bool = False) -> tuple[int, int]:
        """Insert the complete lines after the saved offset. A torn last line of a dead
        owner is a request that never got its response: dropped with the segment."""
        offset = _read_offset(seg)
        written = lines = 0
        try:
            fh = open(seg, "rb")
        except FileNotFoundError:
            return 0, 0
        with fh:
            fh.seek(offset)
            buf = b""
            while True:
                chunk = fh.read(4 << 20)
                if not chunk:
                    break
                buf += chunk
                cut = buf.rfind(b"\n")
                if cut < 0:
                    continue
                complete, buf = buf[: cut + 1], buf[cut + 1:]
                w, n = self._insert(complete.splitlines())
                written += w
                lines += n
                offset += len(complete)
                _write_offset(seg, offset)
            if buf and final:
                self._drop(1, "torn_line")
        return written, lines

    def _insert(self, raw_lines: list[bytes]) -> tuple[int, int]:
        preds: list[dict[str, Any]] = []
        shadows: list[dict[str, Any]] = []
        for raw in raw_lines:
            try:
                kind, recs = expand(orjson.loads(raw))
            except (ValueError, KeyError, TypeError, IndexError):
                self._drop(1, "unreadable_line")
                continue
            (shadows if kind == "s" else preds).extend(recs)
        written = 0
        for i in range(0, len(preds), self.batch_size):
            chunk = preds[i: i + self.batch_size]
            ok = self.store.add_predictions(chunk, ignore_duplicates=True)
            written += ok
            if ok < len(chunk):  # a client reused an X-Request-ID, or a re-collection
                self._drop(len(chunk) - ok, "duplicate_id")
        for i in range(0, len(shadows), self.batch_size):
            self.store.add_shadow_predictions(shadows[i: i + self.batch_size])
        self.written += written
        if written and self._on_written:
            self._on_written(written)
        return written, len(raw_lines)

    @staticmethod
    def _remove(seg: Path) -> None:
        seg.unlink(missing_ok=True)
        _offset_path(seg).unlink(missing_ok=True)

    def _drop(self, n: int, reason: str) -> None:
        self.dropped += n
        if self._on_dropped:
            try:
                self._on_dropped(n, reason)
            except Exception:  # metrics must not break logging
                pass


class PredictionLog:
    """A worker's journal plus its collector thread: `add` on the request path, the rest behind."""

    def __init__(
        self,
        store: Store,
        directory: Path,
        *,
        interval: float = 0.2,
        batch_size: int = 500,
        orphan_interval: float = 1.0,
        fsync: bool = False,
        on_written: Hook | None = None,
        on_dropped: Callable[[int, str], None] | None = None,
    ) -> None:
        self.journal = PredictionJournal(directory, fsync=fsync)
        self.collector = Collector(store, directory, self.journal, batch_size=batch_size,
                                   on_written=on_written, on_dropped=on_dropped)
        self.interval = interval
        self.orphan_interval = orphan_interval
        self.failures = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="predlog-collector", daemon=True)

    def start(self) -> PredictionLog:
        self._thread.start()
        return self

    def add(self, lines: list[dict[str, Any]]) -> None:
        """Durable when it returns (raises OSError if the disk refuses: the request fails)."""
        self.journal.append(lines)

    @property
    def pending(self) -> int:
        """Request lines of this worker not yet in the store."""
        return self.collector.own_pending()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything appended so far is in the store; True if in time."""
        end = time.monotonic() + timeout
        with self._cond:
            self._cond.notify_all()
        while self.pending > 0:
            if time.monotonic() > end or not self._thread.is_alive():
                return False
            time.sleep(0.02)
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Collect what is left (bounded by `timeout`), then stop the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.journal.close()
        if self.pending:
            log.error("prediction log: %d requests not yet in the store at shutdown; they stay in "
                      "%s and are collected by a sibling or at service stop", self.pending,
                      self.journal.dir)

    def _run(self) -> None:
        backoff = self.interval
        next_orphans = 0.0
        while True:
            with self._cond:
                stopping = self._stopping
                if not stopping:
                    self._cond.wait(self.interval)
                    stopping = self._stopping
            now = time.monotonic()
            try:
                self.collector.collect(orphans=now >= next_orphans)
                if now >= next_orphans:
                    next_orphans = now + self.orphan_interval
                backoff = self.interval
            except Exception as exc:  # any store error: the journal keeps the data, retry
                self.failures += 1
                log.warning("prediction log: store write failed (%s), retrying in %.1fs", exc, backoff)
                if stopping:
                    return
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            if stopping:
                return


def collect_all(store: Store, workdir: str | os.PathLike[str]) -> int:
    """Collect every segment no live process owns (the deployer, once a service stopped)."""
    d = journal_dir(workdir)
    if not d.is_dir():
        return 0
    return Collector(store, d).collect(orphans=True)
