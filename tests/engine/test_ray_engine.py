"""The ray backend on a real multi-node Ray cluster (head + 2 worker nodes, 1 CPU each), with a
PostgreSQL store and a real `mlflow server --serve-artifacts` as the only shared state."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from scanflow.cli.main import app as cli_app
from scanflow.control import backends
from scanflow.engine import LocalEngine
from scanflow.procs import pid_alive
from scanflow.settings import Settings, get_settings
from scanflow.spec import load_application
from scanflow.store import Store
from scanflow.store.store import TERMINAL
from scanflow.tracking import MlflowTracker
from support.agent_parts import HANG_ONCE
from support.mlflow_server import mlflow_server
from support.ray_cluster import ray_cluster
from support.ray_cluster import ray_settings as settings_for_ray
from support.waiting import wait_for

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.slow, pytest.mark.postgres]

PRODUCE = '''
import argparse, json, os
import hopshared  # from the spec's code_paths, shipped with the app
p = argparse.ArgumentParser()
p.add_argument("--out")
a = p.parse_args()
with open(a.out, "w") as f:
    json.dump({"cwd": os.getcwd(), "workspace": os.environ["SCANFLOW_WORKSPACE"], "out": a.out,
               "shared": [hopshared.TAG, os.path.realpath(hopshared.__file__)]}, f)
print("produced", a.out)
'''

STEPS = '''
import json, os
import hopshared
import ray

def quiet():
    pass

def nap():
    import time
    time.sleep(120)

def scored():
    return {"acc": 0.75}  # numbers a `call:` step returns are logged to its MLflow child run
def fluent(ctx):
    import mlflow  # imported by the step itself, after the node pointed MLflow at the server
    with ctx.mlflow_run():
        mlflow.log_metric("fluent", 2.0)
    assert mlflow.MlflowClient().get_run(ctx.mlflow_run_id).data.metrics == {"fluent": 2.0}

def consume(src, out, ctx):
    up = json.loads(src.read_text())
    up["consumer"] = {"node": ray.get_runtime_context().get_node_id(), "cwd": os.getcwd(),
                      "src": str(src), "shared": [hopshared.TAG, os.path.realpath(hopshared.__file__)]}
    out.write_text(json.dumps(up))
    ctx.log("consumed", src)
'''

GATE = '''
import argparse, os, sys
p = argparse.ArgumentParser()
p.add_argument("--flag")
p.add_argument("--src")
a = p.parse_args()
print("gate sees", open(a.src).read()[:9])
sys.exit(0 if os.path.exists(a.flag) else 9)
'''

SLEEPER = '''
import argparse, subprocess, sys, time
p = argparse.ArgumentParser()
p.add_argument("--pids")
a = p.parse_args()
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
with open(a.pids + ".part", "w") as f:
    f.write(f"{child.pid}\\n")
import os
import signal
os.rename(a.pids + ".part", a.pids)
time.sleep(120)
'''

SURVIVOR = '''
import argparse, os, time
p = argparse.ArgumentParser()
p.add_argument("--pids")
a = p.parse_args()
if os.environ["SCANFLOW_ATTEMPT"] == "1":
    with open(a.pids + ".part", "w") as f:
        f.write(str(os.getpid()))
    os.rename(a.pids + ".part", a.pids)
    time.sleep(120)
print("attempt", os.environ["SCANFLOW_ATTEMPT"], "done")
'''

HOLD = '''
import argparse, os, time
p = argparse.ArgumentParser()
p.add_argument("--flag")
p.add_argument("--pids")
a = p.parse_args()
with open(a.pids, "a") as f:
    f.write(f"{os.getpid()}\\n")
while not os.path.exists(a.flag):
    time.sleep(0.05)
print("released")
'''

TALKER = '''
import argparse, os, time
p = argparse.ArgumentParser()
p.add_argument("--flag")
p.add_argument("--src")  # an upstream output, in workflows that have one
a = p.parse_args()
print("first line from the node", flush=True)
while not os.path.exists(a.flag):
    time.sleep(0.1)
print("second line")
'''

STAMP = '''
import argparse, json, time
p = argparse.ArgumentParser()
p.add_argument("--out")
a = p.parse_args()
start = time.time()
time.sleep(1.0)
open(a.out, "w").write(json.dumps([start, time.time()]))
'''

READDATA = '''
import argparse, os
p = argparse.ArgumentParser()
p.add_argument("--data")
a = p.parse_args()
print("reads", os.path.realpath(a.data), "holding", open(a.data).read())
'''

SPEC = '''
app: hop
team: ds
code_paths: [../hopshared.py]
workflows:
  hop:
    steps:
      - {name: produce, run: "python produce.py", outputs: [out], resources: {custom: {node_a: 1}}}
      - {name: consume, call: "steps:consume", inputs: {src: produce.out}, outputs: [out],
         resources: {custom: {node_b: 1}}}
  unfit:
    steps:
      - {name: nowhere, run: "python -c pass", resources: {custom: {node_c: 1}}}
  greedy:
    steps:
      - {name: big, run: "python -c pass", resources: {cpus: 2}}
  gated:
    steps:
      - {name: produce, run: "python produce.py", outputs: [out], resources: {custom: {node_a: 1}}}
      - {name: gate, run: "python gate.py", params: {flag: {type: str}}, inputs: {src: produce.out},
         resources: {custom: {node_b: 1}}}
  sleepy:
    steps:
      - {name: sleep, run: "python sleeper.py", params: {pids: {type: str}}, timeout: 100}
  slow:
    steps:
      - {name: nap, run: "python -c 'import time; time.sleep(60)'", timeout: 1}
  survive:
    steps:
      - {name: long, run: "python survivor.py", params: {pids: {type: str}},
         resources: {custom: {spare: 1}}, retries: {count: 1, backoff: 0.01, jitter: 0.0}}
  held:
    steps:
      - {name: produce, run: "python produce.py", outputs: [out]}
      - {name: hold, run: "python hold.py", after: [produce],
         params: {flag: {type: str}, pids: {type: str}}}
  talk:
    steps:
      - {name: talk, run: "python talker.py", params: {flag: {type: str}}, resources: {custom: {node_b: 1}}}
  hopwait:
    steps:
      - {name: produce, run: "python produce.py", outputs: [out], resources: {custom: {node_a: 1}}}
      - {name: talk, run: "python talker.py", params: {flag: {type: str}}, inputs: {src: produce.out},
         resources: {custom: {node_b: 1}}}
  withdata:
    steps:
      - {name: read, run: "python readdata.py", params: {data: {type: path}}}
  exclusive:
    steps:
      - {name: one, run: "python stamp.py", params: {out: {type: str}}, resources: {custom: {node_a: 1}}}
      - {name: two, run: "python stamp.py", params: {out: {type: str}}, resources: {custom: {node_a: 1}}}
  napping:
    steps:
      - {name: nap, call: "steps:nap"}
  scoring:
    steps:
      - {name: quiet, call: "steps:quiet"}
      - {name: scored, call: "steps:scored", after: [quiet]}
  flaky:
    steps:
      - {name: code, run: "python -c 'import sys; print(\\"trying\\"); sys.exit(3)'",
         retries: {count: 2, backoff: 0.01, jitter: 0.0}}
  fluent:
    steps:
      - {name: fluent, call: "steps:fluent"}
'''


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """Head + 2 worker nodes of 1 CPU; `node_a` / `node_b` force a step onto one worker,
    `spare` onto either."""
    with ray_cluster([{"node_a": 1, "spare": 1}, {"node_b": 1, "spare": 1}], dashboard=True,
                     client=True) as c:
        yield c


@pytest.fixture(scope="module")
def tracking(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as url:
        yield url


@pytest.fixture
def ray_settings(cluster: Any, tracking: str, pg_url: str, tmp_path: Path,
                 monkeypatch: pytest.MonkeyPatch) -> Settings:
    return settings_for_ray(cluster.address, tracking, pg_url, tmp_path / "ws", monkeypatch)


@pytest.fixture
def spec(tmp_path: Path) -> Path:
    d = tmp_path / "app"
    d.mkdir()
    (tmp_path / "hopshared.py").write_text("TAG = 'shared code'\n")  # outside the app folder
    (d / "produce.py").write_text(textwrap.dedent(PRODUCE))
    (d / "steps.py").write_text(textwrap.dedent(STEPS))
    (d / "gate.py").write_text(textwrap.dedent(GATE))
    (d / "sleeper.py").write_text(textwrap.dedent(SLEEPER))
    (d / "survivor.py").write_text(textwrap.dedent(SURVIVOR))
    (d / "talker.py").write_text(textwrap.dedent(TALKER))
    (d / "readdata.py").write_text(textwrap.dedent(READDATA))
    (d / "stamp.py").write_text(textwrap.dedent(STAMP))
    (d / "hold.py").write_text(textwrap.dedent(HOLD))
    (d / "scanflow.yaml").write_text(SPEC)
    return d


def cli(settings: Settings, *args: str) -> tuple[int, str]:
    res = CliRunner().invoke(cli_app, ["--workspace", str(settings.root), *args])
    return res.exit_code, res.output


def node_with(resource: str) -> str:
    return next(n["NodeID"] for n in ray.nodes() if n["Alive"] and resource in n["Resources"])


def test_two_steps_on_two_nodes_pass_their_output_through_mlflow(
        ray_settings: Settings, spec: Path) -> None:
    code, out = cli(ray_settings, "run", str(spec), "hop")
    assert code == 0, out
    store = Store(ray_settings.store)
    run = store.list_runs()[0]
    steps = {s.step: s for s in store.list_steps(run.id)}
    assert {k: s.status for k, s in steps.items()} == {"produce": "succeeded", "consume": "succeeded"}
    uri = steps["consume"].outputs["out"]
    assert uri.startswith(f"runs:/{run.mlflow_run_id}/scanflow/outputs/consume/")  # not a driver path
    assert not list((ray_settings.runs_dir / run.id).rglob("out"))  # nothing landed on the driver

    tracker = MlflowTracker(ray_settings)
    fetched = Path(tracker.download(run.mlflow_run_id or "", "scanflow/outputs/consume/out",
                                    str(ray_settings.root / "dl")))
    got = json.loads(fetched.read_text())
    lineage = json.loads(Path(tracker.download(run.mlflow_run_id or "", "scanflow/steps.json",
                                               str(ray_settings.root / "lineage"))).read_text())
    outs = {s["step"]: s["outputs"]["out"] for s in lineage}
    assert outs["consume"] == {"path": uri, "sha256": hashlib.sha256(fetched.read_bytes()).hexdigest()}
    assert outs["produce"]["sha256"] and len(outs["produce"]["sha256"]) == 64  # taken on its node
    driver_cwd = os.getcwd()
    assert got["consumer"]["node"] == node_with("node_b")  # placed by its custom resource
    assert got["cwd"] not in (driver_cwd, str(spec)) and got["consumer"]["cwd"] != driver_cwd
    assert got["workspace"] != str(ray_settings.root)  # the node's own workspace, not the driver's
    assert got["consumer"]["src"] != got["out"]  # read from its own download, not the producer's path
    original = str(spec.parent / "hopshared.py")
    for shared in (got["shared"], got["consumer"]["shared"]):  # run: and call: steps alike
        assert shared[0] == "shared code" and shared[1] != original and "/_code/" in shared[1]
    # the lineage holds each output's sha256, hashed on the node that wrote it
    lineage = {e["step"]: e for e in json.loads(Path(MlflowTracker(ray_settings).download(
        run.mlflow_run_id or "", "scanflow/steps.json", str(ray_settings.root / "dl2"))).read_text())}
    dl = ray_settings.root / "dl" / "out"
    assert lineage["consume"]["outputs"]["out"]["sha256"] == hashlib.sha256(dl.read_bytes()).hexdigest()
    assert len(lineage["produce"]["outputs"]["out"]["sha256"] or "") == 64

    code, log = cli(ray_settings, "logs", run.id, "produce")
    assert code == 0 and "produced" in log and f"on Ray node {node_with('node_a')[:12]}" in log
    code, log = cli(ray_settings, "logs", run.id, "consume")
    assert code == 0 and "consumed" in log and f"on Ray node {node_with('node_b')[:12]}" in log


def test_a_run_through_a_ray_client_address_runs_on_the_cluster(
        cluster: Any, ray_settings: Settings, spec: Path) -> None:
    """`SCANFLOW_RAY_ADDRESS=ray://HOST:10001` (the Ray client, e.g. through a port-forward to a
    KubeRay head): the driver is a Ray client, and the steps still run on their nodes."""
    import subprocess
    import sys

    env = {**os.environ, "SCANFLOW_RAY_ADDRESS": cluster.client_address}
    done = subprocess.run([str(Path(sys.executable).parent / "scanflow"), "--workspace",
                           str(ray_settings.root), "run", str(spec), "hop"],
                          env=env, capture_output=True, text=True, timeout=240)
    servers = Path(cluster.head_node.get_logs_dir_path()).glob("ray_client_server*")  # why, if it fails
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:] + "".join(
        f"\n{f.name}: {f.read_text()[-1500:]}" for f in servers)
    store = Store(ray_settings.store)
    (run,) = store.list_runs()
    assert {s.step: s.status for s in store.list_steps(run.id)} == {"produce": "succeeded",
                                                                    "consume": "succeeded"}
    code, log = cli(ray_settings, "logs", run.id, "consume")
    assert code == 0 and f"on Ray node {node_with('node_b')[:12]}" in log, log


@pytest.mark.parametrize(("workflow", "why"), [("unfit", "asks for CPU 1, node_c 1,"),
                                               ("greedy", "asks for CPU 2,")])
def test_a_step_no_node_can_fit_is_refused_at_submit_with_exit_2(
        ray_settings: Settings, spec: Path, workflow: str, why: str) -> None:
    code, out = cli(ray_settings, "run", str(spec), workflow)
    assert code == 2, out
    assert why in out and "which no node of the Ray cluster offers" in out
    assert "Traceback" not in out
    assert Store(ray_settings.store).list_runs() == []  # refused before anything was recorded


def _retried(engine: Any, spec: Path) -> tuple[Any, Any, list[str]]:
    res = engine.run(load_application(spec), "flaky")
    row = engine.store.list_steps(res.run_id)[0]
    log = "".join(t for _, t in engine.logs(res.run_id, "code"))
    return res, row, log.splitlines()


def test_a_failing_step_is_retried_and_ends_with_its_exit_code_as_on_the_local_backend(
        ray_settings: Settings, spec: Path, tmp_path: Path) -> None:
    ray_res, ray_row, ray_log = _retried(backends.engine(ray_settings, Store(ray_settings.store)), spec)
    local = Settings(workspace=tmp_path / "local-ws").ensure()
    loc_res, loc_row, loc_log = _retried(LocalEngine(local, Store(local.store)), spec)
    for res, row in ((ray_res, ray_row), (loc_res, loc_row)):
        assert (res.status, row.status, row.attempts, row.exit_code) == ("failed", "failed", 3, 3)
        assert res.error.startswith("step code failed with exit code 3; last lines of its log")
    assert "trying" in ray_res.error  # the tail came back from the node
    assert [ln for ln in loc_log if ln == "trying"] == ["trying"] * 3
    ends = [ln.rsplit(": ", 1)[1] for ln in ray_log if " on Ray node " in ln]
    assert ends == ["exit code 3 ---"] * 3  # every try ran on a node and exited 3, as locally
    assert "trying" in ray_log
    # each try's log as its node wrote it, kept in the shared store for any machine to read
    kept = Store(ray_settings.store).step_attempt_logs(ray_res.run_id, "code")
    assert [(n, "trying" in text) for n, text in kept] == [(1, True), (2, True), (3, True)]


def test_mlflows_fluent_api_in_a_call_step_logs_to_the_runs_server(
        ray_settings: Settings, spec: Path) -> None:
    engine = backends.engine(ray_settings, Store(ray_settings.store))
    res = engine.run(load_application(spec), "fluent")
    assert res.ok, res.error
    child = engine.store.list_steps(res.run_id)[0].mlflow_run_id
    run = MlflowTracker(ray_settings).client.get_run(child or "")
    assert run.data.metrics == {"fluent": 2.0}
    assert run.data.tags["mlflow.parentRunId"] == res.mlflow_run_id


def test_steps_wanting_the_one_unit_of_a_resource_run_one_after_the_other_on_its_node(
        ray_settings: Settings, spec: Path, tmp_path: Path) -> None:
    engine = backends.engine(ray_settings, Store(ray_settings.store))
    res = engine.run(load_application(spec), "exclusive",
                     {"one.out": str(tmp_path / "one.json"), "two.out": str(tmp_path / "two.json")})
    assert res.ok, res.error
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert one[1] <= two[0] or two[1] <= one[0]  # both in flight, never at once: Ray admitted them
    for name in ("one", "two"):
        log = "".join(t for _, t in engine.logs(res.run_id, name))
        assert f"on Ray node {node_with('node_a')[:12]}" in log


def test_a_call_step_gets_an_mlflow_child_run_on_its_node_only_when_it_logs(
        ray_settings: Settings, spec: Path) -> None:
    engine = backends.engine(ray_settings, Store(ray_settings.store))
    res = engine.run(load_application(spec), "scoring")
    assert res.ok, res.error
    steps = {s.step: s for s in engine.store.list_steps(res.run_id)}
    assert steps["quiet"].mlflow_run_id is None  # logged nothing: no MLflow call for it at all
    child = MlflowTracker(ray_settings).client.get_run(steps["scored"].mlflow_run_id or "")
    assert child.data.metrics == {"acc": 0.75}
    assert child.data.tags["mlflow.parentRunId"] == res.mlflow_run_id
    assert child.info.status == "FINISHED"  # made on the node, ended by the driver with the step
    quiet = MlflowTracker(ray_settings).client.search_runs(
        [child.info.experiment_id], f"tags.`mlflow.parentRunId` = '{res.mlflow_run_id}'")
    assert [r.info.run_name for r in quiet] == ["scored"]


def test_a_second_run_is_cached_and_resume_reruns_only_what_failed(
        ray_settings: Settings, spec: Path, tmp_path: Path) -> None:
    engine = backends.engine(ray_settings, Store(ray_settings.store))
    app = load_application(spec)
    first = engine.run(app, "hop")
    again = engine.run(app, "hop")
    assert first.ok and again.steps == {"produce": "cached", "consume": "cached"}, again

    flag = tmp_path / "open"
    fresh = engine.run(app, "gated", {"flag": str(flag)})  # the cache is per workflow
    assert fresh.steps == {"produce": "succeeded", "gate": "failed"}, fresh
    flag.touch()
    resumed = engine.resume(fresh.run_id, app)
    assert resumed.ok and resumed.steps == {"produce": "succeeded", "gate": "succeeded"}, resumed
    rows = {s.step: s for s in engine.store.list_steps(fresh.run_id)}
    assert rows["produce"].attempts == 1  # kept from the first try: not re-run
    log = "".join(t for _, t in engine.logs(fresh.run_id, "produce"))
    assert log.count("on Ray node") == 1
    gate_log = "".join(t for _, t in engine.logs(fresh.run_id, "gate"))
    assert gate_log.count('gate sees {"cwd": ') == 2  # both tries downloaded produce's output


def test_a_timeout_kills_the_step_on_its_node_and_fails_it(ray_settings: Settings, spec: Path) -> None:
    engine = backends.engine(ray_settings, Store(ray_settings.store))
    res = engine.run(load_application(spec), "slow")
    assert res.status == "failed" and "timed out after 1s (process tree killed)" in (res.error or "")


def test_cancel_stops_a_lone_call_step_on_its_node_at_once(ray_settings: Settings, spec: Path) -> None:
    engine = backends.engine(ray_settings, Store(ray_settings.store))
    run_id = engine.submit(load_application(spec), "napping", status="running")
    done: dict[str, Any] = {}
    t = threading.Thread(target=lambda: done.update(res=engine.execute(run_id)), daemon=True)
    t.start()
    wait_for(lambda: engine.store.list_steps(run_id)[0].status == "running", timeout=60,
             what="the step running")
    assert engine.cancel(run_id) == "cancelling"
    wait_for(lambda: "res" in done, timeout=20, what="the run settled after cancel (not after the nap)")
    assert done["res"].status == "cancelled"
    assert engine.store.list_steps(run_id)[0].status == "cancelled"


def test_cancel_kills_the_steps_process_tree_on_its_node(
        ray_settings: Settings, spec: Path, tmp_path: Path) -> None:
    engine = backends.engine(ray_settings, Store(ray_settings.store))
    pids_file = tmp_path / "pids"
    run_id = engine.submit(load_application(spec), "sleepy", {"pids": str(pids_file)}, status="running")
    done: dict[str, Any] = {}
    t = threading.Thread(target=lambda: done.update(res=engine.execute(run_id)), daemon=True)
    t.start()
    grandchild = int(wait_for(lambda: pids_file.exists() and pids_file.read_text().strip(),
                              timeout=60, what="the step's process tree started"))
    assert pid_alive(grandchild)
    assert engine.cancel(run_id) == "cancelling"
    wait_for(lambda: "res" in done, timeout=30, what="the run settled after cancel")
    assert done["res"].status == "cancelled" and done["res"].steps == {"sleep": "cancelled"}
    wait_for(lambda: not pid_alive(grandchild), timeout=15, what="the step's child process killed")

def _follow_in_another_process(run_id: str, step: str) -> tuple[subprocess.Popen[str], list[str],
                                                                 threading.Thread]:
    """`scanflow logs RUN STEP --follow` as a user in another shell runs it; its lines as read."""
    follower = subprocess.Popen([sys.executable, "-m", "scanflow.cli.main", "logs", run_id, step,
                                 "--follow"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=dict(os.environ))
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(follower.stdout.readline, "")),  # type: ignore[union-attr]
                              daemon=True)
    reader.start()
    return follower, lines, reader


def test_logs_follow_streams_a_running_steps_log_from_its_node(
        ray_settings: Settings, spec: Path, tmp_path: Path) -> None:
    """`scanflow logs RUN STEP --follow` (another process) shows what the step printed on its
    node while it still runs, then the rest from the driver's copy, each line once."""
    engine = backends.engine(ray_settings, Store(ray_settings.store))
    flag = tmp_path / "go-on"
    run_id = engine.submit(load_application(spec), "talk", {"flag": str(flag)}, status="running")
    done: dict[str, Any] = {}
    t = threading.Thread(target=lambda: done.update(res=engine.execute(run_id)), daemon=True)
    t.start()
    follower, lines, reader = _follow_in_another_process(run_id, "talk")
    try:
        wait_for(lambda: "first line from the node\n" in lines, timeout=60,
                 what="the step's first line seen by `scanflow logs --follow`")
        assert "res" not in done and not flag.exists()  # the step still runs: it waits for the flag
        assert any(f"running on Ray node {node_with('node_b')[:12]} (live)" in ln for ln in lines)
        flag.touch()
        assert follower.wait(timeout=60) == 0, follower.stderr.read()  # type: ignore[union-attr]
        reader.join(timeout=10)
    finally:
        flag.touch()  # a failed assertion must not leave the step waiting on its node
        if follower.poll() is None:
            follower.kill()
    wait_for(lambda: "res" in done, timeout=30, what="the run settled")
    assert done["res"].ok, done["res"].error
    text = "".join(lines)
    assert text.count("first line from the node") == 1 and text.count("second line") == 1, text
    assert text.index("first line") < text.index("--- attempt 1 on Ray node")  # its end, from the driver


