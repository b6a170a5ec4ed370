"""Services on the ray backend: `scanflow deploy` with SCANFLOW_BACKEND=ray runs the service as a
Ray Serve application on a real 3-node cluster (head + 2 workers), with PostgreSQL and an
MLflow server as the shared state. The same requests get the same answers as on the local
backend (the shared corpus of malformed requests included), predictions reach the shared store
with the version that answered, and a scale 1 -> 3 -> 1 under load fails no request."""

from __future__ import annotations

import os
import signal
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from scanflow.cli.main import app as cli_app
from scanflow.control import backends
from scanflow.serving.ray_serve import RayServeDeployer
from scanflow.settings import Settings, get_settings
from scanflow.store import Store
from support.mlflow_server import free_port, mlflow_server
from support.ray_cluster import ray_cluster
from support.serving import KeepAliveLoad
from support.serving_corpus import BAD_INPUTS, send_fuzz
from support.waiting import wait_for

pytestmark = pytest.mark.slow
MODEL = "digits"
SERVICE = "web"


@pytest.fixture(scope="module")
def pg_module_url() -> Iterator[str]:
    """A schema of the local PostgreSQL for this module (its services outlive one test)."""
    from conftest import pg_schema

    with pg_schema() as url:
        yield url


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    return X, y


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """A head and 2 worker nodes (`ray.cluster_utils.Cluster`: a test may remove a node)."""
    with ray_cluster([{"node_a": 1}, {"node_b": 1}]) as c:
        yield c


@pytest.fixture(scope="module")
def cluster_settings(tmp_path_factory: pytest.TempPathFactory, pg_module_url: str, cluster: Any,
                     digits: tuple[np.ndarray, np.ndarray]) -> Iterator[Settings]:
    """The MLflow server holding `digits` v1 (champion) and v2, the settings of a person on the
    ray backend, and the app folder (`settings.root.parent / "app"`)."""
    root = tmp_path_factory.mktemp("ray-serve")
    mp = pytest.MonkeyPatch()
    with mlflow_server(root / "mlflow") as tracking:
        env = {"SCANFLOW_BACKEND": "ray", "SCANFLOW_STORE_URL": pg_module_url,
               "SCANFLOW_TRACKING_URI": tracking, "SCANFLOW_RAY_ADDRESS": cluster.address,
               "SCANFLOW_WORKSPACE": str(root / "ws"), "SCANFLOW_SERVE_PORT": str(free_port())}
        for k, v in env.items():
            mp.setenv(k, v)
        get_settings.cache_clear()
        settings = Settings().ensure()
        _register(tracking, *digits)
        app = root / "app"
        app.mkdir()
        (app / "scanflow.yaml").write_text(textwrap.dedent(f"""\
            app: digits
            team: serving
            services:
              {SERVICE}:
                model: {MODEL}
                resources: {{cpus: 0.25}}
            """))
        try:
            yield settings
        finally:
            from ray import serve

            serve.shutdown()
            mp.undo()
            get_settings.cache_clear()


def _register(tracking: str, X: np.ndarray, y: np.ndarray) -> None:
    """`digits` v1 and v2 in the server's registry, its files in the server's proxied artifact store
    (no path on this machine)."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.models import infer_signature
    from sklearn.linear_model import LogisticRegression

    mlflow.set_tracking_uri(tracking)
    for n_train in (len(X), 300):  # v1 on everything, v2 on a subset (other predictions)
        est = LogisticRegression(max_iter=300).fit(X[:n_train], y[:n_train])
        with mlflow.start_run():
            info = mlflow.sklearn.log_model(est, name="model", signature=infer_signature(X, y),
                                            pip_requirements=["scikit-learn"])
        mlflow.register_model(info.model_uri, MODEL)
    MlflowClient(tracking_uri=tracking).set_registered_model_alias(MODEL, "champion", "1")


def cli(settings: Settings, *args: str) -> tuple[int, str]:
    res = CliRunner().invoke(cli_app, ["--workspace", str(settings.root), *args])
    return res.exit_code, res.output


@pytest.fixture(scope="module")
def deployed(cluster_settings: Settings) -> Iterator[tuple[Settings, str]]:
    """The service deployed by `scanflow deploy` on the cluster; its URL."""
    settings = cluster_settings
    code, out = cli(settings, "deploy", str(settings.root.parent / "app"))
    assert code == 0, out
    url = f"http://{settings.host}:{settings.serve_port}/{SERVICE}"
    assert f"at {url}" in " ".join(out.split()), out
    try:
        yield settings, url
    finally:
        cli(settings, "stop", SERVICE)


def _metric(url: str, name: str, **labels: str) -> float:
    """A sample of the service's `/metrics`, summed over the label values not given."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def _deployer(settings: Settings) -> RayServeDeployer:
    dep = backends.deployer(settings, Store(settings.store))
    assert isinstance(dep, RayServeDeployer)
    return dep


