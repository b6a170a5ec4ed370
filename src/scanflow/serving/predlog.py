"""The prediction log: on disk before the response leaves, in the store a moment later.

Each worker appends one binary record per answered request to its own segment file under
`<workdir>/predlog/` *before* the response is sent (one `write(2)`; the page cache survives
`kill -9` of the process, `fsync=True` also survives the machine). The record holds what the
request path already has: the validated array's bytes (not a JSON rendering of the inputs;
uint8 when every value is an integer in 0..255, as pixels are: exact, and a quarter of
float32), each output's JSON as the model path produced it, ids, version, times. A collector
tails the segments and inserts the records into the store in batches, keeping the byte offset
it reached in a side file; it decodes nothing (the bytes go to the store as they are, JSON is
decoded where a window is read), so the worker pays a few microseconds per request and the
collector little more. The journal is the queue: a slow or absent store costs disk, never
records. Segments of a dead worker (its pid gone, or reused by a newer process) are adopted by
any live sibling, and by the deployer when the service stops. Re-collecting after a crash is
harmless: inserts skip request ids already stored. Segments of the former JSON-lines format
(`.jsonl`) are still collected.

Record (little-endian): magic 0xA7, u32 length of the rest; kind `p`|`s`, f64 ts, f64 latency
ms, u32 instances, u16 x3 lengths of request id / service / version, u8 inputs tag; the three
strings; inputs (tag 1: u32 row bytes then the float32 rows; tag 3: the same with uint8 rows;
tag 2: per instance u32 + JSON; tag 0: none, shadow answers); per instance u32 + output JSON.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from scanflow.procs import start_time
from scanflow.serving.group_commit import GroupCommit
from scanflow.store import Store
from scanflow.store.predictions import EncodedPrediction, EncodedShadow
from scanflow.store.window import exact_u8, pack_inputs

log = logging.getLogger("scanflow.serving.predlog")

SUFFIX = ".plog"
LEGACY_SUFFIX = ".jsonl"  # segments written before the binary format
Hook = Callable[[int], None]
STORE_ENV = "SCANFLOW_PREDLOG_STORE"
# How much lower the collector process runs than its worker: when the replica's cores are busy,
# a collector waking up does not preempt the worker serving requests; its fair share (~1/10 of
# a core per worker) stays far above what it needs (~15 us per record), so it keeps up.
COLLECTOR_NICE = 10

MAGIC = 0xA7
_FRAME = struct.Struct("<BI")
_HEAD = struct.Struct("<cddIHHHB")
_U32 = struct.Struct("<I")
NO_INPUTS, F32_ROWS, JSON_EACH, U8_ROWS = 0, 1, 2, 3


def journal_dir(workdir: str | os.PathLike[str]) -> Path:
    return Path(workdir) / "predlog"


# -- the request path: encode ------------------------------------------------------------------
def _dumps(v: Any) -> bytes:
    try:
        return orjson.dumps(v)
    except TypeError:  # an integer beyond 64 bits (json.loads accepted it), or > 254 levels
        pass
    try:
        return json.dumps(v).encode()
    except (RecursionError, ValueError, TypeError) as exc:  # answered, but not representable
        return orjson.dumps(f"<not logged: {type(exc).__name__}>")


def _numeric_rows(x: Any, instances: Sequence[Any]) -> tuple[int, np.ndarray] | None:
    """(tag, (n, d) rows) of the validated model input when each instance was a flat list of
    numbers (what the store keeps as bytes): uint8 when exact, else float32; None for anything
    else (kept as JSON)."""
    if not isinstance(x, np.ndarray) or x.dtype.kind not in "iuf" or x.ndim < 2:
        return None
    first = instances[0]
    if not isinstance(first, list) or not first or isinstance(first[0], list | dict | str | bool):
        return None
    rows = x.reshape(len(instances), -1)
    u8 = exact_u8(rows)  # also the finiteness check, in one pass
    if u8 is not None:
        return U8_ROWS, u8
    if rows.dtype != np.float32:
        with np.errstate(over="ignore"):  # too large for float32: kept as JSON below
            rows = rows.astype(np.float32)
    return (F32_ROWS, rows) if np.isfinite(rows).all() else None


def _frame(kind: bytes, rid: str, service: str, version: str, ts: float, latency_ms: float,
           n: int, tag: int, tail: list[bytes]) -> bytes:
    r, s, v = rid.encode(), service.encode(), version.encode()
    body = b"".join([_HEAD.pack(kind, ts, latency_ms, n, len(r), len(s), len(v), tag), r, s, v,
                     *tail])
    return _FRAME.pack(MAGIC, len(body)) + body


def _outputs_tail(outputs: Sequence[Any], tail: list[bytes]) -> list[bytes]:
    for o in outputs:
        b = _dumps(o)
        tail += (_U32.pack(len(b)), b)
    return tail


def encode_prediction(rid: str, service: str, version: str, ts: float, latency_ms: float,
                      x: Any, instances: Sequence[Any], outputs: Sequence[Any]) -> bytes:
    """One answered request as a journal record: `x` is the validated model input of
    `instances` (its bytes are journaled when it is a numeric array), `outputs` one per instance."""
    numeric = _numeric_rows(x, instances)
    tail: list[bytes]
    if numeric is not None:
        tag, rows = numeric
        tail = [_U32.pack(rows.shape[1] * rows.itemsize), rows.tobytes()]
    else:
        tag, tail = JSON_EACH, []
        for inst in instances:
            b = _dumps(inst)
            tail += (_U32.pack(len(b)), b)
    return _frame(b"p", rid, service, version, ts, latency_ms, len(outputs), tag,
                  _outputs_tail(outputs, tail))


def encode_shadow(rid: str, service: str, version: str, ts: float, latency_ms: float,
                  outputs: Sequence[Any]) -> bytes:
    """A shadow version's answers to a live request (no inputs: the live record has them)."""
    return _frame(b"s", rid, service, version, ts, latency_ms, len(outputs), NO_INPUTS,
                  _outputs_tail(outputs, []))


