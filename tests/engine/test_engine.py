"""The engine: DAG order, parallelism, failure propagation, logs and MLflow records. The tests
taking `backend` run on the local backend and on the ray backend (a real 3-node cluster, with
PostgreSQL and an MLflow server as its only shared state)."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from scanflow.control import backends
from scanflow.engine import Engine, LocalEngine, ParamError
from scanflow.engine.dag import Scheduler
from scanflow.engine.ray_task import split_uri
from scanflow.settings import Settings
from scanflow.spec import load_application
from scanflow.spec.models import Step, Workflow
from scanflow.store import Store
from scanflow.tracking import MlflowTracker
from support.mlflow_server import mlflow_server
from support.ray_cluster import ray_cluster, ray_settings

STEPS = '''
import json, time
from pathlib import Path

def stamp(name, out, ctx, delay=0.0):
    t0 = time.time(); time.sleep(delay)
    out.write_text(json.dumps({"step": name, "t0": t0, "t1": time.time()}))
    ctx.log("stamped", name)
    return {"delay": delay}

def join(left, right, out):
    out.write_text(left.read_text() + "\\n" + right.read_text())

def boom():
    raise RuntimeError("the model diverged")
'''

SCRIPT = '''
import argparse, sys, mlflow
p = argparse.ArgumentParser()
p.add_argument("--code", type=int, default=0)
p.add_argument("--words", default="")
p.add_argument("--src")
a = p.parse_args()
with mlflow.start_run():
    mlflow.log_metric("accuracy", 0.5 + a.code / 100)
for i in range(30):
    print("line", i)
print("words:", a.words, "src:", open(a.src).read()[:20] if a.src else None)
sys.exit(a.code)
'''

SPEC = '''
app: demo
team: ds
workflows:
  diamond:
    steps:
      - {name: a, call: "steps:stamp", params: {name: a}, outputs: [out]}
      - {name: left, call: "steps:stamp", params: {name: left, delay: 1.0}, inputs: {}, after: [a],
         outputs: [out]}
      - {name: right, call: "steps:stamp", params: {name: right, delay: 1.0}, after: [a], outputs: [out]}
      - {name: join, call: "steps:join", inputs: {left: left.out, right: right.out}, outputs: [out]}
  mixed:
    params: {code: 0}
    steps:
      - {name: a, call: "steps:stamp", params: {name: a}, outputs: [out]}
      - {name: script, run: "python script.py", params: {words: hello}, inputs: {src: a.out}}
      - {name: after_script, call: "steps:stamp", params: {name: z}, after: [script], outputs: [out]}
      - {name: independent, call: "steps:stamp", params: {name: i, delay: 0.5}, outputs: [out]}
  raises:
    steps:
      - {name: bad, call: "steps:boom"}
      - {name: never, call: "steps:stamp", params: {name: n}, after: [bad], outputs: [out]}
'''


@pytest.fixture
def app(tmp_path: Path) -> object:
    d = tmp_path / "app"
    d.mkdir()
    (d / "steps.py").write_text(textwrap.dedent(STEPS))
    (d / "script.py").write_text(textwrap.dedent(SCRIPT))
    (d / "scanflow.yaml").write_text(SPEC)
    return load_application(d)


@dataclass
class Backend:
    """One backend under test: its settings and store, an engine, and a step output's text."""

    settings: Settings
    store: Store
    engine: Callable[..., Engine]
    read: Callable[[str, str, str], str]  # (run id, step, output) -> its content


@pytest.fixture(scope="module")
def ray_state(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, str]]:
    """A head + 2 worker nodes of 1 CPU and an `mlflow server --serve-artifacts`, per module."""
    pytest.importorskip("ray")
    with mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as url, ray_cluster([{}, {}]) as c:
        yield c, url


