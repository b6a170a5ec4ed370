"""The control-plane server on a real uvicorn on 127.0.0.1, with a real model server behind it:
every mutating endpoint refuses a missing, expired or revoked token (401), another team and a
viewer (403), and does its work for the role it needs; `/labels` on the model server needs a
token allowed `label` there; tokens never reach logs, events or error messages."""

from __future__ import annotations

import logging
import re
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from scanflow.server.app import create_app
from scanflow.spec.access import Role
from support.serving import DigitsWorkspace, digits_workspace, stop_everything  # noqa: F401
from support.waiting import wait_for

SPEC = '''
app: shop
team: data
workflows:
  hello:
    steps:
      - {name: hello, call: "steps:hello", params: {who: world}}
  broken:
    steps:
      - {name: fails, run: "python -c 'import sys; sys.exit(3)'"}
services:
  shop-digits:
    model: digits
    alias: champion
    replicas: 1
agents:
  clerk:
    role: monitor
    imports: [parts]
    sensors:
      - name: tick
        triggers: [{interval: 1h}]
        actuators: [{func: note, params: {path: NOTES}}]
'''

PARTS = '''
from scanflow.agents import actuator

@actuator("note")
def note(obs, ctx, path):
    with open(path, "a") as f:
        f.write(f"{ctx.sensor}\\n")
    return {"noted": True}
'''


@dataclass
class Server:
    url: str
    tokens: dict[str, str]  # who -> token
    spec: Path
    ws: DigitsWorkspace
    app: Any
    log: list[str]

    def call(self, method: str, path: str, who: str | None, body: Any = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.tokens[who]}"} if who else {}
        return httpx.request(method, f"{self.url}{path}", json=body, headers=headers, timeout=120)


class _Captured(logging.Handler):
    def __init__(self, sink: list[str]) -> None:
        super().__init__(logging.DEBUG)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(self.format(record))


def _identities(store: Any) -> dict[str, str]:
    ids = store.identities
    for team in ("data", "science"):
        ids.create_team(team)
    people = {"root": None, "olga": ("data", Role.owner), "oscar": ("data", Role.operator),
              "vera": ("data", Role.viewer), "sam": ("science", Role.owner)}
    tokens = {}
    for name, role in people.items():
        ids.create_user(name, admin=name == "root")
        if role:
            ids.set_role(name, *role)
        tokens[name] = ids.create_token(name)[1]
    tokens["expired"] = ids.create_token("oscar", expires_at=time.time() - 1)[1]
    revoked_id, tokens["revoked"] = ids.create_token("oscar")
    ids.revoke_token(revoked_id)
    tokens["labeller"] = ids.create_token("oscar", scopes=["label:shop-digits"])[1]
    ids.create_team("fuzz")  # the schemathesis test's own: whatever it changes stays there
    ids.create_user("fuzzer")
    ids.set_role("fuzzer", "fuzz", Role.owner)
    tokens["fuzzer"] = ids.create_token("fuzzer")[1]
    tokens["other-scope"] = ids.create_token("oscar", scopes=["label:elsewhere"])[1]
    return tokens


@pytest.fixture(scope="module")
def server(digits_workspace: DigitsWorkspace, tmp_path_factory: pytest.TempPathFactory,  # noqa: F811
           ) -> Iterator[Server]:
    spec = tmp_path_factory.mktemp("shop") / "app"
    spec.mkdir()
    (spec / "scanflow.yaml").write_text(SPEC.replace("NOTES", str(spec / "notes.txt")))
    (spec / "parts.py").write_text(PARTS)
    (spec / "steps.py").write_text(textwrap.dedent('''
        def hello(who, ctx):
            ctx.log(f"hello {who}")
    '''))
    settings = digits_workspace.settings.model_copy(update={"auth_failure_limit": 10_000})
    tokens = _identities(digits_workspace.store)
    captured: list[str] = []
    handler = _Captured(captured)
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.DEBUG)
    app = create_app(settings, max_runs=2)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="debug", access_log=True)
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    wait_for(lambda: srv.started, 30, what="the server started")
    port = srv.servers[0].sockets[0].getsockname()[1]
    try:
        yield Server(f"http://127.0.0.1:{port}", tokens, spec, digits_workspace, app, captured)
    finally:
        srv.should_exit = True
        thread.join(timeout=30)
        root.removeHandler(handler)
        root.setLevel(old_level)
        from scanflow.agents.process import AgentSupervisor
        from scanflow.serving.deployer import LocalDeployer

        AgentSupervisor(settings, digits_workspace.store).stop()
        stop_everything(LocalDeployer(settings, digits_workspace.store), digits_workspace.store)