# -- the collector side: split records into rows, decode nothing --------------------------------
class Unreadable(ValueError):
    """Bytes that are not a record (a damaged segment): the rest of the segment is skipped."""


def split_records(buf: bytes, preds: list[EncodedPrediction], shadows: list[EncodedShadow]
                  ) -> tuple[int, int]:
    """Append the rows of the complete records at the start of `buf`; (bytes used, records)."""
    pos, end, count = 0, len(buf), 0
    u32 = _U32.unpack_from
    while pos + _FRAME.size <= end:
        magic, size = _FRAME.unpack_from(buf, pos)
        if magic != MAGIC:
            raise Unreadable(f"no record at byte {pos}")
        stop = pos + _FRAME.size + size
        if stop > end:
            break  # not all written yet (or torn by a crash)
        try:
            kind, ts, lat, n, lr, ls, lv, tag = _HEAD.unpack_from(buf, pos + _FRAME.size)
            p = pos + _FRAME.size + _HEAD.size
            rid = buf[p: p + lr].decode()
            p += lr
            svc = buf[p: p + ls].decode()
            p += ls
            ver = buf[p: p + lv].decode()
            p += lv
            ins_json: list[str | None] = [None] * n
            ins_f32: list[bytes | None] = [None] * n
            ins_u8: list[bytes | None] = [None] * n
            if tag == F32_ROWS or tag == U8_ROWS:
                (rb,) = u32(buf, p)
                p += 4
                rows = [buf[p + i * rb: p + (i + 1) * rb] for i in range(n)]
                if tag == U8_ROWS:
                    ins_u8 = rows  # type: ignore[assignment]
                else:
                    ins_f32 = rows  # type: ignore[assignment]
                p += n * rb
            elif tag == JSON_EACH:
                for i in range(n):
                    (ln,) = u32(buf, p)
                    ins_json[i] = buf[p + 4: p + 4 + ln].decode()
                    p += 4 + ln
            outs = []
            for _ in range(n):
                (ln,) = u32(buf, p)
                outs.append(buf[p + 4: p + 4 + ln].decode())
                p += 4 + ln
        except (struct.error, UnicodeDecodeError) as exc:
            raise Unreadable(f"damaged record at byte {pos}: {exc}") from None
        if p != stop:
            raise Unreadable(f"record at byte {pos}: {stop - pos} bytes framed, {p - pos} read")
        if kind == b"s":
            shadows.extend((f"{rid}-{i}", svc, ver, ts, outs[i], lat) for i in range(n))
        else:
            preds.extend((f"{rid}-{i}", svc, ver, ts, ins_json[i], ins_f32[i], ins_u8[i], outs[i],
                          lat) for i in range(n))
        pos = stop
        count += 1
    return pos, count