@pytest.fixture(params=["local", pytest.param("ray", marks=[pytest.mark.slow, pytest.mark.postgres])])
def backend(request: pytest.FixtureRequest, settings: Settings, store: Store, tmp_path: Path,
            monkeypatch: pytest.MonkeyPatch) -> Backend:
    if request.param == "local":
        return Backend(settings, store, lambda **kw: LocalEngine(settings, store, **kw),
                       lambda run, step, name: (settings.runs_dir / run / step / name).read_text())
    if request.node.callspec.params.get("store_url") != "postgresql":
        pytest.skip("the ray backend needs a shared store: it runs on PostgreSQL only")
    cluster, url = request.getfixturevalue("ray_state")
    rs = ray_settings(cluster.address, url, request.getfixturevalue("store_url"), tmp_path / "ray-ws",
                      monkeypatch)

    def read(run: str, step: str, name: str) -> str:
        row = next(s for s in store.list_steps(run) if s.step == step)
        run_id, path = split_uri(row.outputs[name])  # an MLflow URI: nothing on this disk
        return Path(MlflowTracker(rs).download(run_id, path, str(tmp_path / "dl" / step))).read_text()

    return Backend(rs, store, lambda **kw: backends.engine(rs, store, **kw), read)


def _times(backend: Backend, run_id: str, step: str) -> dict[str, float]:
    return json.loads(backend.read(run_id, step, "out"))


def test_dag_runs_in_order_and_in_parallel(app, backend: Backend) -> None:  # type: ignore[no-untyped-def]
    res = backend.engine(concurrency=2).run(app, "diamond")
    assert res.ok, res.error
    a, left, right = (_times(backend, res.run_id, s) for s in ("a", "left", "right"))
    assert left["t0"] >= a["t1"] and right["t0"] >= a["t1"]  # order
    assert left["t0"] < right["t1"] and right["t0"] < left["t1"]  # overlapped: ran in parallel
    joined = backend.read(res.run_id, "join", "out")
    assert '"left"' in joined and '"right"' in joined  # outputs handed over as inputs
    assert {s.step: s.status for s in backend.store.list_steps(res.run_id)} == dict.fromkeys(
        ["a", "left", "right", "join"], "succeeded")


def test_concurrency_one_serialises(app, backend: Backend) -> None:  # type: ignore[no-untyped-def]
    res = backend.engine(concurrency=1).run(app, "diamond")
    left, right = (_times(backend, res.run_id, s) for s in ("left", "right"))
    assert left["t1"] <= right["t0"] or right["t1"] <= left["t0"]


def test_failure_stops_dependants_and_reports_exit_code_and_tail(  # type: ignore[no-untyped-def]
        app, backend: Backend) -> None:
    store = backend.store
    res = backend.engine().run(app, "mixed", {"code": 3})
    assert res.status == "failed"
    assert res.steps == {"a": "succeeded", "script": "failed", "after_script": "skipped",
                         "independent": "succeeded"}
    assert "exit code 3" in (res.error or "") and "line 29" in (res.error or "")
    assert "line 0\n" not in (res.error or "")  # only the tail
    steps = {s.step: s for s in store.list_steps(res.run_id)}
    assert steps["script"].exit_code == 3
    log = Path(steps["script"].log_path or "").read_text()
    assert "line 0" in log and "words: hello" in log
    run = store.get_run(res.run_id)
    assert run is not None and run.status == "failed" and "exit code 3" in (run.error or "")


def test_exception_in_callable_fails_the_run(app, backend: Backend) -> None:  # type: ignore[no-untyped-def]
    res = backend.engine().run(app, "raises")
    assert res.status == "failed" and res.steps["never"] == "skipped"
    assert "RuntimeError: the model diverged" in (res.error or "")


