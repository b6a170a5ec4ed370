"""`kill -9` of agent processes at every point of the judge/act/commit sequence, in the middle of
an actuator and of a workflow run it started, and at random: after a restart no decision is
lost, no action is executed twice, watermarks resume, every message is handled once."""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from scanflow.agents.process import AgentSupervisor
from scanflow.agents.runtime import FAILPOINT_ENV
from scanflow.procs import pid_alive
from scanflow.settings import Settings
from scanflow.store import Store

PARTS = '''
import hashlib, os, time
from pathlib import Path

from scanflow.agents import actuator, rule


@rule("count_jobs")
def count_jobs(obs, ctx):
    n = int(ctx.get("judged", 0)) + 1
    ctx.set("judged", n)  # stored with the decision: a replay must not count twice
    return True, f"job {n}"


@actuator("effect")
def effect(obs, ctx, dir, pause=0.0):
    """Log every call; make the user-visible effect (a file per action key) only once."""
    d = Path(dir)
    d.mkdir(exist_ok=True)
    with open(d / "calls.log", "a") as f:
        f.write(f"{obs.key} {ctx.action.attempt}\\n")
    time.sleep(pause)
    name = hashlib.sha1(ctx.action_key.encode()).hexdigest()
    try:
        fd = os.open(d / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return {"already": True}
    os.write(fd, obs.key.encode())
    os.close(fd)
    return {"done": obs.key}


@actuator("hang_once")
def hang_once(obs, ctx, dir):
    """The first call hangs (until the test kills the agent); a resumed call finishes."""
    log = Path(dir) / "hang.log"
    with open(log, "a") as f:
        f.write(f"begin {ctx.action_key} {ctx.action.attempt}\\n")
    while not ctx.action.resumed:
        time.sleep(0.05)
    with open(log, "a") as f:
        f.write(f"end {ctx.action_key} {ctx.action.attempt}\\n")
    return {"finished": True}
'''

STEP = '''
import sys, time
from pathlib import Path

log = Path(sys.argv[2])
with open(log, "a") as f:
    f.write(sys.argv[1] + "\\n")
if sys.argv[1] == "second":
    while not Path(sys.argv[3]).exists():
        time.sleep(0.05)
    with open(log, "a") as f:
        f.write("second done\\n")
'''

SPEC = '''
app: demo
team: ops
services:
  svc: {model: m}
workflows:
  slow:
    steps:
      - {name: first, run: "python steps.py first STEPLOG", cache: false}
      - {name: second, run: "python steps.py second STEPLOG RELEASE", after: [first], cache: false}
agents:
  monitor:
    role: monitor
    service: svc
    sensors:
      - name: windows
        trigger: {event: {prediction_window: {size: 5, settle: 0}, poll: 0.1}}
        actuators: [{func: send, params: {to: receiver, kind: job}}]
  receiver:
    role: custom
    imports: [parts]
    sensors:
      - name: jobs
        trigger: {event: {message: {kind: job}, poll: 0.1}}
        rule: count_jobs
        actuators: [{func: effect, params: {dir: EFFECTS, pause: PAUSE}}]
  hanger:
    role: custom
    imports: [parts]
    sensors:
      - name: jobs
        trigger: {event: {message: {kind: hang}, poll: 0.1}}
        actuators: [{func: hang_once, params: {dir: EFFECTS}}]
  quitter:
    role: custom
    imports: [parts]
    sensors:
      - name: jobs
        trigger: {event: {message: {kind: hang}, poll: 0.1}}
        actuators: [{func: hang_once, params: {dir: EFFECTS}, on_interrupted: abandon}]
  runner:
    role: executor
    sensors:
      - name: jobs
        trigger: {event: {message: {kind: run}, poll: 0.1}}
        actuators: [{func: run_workflow, params: {app: ., workflow: slow}}]
'''


def _app(tmp_path: Path, pause: float = 0.0) -> Path:
    d = tmp_path / "app"
    d.mkdir()
    (d / "parts.py").write_text(PARTS)
    (d / "steps.py").write_text(STEP)
    effects = tmp_path / "effects"
    effects.mkdir()
    text = (SPEC.replace("EFFECTS", str(effects)).replace("PAUSE", str(pause))
            .replace("STEPLOG", str(tmp_path / "steps.log")).replace("RELEASE", str(tmp_path / "release")))
    (d / "scanflow.yaml").write_text(text)
    return d