def _detach(settings: Settings, *args: str) -> str:
    res = CliRunner().invoke(cli_app, ["--workspace", str(settings.root), "run", *args, "--detach"])
    assert res.exit_code == 0, res.output
    return res.stdout.splitlines()[0].strip()


def _shown(settings: Settings, run_id: str) -> dict[str, Any]:
    code, out = cli(settings, "runs", "show", run_id, "--json")
    assert code == 0, out
    return dict(json.loads(out))


def _jobs_of(settings: Settings, run_id: str) -> str:
    """What Ray says of the run's jobs (status and the tail of each one's output): a detached
    run that does not end says why."""
    from ray.dashboard.utils import ray_address_to_api_server_url
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(ray_address_to_api_server_url(settings.ray_address))
    told = []
    for job in client.list_jobs():
        if job.submission_id and job.submission_id.startswith(f"scanflow-{run_id}"):
            logs = client.get_job_logs(job.submission_id)
            told.append(f"{job.submission_id}: {job.status} {job.message}\n{logs[-3000:]}")
    return "\n".join(told) or "no Ray job for the run"


def _wait_detached(settings: Settings, run_id: str, done: Callable[[dict[str, Any]], bool],
                   timeout: float, what: str) -> dict[str, Any]:
    """`runs show --json` of the detached run once `done` holds; on timeout, the failure shows
    the run as the store has it and what Ray says of its job."""
    def shown_when_done() -> dict[str, Any] | None:
        shown = _shown(settings, run_id)
        return shown if done(shown) else None

    try:
        return wait_for(shown_when_done, timeout=timeout, interval=0.5, what=what)
    except pytest.fail.Exception as exc:
        pytest.fail(f"{exc}\nthe run: {_shown(settings, run_id)}\n{_jobs_of(settings, run_id)}")