def test_runs_are_tracked_in_mlflow(app, settings: Settings, store: Store) -> None:  # type: ignore[no-untyped-def]
    res = LocalEngine(settings, store).run(app, "mixed", {"code": 0, "script.words": "hi"})
    assert res.ok, res.error
    client = MlflowClient(settings.tracking)
    parent = client.get_run(res.mlflow_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["scanflow.run_id"] == res.run_id
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{res.mlflow_run_id}'")
    by_step = {r.data.tags["scanflow.step"]: r for r in children}
    assert set(by_step) == {"a", "script", "after_script", "independent"}
    script = by_step["script"]
    assert script.data.params["words"] == "hi" and script.data.params["code"] == "0"
    assert script.data.metrics["accuracy"] == 0.5  # logged by the step through the env
    assert by_step["independent"].data.metrics["delay"] == 0.5  # returned by a callable
    # Lineage of every step, with output digests, on the parent run.
    path = client.download_artifacts(res.mlflow_run_id or "", "scanflow/steps.json",
                                     str(settings.root))
    lineage = {d["step"]: d for d in json.loads(Path(path).read_text())}
    assert lineage["script"]["inputs"] == {"src": "a.out"}
    out = lineage["a"]["outputs"]["out"]
    assert out["path"].endswith("/a/out") and len(out["sha256"]) == 64
    assert lineage["script"]["mlflow_run_id"] == script.info.run_id
    # MLflow artifacts stay in the workspace.
    assert parent.info.artifact_uri.startswith(settings.artifacts.as_uri())
    # Child runs are made ahead of their steps and closed behind them: every one is closed when
    # the run returns, and a run whose steps all come from the cache keeps none of them.
    assert {r.info.status for r in children} == {"FINISHED"}
    again = LocalEngine(settings, store).run(app, "mixed", {"code": 0, "script.words": "hi"})
    assert again.ok and set(again.steps.values()) == {"cached"}, again.steps
    assert client.search_runs([parent.info.experiment_id],
                              f"tags.mlflow.parentRunId = '{again.mlflow_run_id}'") == []


def test_bad_params_are_refused_before_anything_runs(app, backend: Backend) -> None:  # type: ignore[no-untyped-def]
    eng, store = backend.engine(), backend.store
    for bad, msg in [({"code": "x"}, "expected an int"), ({"nope": 1}, "unknown parameter"),
                     ({"ghost.code": 1}, "no step named 'ghost'")]:
        with pytest.raises(ParamError, match=msg):
            eng.run(app, "mixed", bad)
    assert store.list_runs() == []
    with pytest.raises(KeyError, match="no workflow 'missing'"):
        eng.run(app, "missing")


# -- the Scheduler alone: no threads, no store ---------------------------------------------------
def _wf(**deps: list[str]) -> Workflow:
    return Workflow(steps=[Step(name=n, call="steps:noop", after=d) for n, d in deps.items()])


def _drain(sched: Scheduler) -> list[str]:
    out = []
    while (s := sched.take()) is not None:
        out.append(s.name)
    return out


def test_scheduler_releases_a_step_when_its_last_dependency_is_done() -> None:
    sched = Scheduler(_wf(a=[], b=[], left=["a"], right=["a"], join=["left", "right", "b"]))
    assert _drain(sched) == ["a", "b"]  # roots, in workflow order, now running
    assert sched.status["a"] == "running" and sched.take() is None
    assert sched.settle("a", "succeeded") == []
    assert _drain(sched) == ["left", "right"]
    sched.settle("left", "cached")  # a cache hit counts as done
    sched.settle("b", "succeeded")
    assert not sched.has_ready()  # join still waits for right
    sched.settle("right", "succeeded")
    assert _drain(sched) == ["join"]
    sched.settle("join", "succeeded")
    assert sched.outcome() == "succeeded"


def test_scheduler_skips_everything_downstream_of_a_failure_only() -> None:
    sched = Scheduler(_wf(a=[], b=["a"], c=["b"], d=[], e=["d"]))
    assert _drain(sched) == ["a", "d"]
    assert sorted(sched.settle("a", "failed")) == ["b", "c"]
    assert sched.status == {"a": "failed", "b": "skipped", "c": "skipped", "d": "running",
                            "e": "pending"}
    sched.settle("d", "succeeded")
    assert _drain(sched) == ["e"]  # the independent branch goes on
    sched.settle("e", "succeeded")
    assert sched.outcome() == "failed"


def test_scheduler_cancellation_and_resume() -> None:
    sched = Scheduler(_wf(a=[], b=["a"], c=["b"], d=[]))
    _drain(sched)
    assert sorted(sched.settle("a", "cancelled")) == ["b", "c"]
    assert sched.status["b"] == sched.status["c"] == "cancelled"
    assert sched.cancel_rest() == ["d"]  # was running
    resumed = Scheduler(_wf(a=[], b=["a"], c=["b"]), done=["a"])  # a finished last time
    assert resumed.status["a"] == "succeeded" and _drain(resumed) == ["b"]
