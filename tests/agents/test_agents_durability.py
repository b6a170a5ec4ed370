"""`kill -9` of agent processes at every point of the judge/act/commit sequence, in the middle of
an actuator and of a workflow run it started, and at random: after a restart no decision is
lost, no action is executed twice, watermarks resume, every message is handled once. Poison
messages are tried `max_attempts` times, then dead-lettered while the others flow, and can be
requeued; scheduled fires missed while an agent was down are coalesced or skipped."""

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
from scanflow.control import backends
from scanflow.procs import pid_alive
from scanflow.settings import Settings
from scanflow.store import Store
from support.agent_parts import HANG_ONCE
from support.waiting import wait_for

PARTS = '''
import hashlib, os, signal, time
from pathlib import Path

from scanflow.agents import Observation, actuator, rule, sensor


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


def poisoned(data, flag):
    return bool(data.get("poison")) and Path(flag).exists()


@sensor("picky_read")
def picky_read(ctx, flag):
    ev = ctx.trigger_event
    if poisoned(ev.data, flag):
        raise RuntimeError(f"cannot read {ev.key}")
    return Observation(key=ev.key, data=dict(ev.data))


@rule("picky_rule")
def picky_rule(obs, ctx, flag):
    if poisoned(obs.data, flag):
        raise ValueError(f"cannot judge {obs.key}")
    return True, "fine"


@actuator("flaky")
def flaky(obs, ctx, dir, flag):
    with open(Path(dir) / "flaky.log", "a") as f:
        f.write(f"{obs.key} {ctx.action.attempt} {ctx.action.after_failure}\\n")
    if poisoned(obs.data, flag):
        raise RuntimeError(f"the backend refused {obs.key}")
    return {"done": obs.key}


@actuator("kill_on_poison")
def kill_on_poison(obs, ctx, dir, flag):
    with open(Path(dir) / "kills.log", "a") as f:
        f.write(f"{obs.key} {ctx.action.attempt}\\n")
    if poisoned(obs.data, flag):
        os.kill(os.getpid(), signal.SIGKILL)
    return {"survived": obs.key}
''' + HANG_ONCE

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
  picky:
    role: custom
    imports: [parts]
    max_attempts: 3
    retry_backoff: 0.2s
    sensors:
      - name: reads
        func: picky_read
        params: {flag: FLAG}
        trigger: {event: {message: {kind: read}, poll: 0.1}}
        actuators: [{func: effect, params: {dir: EFFECTS}}]
      - name: judges
        trigger: {event: {message: {kind: judge}, poll: 0.1}}
        rule: {func: picky_rule, params: {flag: FLAG}}
        actuators: [{func: effect, params: {dir: EFFECTS}}]
      - name: acts
        trigger: {event: {message: {kind: act}, poll: 0.1}}
        actuators: [{func: effect, params: {dir: EFFECTS}}, {func: flaky, params: {dir: EFFECTS, flag: FLAG}}]
  killer:
    role: custom
    imports: [parts]
    max_attempts: 2
    sensors:
      - name: jobs
        trigger: {event: {message: {kind: job}, poll: 0.1}}
        actuators:
          - {func: kill_on_poison, params: {dir: EFFECTS, flag: FLAG}}
          - {func: effect, params: {dir: EFFECTS}}
  clock:
    role: custom
    sensors:
      - {name: coalescing, trigger: {interval: 1s}}
      - {name: skipping, trigger: {interval: 1s, misfire: skip}}
  hourly:
    role: custom
    imports: [parts]
    sensors:
      - name: once_an_hour
        trigger: {interval: 1h}
        actuators: [{func: effect, params: {dir: EFFECTS}}]
