"""Sensor triggers: interval, cron and date on a schedule, events (workflow finished, model
version registered, alias moved, prediction window full, message received), each event judged
once — also when it is replayed after a crash or seen again after a restart; fires missed while
the agent was down are coalesced into one at restart, or skipped (`misfire`)."""

from __future__ import annotations

import textwrap
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from scanflow.agents import (
    Agent,
    AgentSpec,
    CallSpec,
    Observation,
    SensorSpec,
    Trigger,
    actuator,
    rule,
    sensor,
)
from scanflow.control import backends
from scanflow.control.triggers import MAX_COUNTED_MISSES, plan_schedule
from scanflow.settings import Settings
from scanflow.spec import SpecError, load_application
from scanflow.store import Store
from scanflow.store.schema import Message
from support.waiting import wait_for

PARTS = '''
from scanflow.agents import actuator

@actuator("note")
def note(obs, ctx, path):
    with open(path, "a") as f:
        f.write(f"{ctx.sensor} {obs.key}\\n")
    return {"noted": obs.key}
'''

EVENTS = '''
app: demo
team: ops
services:
  svc: {model: tiny}
workflows:
  ingest:
    steps: [{name: a, call: "steps:noop", cache: false}]
agents:
  watcher:
    role: custom
    service: svc
    imports: [parts]
    sensors:
      - name: runs
        trigger: {event: {workflow_finished: ingest}}
        actuators: [{func: note, params: {path: NOTES}}]
      - name: versions
        trigger: {event: {model: {name: tiny}}}
        actuators: [{func: note, params: {path: NOTES}}]
      - name: champion
        trigger: {event: {model: {name: tiny, event: alias_moved, alias: champion}}}
        actuators: [{func: note, params: {path: NOTES}}]
      - name: windows
        trigger: {event: {prediction_window: {size: 4, settle: 0}}}
        actuators: [{func: note, params: {path: NOTES}}]
      - name: pings
        trigger: {event: {message: {kind: ping}}}
        actuators: [{func: note, params: {path: NOTES}}]
'''


def _app_dir(tmp_path: Path, spec: str, name: str = "app") -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "parts.py").write_text(PARTS)
    (d / "steps.py").write_text("def noop():\n    pass\n")
    (d / "scanflow.yaml").write_text(spec.replace("NOTES", str(tmp_path / "notes.txt")))
    return d


def _notes(tmp_path: Path) -> list[str]:
    p = tmp_path / "notes.txt"
    return p.read_text().splitlines() if p.exists() else []


def _log(store: Store, n: int, start: int = 0) -> None:
    now = time.time() - 5
    store.add_predictions(
        {"request_id": f"r{i}", "service": "svc", "model_version": "1", "ts": now,
         "inputs": [i], "outputs": 0, "latency_ms": 1.0} for i in range(start, start + n)
    )


