"""Local serving backend end to end: real MLflow registry, real gunicorn masters, real HTTP.

The tests of one module share one deployed `digits` service and run in file order:
predictions, validation, log, labels, metrics, scale, rollout, stop.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import httpx
import numpy as np
import orjson
import pytest
from mlflow.types.schema import ColSpec, Schema, TensorSpec
from prometheus_client.parser import text_string_to_metric_families

from scanflow.procs import child_pids, pid_alive
from scanflow.serving import Deployer, LocalDeployer, UnknownService
from scanflow.serving.backend import NotOnThisBackend
from scanflow.serving.predlog import (
    COLLECTOR_NICE,
    PredictionLog,
    collect_all,
    encode_prediction,
    encode_shadow,
)
from scanflow.serving.validation import (
    RequestError,
    extract_instances,
    parse_body,
    spec_from_schema,
    to_model_input,
)
from scanflow.spec.policy import Policy
from scanflow.store import Store
from support.serving import (
    COLUMN_MODEL,
    MODEL,
    DigitsWorkspace,
    KeepAliveLoad,
    digits_workspace,  # noqa: F401 - fixture
    register_broken_version,
    register_column_model,
    stop_everything,
)
from support.serving_corpus import BAD_INPUTS, DEEP_BODIES, send_fuzz, zero_row
from support.waiting import wait_for

SERVICE = "digits-svc"


def digits_workspace_actor() -> str:
    """Who the audit trail names for actions taken from this process (a person)."""
    import getpass

    return os.environ.get("SCANFLOW_ACTOR") or getpass.getuser()


# -- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def deployer(digits_workspace: DigitsWorkspace) -> Iterator[LocalDeployer]:  # noqa: F811
    d = LocalDeployer(digits_workspace.settings, digits_workspace.store)
    try:
        yield d
    finally:
        stop_everything(d, digits_workspace.store)


@pytest.fixture(scope="module")
def url(deployer: LocalDeployer) -> str:
    deployer.deploy(SERVICE, app="mnist", team="datascience", model=MODEL, replicas=1)
    return deployer.url(SERVICE)


def post(url: str, body: object, **kw: object) -> httpx.Response:
    return httpx.post(f"{url}/predict", json=body, timeout=30.0, **kw)  # type: ignore[arg-type]


def assert_serving(url: str, ws: DigitsWorkspace) -> None:
    r = post(url, {"instances": ws.X[:2].tolist()})
    assert r.status_code == 200, r.text


# -- pure validation ----------------------------------------------------------------------------
def test_validation_tensor_and_columns() -> None:
    tensor = spec_from_schema(Schema([TensorSpec(np.dtype("float32"), (-1, 4))]))
    x = to_model_input([[1, 2, 3, 4.5]], tensor)
    assert x.dtype == np.float32 and x.shape == (1, 4)
    with pytest.raises(RequestError, match=r"instances\[1\]: expected 4 values, got 3"):
        to_model_input([[1, 2, 3, 4], [1, 2, 3]], tensor)
    with pytest.raises(RequestError, match=r"instances\[0\]\[2\]: expected a number, got 'x'"):
        to_model_input([[1, 2, "x", 4]], tensor)

    cols = spec_from_schema(Schema([ColSpec("double", "a"), ColSpec("long", "b")]))
    df = to_model_input([{"a": 1, "b": 2}], cols)
    assert list(df.columns) == ["a", "b"] and str(df["a"].dtype) == "float64"
    with pytest.raises(RequestError, match=r"instances\[0\]: missing field 'b'") as e:
        to_model_input([{"a": 1}], cols)
    assert e.value.status == 422
    with pytest.raises(RequestError, match=r"instances\[0\]\.b: expected an integer"):
        to_model_input([{"a": 1, "b": 2.5}], cols)

    with pytest.raises(RequestError) as e:
        parse_body(b"{", "application/json")
    assert e.value.status == 400 and e.value.message.startswith("body is not valid JSON: ")
    with pytest.raises(RequestError) as e:
        extract_instances({"instances": [1, 2, 3]}, max_instances=2)
    assert e.value.status == 413


def _record(base: str, n: int, version: str = "1", kind: str = "p") -> bytes:
    """A journal record of a request of `n` instances [i, 0.5] answered 0..n-1."""
    if kind == "s":
        return encode_shadow(base, "s", version, time.time(), 1.0, list(range(n)))
    inst = [[float(i), 0.5] for i in range(n)]
    return encode_prediction(base, "s", version, time.time(), 1.0, np.asarray(inst), inst,
                             list(range(n)))


@pytest.mark.parametrize("process", [True, False], ids=["collector-process", "collector-thread"])
def test_prediction_log_journal_reaches_the_store_and_skips_duplicates(  # type: ignore[no-untyped-def]
    tmp_path, process, store_url
) -> None:
    store = Store(store_url)  # SQLite: bytes as they are; PostgreSQL: decoded for its JSON type
    plog = PredictionLog(store, tmp_path / "predlog", interval=0.05, batch_size=100,
                         process=process).start()
    for i in range(300):
        plog.add(_record(f"r{i}", 4))
    plog.add(_record("r7", 4))  # a client reusing an X-Request-ID: stored once, counted
    plog.add(_record("r1", 4, version="2", kind="s"))  # the shadow's answer to r1
    # inputs the store keeps as JSON: nested rows, column records, scalars
    nested = [[[1, 2], [3, 4]]]
    plog.add(encode_prediction("nest", "s", "1", time.time(), 1.0, np.asarray(nested, float),
                               nested, [{"label": 1, "p": [0.25, 0.75]}]))
    cols = [{"a": 1.5, "b": "x"}]
    plog.add(encode_prediction("cols", "s", "1", time.time(), 1.0, None, cols, ["y"]))
    assert plog.flush(timeout=30) and plog.pending == 0
    plog.close()
    assert not list((tmp_path / "predlog").glob("*.plog"))  # collected segments are removed
    win = store.prediction_window("s", with_shadow=True)
    assert len(win) == 1202 and len(set(win.request_ids)) == 1202
    if not process and store_url.startswith("sqlite"):  # counted where the collector runs;
        assert plog.collector.dropped == 4  # PostgreSQL's executemany reports no row count
    r1 = [i for i, r in enumerate(win.request_ids) if r.startswith("r1-")]
    assert [win.shadow_versions[i] for i in r1] == ["2"] * 4
    assert [win.shadow_outputs[i] for i in r1] == [0, 1, 2, 3]
    rows = {p["request_id"]: p for p in store.predictions("s")}
    assert rows["r3-2"]["inputs"] == [2.0, 0.5] and rows["r3-2"]["outputs"] == 2
    assert rows["nest-0"]["inputs"] == nested[0]
    assert rows["nest-0"]["outputs"] == {"label": 1, "p": [0.25, 0.75]}
    assert rows["cols-0"]["inputs"] == cols[0] and rows["cols-0"]["outputs"] == "y"
    flat = store.prediction_window("s", until=win.ts[r1[0]] + 1e-9)  # flat rows only: one array
    assert isinstance(flat.inputs, np.ndarray) and flat.inputs.shape[1] == 2
    store.close()


def test_pixel_inputs_are_logged_as_exact_uint8_at_a_quarter_of_the_bytes(  # type: ignore[no-untyped-def]
    tmp_path, store_url
) -> None:
    """Integers in 0..255 (an image's pixels) are journaled and stored as uint8 — what comes
    back is exactly what was sent — and anything else keeps float32; a window that mixes rows
    of both (a store written before uint8 rows) still reads as one float32 array."""
    rng = np.random.default_rng(0)
    digit = rng.integers(0, 256, 784).astype(float).tolist()
    sent = {"pixl": digit, "edge": [0.0, 255.0] * 392, "over": [0.0, 256.0] * 392,
            "negv": [-1.0, 3.0] * 392, "half": [0.5, 1.0] * 392}
    records = {rid: encode_prediction(rid, "s", "1", time.time(), 1.0, np.asarray([x]), [x], [1])
               for rid, x in sent.items()}
    assert len(records["pixl"]) < len(records["half"]) / 3  # 784 bytes of pixels, not 3,136
    assert len(records["edge"]) == len(records["pixl"])
    assert len(records["over"]) == len(records["negv"]) == len(records["half"])
    store = Store(store_url)
    old_f32 = np.asarray(digit, dtype=np.float32).tobytes()  # a row as the log wrote it before
    store.prediction_log.add_encoded([("old-0", "s", "1", time.time(), None, old_f32, None,
                                       "1", 1.0)])
    plog = PredictionLog(store, tmp_path / "predlog", interval=0.05, process=False).start()
    for rec in records.values():
        plog.add(rec)
    assert plog.flush(timeout=30)
    plog.close()
    rows = {p["request_id"]: p["inputs"] for p in store.predictions("s")}
    assert rows == {"old-0": digit, **{f"{rid}-0": x for rid, x in sent.items()}}
    win = store.prediction_window("s")
    assert isinstance(win.inputs, np.ndarray) and win.inputs.dtype == np.float32
    assert win.inputs.shape == (6, 784)
    by_id = dict(zip(win.request_ids, win.inputs, strict=True))
    assert np.array_equal(by_id["old-0"], by_id["pixl-0"])
    assert by_id["half-0"][0] == 0.5 and by_id["negv-0"][0] == -1.0 and by_id["over-0"][1] == 256.0
    store.close()


def test_orphan_journal_of_a_dead_worker_is_collected_once(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Segments named after a process that no longer exists are adopted, and re-collecting
    a segment whose offset file was lost (a crash between insert and offset) duplicates
    nothing; a segment of the former JSON-lines format is still read."""
    store = Store(f"sqlite:///{tmp_path / 'log.db'}")
    d = tmp_path / "predlog"
    d.mkdir()
    records = [_record(f"dead{i}", 2) for i in range(50)]
    seg = d / "999999-12345-000001.plog"  # no such pid: its owner is gone
    seg.write_bytes(b"".join(records) + _record("torn", 2)[:-7])  # killed mid-record
    twin = d / "999998-1-000001.plog"
    twin.write_bytes(b"".join(records[:10]))  # the same records again (re-collection)
    legacy = d / "999997-1-000001.jsonl"
    legacy.write_bytes(orjson.dumps({"k": "p", "rid": "old", "svc": "s", "v": "1", "ts": 1.0,
                                     "lat": 1.0, "in": [[1, 2]], "out": [5]}) + b"\n")
    assert collect_all(store, tmp_path) == 101
    assert not seg.exists() and not twin.exists() and not legacy.exists()
    assert store.count_predictions("s")[0] == 101
    win = store.prediction_window("s")
    assert all(not r.startswith("torn") for r in win.request_ids)
    old = win.request_ids.index("old-0")
    assert list(win.inputs[old]) == [1.0, 2.0] and win.outputs[old] == 5
    store.close()


# -- the digits service -------------------------------------------------------------------------
def test_predictions_match_the_model(url: str, digits_workspace: DigitsWorkspace) -> None:  # noqa: F811
    ws = digits_workspace
    r = post(url, {"instances": ws.X[:20].tolist()}, headers={"X-Request-ID": "match"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["predictions"] == ws.models["1"].predict(ws.X[:20]).tolist()
    assert body["ids"] == [f"match-{i}" for i in range(20)]
    assert body["model_version"] == "1"
    # `inputs` is a synonym; without X-Request-ID the ids are still unique, and in the order of
    # the requests (time-ordered: the store's request-id index grows at its end)
    r2 = post(url, {"inputs": ws.X[:3].tolist()})
    r3 = post(url, {"inputs": ws.X[:3].tolist()})
    ids = r2.json()["ids"] + r3.json()["ids"]
    assert len(set(ids)) == 6 and ids == sorted(ids)
    assert all(len(i.split("-")[0]) == 32 for i in ids)
    h = httpx.get(f"{url}/health").json()
    assert h["status"] == "ok" and h["service"] == SERVICE and h["model_name"] == MODEL
    assert h["model_version"] == "1" and isinstance(h["pid"], int)


def test_open_inference_v2_protocol(url: str, digits_workspace: DigitsWorkspace) -> None:  # noqa: F811
    ws = digits_workspace
    assert httpx.get(f"{url}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{url}/v2/health/ready").json() == {"ready": True}
    meta = httpx.get(f"{url}/v2/models/{MODEL}").json()
    assert meta["name"] == MODEL and meta["versions"] == ["1"]
    assert meta["inputs"][0]["shape"] == [-1, 64] and meta["inputs"][0]["datatype"] == "FP64"
    x = ws.X[:3]
    body = {"id": "v2req", "inputs": [{"name": "input", "shape": [3, 64], "datatype": "FP64",
                                      "data": x.ravel().tolist()}]}
    r = httpx.post(f"{url}/v2/models/{MODEL}/infer", json=body, timeout=30)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model_name"] == MODEL and out["model_version"] == "1" and out["id"] == "v2req"
    (tensor,) = out["outputs"]
    assert tensor["shape"] == [3] and tensor["data"] == ws.models["1"].predict(x).tolist()
    assert out["parameters"]["ids"] == ["v2req-0", "v2req-1", "v2req-2"]  # prediction-log ids
    nested = {"inputs": [{"name": "input", "shape": [3, 64], "datatype": "FP64",
                          "data": x.tolist()}]}
    assert httpx.post(f"{url}/v2/models/{MODEL}/versions/1/infer", json=nested,
                      timeout=30).json()["outputs"][0]["data"] == tensor["data"]
    bad = [
        ("/v2/models/other/infer", body, 404, "model 'other' is not served here"),
        (f"/v2/models/{MODEL}/versions/9/infer", body, 404, "version '9'"),
        (f"/v2/models/{MODEL}/infer", {"inputs": []}, 422, "inputs: required"),
        (f"/v2/models/{MODEL}/infer", {"inputs": [{"name": "input", "shape": [2, 64],
                                                   "datatype": "FP64", "data": [0.0] * 10}]},
         422, "shape [2, 64] needs 128 values, got 10"),
        (f"/v2/models/{MODEL}/infer", {"inputs": [{"name": "input", "shape": [1, 64],
                                                   "datatype": "FP128", "data": [0.0] * 64}]},
         422, "unknown datatype 'FP128'"),
        (f"/v2/models/{MODEL}/infer", {"inputs": [{"name": "input", "shape": [1, 60],
                                                   "datatype": "FP64", "data": [0.0] * 60}]},
         422, "instances[0]: expected 64 values, got 60"),
    ]
    for path, payload, status, message in bad:
        r = httpx.post(f"{url}{path}", json=payload, timeout=30)
        assert r.status_code == status and message in r.json()["detail"], (path, r.text)
    assert httpx.get(f"{url}/v2/models/other").status_code == 404
    assert_serving(url, ws)


def test_fuzzed_requests_never_5xx_nor_kill_a_worker(
    url: str, deployer: LocalDeployer, digits_workspace: DigitsWorkspace  # noqa: F811
) -> None:
    before = deployer.status(SERVICE)["workers"]
    send_fuzz(url, MODEL)
    assert deployer.status(SERVICE)["workers"] == before  # no worker died or was replaced
    assert_serving(url, digits_workspace)


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_a_clear_4xx(
    url: str, digits_workspace: DigitsWorkspace, case: tuple  # noqa: F811
) -> None:
    _, raw, ctype, status, message = case
    headers = {"Content-Type": ctype or "application/json"}
    r = httpx.post(f"{url}/predict", content=raw, headers=headers, timeout=30.0)
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]
    assert_serving(url, digits_workspace)


def test_bad_request_id_and_labels(url: str, digits_workspace: DigitsWorkspace) -> None:  # noqa: F811
    r = post(url, {"instances": [zero_row()]}, headers={"X-Request-ID": "has space"})
    assert r.status_code == 422 and "X-Request-ID" in r.json()["detail"]
    for body in ({}, {"labels": []}, {"labels": {}}, {"labels": {"x": [1]}}):
        r = httpx.post(f"{url}/labels", json=body)
        assert r.status_code == 422 and "labels" in r.json()["detail"], (body, r.text)
    for raw in (b"nope", DEEP_BODIES[1]):
        r = httpx.post(f"{url}/labels", content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and "not valid JSON" in r.json()["detail"], r.text
    assert_serving(url, digits_workspace)


def test_prediction_log_and_labels(url: str, digits_workspace: DigitsWorkspace) -> None:  # noqa: F811
    ws = digits_workspace
    r = post(url, {"instances": ws.X[10:13].tolist()}, headers={"X-Request-ID": "log"})
    assert r.status_code == 200
    preds = r.json()["predictions"]
    ids = ["log-0", "log-1", "log-2"]

    def logged() -> list[dict]:
        rows = [p for p in ws.store.predictions(SERVICE) if p["request_id"] in ids]
        return rows if len(rows) == 3 else []

    rows = sorted(wait_for(logged, timeout=30), key=lambda p: p["request_id"])
    for i, row in enumerate(rows):
        assert row["model_version"] == "1" and row["service"] == SERVICE
        assert row["inputs"] == ws.X[10 + i].tolist()
        assert row["outputs"] == preds[i]
        assert row["latency_ms"] > 0 and row["ts"] > 0
    # every instance of every request so far is in the log, once
    all_ids = [p["request_id"] for p in ws.store.predictions(SERVICE)]
    assert len(all_ids) == len(set(all_ids)) and {"match-0", "match-19"} <= set(all_ids)

    r = httpx.post(f"{url}/labels", json={"labels": {"log-0": int(ws.y[10]), "log-2": 7}})
    assert r.status_code == 200 and r.json() == {"count": 2}
    joined = ws.store.predictions(SERVICE, labelled_only=True)
    assert {p["request_id"]: p["label"] for p in joined} == {"log-0": int(ws.y[10]), "log-2": 7}


def test_metrics_count_requests(url: str, digits_workspace: DigitsWorkspace) -> None:  # noqa: F811
    for _ in range(5):
        assert_serving(url, digits_workspace)
    text = httpx.get(f"{url}/metrics").text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }

    def value(name: str, **labels: str) -> float:
        return sum(v for (n, ls), v in samples.items()
                   if n == name and all((k, lv) in ls for k, lv in labels.items()))

    assert value("scanflow_requests_total", endpoint="predict", status="200",
                 model_version="1") >= 5
    assert value("scanflow_requests_total", endpoint="predict", status="422") >= 5
    assert value("scanflow_instances_total", service=SERVICE) >= 10
    assert value("scanflow_request_latency_seconds_count", model_version="1") >= 5


def test_deployer_errors(deployer: LocalDeployer, url: str) -> None:
    assert isinstance(deployer, Deployer)
    with pytest.raises(ValueError, match="already running"):
        deployer.deploy(SERVICE, app="mnist", team="ds", model=MODEL)
    with pytest.raises(ValueError, match=r"models:/digits@nope"):
        deployer.deploy("other", app="mnist", team="ds", model=MODEL, alias="nope")
    with pytest.raises(ValueError, match=r"models:/no-such-model@champion"):
        deployer.deploy("other", app="mnist", team="ds", model="no-such-model")
    with pytest.raises(NotOnThisBackend, match=r"scaling: serve .*needs the ray backend"):
        deployer.deploy("other", app="mnist", team="ds", model=MODEL,
                        policy=Policy.model_validate({"scaling": "serve"}))
    for call in (lambda: deployer.status("ghost"), lambda: deployer.scale("ghost", 2),
                 lambda: deployer.rollout("ghost"), lambda: deployer.url("ghost")):
        with pytest.raises(KeyError, match="unknown service 'ghost'") as e:
            call()
        assert isinstance(e.value, UnknownService)


def test_column_model_fields_and_model_errors(
    deployer: LocalDeployer, digits_workspace: DigitsWorkspace  # noqa: F811
) -> None:
    from scanflow.serving.app import Limits

    register_column_model(digits_workspace)
    deployer = LocalDeployer(digits_workspace.settings, digits_workspace.store,
                             limits=Limits(request_timeout_s=1.0))
    deployer.deploy("adder-svc", app="demo", team="ds", model=COLUMN_MODEL)
    try:
        u = deployer.url("adder-svc")
        ok = post(u, {"instances": [{"a": 1.5, "b": 2}, {"a": 2, "b": 3, "note": "x"}]})
        assert ok.status_code == 200, ok.text
        assert ok.json()["predictions"] == [3.5, 5.0]
        missing = post(u, {"instances": [{"a": 1, "b": 2}, {"a": 1}]})
        assert missing.status_code == 422
        assert missing.json()["detail"] == "instances[1]: missing field 'b'"
        typed = post(u, {"instances": [{"a": "one", "b": 2}]})
        assert typed.status_code == 422 and "instances[0].a: expected a number" in typed.text
        listed = post(u, {"instances": [[1, 2]]})
        assert listed.status_code == 422 and "expected an object with fields a, b" in listed.text
        pid = httpx.get(f"{u}/health").json()["pid"]
        boom = post(u, {"instances": [{"a": 13, "b": 1}]})
        assert boom.status_code == 500 and "unlucky 13" in boom.json()["detail"]
        assert post(u, {"instances": [{"a": 1, "b": 1}]}).json()["predictions"] == [2.0]
        assert httpx.get(f"{u}/health").json()["pid"] == pid  # the same worker, alive
        slow = post(u, {"instances": [{"a": 7, "b": 3}]})
        assert slow.status_code == 504 and "longer than 1s" in slow.json()["detail"]
        assert post(u, {"instances": [{"a": 1, "b": 1}]}).json()["predictions"] == [2.0]
    finally:
        deployer.stop("adder-svc")


def test_scale_under_keepalive_load(
    deployer: LocalDeployer, url: str, digits_workspace: DigitsWorkspace  # noqa: F811
) -> None:
    master = deployer.status(SERVICE)["pid"]
    with KeepAliveLoad(url, digits_workspace.X, clients=4) as load:
        time.sleep(0.5)
        dep = deployer.scale(SERVICE, 3)
        assert dep.replicas == 3
        st = deployer.status(SERVICE)
        assert len(st["worker_pids"]) == 3 and len(child_pids(master)) == 3
        time.sleep(1.0)
        dep = deployer.scale(SERVICE, 1)
        assert dep.replicas == 1 and len(child_pids(master)) == 1
        time.sleep(0.5)
    res = load.result
    assert res.failed == 0, res.errors[:5]
    assert res.ok > 20
    kinds = [(e.kind, e.payload) for e in digits_workspace.store.list_events(SERVICE)]
    me = digits_workspace_actor()
    assert ("scaled", {"from": 1, "to": 3, "actor": me}) in kinds
    assert ("scaled", {"from": 3, "to": 1, "actor": me}) in kinds


def test_rollout_under_keepalive_load(
    deployer: LocalDeployer, url: str, digits_workspace: DigitsWorkspace  # noqa: F811
) -> None:
    ws = digits_workspace
    deployer.scale(SERVICE, 2)
    old_pids = set(deployer.status(SERVICE)["worker_pids"])
    ws.set_champion("2")
    with KeepAliveLoad(url, ws.X, clients=4) as load:
        time.sleep(0.5)
        dep = deployer.rollout(SERVICE)
        done = time.monotonic()
        time.sleep(1.0)
    res = load.result
    assert res.failed == 0, res.errors[:5]
    # the old workers handed their keep-alive clients over instead of dropping connections
    assert res.told_to_reconnect > 0
    assert dep.model_version == "2" and dep.replicas == 2
    before = {v for t, v in res.versions if t < done}
    after = [v for t, v in res.versions if t > done]
    assert "1" in before and after and set(after) == {"2"}
    st = deployer.status(SERVICE)
    assert st["versions"] == ["2"] and len(st["worker_pids"]) == 2
    assert not old_pids & set(st["worker_pids"])
    r = post(url, {"instances": ws.X[:50].tolist()})
    assert r.json()["predictions"] == ws.models["2"].predict(ws.X[:50]).tolist()
    ev = [e for e in ws.store.list_events(SERVICE) if e.kind == "rollout_completed"]
    assert len(ev) == 1 and ev[0].payload["from_version"] == "1"
    assert ev[0].payload["to_version"] == "2" and ev[0].payload["seconds"] > 0
    # alias unchanged: nothing restarts
    pids = st["worker_pids"]
    assert deployer.rollout(SERVICE).model_version == "2"
    assert deployer.status(SERVICE)["worker_pids"] == pids
    assert len([e for e in ws.store.list_events(SERVICE) if e.kind == "rollout_completed"]) == 1


def test_a_version_that_does_not_load_is_refused(
    deployer: LocalDeployer, url: str, digits_workspace: DigitsWorkspace  # noqa: F811
) -> None:
    ws = digits_workspace
    before = deployer.status(SERVICE)
    serving = before["model_version"]
    broken = register_broken_version(ws, like="2")
    ws.set_champion(broken)
    try:
        with pytest.raises(RuntimeError, match=rf"models:/digits/{broken} does not load"):
            deployer.rollout(SERVICE)
        st = deployer.status(SERVICE)
        assert st["versions"] == [serving] and st["worker_pids"] == before["worker_pids"]
        assert_serving(url, ws)
        with pytest.raises(RuntimeError, match="exited while waiting") as e:
            deployer.deploy("broken-svc", app="mnist", team="ds", model=MODEL)
        assert "model.skops" in str(e.value)  # the tail of server.log says why
        assert ws.store.get_deployment("broken-svc").status == "failed"
        assert not group_pids_of(deployer, "broken-svc")
    finally:
        ws.set_champion(serving)


def group_pids_of(deployer: LocalDeployer, service: str) -> list[int]:
    """Processes left of a service whose deploy failed (its master never got recorded)."""
    wd = str(deployer.workdir(service))
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                env = open(f"/proc/{entry.name}/environ", "rb").read()
            except OSError:
                continue
            if f"SCANFLOW_SERVICE_CONFIG={wd}/".encode() in env:
                out.append(int(entry.name))
    return out


def test_stop_leaves_no_process(
    deployer: LocalDeployer, url: str, digits_workspace: DigitsWorkspace  # noqa: F811
) -> None:
    st = deployer.status(SERVICE)
    collectors = [c for w in st["worker_pids"] for c in child_pids(w)]  # prediction-log collectors
    assert len(collectors) == len(st["worker_pids"])
    # each collector yields the cores to the worker that serves (see predlog.COLLECTOR_NICE)
    worker_nice = os.getpriority(os.PRIO_PROCESS, st["worker_pids"][0])
    assert {os.getpriority(os.PRIO_PROCESS, c) for c in collectors} == {
        min(19, worker_nice + COLLECTOR_NICE)}
    pids = [st["pid"], *st["worker_pids"], *collectors]
    assert all(pid_alive(p) for p in pids)
    deployer.stop(SERVICE)
    assert not any(pid_alive(p) for p in pids)
    st = deployer.status(SERVICE)
    assert st["status"] == "stopped" and not st["alive"] and st["worker_pids"] == []
    assert digits_workspace.store.get_deployment(SERVICE).status == "stopped"
    assert "stopped" in [e.kind for e in digits_workspace.store.list_events(SERVICE)]
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health", timeout=2.0)