def _legacy_rows(line: dict[str, Any], preds: list[EncodedPrediction],
                 shadows: list[EncodedShadow]) -> None:
    """One JSON line of a `.jsonl` segment (the format before the binary records)."""
    base, svc, ver, ts, lat = line["rid"], line["svc"], line["v"], line["ts"], line["lat"]
    if line["k"] == "s":
        shadows.extend((f"{base}-{i}", svc, ver, ts, _dumps(o).decode(), lat)
                       for i, o in enumerate(line["out"]))
        return
    for i, o in enumerate(line["out"]):
        js, f32, u8 = pack_inputs(line["in"][i])
        preds.append((f"{base}-{i}", svc, ver, ts, None if js is None else _dumps(js).decode(),
                      f32, u8, _dumps(o).decode(), lat))


# -- segments ----------------------------------------------------------------------------------
def _is_segment(path: Path) -> bool:
    return path.suffix in (SUFFIX, LEGACY_SUFFIX)


def _owner(path: Path) -> tuple[int, int]:
    pid, start, _seq = path.stem.split("-")
    return int(pid), int(start)


def _owner_alive(path: Path) -> bool:
    try:
        pid, start = _owner(path)
    except ValueError:
        return False
    return start_time(pid) == start


def _offset_path(seg: Path) -> Path:
    return seg.with_suffix(".offset")


def _read_offset(seg: Path) -> tuple[int, int]:
    """(bytes, records) of `seg` already in the store."""
    try:
        parts = _offset_path(seg).read_text().split()
    except OSError:
        return 0, 0
    try:
        return int(parts[0]) if parts else 0, int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        return 0, 0


def _write_offset(seg: Path, offset: int, records: int) -> None:
    """Overwrite the side file in place: one `pwrite` of a fixed-width line, no new file and
    rename per batch (that cost more than the insert). A torn side file after a power loss
    reads as 0 and the segment is collected again, which inserts nothing twice."""
    fd = os.open(_offset_path(seg), os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, f"{offset:>20} {records:>20}\n".encode(), 0)
    finally:
        os.close(fd)


def process_prefix(pid: int) -> str:
    """How a process names its segments: pid and start time (a pid alone is recycled)."""
    return f"{pid}-{start_time(pid) or 0}"


class PredictionJournal:
    """This process's append-only segments (thread-safe; open it after fork)."""

    def __init__(self, directory: Path, *, segment_bytes: int = 64 << 20, fsync: bool = False) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self.prefix = process_prefix(os.getpid())
        self._seq = 0
        self._lock = threading.Lock()
        self.counts: dict[Path, int] = {}  # records written per segment
        self._fd = -1
        self._size = 0
        self.path = self._open_next()

    def _open_next(self) -> Path:
        self._seq += 1
        path = self.dir / f"{self.prefix}-{self._seq:06d}{SUFFIX}"
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._size = os.fstat(self._fd).st_size
        self.counts[path] = 0
        return path

    def append(self, record: bytes) -> None:
        """Write one encoded record; returns once the bytes are in the OS (on disk with fsync)."""
        with self._lock:
            if self._size >= self.segment_bytes:
                os.close(self._fd)
                self.path = self._open_next()
            n = os.write(self._fd, record)
            if n < len(record):  # only on a full disk or a signal: finish it, or raise
                view = memoryview(record)[n:]
                while view:
                    view = view[os.write(self._fd, view):]
            if self.fsync:
                os.fsync(self._fd)
            self._size += len(record)
            self.counts[self.path] += 1

    def uncollected(self) -> int:
        """Records of this journal not yet in the store, from the collector's offset files."""
        left = 0
        for seg, n in list(self.counts.items()):
            if not seg.exists():  # fully collected and removed
                if seg != self.path:
                    self.counts.pop(seg, None)
                continue
            left += max(0, n - _read_offset(seg)[1])
        return left

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