def test_a_detached_run_runs_on_the_cluster_and_is_seen_from_the_submitting_shell(
        ray_settings: Settings, spec: Path) -> None:
    """`run --detach` returns the run's id at once; a Ray job runs its driver; `runs show` and
    `logs` (read from MLflow: the driver's folder is the job's) see it from here."""
    run_id = _detach(ray_settings, str(spec), "hop")
    shown = _wait_detached(ray_settings, run_id, lambda r: r["status"] in TERMINAL, timeout=300,
                           what="the detached run ended")
    assert shown["status"] == "succeeded", (shown["error"], [s["error"] for s in shown["steps"]])
    assert {s["step"]: s["status"] for s in shown["steps"]} == {"produce": "succeeded",
                                                                "consume": "succeeded"}
    assert shown["trigger"] == {"by": "user", "detached": True}
    code, out = cli(ray_settings, "runs", "list")
    assert code == 0 and f"{run_id[:12]}" in out and "succeeded" in out
    code, log = cli(ray_settings, "logs", run_id, "consume")
    assert code == 0 and "consumed" in log and f"on Ray node {node_with('node_b')[:12]}" in log, log
    code, log = cli(ray_settings, "logs", run_id, "--follow")  # ended: each attempt's, once
    assert code == 0 and log.count("[consume] consumed") == 1 and log.count("produced") == 1, log
    from ray.dashboard.utils import ray_address_to_api_server_url
    from ray.job_submission import JobSubmissionClient

    jobs = JobSubmissionClient(ray_address_to_api_server_url(ray_settings.ray_address))
    wait_for(lambda: jobs.get_job_status(f"scanflow-{run_id}") == "SUCCEEDED", timeout=60,
             interval=0.5, what="its Ray job ended (after keeping the driver's logs in MLflow)")