def test_the_same_protocols_answer_on_ray_serve(
        deployed: tuple[Settings, str], digits: tuple[np.ndarray, np.ndarray]) -> None:
    settings, url = deployed
    X, _ = digits
    r = httpx.post(f"{url}/predict", json={"instances": X[:3].tolist()},
                   headers={"X-Request-ID": "same"}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"predictions", "ids", "model_version"} and body["model_version"] == "1"
    assert body["ids"] == ["same-0", "same-1", "same-2"] and len(body["predictions"]) == 3
    health = httpx.get(f"{url}/health", timeout=10).json()
    assert health["status"] == "ok" and health["service"] == SERVICE
    assert health["model_name"] == MODEL and health["model_version"] == "1"
    assert health["signature"] == {"kind": "tensor", "dtype": "float64", "shape": [-1, 64]}
    v2 = httpx.post(f"{url}/v2/models/{MODEL}/infer", timeout=30, json={
        "id": "v2", "inputs": [{"name": "input", "shape": [3, 64], "datatype": "FP64",
                                "data": X[:3].ravel().tolist()}]}).json()
    assert v2["outputs"][0]["data"] == body["predictions"] and v2["model_version"] == "1"
    assert httpx.get(f"{url}/v2/health/ready").json() == {"ready": True}
    assert "scanflow_requests_total" in httpx.get(f"{url}/metrics", timeout=10).text
    labels = httpx.post(f"{url}/labels", json={"labels": {"same-0": 1}}, timeout=10)
    assert labels.status_code == 200 and labels.json() == {"count": 1}, labels.text
    for name, raw, ctype, status, message in BAD_INPUTS:
        r = httpx.post(f"{url}/predict", content=raw, timeout=30,
                       headers={"Content-Type": ctype or "application/json"})
        assert r.status_code == status and message in r.json()["detail"], (name, r.text)


def test_the_fuzz_corpus_gets_no_5xx_and_kills_no_replica(deployed: tuple[Settings, str]) -> None:
    settings, url = deployed
    deployer = _deployer(settings)
    before = {r["replica_id"] for r in deployer.status(SERVICE)["workers"]}
    send_fuzz(url, MODEL)
    after = deployer.status(SERVICE)
    assert {r["replica_id"] for r in after["workers"]} == before and after["alive"], after


def test_predictions_reach_the_shared_store_with_the_version_that_answered(
        deployed: tuple[Settings, str], digits: tuple[np.ndarray, np.ndarray]) -> None:
    settings, url = deployed
    X, _ = digits
    ids = []
    with httpx.Client(timeout=30) as client:
        for i in range(20):
            r = client.post(f"{url}/predict", json={"instances": X[i:i + 1].tolist()},
                            headers={"X-Request-ID": f"shared-{i}"})
            assert r.status_code == 200, r.text
            ids += r.json()["ids"]
    store = Store(settings.store)

    def logged() -> list[dict[str, Any]]:
        rows = [p for p in store.predictions(SERVICE) if p["request_id"] in ids]
        return rows if len(rows) == len(ids) else []

    rows = wait_for(logged, timeout=60, interval=0.3, what="the 20 predictions in PostgreSQL")
    assert {r["model_version"] for r in rows} == {"1"}
    assert sorted(r["inputs"] for r in rows) == sorted(X[i].tolist() for i in range(20))