def _log(store: Store, n: int, start: int = 0) -> None:
    now = time.time() - 5
    store.add_predictions(
        {"request_id": f"r{i}", "service": "svc", "model_version": "1", "ts": now,
         "inputs": [i], "outputs": 0, "latency_ms": 1.0} for i in range(start, start + n)
    )


def _wait(cond: Any, timeout: float = 60.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"{what} not met within {timeout}s")


def _pids(sup: AgentSupervisor) -> dict[str, int]:
    return {r["name"]: r["pid"] for r in sup.status() if r["status"] == "running"}


def _effects(tmp_path: Path) -> list[str]:
    return sorted(p.read_text() for p in (tmp_path / "effects").iterdir() if len(p.name) == 40)


def _calls(tmp_path: Path) -> list[tuple[str, int]]:
    p = tmp_path / "effects" / "calls.log"
    return [(k, int(a)) for k, a in (line.rsplit(" ", 1) for line in p.read_text().splitlines())] \
        if p.exists() else []


def _cursor(store: Store) -> int:
    return int(next(iter(store.state_items("monitor", "_cursor:windows/").values()), 0) or 0)


@pytest.mark.parametrize("point", ["before_decision", "after_decision", "after_action", "before_commit",
                                   "before_cursor"])
def test_kill_at_each_point_loses_and_repeats_nothing(
    point: str, tmp_path: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(settings.store)
    app = _app(tmp_path)
    sup = AgentSupervisor(settings, store)
    monkeypatch.setenv(FAILPOINT_ENV, point)  # both agents kill themselves there, once
    sup.start(app, ["monitor", "receiver"])
    monkeypatch.delenv(FAILPOINT_ENV)
    crashes: Counter[str] = Counter()
    _log(store, 5)
    try:
        def settled() -> bool:
            for name in ("monitor", "receiver"):
                if name not in _pids(sup):
                    crashes[name] += 1
                    sup.start(app, [name])  # restarted without the failpoint
            return _cursor(store) == 5 and bool(store.list_messages("receiver")) and \
                all(m.status == "done" for m in store.list_messages("receiver")) and \
                store.get_state("receiver", "judged") is not None and \
                not store.state_items("receiver", "_pending:")
        _wait(settled, what=f"recovery from a kill at {point}")
    finally:
        sup.stop()
    assert crashes == {"monitor": 1, "receiver": 1}  # each agent really died at the point
    (window,) = store.list_decisions("monitor")
    assert window.key == "monitor:windows:svc:1-5" and window.actions[0]["status"] == "succeeded"
    (msg,) = store.list_messages("receiver")
    assert msg.key == "monitor:svc:1-5:job" and msg.status == "done"
    (job,) = store.list_decisions("receiver")
    assert job.evidence["reason"] == "job 1" and store.get_state("receiver", "judged") == 1
    assert [a["status"] for a in job.actions] == ["succeeded"]
    assert _effects(tmp_path) == ["monitor:svc:1-5:job"]
    assert _calls(tmp_path) == [("monitor:svc:1-5:job", 1)]  # called once: never repeated
    assert [a.status for a in store.list_actions()] == ["succeeded", "succeeded"]


@pytest.mark.parametrize("agent", ["hanger", "quitter"])
def test_kill_in_the_middle_of_an_actuator(agent: str, tmp_path: Path, settings: Settings) -> None:
    """Resumed with the same idempotency key (default), or recorded `interrupted` (abandon)."""
    store = Store(settings.store)
    app = _app(tmp_path)
    sup = AgentSupervisor(settings, store)
    pid = sup.start(app, [agent])[agent]
    store.send_message("someone", agent, "hang", {}, key="h1")
    log = tmp_path / "effects" / "hang.log"
    try:
        _wait(lambda: log.exists() and "begin" in log.read_text(), what="the actuator to start")
        os.kill(pid, signal.SIGKILL)
        _wait(lambda: not pid_alive(pid))
        (cut,) = store.list_decisions(agent)  # decided before acting: not lost
        assert [a["status"] for a in cut.actions] == ["pending"]
        sup.start(app, [agent])
        _wait(lambda: store.list_messages(agent)[0].status == "done", what="the message to be handled")
    finally:
        sup.stop()
    key = f"{agent}:jobs:h1:hang_once"
    (decision,) = store.list_decisions(agent)
    (action,) = decision.actions
    assert action["attempt"] == 2
    if agent == "hanger":
        assert log.read_text().splitlines() == [f"begin {key} 1", f"begin {key} 2", f"end {key} 2"]
        assert action["status"] == "succeeded"
    else:
        assert log.read_text().splitlines() == [f"begin {key} 1"]  # not called again
        assert action["status"] == "interrupted" and "not called again" in action["error"]


def test_kill_during_a_workflow_run_continues_that_run(tmp_path: Path, settings: Settings) -> None:
    store = Store(settings.store)
    app = _app(tmp_path)
    sup = AgentSupervisor(settings, store)
    steps = tmp_path / "steps.log"
    pid = sup.start(app, ["runner"])["runner"]
    store.send_message("someone", "runner", "run", {}, key="go")
    try:
        _wait(lambda: steps.exists() and "second" in steps.read_text(), what="step `second` to start")
        os.kill(pid, signal.SIGKILL)
        _wait(lambda: not pid_alive(pid))
        sup.start(app, ["runner"])
        _wait(lambda: steps.read_text().splitlines().count("second") == 2, what="`second` to run again")
        (tmp_path / "release").touch()
        _wait(lambda: store.list_messages("runner")[0].status == "done", what="the message to be handled")
    finally:
        sup.stop()
    assert steps.read_text().splitlines() == ["first", "second", "second", "second done"]
    (run,) = store.list_runs("slow")  # one run, continued: not a second one
    assert run.status == "succeeded" and run.trigger["by"] == "agent"
    assert run.trigger["action_key"] == "runner:jobs:go:run_workflow"
    (decision,) = store.list_decisions("runner")
    assert decision.actions[0]["status"] == "succeeded" and decision.actions[0]["run_id"] == run.id


def test_random_kills_of_sender_and_receiver(tmp_path: Path, settings: Settings) -> None:
    store = Store(settings.store)
    app = _app(tmp_path, pause=0.02)
    sup = AgentSupervisor(settings, store)
    rng = random.Random(7)
    sup.start(app, ["monitor", "receiver"])
    _log(store, 60)
    kills = 0
    try:
        for i in range(8):
            time.sleep(rng.uniform(0.2, 1.0))
            if i == 3:
                _log(store, 40, start=60)  # more traffic while the agents come and go
            name = rng.choice(["monitor", "receiver"])
            pid = _pids(sup).get(name)
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                _wait(lambda pid=pid: not pid_alive(pid))
                kills += 1
                sup.start(app, [name])
        _wait(lambda: _cursor(store) == 100 and len(_effects(tmp_path)) == 20
              and all(m.status == "done" for m in store.list_messages("receiver")), timeout=120,
              what="all 20 windows handled")
        time.sleep(0.5)  # a duplicate would have time to show
    finally:
        sup.stop()
    assert kills == 8
    windows = [d.key for d in store.list_decisions("monitor")]
    assert windows == [f"monitor:windows:svc:{i + 1}-{i + 5}" for i in range(0, 100, 5)]
    assert len(store.list_messages("receiver")) == 20
    jobs = store.list_decisions("receiver")
    assert len(jobs) == 20 and store.get_state("receiver", "judged") == 20
    assert sorted(d.evidence["reason"] for d in jobs) == sorted(f"job {n}" for n in range(1, 21))
    assert all(a["status"] == "succeeded" for d in jobs for a in d.actions)
    assert len(_effects(tmp_path)) == 20
    # A call is repeated only when a kill cut off the one before (attempt 2, 3 ...), never blindly.
    by_key: dict[str, list[int]] = {}
    for key, attempt in _calls(tmp_path):
        by_key.setdefault(key, []).append(attempt)
    assert len(by_key) == 20 and all(a == list(range(1, len(a) + 1)) for a in by_key.values())
