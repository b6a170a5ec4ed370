"""The analyzer's built-in sensor judges each window against the reference of the model version
that served it, not whatever is served when the window is judged: windows a rolled-back model
answered must not count against the model that replaced it."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from scanflow.agents import Agent, AgentSpec, SensorSpec
from scanflow.settings import Settings
from scanflow.spec import Application, Service, validate_application
from scanflow.store import Store


def _register(settings: Settings, reference: np.ndarray) -> str:
    """A registered version whose run carries `reference/reference.npy`, as the training steps log."""
    import mlflow
    from sklearn.dummy import DummyClassifier

    mlflow.set_tracking_uri(settings.tracking)
    # artifacts in the test's workspace (the default experiment would write ./mlruns in the cwd)
    exp = mlflow.get_experiment_by_name("analyzer")
    exp_id = exp.experiment_id if exp else mlflow.create_experiment(
        "analyzer", artifact_location=settings.artifacts.as_uri())
    model = DummyClassifier().fit(reference, np.zeros(len(reference)))
    with mlflow.start_run(experiment_id=exp_id), tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "reference.npy", reference)
        mlflow.log_artifact(str(Path(tmp) / "reference.npy"), "reference")
        info = mlflow.sklearn.log_model(model, name="model", pip_requirements=["scikit-learn"])
    return str(mlflow.register_model(info.model_uri, "m").version)


def test_windows_are_judged_against_the_reference_of_the_version_that_served_them(
    settings: Settings, store: Store
) -> None:
    rng = np.random.default_rng(0)
    clean = rng.normal(size=(1500, 8))
    v1 = _register(settings, clean[:500])
    v2 = _register(settings, clean[:500] + 3.0)  # a model adapted to a shifted stream
    store.put_deployment(service="svc", app="demo", team="ops", model_name="m", alias="champion",
                         model_version=v2, host="127.0.0.1", port=1, pid=None, replicas=1,
                         status="running", workdir=str(settings.root / "svc"))
    # 200 clean requests answered by version 1 (before the rollout), then 200 by version 2.
    rows = [(v1, clean[500 + i]) for i in range(200)] + [(v2, clean[700 + i]) for i in range(200)]
    store.add_predictions({"request_id": f"r{i}", "service": "svc", "model_version": v, "ts": 1000.0 + i,
                           "inputs": x.tolist(), "outputs": 0, "latency_ms": 1.0}
                          for i, (v, x) in enumerate(rows))
    ids = [int(i) for i in store.prediction_window("svc", with_inputs=False).ids]
    for k, (first, last) in enumerate(((ids[0], ids[199]), (ids[200], ids[399]))):
        store.send_message("monitor", "analyzer", "window",
                           {"service": "svc", "first_id": first, "last_id": last}, key=f"w{k}")
    # A window the analyzer cannot judge (its service is not deployed) fails alone.
    store.send_message("monitor", "analyzer", "window", {"service": "ghost", "first_id": 1, "last_id": 2},
                       key="bad")
    app = Application(app="demo", team="ops", services={"svc": Service(model="m")},
                      agents={"analyzer": AgentSpec(
        role="analyzer", service="svc", max_attempts=1, sensors=[SensorSpec(
            name="drift", func="drift_check", params={"n_components": 4, "n_permutations": 50},
            triggers=[{"interval": "1h"}], rule="drift_detected")])})
    app.base_dir = Path.cwd()
    agent = Agent(settings, store, validate_application(app), "analyzer")
    assert agent.tick("drift") == 3
    by_key = {d.key.rsplit(":", 1)[-1]: d for d in store.list_decisions("analyzer")}
    old, new = by_key["w0"].evidence, by_key["w1"].evidence
    # Clean inputs version 1 answered: judged against version 1's clean reference, no drift.
    assert old["reference_version"] == v1 and old["drift"] is False, old
    # The same clean stream answered by version 2 (trained for the shifted one): drift.
    assert new["reference_version"] == v2 and new["drift"] is True, new
    assert not by_key["w0"].fired and by_key["w1"].fired
    # ... and, with one try allowed, is dead-lettered with its error; the other two were judged.
    (dead,) = store.list_messages("analyzer", status="dead")
    assert dead.key == "bad" and "not deployed" in (dead.error or ""), dead.error
    assert len(store.list_decisions("analyzer")) == 2
    assert "not deployed" in (agent.sensor_info("drift")["last_error"] or "")