def test_a_failed_run_is_resumed_on_the_cluster_with_resume_detach(
        ray_settings: Settings, spec: Path, tmp_path: Path) -> None:
    """`resume --detach` returns at once and a Ray job re-runs only the step that failed."""
    flag = tmp_path / "flag"
    code, out = cli(ray_settings, "run", str(spec), "gated", "-p", f"flag={flag}")
    assert code != 0, out  # the gate fails: no flag yet
    run_id = Store(ray_settings.store).list_runs()[0].id
    flag.write_text("1")
    code, out = cli(ray_settings, "resume", run_id, "--detach")
    assert code == 0 and run_id in out, out
    # (it was `failed` before: wait for the resumed run's own end)
    _wait_detached(ray_settings, run_id, lambda r: r["status"] == "succeeded", timeout=300,
                   what="the resumed run succeeded on the cluster")
    steps = {s.step: s for s in Store(ray_settings.store).list_steps(run_id)}
    assert steps["produce"].attempts == 1 and steps["gate"].status == "succeeded"  # produce kept


def test_a_detached_run_is_cancelled_from_the_submitting_shell(
        ray_settings: Settings, spec: Path, tmp_path: Path) -> None:
    pids_file = tmp_path / "pids"
    run_id = _detach(ray_settings, str(spec), "sleepy", "-p", f"pids={pids_file}")

    def started() -> str:
        run = Store(ray_settings.store).get_run(run_id)
        assert run is not None and run.status not in TERMINAL, (run and run.error)  # ended early
        return pids_file.exists() and pids_file.read_text().strip()

    grandchild = int(wait_for(started, timeout=90, what="the detached run's step started on a node"))
    wait_for(lambda: _shown(ray_settings, run_id)["steps"][0]["status"] == "running", timeout=10,
             interval=0.3, what="`runs show` here saying the step runs")
    code, out = cli(ray_settings, "cancel", run_id)
    assert code == 0 and "cancelling" in out, out
    shown = _wait_detached(ray_settings, run_id, lambda r: r["status"] in TERMINAL, timeout=120,
                           what="the detached run settled after cancel")
    assert shown["status"] == "cancelled" and shown["steps"][0]["status"] == "cancelled", shown
    wait_for(lambda: not pid_alive(grandchild), timeout=15, what="the step's child process killed")