@contextmanager
def _exclusive(seg: Path) -> Iterator[bool]:
    """One collector per segment at a time (siblings race for orphans)."""
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
    """Moves journal records into the store: one process's segments (`owner`, a
    `process_prefix`), then orphans. Runs in the collector process of a worker (see `main`),
    in a thread (`PredictionLog(process=False)`), or once in the deployer (`collect_all`)."""

    def __init__(
        self,
        store: Store,
        directory: Path,
        owner: str | None = None,
        *,
        batch_size: int = 500,
        on_written: Hook | None = None,
        on_dropped: Callable[[int, str], None] | None = None,
    ) -> None:
        self.store = store
        self.dir = Path(directory)
        self.owner = owner
        self.batch_size = batch_size
        self._on_written = on_written
        self._on_dropped = on_dropped
        self.written = 0
        self.dropped = 0

    def own_segments(self) -> list[Path]:
        return sorted(self.dir.glob(f"{self.owner}-*{SUFFIX}")) if self.owner else []

    def collect(self, orphans: bool = True, final: bool = False) -> int:
        """One pass; returns records written. `final`: the owner appends no more (closed or
        dead), so its segments are finished and removed. Store errors propagate (the caller
        retries)."""
        n = 0
        mine = self.own_segments()
        for seg in mine:
            with _exclusive(seg) as ok:
                if not ok:
                    continue
                n += self._collect_segment(seg, final=final)
                # A segment older than the newest is rotated: the owner never writes it again.
                if final or (seg != mine[-1] and _read_offset(seg)[0] >= seg.stat().st_size):
                    self._remove(seg)
        if orphans:
            for seg in sorted(p for p in self.dir.iterdir() if _is_segment(p)):
                if seg in mine or _owner_alive(seg):
                    continue
                with _exclusive(seg) as ok:
                    if not ok:
                        continue
                    n += self._collect_segment(seg, final=True)
                    self._remove(seg)
        return n

    def _collect_segment(self, seg: Path, final: bool = False) -> int:
        """Insert the complete records after the saved offset. A torn last record of a dead
        owner is a request that never got its response: dropped with the segment."""
        offset, records = _read_offset(seg)
        written = 0
        legacy = seg.suffix == LEGACY_SUFFIX
        try:
            fh = open(seg, "rb")
        except FileNotFoundError:
            return 0
        with fh:
            fh.seek(offset)
            buf = b""
            while True:
                chunk = fh.read(4 << 20)
                if not chunk:
                    break
                buf = buf + chunk if buf else chunk
                preds: list[EncodedPrediction] = []
                shadows: list[EncodedShadow] = []
                try:
                    used, got = (self._split_legacy(buf, preds, shadows) if legacy
                                 else split_records(buf, preds, shadows))
                except Unreadable as exc:
                    log.error("prediction log: %s: %s; the rest of the segment is skipped",
                              seg.name, exc)
                    self._drop(1, "unreadable_line")
                    _write_offset(seg, offset + len(buf) + len(fh.read()), records)
                    return written
                if not used:
                    continue
                written += self._insert(preds, shadows)
                records += got
                offset += used
                _write_offset(seg, offset, records)
                buf = buf[used:]
            if buf and final:
                self._drop(1, "torn_line")
        return written

    def insert_records(self, buf: bytes) -> int:
        """Insert the complete records of `buf` (from `encode_*`); store errors propagate."""
        preds: list[EncodedPrediction] = []
        shadows: list[EncodedShadow] = []
        split_records(buf, preds, shadows)
        return self._insert(preds, shadows)

    def _split_legacy(self, buf: bytes, preds: list[EncodedPrediction],
                      shadows: list[EncodedShadow]) -> tuple[int, int]:
        cut = buf.rfind(b"\n")
        if cut < 0:
            return 0, 0
        lines = buf[: cut + 1].splitlines()
        for raw in lines:
            try:
                _legacy_rows(orjson.loads(raw), preds, shadows)
            except (ValueError, KeyError, TypeError, IndexError):
                self._drop(1, "unreadable_line")
        return cut + 1, len(lines)

    def _insert(self, preds: list[EncodedPrediction], shadows: list[EncodedShadow]) -> int:
        written = 0
        repo = self.store.prediction_log
        for i in range(0, max(len(preds), len(shadows)), self.batch_size):
            chunk = preds[i: i + self.batch_size]
            ok = repo.add_encoded(chunk, shadows[i: i + self.batch_size])
            written += ok
            if ok < len(chunk):  # a client reused an X-Request-ID, or a re-collection
                self._drop(len(chunk) - ok, "duplicate_id")
        self.written += written
        if written and self._on_written:
            self._on_written(written)
        return written

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