def test_scale_one_three_one_under_load_fails_no_request_and_status_shows_the_nodes(
        cluster: Any, deployed: tuple[Settings, str], digits: tuple[np.ndarray, np.ndarray]) -> None:
    settings, url = deployed
    X, _ = digits
    with KeepAliveLoad(url, X, clients=4) as load:
        wait_for(lambda: load.result.ok >= 50, timeout=60, what="load flowing")
        code, out = cli(settings, "scale", SERVICE, "3")
        assert code == 0 and "3 replica(s)" in out, out
        status = _deployer(settings).status(SERVICE)
        assert len(status["workers"]) == 3 and all(w["ready"] for w in status["workers"]), status
        assert len(status["nodes"]) >= 2, status  # spread over the cluster's nodes
        # one HTTP proxy, on the head (SCANFLOW_SERVE_PROXIES=head): the address deploy printed
        proxies = _deployer(settings)._client().get_serve_details()["proxies"]
        assert list(proxies) == [cluster.head_node.node_id], proxies
        # `/metrics` from whichever replica answers is the sum over all three
        wait_for(lambda: _metric(url, "scanflow_replicas", role="champion") == 3, timeout=30,
                 interval=0.3, what="/metrics counting 3 live replicas")
        served = load.result.ok
        wait_for(lambda: load.result.ok >= served + 50, timeout=60, what="load on 3 replicas")
        code, out = cli(settings, "scale", SERVICE, "1")
        assert code == 0 and "1 replica(s)" in out, out
        served = load.result.ok
        wait_for(lambda: load.result.ok >= served + 50, timeout=60, what="load on 1 replica")
    result = load.result
    assert result.failed == 0 and result.ok > 150, (result.failed, result.errors[:5])
    wait_for(lambda: _metric(url, "scanflow_replicas", role="champion") == 1, timeout=30,
             interval=0.3, what="/metrics counting the one live replica")
    # every answer counted, those of the two replicas scaled away included
    assert _metric(url, "scanflow_requests_total", endpoint="predict", status="200") >= result.ok
    code, out = cli(settings, "status", SERVICE)
    nodes = _deployer(settings).status(SERVICE)["nodes"]
    assert code == 0 and "node" in out and nodes[0][:12] in out, out  # where the replica runs
    events = [e.kind for e in Store(settings.store).list_events(service=SERVICE)]
    assert events.count("scaled") == 2 and "deployed" in events, events


def test_a_replica_killed_under_load_loses_no_logged_answer(
        deployed: tuple[Settings, str], digits: tuple[np.ndarray, np.ndarray]) -> None:
    """kill -9 of a replica's process while 4 clients send: Serve replaces it, and every
    request answered 200 is in the shared store's prediction log (each once)."""
    settings, url = deployed
    X, _ = digits
    deployer = _deployer(settings)
    deployer.scale(SERVICE, 2)
    with KeepAliveLoad(url, X, clients=4) as load:
        wait_for(lambda: load.result.ok >= 100, timeout=60, what="load flowing")
        victim = deployer.status(SERVICE)["workers"][0]
        os.kill(int(victim["pid"]), signal.SIGKILL)
        wait_for(lambda: (ws := deployer.status(SERVICE)["workers"]) and len(ws) == 2
                 and all(w["ready"] for w in ws) and victim["replica_id"] not in
                 {w["replica_id"] for w in ws}, timeout=120, interval=0.5,
                 what="Serve replacing the killed replica")
        served = load.result.ok
        wait_for(lambda: load.result.ok >= served + 100, timeout=60, what="load after the kill")
    answered = set(load.result.ids)
    store = Store(settings.store)

    def logged() -> set[str]:
        have = {p["request_id"] for p in store.predictions(SERVICE)}
        return have if answered <= have else set()

    have = wait_for(logged, timeout=90, interval=0.5, what="every answered request in the log")
    rows = [p["request_id"] for p in store.predictions(SERVICE) if p["request_id"] in answered]
    assert len(rows) == len(answered), "a request logged twice"
    assert answered <= have
    deployer.scale(SERVICE, 1)


def _versions_seen(url: str, X: np.ndarray, n: int = 40) -> list[str]:
    with httpx.Client(timeout=30) as client:
        return [client.post(f"{url}/predict", json={"instances": X[i:i + 1].tolist()}).json()
                ["model_version"] for i in range(n)]