def test_a_detached_runs_driver_killed_mid_run_is_resumed_from_the_submitting_shell(
        ray_settings: Settings, spec: Path, tmp_path: Path) -> None:
    """kill -9 of the job's driver while its second step runs: `scanflow resume` here marks it
    interrupted and finishes it without re-running the first step."""
    flag = tmp_path / "go-on"
    run_id = _detach(ray_settings, str(spec), "hopwait", "-p", f"flag={flag}")
    store = Store(ray_settings.store)
    follower, lines, reader = _follow_in_another_process(run_id, "talk")  # live, then from MLflow
    try:
        wait_for(lambda: "first line from the node\n" in lines, timeout=120, interval=0.2,
                 what="the second step running on its node, seen by `logs --follow`")
        run = store.get_run(run_id)
        assert run is not None and run.owner_pid and run.owner_host == socket.gethostname()
        driver = run.owner_pid
        os.kill(int(driver), signal.SIGKILL)
        wait_for(lambda: not pid_alive(int(driver)), timeout=15, what="the driver dead")
        flag.touch()  # the retried step finishes at once (the killed attempt's process may too)
        code, out = cli(ray_settings, "resume", run_id)
        assert code == 0, out
        # The follower stopped when the run ended `interrupted` (marked so by this resume).
        assert follower.wait(timeout=60) == 0, follower.stderr.read()  # type: ignore[union-attr]
        reader.join(timeout=10)
    finally:
        flag.touch()  # a failed assertion must not leave the step waiting on its node
        if follower.poll() is None:
            follower.kill()
    shown = _shown(ray_settings, run_id)
    assert shown["status"] == "succeeded", shown
    tries = {s["step"]: (s["status"], s["attempts"]) for s in shown["steps"]}
    assert tries == {"produce": ("succeeded", 1), "talk": ("succeeded", 1)}, tries
    code, log = cli(ray_settings, "logs", run_id, "talk")  # the resumed attempt's, from MLflow
    assert code == 0 and "second line" in log, log


