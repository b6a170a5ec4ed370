"""The CLI: exit 0 on success, 1 when a run fails, 2 on bad input (and then nothing starts).

Every test runs both ways (issue 17): on the local workspace, and through a real `scanflow
server` on that workspace (`SCANFLOW_SERVER`, an admin's token) with the same assertions."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from scanflow.cli.main import app
from scanflow.store import Store
from support.control_server import control_server

SPEC = '''
app: demo
team: ds
workflows:
  ok:
    steps:
      - {name: hello, call: "steps:hello", params: {who: world}}
      - {name: bye, call: "steps:hello", params: {who: moon}, after: [hello]}
  broken:
    steps:
      - {name: fails, run: "python -c 'import sys; print(\\"bad luck\\"); sys.exit(4)'"}
  gated:
    steps:
      - {name: first, call: "steps:hello", params: {who: first}}
      - {name: gate, run: "python gate.py", after: [first]}
  chatty:
    steps:
      - {name: talk, run: "python talk.py", cache: false}
'''


@pytest.fixture
def spec(tmp_path: Path) -> Path:
    d = tmp_path / "app"
    d.mkdir()
    (d / "steps.py").write_text(textwrap.dedent('''
        def hello(who, ctx):
            ctx.log(f"hello {who}")
    '''))
    (d / "scanflow.yaml").write_text(SPEC)
    (d / "gate.py").write_text(textwrap.dedent('''
        import os, sys, time
        if os.path.exists("open"):
            sys.exit(0)
        if os.path.exists("slow"):
            time.sleep(60)
        sys.exit(9)
    '''))
    (d / "talk.py").write_text("import time\nfor i in range(5):\n    print('line', i, flush=True)\n"
                               "    time.sleep(0.3)\n")
    return d


BY_THE_TEST = {"by": "test"}  # runs a test starts on the engine itself, not through the CLI
_VIA: dict[str, str] = {}  # the environment that sends the CLI through the server, when it does


@pytest.fixture(autouse=True, params=["local", "remote"])
def way(request: pytest.FixtureRequest, settings) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """Run the test on the local workspace, then through a server on it."""
    if request.param == "local":
        yield "local"
        return
    with control_server(settings, teams=("ds",)) as srv:
        _VIA.update(srv.env())
        try:
            yield "remote"
        finally:
            _VIA.clear()
        # every run the CLI made went through the server: it records who asked for it
        runs = [r for r in Store(settings.store).list_runs(limit=1000) if r.trigger != BY_THE_TEST]
        assert all(r.trigger.get("by") == "person:root" for r in runs), [r.trigger for r in runs]


def cli(settings, *args: str) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    env = {"SCANFLOW_SERVER": "", "SCANFLOW_TOKEN": "", **_VIA}
    res = CliRunner().invoke(app, ["--workspace", str(settings.root), *args], env=env)
    return res.exit_code, res.output


def test_run_then_inspect(spec: Path, settings) -> None:  # type: ignore[no-untyped-def]
    code, out = cli(settings, "run", str(spec), "ok", "-p", "hello.who=you")
    assert code == 0, out
    assert "succeeded" in out
    run = Store(settings.store).list_runs()[0]
    code, out = cli(settings, "runs", "show", run.id[:10])
    assert code == 0 and "hello" in out and "bye" in out and "succeeded" in out
    code, out = cli(settings, "logs", run.id, "hello")
    assert code == 0 and "hello you" in out and "moon" not in out
    code, out = cli(settings, "runs", "list")
    assert code == 0 and run.id[:12] in out


def test_failed_run_exits_1_with_the_tail(spec: Path, settings) -> None:  # type: ignore[no-untyped-def]
    code, out = cli(settings, "run", str(spec), "broken")
    assert code == 1
    assert "exit code 4" in out and "bad luck" in out


@pytest.mark.parametrize("args, message", [
    (["run", "{spec}", "nope"], "no workflow 'nope'"),
    (["run", "{spec}", "ok", "-p", "who"], "expected name=value"),
    (["run", "{spec}", "ok", "-p", "ghost=1"], "unknown parameter"),
    (["run", "{spec}/missing.yaml", "ok"], "cannot read"),
    (["runs", "show", "deadbeef"], "no run 'deadbeef'"),
    (["logs", "deadbeef"], "no run 'deadbeef'"),
    (["scale", "ghost", "2"], "ghost"),
    (["scale", "ghost", "0"], "greater than or equal to 1"),
    (["rollout", "ghost"], "ghost"),
])
def test_bad_input_exits_2(spec: Path, settings, args: list[str], message: str) -> None:  # type: ignore[no-untyped-def]
    code, out = cli(settings, *[a.replace("{spec}", str(spec)) for a in args])
    assert code == 2, out
    assert message in out
    if args[0] == "run":
        assert Store(settings.store).list_runs() == []  # nothing started


def test_logs_unknown_step(spec: Path, settings) -> None:  # type: ignore[no-untyped-def]
    assert cli(settings, "run", str(spec), "ok")[0] == 0
    run = Store(settings.store).list_runs()[0]
    code, out = cli(settings, "logs", run.id, "nope")
    assert code == 2 and "has no step 'nope'" in out


def test_cache_key_is_shown_and_no_cache_reruns(spec: Path, settings) -> None:  # type: ignore[no-untyped-def]
    assert cli(settings, "run", str(spec), "ok")[0] == 0
    code, out = cli(settings, "run", str(spec), "ok")
    assert code == 0 and "cached" in out
    run = Store(settings.store).list_runs()[0]
    code, out = cli(settings, "runs", "show", run.id)
    assert "cached" in out and "cache key" in out
    key = Store(settings.store).list_steps(run.id)[0].cache_key
    assert key and key[:12] in out
    code, out = cli(settings, "run", str(spec), "ok", "--no-cache")
    assert code == 0 and "cached" not in out.replace("cache", "")


def test_resume_from_the_cli(spec: Path, settings) -> None:  # type: ignore[no-untyped-def]
    assert cli(settings, "run", str(spec), "gated")[0] == 1
    run = Store(settings.store).list_runs()[0]
    (spec / "open").write_text("1")
    code, out = cli(settings, "resume", run.id[:12])
    assert code == 0, out
    assert Store(settings.store).get_run(run.id).status == "succeeded"  # type: ignore[union-attr]
    code, out = cli(settings, "resume", run.id)
    assert code == 2 and "is succeeded" in out


def test_cancel_and_follow_from_the_cli(spec: Path, settings) -> None:  # type: ignore[no-untyped-def]
    import threading
    import time

    from scanflow.engine import LocalEngine
    from scanflow.spec import load_application

    app = load_application(spec)
    eng = LocalEngine(settings, Store(settings.store))
    talk = eng.submit(app, "chatty", trigger=BY_THE_TEST, status="running")
    box: dict[str, object] = {}
    t = threading.Thread(target=lambda: box.update(r=eng.execute(talk, app)))
    t.start()
    code, out = cli(settings, "logs", talk, "--follow")  # returns when the run ends
    t.join(30)
    assert code == 0 and all(f"line {i}" in out for i in range(5))

    (spec / "slow").write_text("1")
    gated = eng.submit(app, "gated", trigger=BY_THE_TEST, status="running")
    t = threading.Thread(target=lambda: box.update(r=eng.execute(gated, app)))
    t.start()
    deadline = time.time() + 30
    while time.time() < deadline and not any(
        s.step == "gate" and s.status == "running" for s in Store(settings.store).list_steps(gated)
    ):
        time.sleep(0.1)
    code, out = cli(settings, "cancel", gated)
    assert code == 0 and "cancelling" in out
    t.join(30)
    assert box["r"].status == "cancelled"  # type: ignore[attr-defined]
    assert cli(settings, "cancel", "nope")[0] == 2


BAD_FILES = {
    "binary": (b"\x7fELF\x02\x01\x01\x00\x00\x00\xff\xfe", "a binary file, not a YAML spec"),
    "latin-1": ("app: café\nteam: ds\n".encode("latin-1"), "not UTF-8 text (byte 0xe9 at line 1)"),
    "invalid YAML": (b"app: [demo\nteam: ds\n", "invalid YAML"),
    "a control character": (b"app: demo\nteam: \x07\n", "line 2: invalid YAML: character #x0007"),
    "a list": (b"- app: demo\n- team: ds\n", "a spec is a YAML mapping (app:, team:, ...), got a list"),
    "empty": (b"\n", "the file is empty"),
}


@pytest.mark.parametrize("kind, command", [
    *[(kind, command) for kind in sorted(BAD_FILES)
      for command in (["validate"], ["run", "{file}", "ok"], ["agents", "start"])],
    ("binary", ["deploy"]),  # (deploy reads the MLflow registry first: one case is enough)
])
def test_a_spec_file_that_is_not_yaml_is_exit_2_naming_it(  # type: ignore[no-untyped-def]
        tmp_path: Path, settings, kind: str, command: list[str]) -> None:
    content, problem = BAD_FILES[kind]
    f = tmp_path / "scanflow.yaml"
    f.write_bytes(content)
    args = [a.replace("{file}", str(f)) for a in command]
    res = CliRunner().invoke(app, ["--workspace", str(settings.root), *args,
                                   *([] if "{file}" in command else [str(f)])])
    assert res.exit_code == 2, (res.output, res.exception)
    text = " ".join(res.output.split())
    assert text.startswith(f"{f}: ") and problem in text.splitlines()[0]
    assert "Traceback" not in res.output


def test_a_binary_spec_is_one_line_on_stderr_from_the_installed_command(tmp_path: Path) -> None:
    f = tmp_path / "model.bin"
    f.write_bytes(bytes(range(256)))
    res = subprocess.run([str(Path(sys.executable).parent / "scanflow"), "validate", str(f)],
                         capture_output=True, text=True, timeout=60, env={
                             **os.environ, "COLUMNS": "200", "SCANFLOW_WORKSPACE": str(tmp_path / "ws")})
    assert res.returncode == 2
    assert res.stderr.splitlines()[0] == f"{f}: a binary file, not a YAML spec"
    assert "Traceback" not in res.stderr and res.stdout == ""


def test_runs_list_and_show_as_json(spec: Path, settings) -> None:  # type: ignore[no-untyped-def]
    import json
    import re

    assert cli(settings, "run", str(spec), "ok")[0] == 0
    code, out = cli(settings, "runs", "list", "--json")
    assert code == 0, out
    [run] = json.loads(out)
    assert run["workflow"] == "ok" and run["status"] == "succeeded"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", run["started_at"])
    assert isinstance(run["started_at_ts"], float)
    code, out = cli(settings, "runs", "show", run["id"][:10], "--json")
    assert code == 0, out
    shown = json.loads(out)
    assert shown["id"] == run["id"] and [s["step"] for s in shown["steps"]] == ["hello", "bye"]
    assert all(s["status"] == "succeeded" and s["ended_at"].endswith("Z") for s in shown["steps"])


def test_db_current_and_upgrade_name_the_store_they_read(settings, way: str) -> None:  # type: ignore[no-untyped-def]
    from scanflow.store.migrate import HEAD

    Store(settings.store).close()  # the workspace's store exists, at head
    code, out = cli(settings, "db", "current", "--check")
    assert code == 0 and f"{HEAD} (head)" in out, out
    assert ("the sqlite store of the server at http://127.0.0.1:" in out) == (way == "remote"), out
    code, out = cli(settings, "db", "upgrade")
    assert code == 0 and f"already at head ({HEAD})" in out, out