def test_rollout_and_rollback_under_load_fail_no_request(
        deployed: tuple[Settings, str], digits: tuple[np.ndarray, np.ndarray]) -> None:
    """A surge rollout: v2's replicas start beside v1's, which serve until they run, then
    drain; rollback brings v1 back the same way (and moves the alias back)."""
    settings, url = deployed
    X, _ = digits
    with KeepAliveLoad(url, X, clients=4) as load:
        wait_for(lambda: load.result.ok >= 50, timeout=60, what="load flowing")
        code, out = cli(settings, "rollout", SERVICE, "--version", "2")
        assert code == 0 and "serving version 2" in out, out
        status = _deployer(settings).status(SERVICE)
        assert status["previous_version"] == "1" and status["versions"] == ["2"], status
        assert set(_versions_seen(url, X)) == {"2"}
        code, out = cli(settings, "rollback", SERVICE)
        assert code == 0 and "rolled back to version 1" in out, out
        served = load.result.ok
        wait_for(lambda: load.result.ok >= served + 50, timeout=60, what="load after the rollback")
    result = load.result
    assert result.failed == 0, (result.failed, result.errors[:5])
    assert {v for _, v in result.versions} == {"1", "2"}  # the load saw both versions answer
    assert set(_versions_seen(url, X)) == {"1"}
    kinds = [e.kind for e in Store(settings.store).list_events(service=SERVICE)]
    assert "rollout_completed" in kinds and "rollback_completed" in kinds, kinds


def test_canary_and_shadow_on_ray(deployed: tuple[Settings, str],
                                  digits: tuple[np.ndarray, np.ndarray]) -> None:
    settings, url = deployed
    X, _ = digits
    code, out = cli(settings, "canary", SERVICE, "2", "--share", "0.5")
    assert code == 0, out
    seen = _versions_seen(url, X, 60)
    assert 10 <= seen.count("2") <= 50 and "1" in seen, seen  # about half from the challenger
    status = _deployer(settings).status(SERVICE)
    assert status["canary"] == {"version": "2", "share": 0.5}
    code, out = cli(settings, "canary", SERVICE, "--off")
    assert code == 0, out
    code, out = cli(settings, "shadow", SERVICE, "2")
    assert code == 0, out
    r = httpx.post(f"{url}/predict", json={"instances": X[:1].tolist()},
                   headers={"X-Request-ID": "shadowed"}, timeout=30)
    assert r.json()["model_version"] == "1"  # the shadow's answer is never returned
    store = Store(settings.store)

    def shadowed() -> bool:
        win = store.prediction_window(SERVICE, with_shadow=True)
        return "2" in win.shadow_versions

    wait_for(shadowed, timeout=60, interval=0.3, what="the shadow's answer in the prediction log")
    code, out = cli(settings, "shadow", SERVICE, "--off")
    assert code == 0, out
    assert _deployer(settings).status(SERVICE)["versions"] == ["1"]


def test_with_scaling_serve_ray_serves_autoscaler_decides_the_replicas(
        deployed: tuple[Settings, str], digits: tuple[np.ndarray, np.ndarray]) -> None:
    """`policy.scaling: serve`: Serve's autoscaler adds a replica under load and removes it
    after, within the policy's limits, failing no request; `scanflow scale` on such a service is
    refused with exit 2, and `status` says who scales."""
    settings, base = deployed
    X, _ = digits
    auto = settings.root.parent / "auto"
    auto.mkdir(exist_ok=True)
    (auto / "scanflow.yaml").write_text(textwrap.dedent(f"""\
        app: auto
        team: serving
        services:
          busy:
            model: {MODEL}
            resources: {{cpus: 0.25}}
            policy:
              scaling: serve
              limits: {{min_replicas: 1, max_replicas: 2}}
              objectives: {{in_flight_per_replica: 1}}
              cooldowns: {{scale_up: 1s, scale_down: 2s}}
              serve_autoscaling: {{metrics_interval_s: 0.5, look_back_period_s: 2}}
        """))
    bad = settings.root.parent / "badauto"
    bad.mkdir(exist_ok=True)
    (bad / "scanflow.yaml").write_text((auto / "scanflow.yaml").read_text().replace(
        "look_back_period_s: 2", "look_back_period_s: -1"))
    code, out = cli(settings, "deploy", str(bad))  # what Serve would refuse: named, exit 2
    assert code == 2 and "look_back_period_s" in out, out
    code, out = cli(settings, "deploy", str(auto))
    assert code == 0, out
    deployer = _deployer(settings)

    def ready() -> int:
        return sum(1 for w in deployer.status("busy")["workers"] if w["ready"])

    try:
        status = deployer.status("busy")
        assert status["scaling"] == "serve" and ready() == 1
        assert status["autoscaling"]["max_replicas"] == 2
        assert status["autoscaling"]["target_ongoing_requests"] == 1
        url = base.rsplit("/", 1)[0] + "/busy"
        with KeepAliveLoad(url, X, clients=6, pause=0) as load:
            wait_for(lambda: ready() == 2, timeout=150, interval=0.5,
                     what="Serve's autoscaler adding a replica under load")
        assert load.result.failed == 0 and load.result.ok > 0, load.result.errors[:5]
        code, out = cli(settings, "scale", "busy", "2")
        assert code == 2 and "Ray Serve's autoscaler" in " ".join(out.split()), out
        wait_for(lambda: ready() == 1 and len(deployer.status("busy")["workers"]) == 1,
                 timeout=150, interval=0.5, what="Serve's autoscaler back to min_replicas")
    finally:
        cli(settings, "stop", "busy")