def test_detach_on_the_local_backend_is_refused_with_exit_2(spec: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCANFLOW_BACKEND", "local")
    monkeypatch.setenv("SCANFLOW_WORKSPACE", str(tmp_path / "local-ws"))
    get_settings.cache_clear()
    res = CliRunner().invoke(cli_app, ["run", str(spec), "hop", "--detach"])
    assert res.exit_code == 2 and "set SCANFLOW_BACKEND=ray" in res.output, res.output
    assert "Traceback" not in res.output


def _ppid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rfind(")") + 2:].split()[1])


def test_a_driver_killed_mid_run_leaves_it_interrupted_and_resume_finishes_it(
        ray_settings: Settings, spec: Path, tmp_path: Path) -> None:
    """`kill -9` of `scanflow run` (the driver) while a step runs on the cluster: the step's
    process goes with it, the run is `interrupted`, and `scanflow resume` runs only the step
    that did not finish."""
    import subprocess
    import sys

    flag, pids = tmp_path / "go", tmp_path / "hold.pids"
    driver = subprocess.Popen(
        [str(Path(sys.executable).parent / "scanflow"), "--workspace", str(ray_settings.root), "run",
         str(spec), "held", "-p", f"flag={flag}", "-p", f"pids={pids}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        step = int(wait_for(lambda: pids.exists() and pids.read_text().split()[0], timeout=90,
                            what="the held step running on a node"))
    finally:
        driver.kill()
        driver.wait()
    wait_for(lambda: not pid_alive(step), timeout=60, what="the step's process to go with its driver")
    store = Store(ray_settings.store)
    (run,) = [r for r in store.list_runs() if r.workflow == "held"]
    flag.write_text("1")
    code, out = cli(ray_settings, "resume", run.id)
    assert code == 0, out
    rows = {s.step: s for s in store.list_steps(run.id)}
    assert rows["produce"].status == "succeeded" and rows["produce"].attempts == 1  # not re-run
    assert rows["hold"].status == "succeeded"
    assert len(pids.read_text().split()) == 2  # the cut-off try, then resume's
    assert store.get_run(run.id).status == "succeeded"  # type: ignore[union-attr]


def test_postgresql_restarted_mid_run_the_run_waits_and_continues(
        ray_settings: Settings, spec: Path, tmp_path: Path) -> None:
    """The store's PostgreSQL (a server of this test's own) stopped for a few seconds while a
    step runs on the cluster, then started again: the driver waits for it and the run ends
    succeeded, with every record before the outage intact."""
    from support.private_postgres import private_postgres

    flag, pids = tmp_path / "go", tmp_path / "hold.pids"
    with private_postgres() as pg:
        settings = ray_settings.model_copy(update={"store_url": pg.url})
        engine = backends.engine(settings, Store(pg.url))
        run_id = engine.submit(load_application(spec), "held", {"flag": str(flag), "pids": str(pids)},
                               status="running")
        done: dict[str, Any] = {}

        def drive() -> None:
            try:
                done["res"] = engine.execute(run_id)
            except BaseException:  # the test shows it below
                done["error"] = traceback.format_exc()
                raise

        t = threading.Thread(target=drive, daemon=True)
        t.start()
        wait_for(lambda: pids.exists(), timeout=90, what="the held step running on a node")
        pg.stop()
        t.join(4)  # a 4 s outage (ends early only if the driver gives up)
        assert t.is_alive(), done  # not failed, not finished: waiting for its store
        pg.start()
        flag.write_text("1")
        t.join(120)
        assert "res" in done, f"the run did not end after the store came back: {done!r}"
        res = done["res"]
        assert res.ok, res.error
        rows = {s.step: s for s in engine.store.list_steps(run_id)}
        assert {n: (r.status, r.attempts) for n, r in rows.items()} == {
            "produce": ("succeeded", 1), "hold": ("succeeded", 1)}
        assert engine.store.get_run(run_id).status == "succeeded"  # type: ignore[union-attr]


def test_engine_serve_runs_the_queue_on_the_cluster_fairly_across_teams(
        ray_settings: Settings, spec: Path, tmp_path: Path) -> None:
    """`scanflow engine serve` on the ray backend: queued runs of two teams run on the cluster,
    one at a time, and the lone team's run does not wait behind the busy team's three."""
    other = tmp_path / "other"
    shutil.copytree(spec, other)
    (other / "scanflow.yaml").write_text(
        (spec / "scanflow.yaml").read_text().replace("app: hop", "app: hop2")
        .replace("team: ds", "team: ops"))
    flag = tmp_path / "go"
    flag.write_text("1")
    store = Store(ray_settings.store)
    engine = backends.engine(ray_settings, store)
    busy, lone = load_application(spec), load_application(other)
    params = {"flag": str(flag), "pids": str(tmp_path / "pids")}
    ids = [engine.submit(busy, "held", params) for _ in range(3)]
    ids.append(engine.submit(lone, "held", params))
    stop = threading.Event()
    t = threading.Thread(target=engine.serve, args=(stop.is_set,), kwargs={"max_runs": 1, "poll": 0.05},
                         daemon=True)
    t.start()
    try:
        wait_for(lambda: all(store.get_run(i).status == "succeeded" for i in ids),  # type: ignore[union-attr]
                 timeout=120, what="the queued runs to succeed on the cluster")
    finally:
        stop.set()
        t.join(30)
    order = sorted(ids, key=lambda i: store.get_run(i).started_at)  # type: ignore[union-attr]
    assert order.index(ids[-1]) <= 1


