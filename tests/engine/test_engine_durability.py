"""Engine guarantees a user relies on: retries, timeouts, cancel, caching, resume, crash safety,
resource limits and fair queues. Every test runs with the store on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from scanflow.engine import LocalEngine, ParamError
from scanflow.engine.resources import ResourcePool
from scanflow.procs import pid_alive
from scanflow.settings import Settings
from scanflow.spec import load_application
from scanflow.spec.models import Application, Step, Workflow
from scanflow.store import Store
from support.waiting import wait_for

STEPS = '''
import json, os, time
from pathlib import Path

COUNTER = Path(os.environ["SF_TEST_DIR"]) / "counter.json"

def bump(name):
    d = json.loads(COUNTER.read_text()) if COUNTER.exists() else {}
    d[name] = d.get(name, 0) + 1
    COUNTER.write_text(json.dumps(d))
    return d[name]

def produce(n, out):
    bump("produce")
    out.write_text(str(n))

def consume(src, out):
    bump("consume")
    out.write_text(src.read_text() + "!")

def flaky(fails):
    if bump("flaky") <= fails:
        raise ConnectionError("transient")

def gate():
    bump("gate")
    if not (Path(os.environ["SF_TEST_DIR"]) / "go").exists():
        raise RuntimeError("not yet")

def stamp(ctx, name):
    t0 = time.time(); time.sleep(0.4)
    (Path(os.environ["SF_TEST_DIR"]) / f"{name}.json").write_text(json.dumps([t0, time.time()]))
'''

SLEEPER = '''
import os, subprocess, sys, time
from pathlib import Path
d = Path(os.environ["SF_TEST_DIR"])
child = subprocess.Popen(["sleep", "60"])
(d / "grandchild.pid").write_text(str(child.pid))
(d / "started").write_text("1")
if (d / "fast").exists():
    sys.exit(0)
time.sleep(60)
'''

SPEC = '''
app: demo
team: TEAM
workflows:
  pipe:
    steps:
      - {name: produce, call: "steps:produce", params: {n: 1}, outputs: [out]}
      - {name: consume, call: "steps:consume", inputs: {src: produce.out}, outputs: [out]}
  retry:
    steps:
      - {name: flaky, call: "steps:flaky", params: {fails: 2},
         retries: {count: 3, backoff: 0.01, jitter: 0.0}}
  retry_only_io:
    steps:
      - {name: flaky, call: "steps:flaky", params: {fails: 2},
         retries: {count: 3, backoff: 0.01, on_exceptions: [TimeoutError]}}
  exit_codes:
    steps:
      - {name: code, run: "python -c 'import sys; sys.exit(3)'",
         retries: {count: 2, backoff: 0.01, on_exit_codes: [75]}}
  slow:
    steps:
      - {name: sleeper, run: "python sleeper.py", timeout: 1.5}
  long:
    steps:
      - {name: produce, call: "steps:produce", params: {n: 1}, outputs: [out]}
      - {name: sleeper, run: "python sleeper.py", after: [produce], cache: false}
      - {name: last, call: "steps:consume", inputs: {src: produce.out}, after: [sleeper],
         outputs: [out]}
  resumable:
    steps:
      - {name: produce, call: "steps:produce", params: {n: 1}, outputs: [out]}
      - {name: gate, call: "steps:gate", after: [produce], cache: false}
      - {name: consume, call: "steps:consume", inputs: {src: produce.out}, after: [gate],
         outputs: [out]}
  nocache:
    steps:
      - {name: produce, call: "steps:produce", params: {n: 1}, outputs: [out], cache: false}
  heavy:
    steps:
      - {name: one, call: "steps:stamp", params: {name: one}, resources: {cpus: 2}}
      - {name: two, call: "steps:stamp", params: {name: two}, resources: {cpus: 2}}
  greedy:
    steps:
      - {name: big, call: "steps:produce", params: {n: 1}, outputs: [out], resources: {cpus: 64}}
'''


def make_app(root: Path, team: str = "ds") -> object:
    d = root / f"app-{team}"
    d.mkdir(exist_ok=True)
    (d / "steps.py").write_text(textwrap.dedent(STEPS))
    (d / "sleeper.py").write_text(textwrap.dedent(SLEEPER))
    (d / "scanflow.yaml").write_text(SPEC.replace("TEAM", team))
    return load_application(d)


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "shared"
    d.mkdir()
    monkeypatch.setenv("SF_TEST_DIR", str(d))
    return d


def counts(env: Path) -> dict[str, int]:
    p = env / "counter.json"
    return json.loads(p.read_text()) if p.exists() else {}


def engine(settings: Settings, store: Store, **kw) -> LocalEngine:  # type: ignore[no-untyped-def]
    return LocalEngine(settings, store, pool=ResourcePool(cpus=2, memory=2**30), **kw)


def test_retries_with_backoff_and_filters(env, tmp_path, settings, store) -> None:  # type: ignore[no-untyped-def]
    app = make_app(tmp_path)
    res = engine(settings, store).run(app, "retry")
    assert res.ok, res.error
    (row,) = store.list_steps(res.run_id)
    assert row.attempts == 3 and counts(env)["flaky"] == 3
    assert "retrying" in Path(row.log_path or "").read_text()
    (env / "counter.json").unlink()
    res = engine(settings, store).run(app, "retry_only_io")  # ConnectionError is not listed
    assert res.status == "failed" and store.list_steps(res.run_id)[0].attempts == 1
    res = engine(settings, store).run(app, "exit_codes")  # exit 3 is not in [75]
    assert res.status == "failed" and store.list_steps(res.run_id)[0].attempts == 1


def test_timeout_kills_the_whole_process_tree(env, tmp_path, settings, store) -> None:  # type: ignore[no-untyped-def]
    t0 = time.time()
    res = engine(settings, store).run(make_app(tmp_path), "slow")
    assert res.status == "failed" and "timed out after 1.5s" in (res.error or "")
    assert time.time() - t0 < 30
    grandchild = int((env / "grandchild.pid").read_text())
    wait_for(lambda: not pid_alive(grandchild), 10)


def test_cancel_stops_running_and_pending_steps(env, tmp_path, settings, store) -> None:  # type: ignore[no-untyped-def]
    app = make_app(tmp_path)
    eng = engine(settings, store)
    run_id = eng.submit(app, "long", status="running")
    box = {}
    t = threading.Thread(target=lambda: box.update(res=eng.execute(run_id, app)))
    t.start()
    wait_for(lambda: (env / "started").exists())
    assert eng.cancel(run_id[:10]) == "cancelling"
    t.join(30)
    res = box["res"]
    assert res.status == "cancelled"
    assert res.steps == {"produce": "succeeded", "sleeper": "cancelled", "last": "cancelled"}
    assert not pid_alive(int((env / "grandchild.pid").read_text()))
    assert store.get_run(run_id).status == "cancelled"  # type: ignore[union-attr]
    assert "consume" not in counts(env)  # `last` never started
    with pytest.raises(ValueError, match="already cancelled"):
        eng.cancel(run_id)


def test_cache_reuses_outputs_and_can_be_turned_off(env, tmp_path, settings, store) -> None:  # type: ignore[no-untyped-def]
    app = make_app(tmp_path)
    eng = engine(settings, store)
    first = eng.run(app, "pipe")
    second = eng.run(app, "pipe")
    assert second.ok and second.steps == {"produce": "cached", "consume": "cached"}
    assert counts(env) == {"produce": 1, "consume": 1}  # nothing re-executed
    rows = {s.step: s for s in store.list_steps(second.run_id)}
    assert rows["produce"].cached_from == f"{first.run_id}/produce"
    assert rows["consume"].cache_key and len(rows["consume"].cache_key) == 64
    assert Path(rows["consume"].outputs["out"]).read_text() == "1!"  # reused output
    changed = eng.run(app, "pipe", {"n": 2})  # other params: other key
    assert changed.steps == {"produce": "succeeded", "consume": "succeeded"}
    off = eng.run(app, "pipe", cache=False)  # per run
    assert off.steps == {"produce": "succeeded", "consume": "succeeded"}
    eng.run(app, "nocache")
    assert eng.run(app, "nocache").steps == {"produce": "succeeded"}  # per step
    assert counts(env)["produce"] == 5


def test_resume_reruns_only_what_did_not_finish(env, tmp_path, settings, store) -> None:  # type: ignore[no-untyped-def]
    app = make_app(tmp_path)
    eng = engine(settings, store)
    res = eng.run(app, "resumable")
    assert res.status == "failed" and res.steps["consume"] == "skipped"
    with pytest.raises(ValueError, match="only failed, cancelled or interrupted"):
        eng.resume(eng.run(app, "pipe").run_id, app)
    (env / "go").write_text("1")
    before = counts(env)
    again = eng.resume(res.run_id, app)
    assert again.run_id == res.run_id and again.ok
    after = counts(env)
    assert after["gate"] == before["gate"] + 1 and after["consume"] == before["consume"] + 1
    assert after["produce"] == before["produce"]  # the finished step was not re-executed
    assert len(store.list_steps(res.run_id)) == 3  # no duplicate step rows


ENGINE_SCRIPT = '''
import os, sys
from scanflow.engine import LocalEngine
from scanflow.settings import Settings
from scanflow.spec import load_application
from scanflow.store import Store
settings = Settings(workspace=sys.argv[1], store_url=sys.argv[2]).ensure()
LocalEngine(settings, Store(settings.store)).run(load_application(sys.argv[3]), "long")
'''


def test_kill_9_of_the_engine_then_recover_and_resume(env, tmp_path, settings, store) -> None:  # type: ignore[no-untyped-def]
    app = make_app(tmp_path)
    script = tmp_path / "engine.py"
    script.write_text(ENGINE_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(settings.root), store.url,
                             str(app.source)], env={**os.environ})
    wait_for(lambda: (env / "started").exists(), 60)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    grandchild = int((env / "grandchild.pid").read_text())
    eng = engine(settings, store)  # a restart: recovery runs on start
    (run,) = store.list_runs()
    assert run.status == "interrupted" and "resume" in (run.error or "")
    steps = {s.step: s.status for s in store.list_steps(run.id)}
    assert steps == {"produce": "succeeded", "sleeper": "interrupted", "last": "pending"}
    wait_for(lambda: not pid_alive(grandchild), 10)  # the orphaned step was killed
    (env / "fast").write_text("1")
    res = eng.resume(run.id, app)
    assert res.ok, res.error
    assert counts(env)["produce"] == 1  # finished before the crash: not re-executed
    assert len(store.list_steps(run.id)) == 3
    assert all(s.status != "running" for s in store.list_steps(run.id))


def test_resources_are_never_oversubscribed(env, tmp_path, settings, store) -> None:  # type: ignore[no-untyped-def]
    app = make_app(tmp_path)
    res = engine(settings, store, concurrency=2).run(app, "heavy")
    assert res.ok, res.error
    one, two = (json.loads((env / f"{n}.json").read_text()) for n in ("one", "two"))
    assert one[1] <= two[0] or two[1] <= one[0]  # 2 + 2 CPUs never at once on 2
    with pytest.raises(ParamError, match="asks for 64 CPUs"):
        engine(settings, store).run(app, "greedy")


def test_queue_is_fair_across_teams(env, tmp_path, settings, store) -> None:  # type: ignore[no-untyped-def]
    busy, lone = make_app(tmp_path, "busy"), make_app(tmp_path, "lone")
    eng = engine(settings, store)
    ids = [eng.submit(busy, "nocache") for _ in range(5)]
    ids.append(eng.submit(lone, "nocache"))
    stop = threading.Event()
    t = threading.Thread(target=eng.serve, args=(stop.is_set,), kwargs={"max_runs": 1, "poll": 0.05})
    t.start()
    wait_for(lambda: all(store.get_run(i).status == "succeeded" for i in ids), 60)  # type: ignore[union-attr]
    stop.set()
    t.join(10)
    order = sorted(ids, key=lambda i: store.get_run(i).started_at)  # type: ignore[union-attr]
    assert order.index(ids[-1]) <= 1  # the lone team's run did not wait behind all five


@pytest.mark.parametrize(("resources", "says"), [
    ({"gpus": 1}, "asks for gpus: 1, which the local backend does not schedule"),
    ({"custom": {"node_a": 1}}, "asks for node_a, which the local backend does not schedule"),
])
def test_gpus_and_custom_resources_are_refused_at_submit_on_the_local_backend(
        settings, store, resources, says) -> None:  # type: ignore[no-untyped-def]
    app = Application(app="demo", team="ds", workflows={"w": Workflow(steps=[
        Step(name="s", run="python -c pass", resources=resources)])})
    with pytest.raises(ParamError, match=f"step s {says}.*SCANFLOW_BACKEND=ray"):
        LocalEngine(settings, store).submit(app, "w")
    assert store.list_runs() == []
