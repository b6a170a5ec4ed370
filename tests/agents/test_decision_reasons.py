"""Every decision says why: a rule that returns a bare bool (or no rule at all) is recorded
with the sensor's own summary of its observation, and `scanflow decisions` shows it, with the
actions taken, as a table or as `--json` (times ISO 8601 UTC to the millisecond, NaN as null)."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from typer.testing import CliRunner

from scanflow.agents import Agent, AgentSpec, CallSpec, Observation, SensorSpec
from scanflow.cli.main import app as cli
from scanflow.control import backends
from scanflow.settings import Settings

ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def _windows(ctx: Any, flag: str) -> list[Observation]:
    """Three windows: one the sensor summarised, one it gave a reason for, one it said nothing of."""
    if ctx.get(flag):
        return []
    ctx.set(flag, True)
    return [Observation(key="w1", evidence={"summary": "no drift: p=0.31 > 0.01", "p": 0.31,
                                            "score": math.nan}),
            Observation(key="w2", evidence={"reason": "window of 4 requests"}),
            Observation(key="w3", evidence={"n": 4})]


def _never(obs: Observation, ctx: Any) -> bool:
    return False


def _note(obs: Observation, ctx: Any) -> dict[str, Any]:
    return {"noted": obs.key}


def _cli(settings: Settings, *args: str) -> tuple[int, str]:
    res = CliRunner().invoke(cli, ["--workspace", str(settings.root), *args])
    return res.exit_code, res.output


def test_bare_bool_rules_record_the_sensors_summary_and_decisions_shows_it(settings: Settings) -> None:
    store = backends.store(settings)
    try:
        spec = AgentSpec(role="custom", sensors=[
            SensorSpec(name="windows", func=_windows, params={"flag": "w"}, triggers=[],
                       actuators=[CallSpec(func=_note)]),
            SensorSpec(name="quiet", func=_windows, params={"flag": "q"}, triggers=[],
                       rule=CallSpec(func=_never), actuators=[CallSpec(func=_note)]),
        ])
        agent = Agent.define(settings, store, "watcher", spec)
        assert agent.tick("windows") == 3 and agent.tick("quiet") == 3
        reasons = {(d.sensor, d.key.rsplit(":", 1)[-1]): d.evidence["reason"]
                   for d in store.list_decisions("watcher")}
    finally:
        store.close()
    assert reasons[("windows", "w1")] == "no drift: p=0.31 > 0.01"  # the summary wins
    assert reasons[("windows", "w2")] == "window of 4 requests"
    assert reasons[("windows", "w3")] == "rule always: fired"
    assert reasons[("quiet", "w3")] == "rule _never: not fired"

    code, text = _cli(settings, "decisions", "--agent", "watcher")
    assert code == 0, text
    assert "no drift: p=0.31 > 0.01" in text and "rule _never: not fired" in text
    assert "_note: succeeded (noted=w1)" in text  # the action, how it ended, what it reported
    assert "…" not in text

    code, text = _cli(settings, "decisions", "--fired", "--json")
    assert code == 0, text
    rows = json.loads(text)  # strict JSON: NaN would not parse as null
    assert [r["reason"] for r in rows] == ["no drift: p=0.31 > 0.01", "window of 4 requests",
                                           "rule always: fired"]
    first = rows[0]
    assert ISO_MS.match(first["time"]) and isinstance(first["ts"], float)
    assert first["evidence"]["score"] is None and first["evidence"]["p"] == 0.31
    assert first["actions"][0]["status"] == "succeeded" and first["agent"] == "watcher"

    code, text = _cli(settings, "decisions", "--agent", "watcher", "--limit", "1", "--json")
    assert code == 0 and [r["reason"] for r in json.loads(text)] == ["rule _never: not fired"]
