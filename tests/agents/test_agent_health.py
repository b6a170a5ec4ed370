"""An agent whose sensor's ticks fail says `failing` (not `running`) in `scanflow agents list`
and `agents status`, with the last error, since when and how many ticks in a row; once a tick
succeeds it is `running` again. A real agent process, driven through the CLI."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from scanflow.cli.main import app as cli_app
from scanflow.settings import Settings
from support.waiting import wait_for

PROBE = '''
from pathlib import Path

def probe(ctx, flag):
    if Path(flag).exists():
        raise RuntimeError("the probe is broken: " + Path(flag).read_text())
    return None
'''

SPEC = '''
app: demo
team: ops
agents:
  watcher:
    role: custom
    sensors:
      - name: probe
        func: "probe:probe"
        params: {flag: FLAG}
        trigger: {interval: 0.2}
'''


def cli(settings: Settings, *args: str) -> str:
    res = CliRunner().invoke(cli_app, ["--workspace", str(settings.root), *args])
    assert res.exit_code == 0, res.output
    return res.output


def listed(settings: Settings) -> dict[str, Any]:
    (row,) = json.loads(cli(settings, "agents", "list", "--json"))
    return row  # type: ignore[no-any-return]


def test_an_agent_whose_ticks_fail_is_failing_until_one_succeeds(tmp_path: Path, settings: Settings) -> None:
    d = tmp_path / "app"
    d.mkdir()
    flag = tmp_path / "broken"
    flag.write_text("no data")
    (d / "probe.py").write_text(textwrap.dedent(PROBE))
    (d / "scanflow.yaml").write_text(SPEC.replace("FLAG", str(flag)))
    cli(settings, "agents", "start", str(d))
    try:
        # Every tick since start failed: failing at once, in the list and in the agent's status.
        row = wait_for(lambda: (r := listed(settings))["status"] == "failing" and r,
                       what="agents list says failing")
        (f,) = row["failing"]
        assert f["sensor"] == "probe" and f["error"] == "RuntimeError: the probe is broken: no data"
        assert f["failed_ticks"] >= 1 and f["since"]
        text = " ".join(cli(settings, "agents", "list").split())
        assert "failing" in text and "watcher: sensor probe failing" in text
        assert "RuntimeError: the probe is broken: no data" in text
        status = json.loads(cli(settings, "agents", "status", "watcher", "--json"))
        assert status["status"] == "failing"
        assert status["failing"][0]["error"] == "RuntimeError: the probe is broken: no data"
        assert status["sensors"][0]["failing"] and status["sensors"][0]["failed_ticks"] >= 1
        text = " ".join(cli(settings, "agents", "status", "watcher").split())
        assert text.startswith("watcher: failing") and "last error: RuntimeError: the probe is broken" in text

        flag.unlink()  # it recovers
        wait_for(lambda: listed(settings)["status"] == "running", what="agents list says running")
        status = json.loads(cli(settings, "agents", "status", "watcher", "--json"))
        assert status["status"] == "running" and status["failing"] == []
        assert cli(settings, "agents", "status", "watcher").startswith("watcher: running")

        # Having worked once, it is failing again only after 3 failed ticks in a row.
        flag.write_text("again")
        row = wait_for(lambda: (r := listed(settings))["status"] == "failing" and r,
                       what="failing again")
        assert row["failing"][0]["failed_ticks"] >= 3
        assert row["failing"][0]["error"] == "RuntimeError: the probe is broken: again"
    finally:
        cli(settings, "agents", "stop")
    assert listed(settings)["status"] == "stopped"