def _run_collector(collector: Collector, stop: threading.Event, interval: float,
                   orphan_interval: float, owner_gone: Callable[[], bool] = lambda: False) -> bool:
    """Collect every `interval` until `stop` (or the owner is gone), then a final pass; False if
    the final pass failed (what is left stays on disk for a sibling or the deployer)."""
    backoff = interval
    next_orphans = 0.0
    failures = 0
    while True:
        final = stop.is_set() or owner_gone()
        now = time.monotonic()
        try:
            collector.collect(orphans=final or now >= next_orphans, final=final)
            if now >= next_orphans:
                next_orphans = now + orphan_interval
            backoff = interval
        except Exception as exc:  # any store error: the journal keeps the data, retry
            failures += 1
            log.warning("prediction log: store write failed (%s), retrying in %.1fs", exc, backoff)
            if final and failures >= 3:
                return False
            stop.wait(backoff)
            backoff = min(backoff * 2, 5.0)
            continue
        if final:
            return True
        stop.wait(interval)


class PredictionLog:
    """A worker's journal (`add`, on the request path) and its collector behind it.

    By default (`process=True`) the collector is a separate process (`python -m
    scanflow.serving.predlog`) that reads this worker's segments, so none of its work takes the
    worker's GIL or event loop; it stops when this worker closes the pipe to it or dies. With
    `process=False` it is a thread of this process (for stores a child cannot open, such as an
    in-memory SQLite)."""

    def __init__(
        self,
        store: Store,
        directory: Path,
        *,
        interval: float = 0.2,
        batch_size: int = 500,
        orphan_interval: float = 1.0,
        fsync: bool = False,
        process: bool = True,
        service: str | None = None,
        on_written: Hook | None = None,
        on_dropped: Callable[[int, str], None] | None = None,
        commit_to_store: bool = False,
        commit_timeout: float = 1.0,
        on_fallback: Callable[[int, str], None] | None = None,
    ) -> None:
        self.journal = PredictionJournal(directory, fsync=fsync)
        self.store = store
        self.interval = interval
        self.batch_size = batch_size
        self.orphan_interval = orphan_interval
        self.process = process
        self.service = service
        self.collector = Collector(store, directory, self.journal.prefix, batch_size=batch_size,
                                   on_written=on_written, on_dropped=on_dropped)
        self._commit: GroupCommit | None = None
        if commit_to_store:  # its own Collector: counters not shared with a collector thread
            inserter = Collector(store, directory, batch_size=batch_size, on_written=on_written,
                                 on_dropped=on_dropped)
            self._commit = GroupCommit(inserter.insert_records, self.journal.append,
                                       timeout=commit_timeout, max_batch=batch_size,
                                       on_fallback=on_fallback)
        self._stop = threading.Event()
        self._child: subprocess.Popen[bytes] | None = None
        self._thread = threading.Thread(target=self._supervise if process else self._collect,
                                        name="predlog-collector", daemon=True)

    def start(self) -> PredictionLog:
        if self._commit is not None:
            self._commit.start()
        if self.process:
            self._spawn()
        self._thread.start()
        return self

    def add(self, record: bytes) -> None:
        """Durable when it returns (raises OSError if the disk refuses: the request fails).
        `record` comes from `encode_prediction` / `encode_shadow`."""
        self.journal.append(record)

    async def answered(self, record: bytes) -> None:
        """Log a request about to be answered: durable on this node when it returns, or, with
        `commit_to_store`, in the store (the node's journal only if the store is slow or failing)."""
        if self._commit is None:
            self.journal.append(record)
        else:
            await self._commit.commit(record)

    @property
    def pending(self) -> int:
        """Requests of this worker not yet in the store."""
        return self.journal.uncollected() + (self._commit.pending if self._commit else 0)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything appended so far is in the store; True if in time."""
        end = time.monotonic() + timeout
        while self.pending > 0:
            if time.monotonic() > end or not self._thread.is_alive():
                return False
            time.sleep(0.02)
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Collect what is left (waiting at most `timeout`), then stop the collector. A collector
        process still busy then finishes on its own (it has been told the journal is closed;
        the service's stop waits for it), so a retiring worker is not held up by it."""
        if self._commit is not None:
            self._commit.close(timeout)
        self.journal.close()  # nothing more is appended: the collector may finish the segments
        self._stop.set()
        self._thread.join(timeout)
        child = self._child
        if child is not None:
            if child.stdin:
                child.stdin.close()  # EOF: "your owner is done"
            try:
                child.wait(max(0.1, timeout))
            except subprocess.TimeoutExpired:
                log.warning("prediction log: collector %d still busy after %.0fs; it finishes "
                            "the journal on its own", child.pid, timeout)
                return
        if self.pending:
            log.error("prediction log: %d requests not yet in the store at shutdown; they stay in "
                      "%s and are collected by a sibling or at service stop", self.pending,
                      self.journal.dir)

    # -- collector process ---------------------------------------------------------------------
    def _spawn(self) -> None:
        cmd = [sys.executable, "-m", "scanflow.serving.predlog", "--dir", str(self.journal.dir),
               "--owner", str(os.getpid()),
               "--interval", str(self.interval), "--orphan-interval", str(self.orphan_interval),
               "--batch-size", str(self.batch_size)]
        if self.service:
            cmd += ["--service", self.service]
        env = {**os.environ, STORE_ENV: self.store.url}  # not argv: a password would show in ps
        self._child = subprocess.Popen(cmd, stdin=subprocess.PIPE, close_fds=True, env=env)
        try:  # lowering a child's priority is always allowed; the kernel caps it at 19
            nice = min(19, os.getpriority(os.PRIO_PROCESS, 0) + COLLECTOR_NICE)
            os.setpriority(os.PRIO_PROCESS, self._child.pid, nice)
        except OSError:  # already gone: the supervisor starts another
            pass

    def _supervise(self) -> None:
        """Start the collector again if it died (the journal kept everything meanwhile)."""
        while not self._stop.wait(self.orphan_interval):
            child = self._child
            if child is not None and child.poll() is not None:
                log.warning("prediction log: collector %d exited with %s; starting another",
                            child.pid, child.returncode)
                if child.stdin:
                    child.stdin.close()
                self._spawn()

    def _collect(self) -> None:
        _run_collector(self.collector, self._stop, self.interval, self.orphan_interval)


