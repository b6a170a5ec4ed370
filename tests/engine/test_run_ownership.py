"""Drivers on several machines share one store: a starting engine's `recover()` marks `interrupted`
only the runs whose driver is dead — on this host by its pid, on another host by a silent
heartbeat — never a run another machine's live driver owns. On SQLite and PostgreSQL."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from scanflow.engine import LocalEngine
from scanflow.settings import Settings
from scanflow.spec.models import Application, Step, Workflow
from scanflow.store import Store
from support.waiting import wait_for


@pytest.fixture
def dead_pid() -> int:
    """A pid no process has any more (on this host)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture
def live_pid() -> Iterator[int]:
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield p.pid
    p.kill()
    p.wait()


def _running(store: Store, *, pid: int, host: str | None, beat_age: float) -> str:
    """A run recorded as running by a driver `pid` on `host` that last beat `beat_age` s ago,
    with one step running."""
    run = store.create_run("app", "team", "wf", {}, status="running")
    now = time.time()
    store.update_run(run.id, owner_pid=pid, owner_host=host, started_at=now - beat_age - 1,
                     heartbeat_at=now - beat_age)
    ids = store.create_steps(run.id, ["work"])
    store.update_steps([{"id": ids["work"], "status": "running"}])
    return run.id


def _engine(settings: Settings, store: Store) -> LocalEngine:
    return LocalEngine(settings, store, track=False)  # recover() runs as it starts


def _states(store: Store, run_id: str) -> tuple[str, str, str | None]:
    run = store.get_run(run_id)
    assert run is not None
    return run.status, store.list_steps(run_id)[0].status, run.error


def test_a_run_another_hosts_live_driver_owns_is_left_alone(
        settings: Settings, store: Store, dead_pid: int) -> None:
    """The bug this fixes: its pid is dead *here*, which says nothing about the other machine."""
    run_id = _running(store, pid=dead_pid, host="another-machine", beat_age=1.0)
    engine = _engine(settings, store)
    assert _states(store, run_id) == ("running", "running", None)
    assert engine.recover() == []
    assert engine.cancel(run_id) == "cancelling"  # asked of its driver, not marked over its head
    run = store.get_run(run_id)
    assert run is not None and run.status == "running" and run.cancel_requested


def test_a_run_whose_other_host_driver_went_silent_is_interrupted(
        settings: Settings, store: Store, dead_pid: int) -> None:
    stale = settings.run_stale_after + 30
    run_id = _running(store, pid=dead_pid, host="another-machine", beat_age=stale)
    _engine(settings, store)
    status, step, error = _states(store, run_id)
    assert (status, step) == ("interrupted", "interrupted")
    assert error is not None and error.startswith(
        f"the engine process {dead_pid} on another-machine stopped its heartbeat")
    assert f"scanflow resume {run_id[:12]}" in error


def test_this_hosts_runs_are_judged_by_their_pid(
        settings: Settings, store: Store, dead_pid: int, live_pid: int) -> None:
    """Here a dead pid is a dead driver however fresh its last beat; a live one is alive however
    old (a run recorded before owners had hosts, `host` None, counts as this host's)."""
    dead = _running(store, pid=dead_pid, host=socket.gethostname(), beat_age=0.0)
    legacy = _running(store, pid=dead_pid, host=None, beat_age=0.0)
    alive = _running(store, pid=live_pid, host=socket.gethostname(), beat_age=10_000.0)
    _engine(settings, store)
    assert _states(store, dead) == ("interrupted", "interrupted",
                                    f"the engine process {dead_pid} died; `scanflow resume {dead[:12]}`")
    assert _states(store, legacy)[:2] == ("interrupted", "interrupted")
    assert _states(store, alive) == ("running", "running", None)


def test_a_running_run_records_its_host_and_beats(
        tmp_path: Path, store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its owner is this host and process, and its heartbeat moves while a step runs."""
    monkeypatch.setenv("SF_FLAG", str(tmp_path / "go"))
    settings = Settings(workspace=tmp_path / "beat-ws", run_stale_after=0.4).ensure()  # a beat / 0.1 s
    store = Store(store_url)
    flag = tmp_path / "go"
    (tmp_path / "wait.py").write_text("import os, time\nwhile not os.path.exists(os.environ['SF_FLAG']):\n"
                                      "    time.sleep(0.05)\n")
    app = Application(app="beat", team="t", base_dir=tmp_path,
                      workflows={"wf": Workflow(steps=[Step(name="wait", run="python wait.py")])})
    engine = LocalEngine(settings, store, track=False)
    done: dict[str, Any] = {}
    t = threading.Thread(target=lambda: done.update(res=engine.run(app, "wf")), daemon=True)
    t.start()
    try:
        run = wait_for(lambda: next((r for r in store.list_runs(status=["running"]) if r.owner_pid),
                                    None), timeout=30, what="the run started")
        assert run.owner_host == socket.gethostname() and run.owner_pid == os.getpid()
        first = run.heartbeat_at
        assert first is not None
        wait_for(lambda: (store.get_run(run.id).heartbeat_at or 0) > first,  # type: ignore[union-attr]
                 timeout=10, what="the run's heartbeat moved")
    finally:
        flag.touch()  # the step ends, whatever was found
    wait_for(lambda: "res" in done, timeout=30, what="the run ended")
    assert done["res"].ok, done["res"].error
    store.close()