def _new_version(settings: Settings, tmp_path: Path) -> str:
    """A registered version of `tiny` (the registry is all an event trigger watches)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=settings.tracking)
    try:
        client.create_registered_model("tiny")
    except MlflowException:
        pass
    src = tmp_path / "model-files"
    src.mkdir(exist_ok=True)
    return str(client.create_model_version("tiny", source=str(src)).version)


def test_each_event_is_judged_once_across_replays_and_restarts(
    tmp_path: Path, settings: Settings, store: Store
) -> None:
    from scanflow.engine import LocalEngine
    from scanflow.tracking import MlflowTracker

    app = load_application(_app_dir(tmp_path, EVENTS))
    agent = Agent(settings, store, app, "watcher")
    agent.poll()  # cursors start here: what happened before the triggers existed does not fire
    cursors = store.state_items("watcher", "_cursor:")

    run = LocalEngine(settings, store).run(app, "ingest")
    v1 = _new_version(settings, tmp_path)
    MlflowTracker(settings).set_alias("tiny", "champion", v1)
    _log(store, 9)  # two full windows of 4; one record waits
    store.send_message("someone", "watcher", "ping", {"n": 1}, key="ping-1")
    store.send_message("someone", "watcher", "other", {"n": 2}, key="not-for-pings")

    agent.poll()
    assert sorted(_notes(tmp_path)) == sorted([
        f"runs run:{run.run_id}:succeeded", f"versions model:tiny:v{v1}",
        f"champion model:tiny@champion:move1:v{v1}", "windows svc:1-4", "windows svc:5-8",
        "pings ping-1",
    ])
    (decision,) = [d for d in store.list_decisions("watcher") if d.sensor == "runs"]
    assert decision.evidence["run_id"] == run.run_id and decision.evidence["status"] == "succeeded"
    agent.poll()
    assert len(_notes(tmp_path)) == 6  # nothing happened since

    # A crash after judging but before the cursors advanced replays every event: the decisions
    # stored under the event keys recognise them, and nothing acts twice.
    for key, value in cursors.items():
        store.set_state("watcher", key, value)
    with store.session() as s:
        s.execute(update(Message).where(Message.key == "ping-1").values(status="pending"))
    agent.poll()
    assert len(_notes(tmp_path)) == 6 and len(store.list_decisions("watcher")) == 6
    assert [m.key for m in store.inbox("watcher")] == ["not-for-pings"]  # ping-1 acknowledged

    # Events while the agent is down fire after its restart: the cursors are in the store.
    v2 = _new_version(settings, tmp_path)
    MlflowTracker(settings).set_alias("tiny", "champion", v2)
    _log(store, 3, start=9)
    restarted = Agent(settings, store, app, "watcher")
    restarted.poll()
    new = _notes(tmp_path)[6:]
    assert sorted(new) == sorted([f"versions model:tiny:v{v2}", f"champion model:tiny@champion:move2:v{v2}",
                                  "windows svc:9-12"])
    MlflowTracker(settings).set_alias("tiny", "champion", v1)  # moving back is a new, distinct event
    restarted.poll()
    assert _notes(tmp_path)[-1] == f"champion model:tiny@champion:move3:v{v1}"


SCHEDULE = '''
app: demo
team: ops
agents:
  clock:
    role: custom
    imports: [parts]
    sensors:
      - name: tick
        triggers: [{cron: "*/1 * * * * *"}]
        actuators: [{func: note, params: {path: NOTES}}]
      - name: once
        triggers: [{date: "PAST"}, {date: "SOON"}]
        actuators: [{func: note, params: {path: NOTES}}]
'''


def test_cron_fires_on_schedule_and_a_date_fires_once_ever(tmp_path: Path, settings: Settings) -> None:
    store = backends.store(settings)
    past = "2020-01-01T00:00:00Z"
    soon = (datetime.now(UTC) + timedelta(seconds=2)).isoformat()
    app = load_application(_app_dir(tmp_path, SCHEDULE.replace("PAST", past).replace("SOON", soon)))

    def fired(sensor: str) -> list[str]:
        return [n.split(" ", 1)[1] for n in _notes(tmp_path) if n.startswith(sensor + " ")]

    agent = Agent(settings, store, app, "clock")
    agent.start()
    try:
        wait_for(lambda: len(fired("tick")) >= 2 and all(
            t["fired_at"] for t in agent.sensor_info("once")["triggers"]), timeout=20)
        info = agent.sensor_info("tick")
        assert info["triggers"][0]["next_fire_time"] is not None and not info["paused"]
        dates = agent.sensor_info("once")["triggers"]
        assert all(t["next_fire_time"] is None for t in dates)  # done: nothing scheduled
    finally:
        agent.stop()
    assert sorted(fired("once")) == sorted(["date:2020-01-01T00:00:00+00:00",
                                            f"date:{datetime.fromisoformat(soon).isoformat(timespec='seconds')}"])
    ticks = fired("tick")
    assert len(set(ticks)) == len(ticks)  # every cron fire is its own observation

    # After a restart the cron goes on; neither date fires again (the past one included).
    again = Agent(settings, store, app, "clock")
    again.start()
    try:
        wait_for(lambda: len(fired("tick")) >= len(ticks) + 2, timeout=20)
    finally:
        again.stop()
    assert len(fired("once")) == 2


def test_bad_triggers_name_the_field(tmp_path: Path) -> None:
    d = tmp_path / "bad"
    d.mkdir()
    (d / "scanflow.yaml").write_text(textwrap.dedent('''
        app: x
        team: t
        agents:
          a:
            role: custom
            sensors:
              - name: s
                triggers:
                  - {cron: "every monday"}
                  - {date: "next tuesday"}
                  - {interval: 5, cron: "* * * * *"}
                  - {event: {}}
                  - {event: {model: {name: m, event: alias_moved}}}
                  - {event: {prediction_window: {size: 0}}}
                  - {event: {message: {kind: x}, every: 2}}
                  - {interval: 0}
          b:
            role: custom
            sensors:
              - {name: w, trigger: {event: {prediction_window: {size: 10}}}}
              - {name: m1, trigger: {event: {message: {}}}}
              - {name: m2, trigger: {event: {message: {kind: ping}}}}
          c:
            role: custom
            sensors:
              - {name: s, triggers: [{interval: 1}, {interval: 1s}]}
          d:
            role: custom
            max_attempts: 0
            retry_backoff: soon
            sensors:
              - name: s
                triggers:
                  - {interval: 5, misfire: later}
                  - {event: {message: {kind: z}}, misfire: skip}
    '''))
    with pytest.raises(SpecError) as exc:
        load_application(d)
    text = str(exc.value)
    base = "agents.a.sensors[0].triggers"
    assert f"{base}[0]: bad cron expression 'every monday'" in text
    assert f"{base}[1].date: cannot read 'next tuesday' as an ISO 8601 date-time" in text
    assert f"{base}[2]: a trigger needs exactly one of `interval`, `cron`, `date`, `event`" in text
    assert f"{base}[3].event: an event trigger needs exactly one of" in text
    assert f"{base}[4].event.model: `event: alias_moved` needs `alias`" in text
    assert f"{base}[5].event.prediction_window.size: Input should be greater than or equal to 1" in text
    assert f"{base}[6].event.every: unknown key" in text
    assert f"{base}[7].interval: a duration must be positive" in text
    assert "agents.b: sensors[0].triggers[0].event.prediction_window.service: needed" in text
    assert "sensors[2].triggers[0].event.message: overlaps sensors[1].triggers[0].event.message" in text
    assert "agents.c.sensors[0]: triggers[1] repeats triggers[0]" in text
    assert "agents.d.max_attempts: Input should be greater than or equal to 1" in text
    assert "agents.d.retry_backoff: cannot read 'soon' as a duration" in text
    assert "agents.d.sensors[0].triggers[0].misfire: Input should be 'coalesce' or 'skip'" in text
    assert ("agents.d.sensors[0].triggers[1]: `misfire` applies to interval, cron and date triggers"
            in text)


MISFIRE = '''
app: demo
team: ops
agents:
  clock:
    role: custom
    sensors:
      - {name: cron_c, trigger: {cron: "*/2 * * * * *"}}
      - {name: cron_s, trigger: {cron: "*/2 * * * * *", misfire: skip}}
      - {name: every_c, trigger: {interval: 1s}}
      - {name: every_s, trigger: {interval: 1s, misfire: skip}}
      - {name: date_c, trigger: {date: "SOON"}}
      - {name: date_s, trigger: {date: "SOON", misfire: skip}}
'''


def test_fires_missed_while_down_are_coalesced_or_skipped(tmp_path: Path, settings: Settings) -> None:
    """Down across fire times of a cron, an interval and a date: at restart each `coalesce`
    trigger fires once (its evidence says how many fires it stands for), each `skip` trigger
    does not (a `misfire_skipped` event says what went by); a date is done either way."""
    store = backends.store(settings)
    soon = datetime.now(UTC) + timedelta(seconds=3)
    app = load_application(_app_dir(tmp_path, MISFIRE.replace("SOON", soon.isoformat())))

    def decisions(sensor: str) -> list[Any]:
        return [d for d in store.list_decisions("clock") if d.sensor == sensor]

    def coalesced(sensor: str) -> list[Any]:
        return [d for d in decisions(sensor) if "missed" in d.evidence]

    def skipped() -> dict[str, int]:
        return {e.payload["sensor"]: e.payload["missed"] for e in store.recent_events("clock", 100)
                if e.kind == "misfire_skipped"}

    first = Agent(settings, store, app, "clock")
    first.start()
    try:
        wait_for(lambda: decisions("every_c") and decisions("every_s"))  # an interval fires at start
    finally:
        first.stop()
    time.sleep(max(0.0, (soon - datetime.now(UTC)).total_seconds()) + 0.5)  # down past the date
    assert not decisions("date_c") and not decisions("date_s")

    again = Agent(settings, store, app, "clock")
    again.start()
    try:
        wait_for(lambda: all(coalesced(s) for s in ("cron_c", "every_c", "date_c")) and len(skipped()) == 3)
        info = {s["name"]: s["triggers"][0] for s in again.sensors_info()}
    finally:
        again.stop()
    for name in ("cron_c", "every_c", "date_c"):
        (one,) = coalesced(name)
        assert one.evidence["misfire"] == "coalesce" and one.evidence["missed"] >= 1
    assert coalesced("every_c")[0].evidence["missed"] >= 3  # 1 s interval, down > 3 s: one fire
    assert not any(coalesced(s) for s in ("cron_s", "every_s", "date_s"))
    assert set(skipped()) == {"cron_s", "every_s", "date_s"} and skipped()["every_s"] >= 3
    assert len(decisions("date_c")) == 1 and not decisions("date_s")
    date_c, date_s = info["date_c"], info["date_s"]
    assert date_c["fired_at"] and date_c["last_fire_time"] and not date_c["skipped_at"]
    assert date_s["skipped_at"] and not date_s["fired_at"] and date_s["next_fire_time"] is None
    assert info["every_s"]["misfire"] == "skip" and info["every_s"]["last_fire_time"]

    # A date fires once (or is skipped once), ever: a third start does neither again.
    third = Agent(settings, store, app, "clock")
    third.start()
    try:
        time.sleep(0.5)
    finally:
        third.stop()
    assert len(decisions("date_c")) == 1 and not decisions("date_s")
    assert [e.payload["sensor"] for e in store.recent_events("clock", 100)
            if e.kind == "misfire_skipped"].count("date_s") == 1


def test_plan_schedule_counts_what_was_missed() -> None:
    """The misfire policy on fixed clocks: when the next fire is, and how many went by."""
    now = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)

    def at(**delta: float) -> float:
        return (now + timedelta(**delta)).timestamp()

    hourly, hourly_skip = Trigger(interval="1h"), Trigger(interval="1h", misfire="skip")
    assert plan_schedule(hourly, None, now).first == now  # never fired: fires at start
    fresh = plan_schedule(hourly, {"last": at(minutes=-30)}, now)
    assert (fresh.first, fresh.missed, fresh.fire_now) == (now + timedelta(minutes=30), 0, False)
    down = {"last": at(hours=-3.5), "covered": at(hours=-3.5)}
    c, s = plan_schedule(hourly, down, now), plan_schedule(hourly_skip, down, now)
    assert (c.first, c.missed, c.missed_since, c.fire_now) == (now, 3, now - timedelta(hours=2.5), True)
    assert (s.first, s.missed, s.fire_now) == (now + timedelta(minutes=30), 3, False)
    resumed = plan_schedule(hourly, {**down, "covered": at(minutes=-10)}, now)  # paused, then resumed
    assert (resumed.first, resumed.missed) == (now + timedelta(minutes=30), 0)

    nightly = Trigger(cron="0 3 * * *")
    two_days = plan_schedule(nightly, {"last": None, "covered": at(days=-2)}, now)
    assert (two_days.missed, two_days.first, two_days.fire_now) == (2, now, True)
    assert two_days.missed_since == datetime(2026, 5, 31, 3, 0, tzinfo=UTC)
    assert plan_schedule(nightly, {"covered": at(hours=-8)}, now).missed == 0  # 04:00 -> 12:00
    skipped = plan_schedule(Trigger(cron="0 3 * * *", misfire="skip"), {"covered": at(days=-2)}, now)
    assert (skipped.missed, skipped.first, skipped.fire_now) == (2, None, False)
    busy = plan_schedule(Trigger(cron="* * * * * *"), {"covered": at(days=-7)}, now)
    assert busy.missed == MAX_COUNTED_MISSES and busy.fire_now

    past = now - timedelta(hours=1)
    assert plan_schedule(Trigger(date=past), None, now).fire_now
    gone = plan_schedule(Trigger(date=past, misfire="skip"), None, now)
    assert (gone.scheduled, gone.missed) == (False, 1)
    assert plan_schedule(Trigger(date=now + timedelta(hours=1)), None, now).first == now + timedelta(hours=1)
    # the policy is not part of a trigger's identity: changing it keeps the trigger's history
    assert Trigger(interval="1h").key == Trigger(interval="1h", misfire="skip").key


# -- decorators and agents declared in Python ------------------------------------------------------
COLLECTED: list[str] = []


@sensor("count_up")
def _count_up(ctx: Any, upto: int = 3) -> Observation | None:
    n = int(ctx.get("n", 0))
    if n >= upto:
        return None
    ctx.set("n", n + 1)
    return Observation(key=f"n{n}", evidence={"n": n})


@rule("even")
def _even(obs: Observation, ctx: Any) -> tuple[bool, str]:
    return obs.evidence["n"] % 2 == 0, f"n={obs.evidence['n']}"


@actuator("collect")
def _collect(obs: Observation, ctx: Any, tag: str = "") -> dict[str, Any]:
    COLLECTED.append(f"{tag}{obs.key}")
    return {"collected": obs.key}


def test_python_declared_agent_uses_registered_names_and_functions(
    tmp_path: Path, settings: Settings, store: Store
) -> None:
    COLLECTED.clear()
    spec = AgentSpec(role="custom", sensors=[SensorSpec(
        name="counter", func="count_up", params={"upto": 4}, triggers=[],
        rule=CallSpec(func=_even), actuators=["collect", CallSpec(func=_collect, params={"tag": "fn:"})],
    )])
    agent = Agent.define(settings, store, "py", spec)
    assert sum(agent.tick("counter") for _ in range(5)) == 4
    assert COLLECTED == ["n0", "fn:n0", "n2", "fn:n2"]
    decisions = store.list_decisions("py")
    assert [d.fired for d in decisions] == [True, False, True, False]
    assert decisions[1].rule == "even" and decisions[1].evidence["reason"] == "n=1"
    assert [a["action"] for a in decisions[0].actions] == ["collect", "collect#1"]
    assert agent.sensor_info("counter")["triggers"] == []  # fired by hand (or the API) only

    with pytest.raises(ValueError, match="already registered"):
        actuator("collect")(lambda obs, ctx: None)
    bad = AgentSpec(role="custom", sensors=[SensorSpec(name="s", func="count_up", rule="evn")])
    with pytest.raises(SpecError, match=r"sensors\[0\].rule.func: no rule registered as 'evn'.*even"):
        Agent.define(settings, store, "bad", bad)