'''


def _app(tmp_path: Path, pause: float = 0.0) -> Path:
    d = tmp_path / "app"
    d.mkdir()
    (d / "parts.py").write_text(PARTS)
    (d / "steps.py").write_text(STEP)
    effects = tmp_path / "effects"
    effects.mkdir()
    text = (SPEC.replace("EFFECTS", str(effects)).replace("PAUSE", str(pause))
            .replace("STEPLOG", str(tmp_path / "steps.log")).replace("RELEASE", str(tmp_path / "release"))
            .replace("FLAG", str(tmp_path / "broken")))
    (d / "scanflow.yaml").write_text(text)
    return d


def _log(store: Store, n: int, start: int = 0) -> None:
    now = time.time() - 5
    store.add_predictions(
        {"request_id": f"r{i}", "service": "svc", "model_version": "1", "ts": now,
         "inputs": [i], "outputs": 0, "latency_ms": 1.0} for i in range(start, start + n)
    )


def _pids(sup: AgentSupervisor) -> dict[str, int]:
    return {r["name"]: r["pid"] for r in sup.status() if r["status"] in ("running", "failing")}


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
    store = backends.store(settings)
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
        wait_for(settled, what=f"recovery from a kill at {point}", timeout=60)
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
    store = backends.store(settings)
    app = _app(tmp_path)
    sup = AgentSupervisor(settings, store)
    pid = sup.start(app, [agent])[agent]
    store.send_message("someone", agent, "hang", {}, key="h1")
    log = tmp_path / "effects" / "hang.log"
    try:
        wait_for(lambda: log.exists() and "begin" in log.read_text(),
                 what="the actuator to start", timeout=60)
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not pid_alive(pid), timeout=60)
        (cut,) = store.list_decisions(agent)  # decided before acting: not lost
        assert [a["status"] for a in cut.actions] == ["pending"]
        sup.start(app, [agent])
        wait_for(lambda: store.list_messages(agent)[0].status == "done",
                 what="the message to be handled", timeout=60)
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
    store = backends.store(settings)
    app = _app(tmp_path)
    sup = AgentSupervisor(settings, store)
    steps = tmp_path / "steps.log"
    pid = sup.start(app, ["runner"])["runner"]
    store.send_message("someone", "runner", "run", {}, key="go")
    try:
        wait_for(lambda: steps.exists() and "second" in steps.read_text(),
                 what="step `second` to start", timeout=60)
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not pid_alive(pid), timeout=60)
        sup.start(app, ["runner"])
        wait_for(lambda: steps.read_text().splitlines().count("second") == 2,
                 what="`second` to run again", timeout=60)
        (tmp_path / "release").touch()
        wait_for(lambda: store.list_messages("runner")[0].status == "done",
                 what="the message to be handled", timeout=60)
    finally:
        sup.stop()
    assert steps.read_text().splitlines() == ["first", "second", "second", "second done"]
    (run,) = store.list_runs("slow")  # one run, continued: not a second one
    assert run.status == "succeeded" and run.trigger["by"] == "agent"
    assert run.trigger["action_key"] == "runner:jobs:go:run_workflow"
    (decision,) = store.list_decisions("runner")
    assert decision.actions[0]["status"] == "succeeded" and decision.actions[0]["run_id"] == run.id


def test_random_kills_of_sender_and_receiver(tmp_path: Path, settings: Settings) -> None:
    store = backends.store(settings)
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
                wait_for(lambda pid=pid: not pid_alive(pid), timeout=60)
                kills += 1
                sup.start(app, [name])
        wait_for(lambda: _cursor(store) == 100 and len(_effects(tmp_path)) == 20
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


def _log_lines(tmp_path: Path, name: str) -> list[list[str]]:
    p = tmp_path / "effects" / name
    return [line.split(" ") for line in p.read_text().splitlines()] if p.exists() else []


def test_poison_messages_are_dead_lettered_while_the_others_flow(tmp_path: Path, settings: Settings) -> None:
    """A message whose sensor, rule or actuator raises is tried `max_attempts` (3) times with
    backoff, then dead-lettered with its error; the good message behind it is handled at once.
    Requeued once the cause is fixed, each is handled once: nothing that succeeded is repeated."""
    store = backends.store(settings)
    app = _app(tmp_path)
    (tmp_path / "broken").touch()
    kinds = ["read", "judge", "act"]
    for kind in kinds:  # all waiting before the agent starts: the first poll sees both of a kind
        store.send_message("someone", "picky", kind, {"poison": True}, key=f"bad-{kind}")
        store.send_message("someone", "picky", kind, {}, key=f"good-{kind}")
    sup = AgentSupervisor(settings, store)
    sup.start(app, ["picky"])

    def messages() -> dict[str, Any]:
        return {m.key: m for m in store.list_messages("picky")}

    try:
        wait_for(lambda: {m.status for m in messages().values()} == {"dead", "done"}
                 and sum(m.status == "dead" for m in messages().values()) == 3,
                 what="three dead letters", timeout=60)
        got = messages()
        for kind in kinds:
            bad, good = got[f"bad-{kind}"], got[f"good-{kind}"]
            assert (bad.status, bad.attempts, good.status, good.attempts) == ("dead", 3, "done", 1)
            assert good.handled_at < bad.handled_at  # not blocked behind the failing one
        assert got["bad-read"].error == "RuntimeError: cannot read bad-read"
        assert got["bad-judge"].error == "ValueError: cannot judge bad-judge"
        assert got["bad-act"].error == ("ActionFailed: actuator flaky failed: "
                                        "RuntimeError: the backend refused bad-act")
        with sup.client("picky") as c:
            dead = c.get("/messages", params={"status": "dead"}).json()
            assert sorted((m["key"], m["attempts"]) for m in dead) == [
                ("bad-act", 3), ("bad-judge", 3), ("bad-read", 3)]
            events = [e for e in c.get("/events", params={"limit": 100}).json()
                      if e["kind"] == "message_dead_lettered"]
            assert sorted((e["key"], e["attempts"], e["error"]) for e in events) == sorted(
                (k, 3, got[k].error) for k in ("bad-read", "bad-judge", "bad-act"))
            assert c.get("/health").json()["messages"] == {"dead": 3, "done": 3}

            (tmp_path / "broken").unlink()  # the cause is fixed: requeue them
            for m in dead:
                r = c.post(f"/messages/{m['id']}/requeue")
                assert r.status_code == 200 and (r.json()["status"], r.json()["attempts"]) == ("pending", 0)
            again = c.post(f"/messages/{dead[0]['id']}/requeue")
            assert again.status_code == 409 and "not dead-lettered" in again.json()["detail"]
            assert c.post("/messages/999999/requeue").status_code == 404
            wait_for(lambda: all(m.status == "done" for m in messages().values()),
                     what="requeued handled", timeout=60)
    finally:
        sup.stop()
    assert all(m.attempts == 1 for k, m in messages().items() if k.startswith("bad-"))
    # one decision per message, and every effect once: `effect` before `flaky` is not repeated
    assert sorted(d.key.rsplit(":", 1)[1] for d in store.list_decisions("picky")) == sorted(messages())
    assert _effects(tmp_path) == sorted(messages())
    assert sorted(_calls(tmp_path)) == sorted((k, 1) for k in messages())
    # `flaky` on the poison: three failed tries, then the requeued one, all with one key
    assert [line[1:] for line in _log_lines(tmp_path, "flaky.log") if line[0] == "bad-act"] == [
        ["1", "False"], ["2", "True"], ["3", "True"], ["4", "True"]]
    (act,) = [d for d in store.list_decisions("picky") if d.key.endswith(":bad-act")]
    assert [(a["action"], a["status"]) for a in act.actions] == [("effect", "succeeded"),
                                                                 ("flaky", "succeeded")]
    requeued = [e for e in store.recent_events("picky", 100) if e.kind == "message_requeued"]
    assert sorted(e.payload["key"] for e in requeued) == ["bad-act", "bad-judge", "bad-read"]


def test_a_message_that_kills_its_agent_is_dead_lettered(tmp_path: Path, settings: Settings) -> None:
    """Tries cut off by `kill -9` count: after `max_attempts` (2) deaths the message is
    dead-lettered at the next start and the one behind it is handled; requeued (with the agent
    down: the store is the queue), the cut-off action is resumed under its key, once."""
    store = backends.store(settings)
    app = _app(tmp_path)
    (tmp_path / "broken").touch()
    store.send_message("someone", "killer", "job", {"poison": True}, key="deadly")
    store.send_message("someone", "killer", "job", {}, key="after")
    sup = AgentSupervisor(settings, store)
    sup.start(app, ["killer"])
    deaths = 0

    def settled() -> bool:
        nonlocal deaths
        if "killer" not in _pids(sup):
            deaths += 1
            sup.start(app, ["killer"])
        return {m.key: m.status for m in store.list_messages("killer")} == {"deadly": "dead", "after": "done"}

    try:
        wait_for(settled, what="the deadly message dead-lettered", timeout=60)
    finally:
        sup.stop()
    assert deaths == 2
    deadly = next(m for m in store.list_messages("killer") if m.key == "deadly")
    assert deadly.attempts == 2 and "the agent died while handling it" in (deadly.error or "")
    (event,) = [e for e in store.recent_events("killer") if e.kind == "message_dead_lettered"]
    assert event.payload["key"] == "deadly" and event.payload["attempts"] == 2
    assert _effects(tmp_path) == ["after"]

    (tmp_path / "broken").unlink()
    assert store.requeue_message("killer", deadly.id).status == "pending"
    sup.start(app, ["killer"])
    try:
        wait_for(lambda: all(m.status == "done" for m in store.list_messages("killer")),
                 what="requeued handled", timeout=60)
    finally:
        sup.stop()
    assert _effects(tmp_path) == ["after", "deadly"]
    assert [line for line in _log_lines(tmp_path, "kills.log") if line[0] == "deadly"] == [
        ["deadly", "1"], ["deadly", "2"], ["deadly", "3"]]  # resumed under one key, not a new action
    assert len(store.list_decisions("killer")) == 2


def test_fires_missed_across_kill_9_are_coalesced_or_skipped(tmp_path: Path, settings: Settings) -> None:
    """The last fire time is durable: an agent killed across two fire times of a 1 s interval
    fires once at restart under `misfire: coalesce` (saying how many it stands for) and not
    under `skip` (an event says what was skipped)."""
    store = backends.store(settings)
    app = _app(tmp_path)
    sup = AgentSupervisor(settings, store)
    pid = sup.start(app, ["clock"])["clock"]
    wait_for(lambda: {d.sensor for d in store.list_decisions("clock")} == {"coalescing", "skipping"},
             what="the fires at start", timeout=60)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not pid_alive(pid), timeout=60)
    before = len(store.list_decisions("clock"))
    time.sleep(2.5)  # down across at least two fire times of each trigger
    sup.start(app, ["clock"])

    def after(sensor: str) -> list[Any]:
        return [d for d in store.list_decisions("clock")[before:] if d.sensor == sensor]

    try:
        wait_for(lambda: len(after("coalescing")) >= 2 and after("skipping"),
                 what="fires after the restart", timeout=60)
        with sup.client("clock") as c:
            triggers = {s["name"]: s["triggers"][0] for s in c.get("/sensors").json()}
    finally:
        sup.stop()
    first, *rest = after("coalescing")
    assert first.evidence["misfire"] == "coalesce" and first.evidence["missed"] >= 2
    assert not any("missed" in d.evidence for d in rest)  # once, not once per missed fire
    assert not any("missed" in d.evidence for d in after("skipping"))
    skipped = [e.payload for e in store.recent_events("clock", 100) if e.kind == "misfire_skipped"]
    assert [(p["sensor"], p["misfire"]) for p in skipped] == [("skipping", "skip")]
    assert skipped[0]["missed"] >= 2
    assert (triggers["coalescing"]["misfire"], triggers["skipping"]["misfire"]) == ("coalesce", "skip")
    assert all(t["last_fire_time"] and t["next_fire_time"] for t in triggers.values())


def test_a_scheduled_fire_cut_off_by_kill_9_is_replayed_under_its_key(
    tmp_path: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fire is written down before it is judged: killed before its decision, it is judged
    after the restart under the same key, once (and the hourly schedule owes nothing more)."""
    store = backends.store(settings)
    app = _app(tmp_path)
    sup = AgentSupervisor(settings, store)
    monkeypatch.setenv(FAILPOINT_ENV, "before_decision")
    pid = sup.start(app, ["hourly"])["hourly"]
    monkeypatch.delenv(FAILPOINT_ENV)
    wait_for(lambda: not pid_alive(pid), what="the kill at the first fire", timeout=60)
    (record,) = store.state_items("hourly", "_fire:").values()
    assert record["done"] is False and not store.list_decisions("hourly")
    sup.start(app, ["hourly"])
    try:
        wait_for(lambda: _effects(tmp_path), what="the replayed fire", timeout=60)
        time.sleep(0.5)  # a second fire would have time to show
    finally:
        sup.stop()
    (decision,) = store.list_decisions("hourly")
    assert decision.key == f"hourly:once_an_hour:{record['key']}" and decision.evidence["replayed"] is True
    assert _effects(tmp_path) == [record["key"]] and _calls(tmp_path) == [(record["key"], 1)]
    (done,) = store.state_items("hourly", "_fire:").values()
    assert done["done"] is True and done["key"] == record["key"]