def _start_survivor(ray_settings: Settings, spec: Path, tmp_path: Path
                    ) -> tuple[Any, str, dict[str, Any], int]:
    """The `survive` workflow running on a driver thread: (engine, run id, where its result
    lands, the pid of its first try's step process once started)."""
    engine = backends.engine(ray_settings, Store(ray_settings.store))
    pids_file = tmp_path / "pids"
    run_id = engine.submit(load_application(spec), "survive", {"pids": str(pids_file)}, status="running")
    done: dict[str, Any] = {}
    t = threading.Thread(target=lambda: done.update(res=engine.execute(run_id)), daemon=True)
    t.start()
    step_pid = int(wait_for(lambda: pids_file.exists() and pids_file.read_text(), timeout=60,
                            what="the step started on a node"))
    return engine, run_id, done, step_pid


def test_a_ray_worker_killed_mid_step_takes_its_step_process_with_it_and_the_step_is_retried(
        ray_settings: Settings, spec: Path, tmp_path: Path) -> None:
    engine, run_id, done, step_pid = _start_survivor(ray_settings, spec, tmp_path)
    worker = _ppid(step_pid)
    os.kill(worker, signal.SIGKILL)  # as the OOM killer would
    try:
        wait_for(lambda: not pid_alive(step_pid), timeout=15,
                 what="the step's process killed with its worker")
        wait_for(lambda: "res" in done, timeout=90, what="the run settled after the worker died")
    finally:
        if pid_alive(step_pid):
            os.kill(step_pid, signal.SIGKILL)
    res = done["res"]
    assert res.ok, res.error
    assert engine.store.list_steps(run_id)[0].attempts == 2  # the retry, never beside the first try
    log = "".join(t for _, t in engine.logs(run_id, "long"))
    assert "--- attempt 1: its Ray task failed ---" in log and "attempt 2 done" in log


def test_a_worker_nodes_raylet_killed_mid_step_retries_the_step_on_the_other_node(
        cluster: Any, ray_settings: Settings, spec: Path, tmp_path: Path) -> None:
    """Last in the module: it takes a worker node away."""
    engine, run_id, done, step_pid = _start_survivor(ray_settings, spec, tmp_path)
    worker = _ppid(step_pid)
    raylet = _ppid(worker)  # step <- Ray worker <- raylet
    victim = next(n for n in cluster.worker_nodes if n.all_processes["raylet"][0].process.pid == raylet)
    try:
        os.kill(raylet, signal.SIGKILL)
        wait_for(lambda: "res" in done, timeout=90, what="the run settled after its node died")
        # the worker Ray left running exits once its raylet is gone 30 s, its step with it
        wait_for(lambda: not pid_alive(step_pid) and not pid_alive(worker), timeout=60,
                 what="the orphaned step and its worker gone")
    finally:
        for pid in (step_pid, worker):  # orphaned by the dead raylet (a dead machine takes them)
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        for d in Path(tempfile.gettempdir()).glob(f"scanflow-{run_id[:12]}-*"):  # and its folder
            shutil.rmtree(d, ignore_errors=True)
    res = done["res"]
    assert res.ok, res.error
    row = engine.store.list_steps(run_id)[0]
    assert row.attempts == 2
    log = "".join(t for _, t in engine.logs(run_id, "long"))
    assert f"--- attempt 1 on Ray node {victim.node_id[:12]}: the node died ---" in log
    survivor = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and "spare" in n["Resources"])
    assert survivor != victim.node_id and f"attempt 2 on Ray node {survivor[:12]}" in log
    assert "attempt 2 done" in log


def test_a_path_parameter_travels_to_the_node_through_mlflow(
        ray_settings: Settings, spec: Path, tmp_path: Path) -> None:
    """A `type: path` param names a file on the driver: the node reads its own copy."""
    data = tmp_path / "driver-only" / "labels.csv"
    data.parent.mkdir()
    data.write_text("x,y\n1,2\n")
    code, out = cli(ray_settings, "run", str(spec), "withdata", "-p", f"data={data}")
    assert code == 0, out
    run = Store(ray_settings.store).list_runs()[0]
    code, log = cli(ray_settings, "logs", run.id, "read")
    assert code == 0 and "holding x,y" in log, log
    seen = log.split("reads ", 1)[1].split(" holding", 1)[0]
    assert seen != str(data) and "driver-only" not in seen  # its own download, not the driver's file
    arts = MlflowTracker(ray_settings).list_artifacts(run.mlflow_run_id or "", "scanflow/params")
    assert len(arts) == 1  # uploaded once, under the run


AGENT_PARTS = '''
import time
from pathlib import Path

from scanflow.agents import actuator
''' + HANG_ONCE

AGENT_SPEC = '''
app: rayagents
team: ops
agents:
  hanger:
    role: custom
    imports: [parts]
    sensors:
      - name: jobs
        trigger: {event: {message: {kind: hang}, poll: 0.1}}
        actuators: [{func: hang_once, params: {dir: EFFECTS}}]
'''


