"""Reading a run's step logs, once or following them until the run ends.

A plain function over the store and the runs folder, so that the CLI can read logs without
building an engine (which would `recover()` other runs) and the local engine's `logs` is the
same code."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

from scanflow.store import Store
from scanflow.store.store import TERMINAL


def _read(path: str | None) -> str:
    """A log's text; empty when the step wrote none."""
    if path and Path(path).exists():
        return Path(path).read_text(errors="replace")
    return ""


def step_logs(store: Store, runs_dir: Path, run_id: str, step: str | None = None, *,
              follow: bool = False, poll: float = 0.3) -> Iterator[tuple[str, str]]:
    """(step, text) pairs of a run's logs (`step` alone if given); with `follow`, new text as it
    is written, until the run is finished. KeyError: no such run; ValueError: no such step."""
    run = store.get_run(run_id)
    if run is None:
        raise KeyError(f"no run {run_id!r}")
    steps = store.list_steps(run.id)
    if step is not None and step not in {s.step for s in steps}:
        raise ValueError(f"run {run.id[:12]} has no step {step!r} "
                         f"(steps: {', '.join(s.step for s in steps)})")
    if not follow:
        return iter([(s.step, _read(s.log_path)) for s in steps if step in (None, s.step)])
    return _follow(store, runs_dir / run.id, run.id, step, poll)


def _follow(store: Store, run_dir: Path, run_id: str, step: str | None, poll: float
            ) -> Iterator[tuple[str, str]]:
    offsets: dict[str, int] = {}
    while True:
        names = [step] if step else [s.step for s in store.list_steps(run_id)]
        for name in names:
            path = run_dir / f"{name}.log"
            if not path.exists():
                continue
            with open(path, "rb") as f:
                f.seek(offsets.get(name, 0))
                chunk = f.read()
                offsets[name] = f.tell()
            if chunk:
                yield name, chunk.decode("utf-8", "replace")
        cur = store.get_run(run_id)
        if cur is None or cur.status in TERMINAL:
            return
        time.sleep(poll)


__all__ = ["step_logs"]
