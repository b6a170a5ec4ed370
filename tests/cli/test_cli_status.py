"""`scanflow status` on a real deployed service: readable at 80 columns, whole in a pipe,
`status SERVICE --url` for scripts, and `--json` on the listings (times to the millisecond).
Each test runs both ways: on the workspace, and through a real server on it."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest
from typer.testing import CliRunner

from scanflow.cli.main import app as cli
from scanflow.serving import LocalDeployer
from support.control_server import control_server
from support.serving import MODEL, DigitsWorkspace, stop_everything
from support.serving import digits_workspace as digits_workspace  # noqa: F401 - fixture

SERVICE = "digits-status-with-a-name-long-enough-to-be-cut-in-a-table"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

pytestmark = pytest.mark.slow  # trains and deploys a real model server


@pytest.fixture(scope="module")
def deployed(digits_workspace: DigitsWorkspace) -> Iterator[tuple[DigitsWorkspace, str]]:  # noqa: F811
    d = LocalDeployer(digits_workspace.settings, digits_workspace.store)
    try:
        d.deploy(SERVICE, app="demo", team="ops", model=MODEL, replicas=2)
        yield digits_workspace, d.url(SERVICE)
    finally:
        stop_everything(d, digits_workspace.store)


@pytest.fixture(scope="module")
def server_env(deployed: tuple[DigitsWorkspace, str]) -> Iterator[dict[str, str]]:
    with control_server(deployed[0].settings, teams=("ops",)) as srv:
        yield srv.env()


VIA: dict[str, str] = {}


@pytest.fixture(autouse=True, params=["local", "remote"])
def way(request: pytest.FixtureRequest) -> Iterator[str]:
    VIA.update({"SCANFLOW_SERVER": "", "SCANFLOW_TOKEN": ""} if request.param == "local"
               else request.getfixturevalue("server_env"))
    yield request.param
    VIA.clear()


def _env(ws: DigitsWorkspace, columns: int) -> dict[str, str]:
    return {**os.environ, "SCANFLOW_WORKSPACE": str(ws.settings.root), "COLUMNS": str(columns), **VIA}


def _piped(ws: DigitsWorkspace, *args: str, columns: int = 80) -> str:
    proc = subprocess.run([sys.executable, "-m", "scanflow.cli.main", *args], env=_env(ws, columns),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _in_a_terminal(ws: DigitsWorkspace, *args: str, columns: int) -> str:
    """What a person sees: the command's output written to a pseudo-terminal."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "scanflow.cli.main", *args], env=_env(ws, columns),
                            stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # the terminal's other side closed: the command is done
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=120) == 0, chunks
    return ANSI.sub("", b"".join(chunks).decode()).replace("\r\n", "\n")


def _assert_whole(text: str, url: str) -> None:
    assert SERVICE in text and url in text, text
    assert "digits@champion" in text and "2 (v1: 2)" in text, text
    assert "…" not in text, text


def test_status_is_whole_in_a_pipe_and_at_80_columns(deployed: tuple[DigitsWorkspace, str]) -> None:
    ws, url = deployed
    piped = _piped(ws, "status")
    _assert_whole(piped, url)
    narrow = _in_a_terminal(ws, "status", columns=80)
    _assert_whole(narrow, url)
    assert max(len(line) for line in narrow.splitlines()) <= 80, narrow
    wide = _in_a_terminal(ws, "status", columns=250)  # a table, the URL in it
    _assert_whole(wide, url)
    assert "replicas (live)" in wide


def test_status_service_url_and_json(deployed: tuple[DigitsWorkspace, str]) -> None:
    ws, url = deployed
    runner = CliRunner()

    def run(*args: str) -> tuple[int, str]:
        res = runner.invoke(cli, ["--workspace", str(ws.settings.root), *args], env=dict(VIA))
        return res.exit_code, res.output

    code, text = run("status", SERVICE, "--url")
    assert code == 0 and text == url + "\n", text
    assert httpx.get(f"{text.strip()}/health", timeout=10).status_code == 200  # curl $(... --url)/health
    code, text = run("status", SERVICE)
    assert code == 0 and SERVICE in text and url in text, text
    code, text = run("status", "nope")
    assert code == 2 and "no service 'nope'" in text and SERVICE in text, text
    code, text = run("status", "--url")
    assert code == 2 and "--url needs a SERVICE" in text, text
    code, text = run("status", SERVICE, "--json")
    one = json.loads(text)
    assert one["url"] == url and one["replicas"] == 2 and one["service"] == SERVICE
    code, text = run("status", "--json")
    everything = json.loads(text)
    assert [s["service"] for s in everything["services"]] == [SERVICE] and everything["agents"] == []
    code, text = run("events", "--service", SERVICE, "--json")
    deployed_event = next(e for e in json.loads(text) if e["kind"] == "deployed")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", deployed_event["time"])
    assert isinstance(deployed_event["ts"], float)