def test_an_agent_runs_as_a_ray_actor_and_ray_restarts_it_after_kill_9_mid_action(
        ray_settings: Settings, tmp_path: Path) -> None:
    """`scanflow agents start` on the ray backend: a named detached actor; killed with -9 in the
    middle of an action, Ray brings it back with no person acting, and the action resumes once
    (attempt 2, same key) and the message is handled once."""
    from scanflow.agents.process import AgentSupervisor
    from scanflow.agents.ray_agents import NAMESPACE, actor_name

    app = tmp_path / "agentapp"
    app.mkdir()
    effects = tmp_path / "effects"
    effects.mkdir()
    (app / "parts.py").write_text(AGENT_PARTS)
    (app / "scanflow.yaml").write_text(AGENT_SPEC.replace("EFFECTS", str(effects)))
    store = Store(ray_settings.store, signer=backends.message_signer(ray_settings))
    sup = AgentSupervisor(ray_settings, store)
    code, out = cli(ray_settings, "agents", "start", str(app), "-a", "hanger")
    assert code == 0, out
    try:
        (row,) = sup.status()
        assert row["status"] == "running" and row["supervision"] == "ray actor", row
        ray.get_actor(actor_name("rayagents", "hanger"), namespace=NAMESPACE)  # named, detached
        store.send_message("someone", "hanger", "hang", {}, key="h1")
        log = effects / "hang.log"
        wait_for(lambda: log.exists() and "begin" in log.read_text(), timeout=60,
                 what="the actuator to start in the actor")
        first = row["pid"]
        os.kill(first, signal.SIGKILL)
        back = wait_for(lambda: [r for r in sup.status() if r["status"] == "running" and r["pid"] != first],
                        timeout=90, what="Ray to restart the agent's actor")
        assert back[0]["restarts"] == 1
        wait_for(lambda: store.list_messages("hanger")[0].status == "done", timeout=60,
                 what="the message to be handled by the restarted agent")
        code, out = cli(ray_settings, "agents", "list")
        assert code == 0 and "ray actor" in out, out
    finally:
        code, out = cli(ray_settings, "agents", "stop", "-a", "hanger")
    assert code == 0, out
    key = "hanger:jobs:h1:hang_once"
    assert log.read_text().splitlines() == [f"begin {key} 1", f"begin {key} 2", f"end {key} 2"]
    (decision,) = store.list_decisions("hanger")
    assert [(a["attempt"], a["status"]) for a in decision.actions] == [(2, "succeeded")]
    (restarted,) = [e for e in store.list_events(kinds=["agent_restarted"]) if e.source == "hanger"]
    assert restarted.payload["restarts"] == 1 and restarted.payload["new_pid"] != first
    assert [r["status"] for r in sup.status()] == ["stopped"]
    with pytest.raises(ValueError):
        ray.get_actor(actor_name("rayagents", "hanger"), namespace=NAMESPACE)  # gone for good


def test_an_agent_actor_past_its_restart_limit_is_dead_until_started_again(
        ray_settings: Settings, tmp_path: Path) -> None:
    from scanflow.agents.process import AgentSupervisor

    app = tmp_path / "agentapp"
    app.mkdir()
    (app / "parts.py").write_text(AGENT_PARTS)
    (app / "scanflow.yaml").write_text(AGENT_SPEC.replace("EFFECTS", str(tmp_path)))
    store = Store(ray_settings.store)
    # a heartbeat 3 s old is stale: `dead` is shown within seconds of the second kill
    sup = AgentSupervisor(ray_settings.model_copy(update={"agent_restart_limit": 1,
                                                          "agent_stale_after": 3.0}), store)
    pid = sup.start(app, ["hanger"])["hanger"]
    try:
        os.kill(pid, signal.SIGKILL)
        (back,) = wait_for(lambda: [r["pid"] for r in sup.status() if r["status"] == "running"
                                    and r["pid"] != pid], timeout=90, what="the one restart")
        os.kill(back, signal.SIGKILL)
        wait_for(lambda: [r["status"] for r in sup.status()] == ["dead"], timeout=60,
                 what="the agent shown dead once Ray may not restart it")
        again = sup.start(app, ["hanger"])["hanger"]  # a person starts it again
        assert again not in (pid, back) and [r["status"] for r in sup.status()] == ["running"]
    finally:
        sup.stop(["hanger"])


CALLER_SPEC = '''
app: caller
team: ops
agents:
  runner:
    role: custom
    sensors:
      - name: jobs
        trigger: {event: {message: {kind: go}, poll: 0.1}}
        actuators:
          - func: scanflow.agents.builtin:run_workflow
            params: {app: ../jobs/scanflow.yaml, workflow: hello}
'''

JOBS_SPEC = '''
app: jobs
team: ops
code_paths: [../words.py]
workflows:
  hello:
    steps:
      - name: say
        run: python -c "import words; print('the word is', words.WORD)"
'''


def test_an_agent_actor_runs_a_workflow_of_the_sibling_app_its_params_name(
        ray_settings: Settings, tmp_path: Path) -> None:
    """An agent's `app: ../jobs/scanflow.yaml` (as the MNIST executor names the data science
    team's retrain) travels with its actor, the sibling's code_paths too: a node has only what
    is shipped to it."""
    from scanflow.agents.process import AgentSupervisor

    for name, text in (("caller", CALLER_SPEC), ("jobs", JOBS_SPEC)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "scanflow.yaml").write_text(text)
    (tmp_path / "words.py").write_text("WORD = 'shipped'\n")  # outside both app folders
    store = Store(ray_settings.store, signer=backends.message_signer(ray_settings))
    sup = AgentSupervisor(ray_settings, store)
    sup.start(tmp_path / "caller", ["runner"])
    try:
        store.send_message("someone", "runner", "go", {}, key="g1")
        run = wait_for(lambda: next((r for r in store.list_runs() if r.status == "succeeded"), None),
                       timeout=120, what="the sibling app's workflow run by the agent's actor")
    finally:
        sup.stop(["runner"])
    assert store.list_messages("runner")[0].status == "done"
    code, log = cli(ray_settings, "logs", run.id, "say")
    assert code == 0 and "the word is shipped" in log, log


SIGTERM_DRIVER = '''
import signal, sys, time
from pathlib import Path
from scanflow.engine.ray_backend import connect

def cleanup(*_):
    Path(sys.argv[2]).write_text("cleaned up")
    sys.exit(143)

signal.signal(signal.SIGTERM, cleanup)
connect(sys.argv[1])
print("joined", flush=True)
time.sleep(120)
'''


def test_a_driver_stopped_with_sigterm_after_joining_runs_its_own_cleanup(
        cluster: Any, tmp_path: Path) -> None:
    """Joining the cluster keeps the process's SIGTERM handler (Ray's own would end it with no
    Python cleanup: `make demo-ray` killed so left its MLflow servers running)."""
    script = tmp_path / "driver.py"
    script.write_text(SIGTERM_DRIVER)
    marker = tmp_path / "cleaned"
    proc = subprocess.Popen([sys.executable, str(script), cluster.address, str(marker)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "joined"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 143
    finally:
        proc.kill()
    assert marker.read_text() == "cleaned up"