def test_what_ray_does_not_offer_is_refused_with_exit_2(deployed: tuple[Settings, str]) -> None:
    settings, _ = deployed
    big = settings.root.parent / "big"
    big.mkdir(exist_ok=True)
    (big / "scanflow.yaml").write_text(
        f"app: big\nteam: serving\nservices:\n  huge:\n    model: {MODEL}\n"
        "    resources: {cpus: 8}\n")
    code, out = cli(settings, "deploy", str(big))  # no node has 8 CPUs: refused, not a hang
    assert code == 2 and "no node of the Ray cluster offers" in " ".join(out.split()), out
    code, out = cli(settings, "resize", SERVICE, "--cpus", "0.5")
    assert code == 2 and "not offered on the ray backend" in out, out
    code, out = cli(settings, "rollout", SERVICE, "--version", "99")
    assert code == 2 and "99" in out, out  # an unknown version: named, nothing changed
    assert _deployer(settings).status(SERVICE)["versions"] == ["1"]


def test_a_node_lost_under_load_loses_no_logged_answer(
        cluster: Any, deployed: tuple[Settings, str], digits: tuple[np.ndarray, np.ndarray]) -> None:
    """A worker node killed (its raylet and every process on it) while 4 clients send, and its
    disk lost with it: Serve replaces its replicas on the other nodes, and every request answered
    200 is in the shared store, each once (the records were in the store before the answers left,
    not in the node's journal)."""
    settings, url = deployed
    X, _ = digits
    deployer = _deployer(settings)
    head = cluster.head_node.node_id
    deployer.scale(SERVICE, 3)
    workers = wait_for(lambda: (ws := deployer.status(SERVICE)["workers"]) and len(ws) == 3
                       and all(w["ready"] for w in ws) and any(w["node"] != head for w in ws)
                       and ws, timeout=120, interval=0.5, what="3 replicas, one off the head")
    victim = next(w["node"] for w in workers if w["node"] != head)
    lost_pids = {int(w["pid"]) for w in workers if w["node"] == victim}
    node = next(n for n in cluster.worker_nodes if n.node_id == victim)
    with KeepAliveLoad(url, X, clients=4) as load:
        wait_for(lambda: load.result.ok >= 100, timeout=60, what="load flowing")
        cluster.remove_node(node, allow_graceful=False)
        for seg in Path(tempfile.gettempdir(), "scanflow-serve").glob("*/predlog/*"):
            if int(seg.name.split("-")[0]) in lost_pids:  # the lost node's disk
                seg.unlink(missing_ok=True)
        wait_for(lambda: (ws := deployer.status(SERVICE)["workers"]) and len(ws) == 3
                 and all(w["ready"] and w["node"] != victim for w in ws), timeout=180,
                 interval=0.5, what="Serve replacing the lost node's replicas")
        served = load.result.ok
        wait_for(lambda: load.result.ok >= served + 100, timeout=60, what="load after the loss")
    answered = set(load.result.ids)
    store = Store(settings.store)

    def logged() -> list[str]:  # a record journaled on a live node (store slow) comes in 0.2 s
        return [p["request_id"] for p in store.predictions(SERVICE) if p["request_id"] in answered]

    rows = wait_for(lambda: (r := logged()) and set(r) == answered and r, timeout=30,
                    interval=0.5, what=f"all {len(answered)} answered requests in the log")
    assert len(rows) == len(answered), "a request logged twice"
    deployer.scale(SERVICE, 1)


def test_stop_removes_the_serve_application(deployed: tuple[Settings, str]) -> None:
    """Last in the module: stop takes the application off the cluster and says so."""
    settings, url = deployed
    code, out = cli(settings, "stop", SERVICE)
    assert code == 0, out
    status = _deployer(settings).status(SERVICE)
    assert status["status"] == "stopped" and not status["alive"] and status["workers"] == []
    assert httpx.get(f"{url}/health", timeout=10).status_code == 404