def _refusals(server: Server, method: str, path: str, body: Any, allowed: str) -> None:
    """The four refusals every mutating endpoint makes, before the allowed call."""
    for who, code in ((None, 401), ("expired", 401), ("revoked", 401), ("sam", 403)):
        r = server.call(method, path, who, body)
        assert r.status_code == code, (method, path, who, r.status_code, r.text)
        err = r.json()["error"]
        assert err["code"] and err["message"], r.text
    if Role[allowed] > Role.viewer:
        r = server.call(method, path, "vera", body)
        assert r.status_code == 403, (method, path, "viewer", r.text)
        assert r.json()["error"]["code"] == "forbidden"
    if allowed == "owner":
        r = server.call(method, path, "oscar", body)
        assert r.status_code == 403, (method, path, "operator", r.text)


def test_every_mutating_endpoint_checks_identity_and_role(server: Server) -> None:
    s = server
    # register the application (owner), then deploy its service (operator)
    _refusals(s, "POST", "/api/v1/apps", {"path": str(s.spec)}, "owner")
    r = s.call("POST", "/api/v1/apps", "olga", {"path": str(s.spec)})
    assert r.status_code == 201, r.text
    assert r.json()["team"] == "data" and r.json()["services"] == ["shop-digits"]
    _refusals(s, "POST", "/api/v1/services/shop-digits/deploy", {"app": "shop"}, "operator")
    r = s.call("POST", "/api/v1/services/shop-digits/deploy", "oscar", {"app": "shop"})
    assert r.status_code == 201, r.text
    assert r.json()["model_version"] == "1" and r.json()["status"] == "running"

    # runs: submit (operator), then the queue runs it; a failing run resumes (operator)
    _refusals(s, "POST", "/api/v1/runs", {"app": "shop", "workflow": "hello"}, "operator")
    run = s.call("POST", "/api/v1/runs", "oscar", {"app": "shop", "workflow": "hello"}).json()
    assert run["status"] == "queued" and run["trigger"]["by"] == "person:oscar"
    done = wait_for(lambda: (x := s.call("GET", f"/api/v1/runs/{run['id']}", "vera").json())
                    ["status"] in {"succeeded", "failed"} and x, 120, what="the queued run ended")
    assert done["status"] == "succeeded" and [st["step"] for st in done["steps"]] == ["hello"]
    from mlflow import MlflowClient

    tags = MlflowClient(tracking_uri=s.ws.settings.tracking).get_run(done["mlflow_run_id"]).data.tags
    assert tags["scanflow.by"] == "person:oscar" and tags["scanflow.team"] == "data"
    logs = s.call("GET", f"/api/v1/runs/{run['id']}/logs", "vera")
    assert logs.status_code == 200 and "hello world" in logs.text
    bad = s.call("POST", "/api/v1/runs", "oscar", {"app": "shop", "workflow": "broken"}).json()
    wait_for(lambda: s.call("GET", f"/api/v1/runs/{bad['id']}", "oscar").json()["status"] == "failed",
             120, what="the broken run failed")
    _refusals(s, "POST", f"/api/v1/runs/{bad['id']}/resume", None, "operator")
    before = s.call("GET", f"/api/v1/runs/{bad['id']}", "oscar").json()["steps"][0]["ended_at"]
    r = s.call("POST", f"/api/v1/runs/{bad['id']}/resume", "oscar")
    assert r.status_code == 202, r.text

    def resumed() -> bool:
        again = s.call("GET", f"/api/v1/runs/{bad['id']}", "oscar").json()
        return again["status"] == "failed" and again["steps"][0]["ended_at"] > before

    wait_for(resumed, 120, what="the resumed run ran its step again")
    _refusals(s, "POST", f"/api/v1/runs/{bad['id']}/cancel", None, "operator")

    # service operations, each as the least role that may
    svc = "/api/v1/services/shop-digits"
    for op, body, role in (("scale", {"replicas": 2}, "operator"),
                           ("canary", {"version": "2", "share": 0.2}, "operator"),
                           ("canary", {"version": None}, "operator"),
                           ("shadow", {"version": "2"}, "operator"),
                           ("shadow", {"version": None}, "operator"),
                           ("rollout", {"version": "2", "reason": "test"}, "operator"),
                           ("rollback", {"reason": "worse"}, "owner"),
                           ("scale", {"replicas": 1}, "operator")):
        _refusals(s, "POST", f"{svc}/{op}", body, role)
        who = "oscar" if role == "operator" else "olga"
        r = s.call("POST", f"{svc}/{op}", who, body)
        assert r.status_code == 200, (op, r.text)
    status = s.call("GET", svc, "vera").json()
    assert status["model_version"] == "1" and status["replicas"] == 1
    # who acted is in the audit trail, by name
    events = s.call("GET", "/api/v1/events?service=shop-digits&kind=rolled_back", "vera").json()
    assert events["items"] and events["items"][-1]["payload"]["approved_by"] == "person:olga"
    # promote (owner), force only for owners too
    _refusals(s, "POST", f"{svc}/promote", {"version": "2"}, "owner")
    r = s.call("POST", f"{svc}/promote", "olga", {"version": "2", "force": True, "reason": "test"})
    assert r.status_code == 200, r.text
    assert r.json()["promoted"] and r.json()["served_version"] == "2"
    _refusals(s, "POST", f"{svc}/stop", None, "owner")
    # the admin may do anything in any team
    assert s.call("POST", f"{svc}/scale", "root", {"replicas": 1}).status_code == 200

    # identities: teams and users are an admin's; roles and grants in a team its owner's;
    # a token its user's (or an admin's)
    for path, body in (("/api/v1/admin/teams", {"name": "extra"}),
                       ("/api/v1/admin/users", {"name": "newbie"})):
        _refusals(s, "POST", path, body, "owner")
        assert s.call("POST", path, "olga", body).status_code == 403  # an owner is no admin
        assert s.call("POST", path, "root", body).status_code == 201
    for method, path, body, ok in (
            ("PUT", "/api/v1/admin/teams/data/roles/newbie", {"role": "viewer"}, 200),
            ("POST", "/api/v1/admin/teams/data/grants", {"to": "extra"}, 201),
            ("POST", "/api/v1/admin/tokens", {"user": "olga", "note": "matrix"}, 201)):
        _refusals(s, method, path, body, "owner")
        r = s.call(method, path, "olga", body)
        assert r.status_code == ok, (path, r.text)
    made = r.json()
    assert made["token"].startswith(f"sft_{made['id']}_") and made["user"] == "olga"
    _refusals(s, "DELETE", f"/api/v1/admin/tokens/{made['id']}", None, "owner")
    assert s.call("DELETE", f"/api/v1/admin/tokens/{made['id']}", "olga").json()["revoked_at"]
    r = httpx.get(f"{s.url}/api/v1/runs", headers={"Authorization": f"Bearer {made['token']}"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "token_revoked"


def test_labels_on_the_model_server_need_a_label_token(server: Server) -> None:
    s = server
    dep = s.call("GET", "/api/v1/services/shop-digits", "vera").json()
    url = dep["url"]
    pred = httpx.post(f"{url}/predict", json={"instances": s.ws.X[:2].tolist()}, timeout=30,
                      headers={"X-Request-ID": "lab"})
    assert pred.status_code == 200, pred.text
    body = {"labels": {"lab-0": 1}}

    def label(who: str | None) -> httpx.Response:
        h = {"Authorization": f"Bearer {s.tokens[who]}"} if who else {}
        return httpx.post(f"{url}/labels", json=body, headers=h, timeout=30)

    assert label(None).status_code == 401
    assert label("revoked").status_code == 401
    assert label("vera").status_code == 403  # a viewer
    assert label("sam").status_code == 403  # another team
    assert label("other-scope").status_code == 403  # scoped to another service
    ok = label("labeller")
    assert ok.status_code == 200 and ok.json()["count"] == 1, ok.text


def test_reads_are_filtered_to_the_teams_a_user_may_read(server: Server) -> None:
    s = server
    assert s.call("GET", "/api/v1/runs", "sam").json()["items"] == []
    assert s.call("GET", "/api/v1/services", "sam").json() == []
    r = s.call("GET", "/api/v1/services/shop-digits", "sam")
    assert r.status_code == 403
    # a grant from data lets science read, not act
    s.ws.store.identities.grant_read("data", "science")
    time.sleep(0)  # tokens are checked on every request: no cache to wait out here
    assert s.call("GET", "/api/v1/services/shop-digits", "sam").status_code == 200
    assert s.call("GET", "/api/v1/runs", "sam").json()["items"]
    assert s.call("POST", "/api/v1/services/shop-digits/scale", "sam",
                  {"replicas": 1}).status_code == 403
    # pagination: one run per page, the cursor walks them all, newest first
    seen, cursor = [], None
    while True:
        page = s.call("GET", "/api/v1/runs?limit=1" + (f"&cursor={cursor}" if cursor else ""),
                      "vera").json()
        seen += [r["id"] for r in page["items"]]
        cursor = page["next"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) == len(s.call("GET", "/api/v1/runs", "vera").json()["items"])


def test_a_specs_code_runs_only_for_a_caller_whose_role_allows_it(
    server: Server, tmp_path: Path
) -> None:
    """Registering or validating imports a spec's step code, which runs it: not for someone
    outside the spec's team (the YAML alone is read, to learn the team)."""
    s = server
    evil = tmp_path / "evil"
    evil.mkdir()
    ran = tmp_path / "it-ran"
    (evil / "scanflow.yaml").write_text(textwrap.dedent('''
        app: shop
        team: data
        workflows:
          w:
            steps:
              - {name: s, call: "trap:step"}
    '''))
    (evil / "trap.py").write_text(f"open({str(ran)!r}, 'w').write('x')\ndef step(ctx):\n    pass\n")
    r = s.call("POST", "/api/v1/apps", "sam", {"path": str(evil)})
    assert r.status_code == 403 and not ran.exists()
    r = s.call("POST", "/api/v1/apps/validate", "sam", {"path": str(evil)})
    assert r.status_code == 200 and r.json()["team"] == "data" and not ran.exists()
    r = s.call("POST", "/api/v1/apps/validate", "oscar", {"path": str(evil)})  # data's operator
    assert r.status_code == 200 and r.json()["ok"] and ran.exists()


def test_bad_bodies_are_a_4xx_in_the_one_error_shape(server: Server) -> None:
    s = server
    for method, path, body in (("POST", "/api/v1/services/shop-digits/scale", {"replicas": 0}),
                               ("POST", "/api/v1/services/shop-digits/scale", {"replicas": "x"}),
                               ("POST", "/api/v1/services/shop-digits/scale", {"bogus": 1}),
                               ("POST", "/api/v1/runs", {"app": "nope", "workflow": "x"}),
                               ("POST", "/api/v1/apps", {"path": "/definitely/not/here"}),
                               ("GET", "/api/v1/runs/nope", None),
                               ("GET", "/api/v1/runs?limit=0", None)):
        r = s.call(method, path, "root", body)
        assert 400 <= r.status_code < 500, (path, body, r.status_code, r.text)
        err = r.json()["error"]
        assert err["code"] in {"invalid_request", "not_found"} and err["message"], r.text
    assert "replicas" in s.call("POST", "/api/v1/services/shop-digits/scale", "root",
                                {"replicas": 0}).json()["error"]["message"]


def test_tokens_never_appear_in_logs_events_or_errors(server: Server) -> None:
    s = server
    # bad and good tokens all went through the server and the model server above
    r = s.call("GET", "/api/v1/runs", "expired")
    assert r.status_code == 401 and s.tokens["expired"] not in r.text
    haystacks = ["\n".join(s.log), *(
        p.read_text(errors="replace") for p in s.ws.settings.root.rglob("*")
        if p.is_file() and p.suffix in {".log", ".json", ".yaml", ".txt", ""}
        and p.stat().st_size < 20_000_000)]
    with s.ws.store.session() as sess:
        from sqlalchemy import text

        for table in ("events", "decisions", "workflow_runs", "step_runs", "deployments"):
            haystacks.append(str(sess.execute(text(f"SELECT * FROM {table}")).all()))
    assert len(s.log) > 10  # the capture saw the server's own logging
    for name, token in s.tokens.items():
        secret = token[21:]  # sft_ + 16 hex + _
        for hay in haystacks:
            assert secret not in hay, f"{name}'s token leaked"


def test_openapi_types_every_operation(server: Server) -> None:
    doc = httpx.get(f"{server.url}/openapi.json", timeout=30).json()
    assert doc["openapi"].startswith("3.")
    ops = [(p, m, o) for p, item in doc["paths"].items() for m, o in item.items()]
    assert len(ops) >= 20
    for path, method, op in ops:
        ok = [c for c in op["responses"] if c.startswith("2")]
        assert ok, (path, method)
        if path != "/api/v1/runs/{run_id}/logs":
            assert "application/json" in op["responses"][ok[0]].get("content", {}), (path, method)
        if path != "/health":
            assert "401" in op["responses"] or "403" in op["responses"], (path, method)


def test_failed_logins_are_rate_limited(server: Server) -> None:
    from scanflow.server.auth import FailedLogins

    s = server
    s.app.state.failed_logins = FailedLogins(limit=5, window=60)
    try:
        codes = [s.call("GET", "/api/v1/runs", "revoked").status_code for _ in range(7)]
        assert codes[:5] == [401] * 5 and codes[5:] == [429, 429]
        r = s.call("GET", "/api/v1/runs", "vera")
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1  # the address waits
    finally:
        s.app.state.failed_logins = FailedLogins(limit=10_000)


def _cli(server: Server, *args: str, who: str | None = None,
         env_extra: dict[str, str] | None = None) -> tuple[int, str]:
    """The CLI in this process: through the server as `who`, or locally on the workspace."""
    from typer.testing import CliRunner

    from scanflow.cli.main import app

    env = {"SCANFLOW_WORKSPACE": str(server.ws.settings.root), "SCANFLOW_SERVER": "",
           "SCANFLOW_TOKEN": ""}
    if who is not None:
        env.update(SCANFLOW_SERVER=server.url, SCANFLOW_TOKEN=server.tokens[who],
                   SCANFLOW_WORKSPACE=str(server.ws.settings.root / "elsewhere"))
    res = CliRunner().invoke(app, list(args), env={**env, **(env_extra or {})})
    return res.exit_code, res.output


def test_the_cli_through_the_server_prints_what_it_prints_locally(server: Server) -> None:
    import json

    s = server
    for args in (["runs", "list", "--json"], ["events", "--service", "shop-digits", "--json"],
                 ["decisions", "--json"], ["why", "shop-digits", "--json"]):
        local_code, local = _cli(s, *args)
        remote_code, remote = _cli(s, *args, who="root")
        assert local_code == remote_code == 0, (args, local, remote)
        assert json.loads(remote) == json.loads(local), args
    run_id = json.loads(_cli(s, "runs", "list", "--json")[1])[0]["id"]
    local, remote = _cli(s, "runs", "show", run_id, "--json"), _cli(s, "runs", "show", run_id,
                                                                     "--json", who="vera")
    assert local[0] == remote[0] == 0
    drop = {"log_path"}  # where the step's log is: the server's path, the same here
    assert {k: v for k, v in json.loads(remote[1]).items() if k not in drop} == \
        {k: v for k, v in json.loads(local[1]).items() if k not in drop}
    assert _cli(s, "runs", "show", run_id)[1] == _cli(s, "runs", "show", run_id, who="vera")[1]
    hello = next(r["id"] for r in json.loads(_cli(s, "runs", "list", "--json")[1])
                 if r["workflow"] == "hello")
    local_logs = _cli(s, "logs", hello)
    assert local_logs[0] == 0 and "hello world" in local_logs[1]
    assert _cli(s, "logs", hello, who="vera") == local_logs
    assert _cli(s, "logs", hello, "hello", "--follow", who="vera")[1] == \
        _cli(s, "logs", hello, "hello", "--follow")[1]
    # the same service status, the same table
    assert _cli(s, "status", "shop-digits", "--url") == _cli(s, "status", "shop-digits", "--url",
                                                             who="vera")
    # an action: allowed for the operator, exit 2 with the reason for a viewer, as bad input is
    code, text = _cli(s, "scale", "shop-digits", "2", who="oscar")
    assert code == 0 and "shop-digits: 2 replica(s)" in text
    code, text = _cli(s, "scale", "shop-digits", "1", who="vera")
    assert code == 2 and "needs operator" in text and "viewer" in text
    assert _cli(s, "scale", "nope", "1", who="oscar")[0] == _cli(s, "scale", "nope", "1")[0] == 2
    # the platform's bound on replicas (SCANFLOW_MAX_REPLICAS, 16 by default), both ways
    for who in ("oscar", None):
        code, text = _cli(s, "scale", "shop-digits", "17", who=who)
        assert code == 2 and "17 replicas is more than this platform allows (16" in text, text
    code, text = _cli(s, "rollback", "shop-digits", who="olga")
    assert code == 0 and "rolled back to version" in text
    assert _cli(s, "scale", "shop-digits", "1", who="oscar")[0] == 0
    # a run through the server, waited for, its exit code as locally
    code, text = _cli(s, "run", str(s.spec), "broken", who="oscar")
    assert code == 1 and "failed" in text
    code, text = _cli(s, "run", str(s.spec), "hello", who="oscar")
    assert code == 0 and "succeeded" in text
    # resume: the failed run is tried again in the server and fails again, exit 1 as locally
    broken = next(r["id"] for r in json.loads(_cli(s, "runs", "list", "--json")[1])
                  if r["workflow"] == "broken")
    code, text = _cli(s, "resume", broken, who="vera")
    assert code == 2 and "needs operator" in text
    code, text = _cli(s, "resume", broken, who="oscar")
    assert code == 1 and f"run {broken} failed" in text, text
    (again,) = [r for r in json.loads(_cli(s, "runs", "list", "--json")[1]) if r["id"] == broken]
    assert again["status"] == "failed"
    local_code, local_text = _cli(s, "resume", broken)
    assert local_code == 1 and f"run {broken} failed" in local_text
    # validate: the same line for a good spec, the same problems and exit 2 for a bad one
    assert _cli(s, "validate", str(s.spec), who="vera") == _cli(s, "validate", str(s.spec))
    bad = s.spec.parent / "bad"
    bad.mkdir(exist_ok=True)
    (bad / "scanflow.yaml").write_text("app: shop\nteam: shop\nworkflows:\n  w:\n    steps:\n"
                                        "      - {name: a, run: 'true', after: [nowhere]}\n")
    remote_bad, local_bad = _cli(s, "validate", str(bad), who="vera"), _cli(s, "validate", str(bad))
    assert remote_bad == local_bad and remote_bad[0] == 2 and "nowhere" in remote_bad[1]
    # a wrong token: exit 2, and the token is not echoed
    s.tokens["bogus"] = "sft_0123456789abcdef_" + "x" * 43
    code, text = _cli(s, "runs", "list", who="bogus")
    assert code == 2 and "unknown token" in text and "x" * 43 not in text


@pytest.mark.slow
@pytest.mark.parametrize("who", ["fuzzer", None])
def test_schemathesis_finds_no_5xx_and_every_answer_matches_its_schema(
    server: Server, who: str | None, tmp_path: Path
) -> None:
    """Every operation of /openapi.json, fuzzed with a valid token and with none: no 5xx, and
    every answer (codes and bodies) as the document says. The token is that of the owner of a
    team of its own that owns nothing here: with the admin's, the fuzzer finds the real
    service's name in a list and scales it (seen), which tests the machine, not the API; with
    another test's user's, it revokes that user's token and changes their roles in their team
    (seen: they are that user's to change), which the later tests would trip on."""
    import os
    import subprocess
    import sys

    exe = Path(sys.executable).with_name("schemathesis")
    cmd = [str(exe), "run", f"{server.url}/openapi.json", "--checks",
           "not_a_server_error,status_code_conformance,content_type_conformance,"
           "response_schema_conformance", "--max-examples", "8", "--phases",
           "examples,coverage,fuzzing", "--workers", "2", "--seed", "1",
           "--suppress-health-check", "all", "--exclude-path-regex", r".*/(stop|deploy)$"]
    if who is not None:
        cmd += ["-H", f"Authorization: Bearer {server.tokens[who]}"]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "", "NO_COLOR": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    tail = (res.stdout + res.stderr)[-6000:]
    assert res.returncode == 0, tail
    tested = re.search(r"Tested: (\d+)", res.stdout)
    assert tested and int(tested.group(1)) >= 23, tail  # every operation but stop and deploy
    for token in server.tokens.values():
        assert token not in res.stdout  # the report prints requests: not our tokens' answers


@pytest.mark.slow
def test_twenty_clients_mixing_reads_and_actions_get_no_5xx_and_leave_consistent_state(
    server: Server,
) -> None:
    """20 clients for 60 s: reads of every list, runs submitted, the service scaled 1 <-> 2 by
    several at once (the lease lets one act; the others are told 409 lease_busy). No 5xx; every
    accepted run is in the store once and ends; the service has the replicas it reports."""
    import random

    s = server
    stop = time.monotonic() + 60
    codes: dict[int, int] = {}
    submitted: list[str] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        rnd = random.Random(i)
        who = ("oscar", "vera", "olga", "root")[i % 4]
        runs = scales = 0  # each client submits 2 runs and scales 3 times, at random moments
        with httpx.Client(base_url=s.url, timeout=120,
                          headers={"Authorization": f"Bearer {s.tokens[who]}"}) as c:
            while time.monotonic() < stop:
                pick = rnd.random()
                if pick < 0.98 or (runs >= 2 and scales >= 3):
                    r = c.get(rnd.choice(["/api/v1/runs", "/api/v1/services", "/api/v1/events",
                                          "/api/v1/decisions", "/api/v1/services/shop-digits"]))
                elif pick < 0.99 and runs < 2 or scales >= 3:
                    runs += 1
                    r = c.post("/api/v1/runs", json={"app": "shop", "workflow": "hello"})
                    if r.status_code == 202:
                        with lock:
                            submitted.append(r.json()["id"])
                else:
                    scales += 1
                    r = c.post("/api/v1/services/shop-digits/scale",
                               json={"replicas": rnd.choice([1, 2])})
                with lock:
                    codes[r.status_code] = codes.get(r.status_code, 0) + 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not [c for c in codes if c >= 500], codes
    assert codes.get(200, 0) + codes.get(202, 0) > 100, codes
    assert set(codes) <= {200, 202, 403, 409}, codes  # 403: the viewer's actions
    assert len(submitted) == len(set(submitted)) > 0
    with s.ws.store.session() as sess:
        from sqlalchemy import text

        rows = sess.execute(text("SELECT id FROM workflow_runs")).scalars().all()
    assert set(submitted) <= set(rows) and len(rows) == len(set(rows))

    def ended() -> bool:
        states = {s.call("GET", f"/api/v1/runs/{rid}", "root").json()["status"]
                  for rid in submitted}
        return states <= {"succeeded"}

    wait_for(ended, 300, interval=1, what="the queued runs ran")
    status = s.call("GET", "/api/v1/services/shop-digits", "root").json()
    serving = [w for w in status["workers"] if w["ready"] and not w["draining"]]
    wait_for(lambda: len([w for w in s.call("GET", "/api/v1/services/shop-digits", "root").json()
                          ["workers"] if w["ready"] and not w["draining"]]) == status["replicas"],
             60, what=f"the service serving the {status['replicas']} replica(s) it reports "
             f"(had {len(serving)})")


def test_agents_are_started_steered_and_stopped_by_their_teams_owners(server: Server) -> None:
    import json

    s = server
    _refusals(s, "POST", "/api/v1/agents/start", {"app": "shop"}, "owner")
    r = s.call("POST", "/api/v1/agents/start", "olga", {"app": "shop"})
    assert r.status_code == 201, r.text
    assert set(r.json()) == {"clerk"}
    listed = {a["name"]: a for a in s.call("GET", "/api/v1/agents", "vera").json()}
    assert listed["clerk"]["team"] == "data" and listed["clerk"]["status"] == "running"
    ids = s.ws.store.identities
    ids.create_team("ops")
    ids.create_user("tess")
    ids.set_role("tess", "ops", Role.owner)
    s.tokens["tess"] = ids.create_token("tess")[1]
    assert s.call("GET", "/api/v1/agents", "tess").json() == []  # another team's agents
    for path in ("/api/v1/agents/clerk/pause", "/api/v1/agents/clerk/sensors/tick/fire",
                 "/api/v1/agents/clerk/stop"):
        _refusals(s, "POST", path, None, "owner")
    r = s.call("POST", "/api/v1/agents/clerk/sensors/tick/fire", "olga")
    assert r.status_code == 200 and r.json()["observations"] >= 1, r.text
    assert "tick" in (s.spec / "notes.txt").read_text()
    assert s.call("POST", "/api/v1/agents/clerk/pause", "olga").json()["paused"] == ["tick"]
    r = s.call("POST", "/api/v1/agents/clerk/sensors/nope/fire", "olga")
    assert r.status_code == 404 and "nope" in r.json()["error"]["message"]
    # the agents commands through the server print what they print here
    for args in (["agents", "status", "clerk"], ["agents", "status", "clerk", "--json"]):
        local, remote = _cli(s, *args), _cli(s, *args, who="vera")
        assert local[0] == remote[0] == 0 and local[1] == remote[1], (args, local, remote)
    listed = _cli(s, "agents", "list", "--json", who="vera")
    assert listed[0] == 0
    assert [r["name"] for r in json.loads(listed[1])] == \
        [r["name"] for r in json.loads(_cli(s, "agents", "list", "--json")[1])]
    code, text = _cli(s, "agents", "resume", "clerk", who="vera")
    assert code == 2 and "needs owner" in text
    code, text = _cli(s, "agents", "resume", "clerk", "tick", who="olga")
    assert code == 0 and "clerk/tick: resumed" in text
    code, text = _cli(s, "agents", "pause", "clerk", "tick", who="olga")
    assert code == 0 and "clerk/tick: paused" in text
    assert s.call("POST", "/api/v1/agents/clerk/stop", "olga").json() == ["clerk"]
    wait_for(lambda: {a["name"]: a for a in s.call("GET", "/api/v1/agents", "vera").json()}
             ["clerk"]["status"] == "stopped", 60, what="the agent stopped")


def test_an_application_uploaded_as_a_zip_is_registered_and_runs_from_the_servers_copy(
    server: Server, tmp_path: Path,
) -> None:
    """A client whose files the server cannot see uploads the application's folder; the server
    keeps its own copy, registers it for the owner of the spec's team, and runs from it."""
    import io
    import json
    import zipfile

    from scanflow.cli.packaging import pack_spec

    s = server
    folder = tmp_path / "laptop" / "report"
    folder.mkdir(parents=True)
    (folder / "scanflow.yaml").write_text(
        "app: report\nteam: data\nworkflows:\n  hello:\n    steps:\n"
        "      - {name: hello, call: 'steps:hello', params: {who: upload}}\n")
    (folder / "steps.py").write_text("def hello(who, ctx):\n    ctx.log(f'hello {who}')\n")
    (folder / ".venv").mkdir()
    (folder / ".venv" / "big.bin").write_bytes(b"0" * 1000)  # left out of the package
    package, name = pack_spec(folder)
    assert name == "scanflow.yaml"
    assert ".venv/big.bin" not in zipfile.ZipFile(io.BytesIO(package)).namelist()

    def upload(who: str | None, body: bytes = package, spec: str = "scanflow.yaml",
               ctype: str = "application/zip") -> httpx.Response:
        headers = {"content-type": ctype, **({"Authorization": f"Bearer {s.tokens[who]}"} if who else {})}
        return httpx.post(f"{s.url}/api/v1/apps/package", params={"spec": spec}, content=body,
                          headers=headers, timeout=60)

    for who in (None, "expired", "revoked"):
        assert upload(who).status_code == 401, who
    assert upload("vera").status_code == 403  # owns no team: nothing is even unpacked
    assert upload("oscar").status_code == 403  # an operator registers nothing
    r = upload("sam")  # owns science, not data
    assert r.status_code == 403 and "needs owner" in r.json()["error"]["message"]
    assert upload("olga", b"not a zip").json()["error"]["code"] == "invalid_request"
    assert upload("olga", spec="../scanflow.yaml").status_code == 422
    assert upload("olga", ctype="application/json").status_code == 415
    # through the CLI, forced to upload (as a laptop's CLI falls back to when the server's
    # machine does not see the path): registered, run, logged, from the server's copy
    code, text = _cli(s, "run", str(folder), "hello", who="olga", env_extra={"SCANFLOW_UPLOAD": "1"})
    assert code == 0 and "succeeded" in text, text
    (row,) = [a for a in s.call("GET", "/api/v1/apps", "vera").json() if a["name"] == "report"]
    assert Path(row["spec_path"]).is_relative_to(s.ws.settings.root / "apps")
    assert not Path(row["spec_path"]).is_relative_to(folder)
    run_id = next(r["id"] for r in json.loads(_cli(s, "runs", "list", "--json", who="vera")[1])
                  if r["workflow"] == "hello" and r["app"] == "report")
    assert "hello upload" in _cli(s, "logs", run_id, who="vera")[1]


def test_the_server_fires_the_triggers_of_registered_applications(server: Server, tmp_path: Path) -> None:
    """`engine serve` through the server registers the spec; the server, which runs the queue,
    fires its workflow triggers from then on (here a date two seconds ahead: once)."""
    import json
    from datetime import UTC, datetime, timedelta

    s = server
    at = (datetime.now(UTC) + timedelta(seconds=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    folder = tmp_path / "nightly"
    folder.mkdir()
    (folder / "scanflow.yaml").write_text(
        f"app: nightly\nteam: data\nworkflows:\n  report:\n    triggers: [{{date: \"{at}\"}}]\n"
        "    steps:\n      - {name: say, run: \"python -c 'print(1)'\", cache: false}\n")
    code, text = _cli(s, "engine", "serve", str(folder), who="vera")
    assert code == 2 and "needs owner" in text  # registering is an owner's
    code, text = _cli(s, "engine", "serve", str(folder), who="olga")
    assert code == 0 and "the server at" in text and "fires its 1 trigger(s)" in text, text

    def fired() -> list[dict[str, Any]]:
        runs = json.loads(_cli(s, "runs", "list", "--json", who="vera")[1])
        return [r for r in runs if r["app"] == "nightly" and r["status"] == "succeeded"]

    (run,) = wait_for(fired, 90, what="the date trigger's run, queued and run by the server")
    assert run["workflow"] == "report"
    full = s.call("GET", f"/api/v1/runs/{run['id']}", "vera").json()
    assert full["trigger"]["by"] == "date"
