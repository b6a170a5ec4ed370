"""Reading a run's step logs, once or following them until the run ends.

A plain function over the store and the runs folder, so that the CLI can read logs without
building an engine (which would `recover()` other runs) and the local engine's `logs` is the
same code."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from scanflow.store import Store
from scanflow.store.store import TERMINAL


def _read(path: str | None) -> str:
    """A log's text; empty when the step wrote none."""
    if path and Path(path).exists():
        return Path(path).read_text(errors="replace")
    return ""


class LiveLogs(Protocol):
    """Where a run's steps run now and their logs as they are written there (the ray backend's
    `ray_logs.RayLiveLogs`); None for a backend whose logs are written where the driver runs."""

    unavailable: str | None

    def running(self, run_id: str, step: str) -> dict[int, str]: ...

    def open(self, run_id: str, step: str, attempt: int, node_id: str) -> LiveStream | None: ...


class RemoteLogs(Protocol):
    """Step logs kept where any machine reads them (the store, the parent MLflow run), for a
    run whose driver is elsewhere (`ray_logs.StoreStepLogs`)."""

    def whole(self, run_id: str, parent: str, step: str) -> str | None: ...

    def attempts(self, run_id: str, parent: str, step: str) -> str: ...


class LiveStream(Protocol):
    error: str | None

    @property
    def ended(self) -> bool: ...

    def read(self) -> str: ...

    def close(self) -> None: ...


# The driver's line that ends an attempt's block in its copy of a Ray step's log (ray_backend).
_ATTEMPT_END = re.compile(
    r"^--- attempt (\d+)(?: on Ray node [0-9a-f]+[ :]|: its Ray task failed| ended \(its log as kept)")


def step_logs(store: Store, runs_dir: Path, run_id: str, step: str | None = None, *,
              follow: bool = False, poll: float = 0.3,
              live: LiveLogs | None = None,
              remote: RemoteLogs | None = None) -> Iterator[tuple[str, str]]:
    """(step, text) pairs of a run's logs (`step` alone if given); with `follow`, new text as it
    is written, until the run is finished (with `live`, a running attempt's text as its node
    writes it). A detached run's logs are read through `remote` (its driver's folder is on
    another machine). KeyError: no such run; ValueError: no such step."""
    run = store.get_run(run_id)
    if run is None:
        raise KeyError(f"no run {run_id!r}")
    steps = store.list_steps(run.id)
    if step is not None and step not in {s.step for s in steps}:
        raise ValueError(f"run {run.id[:12]} has no step {step!r} "
                         f"(steps: {', '.join(s.step for s in steps)})")
    far = remote if remote is not None and run.trigger.get("detached") and run.mlflow_run_id else None
    if not follow:
        if far is not None:
            parent = run.mlflow_run_id or ""
            return iter([(s.step, far.whole(run.id, parent, s.step)
                          or far.attempts(run.id, parent, s.step))
                         for s in steps if step in (None, s.step)])
        return iter([(s.step, _read(s.log_path)) for s in steps if step in (None, s.step)])
    return _follow(store, runs_dir / run.id, run.id, step, poll, live, far)


class _StepFollower:
    """One step's log as it grows: the driver's copy, and while an attempt runs on a node its
    live text, each part shown once (an attempt's block in the driver's copy, which arrives when
    it ends, skips what was already shown live)."""

    def __init__(self, run_id: str, name: str, path: Path, live: LiveLogs | None,
                 remote: RemoteLogs | None = None) -> None:
        self.run_id, self.name, self.path, self.live, self.remote = run_id, name, path, live, remote
        self.parent: str | None = None  # the run's MLflow run, where `remote` reads
        self.offset = 0  # in the driver's copy: bytes of the file, or characters of `remote`'s
        self.partial = ""  # the driver copy's last line, until it is whole
        self.skip = 0  # characters of the current block already shown live
        self.shown: dict[int, int] = {}  # attempt -> characters shown live
        self.ended: set[int] = set()  # attempts whose end the driver's copy recorded
        self.stream: tuple[int, LiveStream] | None = None

    def poll(self, final: bool = False) -> str:
        text = self._live_text() if self.stream else ""
        text += self._driver_text(final)
        if final:
            self.close()
        elif self.stream is None and self.live is not None:
            text += self._open_live()
        return text

    def _live_text(self) -> str:
        assert self.stream is not None
        attempt, stream = self.stream
        got = stream.read()
        self.shown[attempt] = self.shown.get(attempt, 0) + len(got)
        if stream.ended:  # broken or refused: the driver's copy tells the rest when it ends
            self.close()
        return got

    def _new_text(self) -> str:
        """What the driver's copy gained since the last look."""
        if self.remote is not None:
            whole = self.remote.attempts(self.run_id, self.parent, self.name) if self.parent else ""
            chunk, self.offset = whole[self.offset:], len(whole)
            return chunk
        if not self.path.exists():
            return ""
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
            self.offset = f.tell()
        return data.decode("utf-8", "replace")

    def _driver_text(self, final: bool) -> str:
        lines = (self.partial + self._new_text()).splitlines(keepends=True)
        self.partial = lines.pop() if lines and not lines[-1].endswith("\n") and not final else ""
        shown = []
        for line in lines:
            m = _ATTEMPT_END.match(line)
            if m and int(m[1]) not in self.ended:
                attempt = int(m[1])
                self.ended.add(attempt)
                if self.stream and self.stream[0] == attempt:
                    self.close()
                self.skip = self.shown.get(attempt, 0)
                shown.append(line)
                continue
            if self.skip:
                cut = min(self.skip, len(line))
                self.skip -= cut
                line = line[cut:]
            shown.append(line)
        return "".join(shown)

    def _open_live(self) -> str:
        assert self.live is not None
        for attempt, node in sorted(self.live.running(self.run_id, self.name).items()):
            if attempt in self.ended or attempt in self.shown:
                continue
            stream = self.live.open(self.run_id, self.name, attempt, node)
            if stream is None:
                return ""
            self.stream = (attempt, stream)
            self.shown[attempt] = 0
            return f"--- attempt {attempt} running on Ray node {node[:12]} (live) ---\n"
        return ""

    def close(self) -> None:
        if self.stream is not None:
            self.stream[1].close()
            self.stream = None


def _follow(store: Store, run_dir: Path, run_id: str, step: str | None, poll: float,
            live: LiveLogs | None, remote: RemoteLogs | None) -> Iterator[tuple[str, str]]:
    followers: dict[str, _StepFollower] = {}
    try:
        while True:
            cur = store.get_run(run_id)
            final = cur is None or cur.status in TERMINAL
            names = [step] if step else [s.step for s in store.list_steps(run_id)]
            for name in names:
                f = followers.get(name)
                if f is None:
                    f = followers[name] = _StepFollower(run_id, name, run_dir / f"{name}.log", live,
                                                        remote)
                f.parent = cur.mlflow_run_id if cur is not None else None
                text = f.poll(final)
                if text:
                    yield name, text
            if final:
                return
            time.sleep(poll)
    finally:
        for f in followers.values():
            f.close()


__all__ = ["LiveLogs", "step_logs"]