def collect_all(store: Store, workdir: str | os.PathLike[str]) -> int:
    """Collect every segment no live process owns (the deployer, once a service stopped)."""
    d = journal_dir(workdir)
    if not d.is_dir():
        return 0
    return Collector(store, d).collect(orphans=True)


def main(argv: list[str] | None = None) -> int:
    """The collector process of one worker: its segments until it closes stdin or dies."""
    import argparse  # lazy: the collector process only, not every worker importing this module
    import signal  # lazy: as above

    ap = argparse.ArgumentParser(prog="python -m scanflow.serving.predlog")
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--owner", type=int, required=True, help="pid of the worker")
    ap.add_argument("--service")
    ap.add_argument("--interval", type=float, default=0.2)
    ap.add_argument("--orphan-interval", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=500)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s predlog %(levelname)s %(message)s")
    # The worker's group may get SIGTERM/SIGINT: this process ends when its worker is done with
    # the journal (EOF on stdin, or the worker gone), never while the worker may still append.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    owner = process_prefix(args.owner)
    stop = threading.Event()

    def wait_eof() -> None:
        try:
            while sys.stdin.buffer.read(4096):
                pass
        finally:
            stop.set()

    threading.Thread(target=wait_eof, daemon=True).start()
    written: Hook | None = None
    dropped: Callable[[int, str], None] | None = None
    if args.service:
        from scanflow.serving import metrics  # lazy: prometheus, only when counting a service

        svc = args.service

        def written(n: int) -> None:
            metrics.PREDLOG_WRITTEN.labels(svc).inc(n)

        def dropped(n: int, why: str) -> None:
            metrics.PREDLOG_DROPPED.labels(svc, why).inc(n)

    url = os.environ.get(STORE_ENV)
    if not url:
        ap.error(f"{STORE_ENV} is not set (the store URL)")
    store = Store(url)
    try:
        collector = Collector(store, args.dir, owner, batch_size=args.batch_size,
                              on_written=written, on_dropped=dropped)
        ok = _run_collector(collector, stop, args.interval, args.orphan_interval,
                            lambda: process_prefix(args.owner) != owner)
    finally:
        store.close()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
