"""Canary, shadow, rollback, micro-batching and a replica killed with SIGKILL, on real
gunicorn services over a real MLflow registry (its own workspace, digits v1 and v2)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from scanflow.serving import LocalDeployer
from scanflow.serving.batching import BatchConfig
from support.serving import (
    COLUMN_MODEL,
    MODEL,
    DigitsWorkspace,
    KeepAliveLoad,
    digits_workspace,  # noqa: F401 - fixture
    register_column_model,
    stop_everything,
)
from support.waiting import wait_for

SERVICE = "digits-rollouts"


@pytest.fixture(scope="module")
def deployer(digits_workspace: DigitsWorkspace) -> Iterator[LocalDeployer]:  # noqa: F811
    d = LocalDeployer(digits_workspace.settings, digits_workspace.store)
    try:
        yield d
    finally:
        stop_everything(d, digits_workspace.store)


@pytest.fixture(scope="module")
def url(deployer: LocalDeployer) -> str:
    deployer.deploy(SERVICE, app="mnist", team="ops", model=MODEL, replicas=2)
    return deployer.url(SERVICE)


def metric(url: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Samples of one metric on /metrics, keyed by their sorted labels."""
    out = {}
    for fam in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in fam.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def versions_of(url: str, ws: DigitsWorkspace, n: int) -> list[str]:
    with httpx.Client(base_url=url, timeout=30) as c:
        return [c.post("/predict", json={"instances": [ws.X[i % len(ws.X)].tolist()]})
                .headers["x-model-version"] for i in range(n)]


def test_canary_takes_its_share_with_per_version_metrics(
    deployer: LocalDeployer, url: str, digits_workspace: DigitsWorkspace  # noqa: F811
) -> None:
    ws = digits_workspace
    deployer.set_canary(SERVICE, "2", share=0.3)
    st = deployer.status(SERVICE)
    assert st["model_version"] == "1" and st["canary"] == {"version": "2", "share": 0.3}
    assert st["versions"] == ["1", "2"]
    seen = versions_of(url, ws, 400)
    share = seen.count("2") / len(seen)
    assert 0.2 < share < 0.4, share  # binomial(400, 0.3): 5 sigma either side
    reqs = metric(url, "scanflow_requests_total")
    by_version = {dict(k)["model_version"]: v for k, v in reqs.items()
                  if dict(k)["endpoint"] == "predict" and dict(k)["status"] == "200"}
    assert by_version["1"] >= seen.count("1") and by_version["2"] >= seen.count("2")
    deployer.set_canary(SERVICE, None)
    assert set(versions_of(url, ws, 50)) == {"1"}
    with pytest.raises(ValueError, match="already the champion"):
        deployer.set_canary(SERVICE, "1", share=0.5)


def test_shadow_answers_are_logged_not_returned(
    deployer: LocalDeployer, url: str, digits_workspace: DigitsWorkspace  # noqa: F811
) -> None:
    ws = digits_workspace
    deployer.set_shadow(SERVICE, "2")
    assert deployer.status(SERVICE)["shadow_version"] == "2"
    X = ws.X[:40]
    with httpx.Client(base_url=url, timeout=30) as c:
        answers = [c.post("/predict", json={"instances": [x.tolist()]}).json() for x in X]
    assert {a["model_version"] for a in answers} == {"1"}
    assert [a["predictions"][0] for a in answers] == ws.models["1"].predict(X).tolist()
    ids = [a["ids"][0] for a in answers]

    def logged() -> object:
        win = ws.store.prediction_window(SERVICE, with_shadow=True)
        got = {r: (v, so) for r, v, so in zip(win.request_ids, win.shadow_versions,
                                               win.shadow_outputs, strict=True) if r in ids}
        return got if len(got) == len(ids) and all(v == "2" for v, _ in got.values()) else None

    got = wait_for(logged, timeout=30)
    assert [got[i][1] for i in ids] == ws.models["2"].predict(X).tolist()
    deployer.set_shadow(SERVICE, None)


def test_rollback_in_one_step_moves_the_alias_back(
    deployer: LocalDeployer, url: str, digits_workspace: DigitsWorkspace  # noqa: F811
) -> None:
    ws = digits_workspace
    ws.set_champion("2")
    with KeepAliveLoad(url, ws.X, clients=4) as load:
        time.sleep(0.3)
        deployer.rollout(SERVICE, reason="test promotes v2")
        assert deployer.status(SERVICE)["previous_version"] == "1"
        dep = deployer.rollback(SERVICE, reason="v2 worse on labels")
        time.sleep(0.5)
    assert load.result.failed == 0, load.result.errors[:5]
    assert dep.model_version == "1"
    st = deployer.status(SERVICE)
    assert st["versions"] == ["1"] and st["previous_version"] == "2"
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=ws.settings.tracking)
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"
    ev = [e for e in ws.store.list_events(SERVICE) if e.kind == "rollback_completed"]
    assert ev and ev[-1].payload["reason"] == "v2 worse on labels"
    assert ev[-1].payload["alias_moved"] is True and ev[-1].payload["actor"]
    with pytest.raises(ValueError, match="no previous version"):
        fresh = LocalDeployer(ws.settings, ws.store)
        fresh.deploy("no-history", app="mnist", team="ops", model=MODEL)
        try:
            fresh.rollback("no-history")
        finally:
            fresh.stop("no-history")


def test_killed_replica_is_replaced_and_no_answered_request_is_lost(
    deployer: LocalDeployer, url: str, digits_workspace: DigitsWorkspace  # noqa: F811
) -> None:
    """SIGKILL one of two replicas under load: the other keeps answering, gunicorn forks a
    replacement, and every request that got a 200 is in the prediction log afterwards."""
    ws = digits_workspace
    before = set(deployer.status(SERVICE)["worker_pids"])
    assert len(before) == 2
    victim = sorted(before)[0]
    with KeepAliveLoad(url, ws.X, clients=4, pause=0.0) as load:
        time.sleep(1.0)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        replaced = wait_for(
            lambda: (lambda st: st if len(st["worker_pids"]) == 2 and victim not in st["worker_pids"]
                     and all(w["ready"] for w in st["workers"]) else None)(deployer.status(SERVICE)),
            timeout=30, interval=0.02,
        )
        replaced_in = time.monotonic() - killed_at
        ok_at_replacement = load.result.ok
        time.sleep(1.0)
    res = load.result
    print(f"replica replaced {replaced_in:.2f}s after SIGKILL; {res.failed} requests failed "
          f"(in flight on the victim)")
    assert res.ok > ok_at_replacement > 0  # served throughout and after
    assert res.failed <= 4  # at most the victim's in-flight requests (one per client)
    assert len(set(replaced["worker_pids"]) - before) == 1
    answered = set(res.ids)
    wait_for(lambda: answered <= set(ws.store.prediction_window(SERVICE, with_inputs=False)
                                      .request_ids), timeout=30, interval=0.2)


def test_concurrent_requests_share_model_calls_and_fail_alone(
    digits_workspace: DigitsWorkspace,  # noqa: F811
) -> None:
    """With a generous max_wait_ms, 12 concurrent single-row requests take far fewer model
    calls than 12; the one whose row makes the model raise gets its own 500."""
    ws = digits_workspace
    register_column_model(ws)
    d = LocalDeployer(ws.settings, ws.store, batching=BatchConfig(max_batch_size=64, max_wait_ms=200))
    d.deploy("adder-batched", app="mnist", team="ops", model=COLUMN_MODEL)
    try:
        u = d.url("adder-batched")
        rows = [{"a": float(i), "b": 1} for i in range(12)]
        rows[5] = {"a": 13.0, "b": 1}  # this one makes the model raise
        out: dict[int, httpx.Response] = {}
        barrier = threading.Barrier(len(rows))

        def send(i: int) -> None:
            with httpx.Client(timeout=30) as c:
                barrier.wait()
                out[i] = c.post(f"{u}/predict", json={"instances": [rows[i]]})

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(rows))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert out[5].status_code == 500 and "unlucky 13" in out[5].json()["detail"]
        for i, r in out.items():
            if i != 5:
                assert r.status_code == 200 and r.json()["predictions"] == [rows[i]["a"] + 1]
        calls = metric(u, "scanflow_batch_size_count")
        items = metric(u, "scanflow_batch_size_sum")
        # the first (failed) batch, then one call per request of it to find the culprit
        n_calls, n_items = sum(calls.values()), sum(items.values())
        assert n_items / n_calls > 1.0, (n_calls, n_items)
        assert metric(u, "scanflow_replicas") and sum(metric(u, "scanflow_replicas").values()) == 1
        health = httpx.get(f"{u}/health").json()
        assert health["batching"]["max_wait_ms"] == 200
    finally:
        d.stop("adder-batched")


def test_cli_canary_shadow_rollback_and_status(
    deployer: LocalDeployer, url: str, digits_workspace: DigitsWorkspace,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from typer.testing import CliRunner

    from scanflow.cli import main
    from scanflow.cli.main import app

    # The console was sized when the module was first imported (maybe by another test).
    monkeypatch.setattr(main.out, "width", 250)

    ws = digits_workspace

    def cli(*args: str) -> tuple[int, str]:
        res = CliRunner(env={"COLUMNS": "250"}).invoke(app, ["--workspace", str(ws.settings.root), *args])
        return res.exit_code, res.output

    code, text = cli("canary", SERVICE)
    assert code == 2 and "give a VERSION, or --off" in text
    code, text = cli("canary", SERVICE, "2", "--share", "0.25")
    assert code == 0, text
    code, text = cli("status")
    assert code == 0 and "v2 25%" in text and "v1: 2" in text, text
    code, text = cli("status", "--json")
    svc = next(s for s in json.loads(text)["services"] if s["service"] == SERVICE)
    assert svc["canary"] == {"version": "2", "share": 0.25} and svc["versions"] == ["1", "2"]
    assert cli("canary", SERVICE, "--off")[0] == 0
    assert cli("shadow", SERVICE, "2")[0] == 0
    assert deployer.status(SERVICE)["shadow_version"] == "2"
    assert cli("shadow", SERVICE, "--off")[0] == 0
    code, text = cli("rollout", SERVICE, "--version", "2", "--reason", "cli test")
    assert code == 0 and "serving version 2" in text, text
    code, text = cli("rollback", SERVICE)
    assert code == 0 and "rolled back to version 1 (was 2)" in text, text
    code, text = cli("rollback", "no-such-service")
    assert code == 2 and "no-such-service" in text
