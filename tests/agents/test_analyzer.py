"""The analyzer's built-in sensor judges each window against the reference of the model version
that served it, not whatever is served when the window is judged: windows a rolled-back model
answered must not count against the model that replaced it. By default its threshold is
calibrated on a held-out part of that reference to a stated false-alarm rate per window."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import pytest

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


def _deploy(settings: Settings, store: Store, version: str) -> None:
    store.put_deployment(service="svc", app="demo", team="ops", model_name="m", alias="champion",
                         model_version=version, host="127.0.0.1", port=1, pid=None, replicas=1,
                         status="running", workdir=str(settings.root / "svc"))


def _windows(store: Store, version: str, windows: list[np.ndarray], prefix: str = "w") -> None:
    """Log each array as requests served by `version` and send it to the analyzer as a window."""
    for k, rows in enumerate(windows):
        base = store.count_predictions("svc")[0]
        store.add_predictions({"request_id": f"r{base + i}", "service": "svc", "model_version": version,
                               "ts": 1000.0 + base + i, "inputs": x.tolist(), "outputs": 0, "latency_ms": 1.0}
                              for i, x in enumerate(rows))
        ids = [int(i) for i in store.prediction_window("svc", with_inputs=False).ids]
        store.send_message("monitor", "analyzer", "window",
                           {"service": "svc", "first_id": ids[base], "last_id": ids[-1]}, key=f"{prefix}{k}")


def _analyzer(settings: Settings, store: Store, **params: object) -> Agent:
    app = Application(app="demo", team="ops", services={"svc": Service(model="m")},
                      agents={"analyzer": AgentSpec(
        role="analyzer", service="svc", max_attempts=1, sensors=[SensorSpec(
            name="drift", func="drift_check", params=params, triggers=[{"interval": "1h"}],
            rule="always")])})
    app.base_dir = Path.cwd()
    return Agent(settings, store, validate_application(app), "analyzer")


def test_the_analyzer_calibrates_by_default_and_says_why_in_one_line(settings: Settings, store: Store
                                                                    ) -> None:
    rng = np.random.default_rng(3)
    clean = rng.normal(size=(2000, 6)) * [1, 10, 100, 1000, 0.1, 5]  # mixed scales
    v1 = _register(settings, clean[:600])
    _deploy(settings, store, v1)
    shifted = clean[1200:1300].copy()
    shifted[:, 2] += 100.0  # one feature moved by one standard deviation
    _windows(store, v1, [clean[600:700], clean[700:800], shifted])
    agent = _analyzer(settings, store)
    assert agent.tick("drift") == 3
    by_key = {d.key.rsplit(":", 1)[-1]: d.evidence for d in store.list_decisions("analyzer")}
    first, drifted = by_key["w0"], by_key["w2"]
    assert first["calibrated"] is True and first["drift"] is False
    cal = first["calibration"]
    assert cal["false_alarm_rate"] == 0.01 and cal["window_size"] == 100
    assert cal["reference_rows"] + cal["pool_rows"] == 600
    assert first["summary"].startswith("no drift: combined p=") and "(calibrated to 0.01" in first["summary"]
    assert first["reason"] == first["summary"]
    assert drifted["drift"] is True and "ks" in drifted["fired"], drifted["summary"]
    assert drifted["summary"].startswith("drift: ks") and drifted["p_value"] <= drifted["threshold"]


def test_a_reference_too_small_to_calibrate_falls_back_to_fixed_alphas(
    settings: Settings, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    rng = np.random.default_rng(4)
    v1 = _register(settings, rng.normal(size=(30, 4)))  # 15 + 15 rows: below the 2 x 20 needed
    _deploy(settings, store, v1)
    _windows(store, v1, [rng.normal(size=(50, 4)), rng.normal(size=(50, 4))])
    with caplog.at_level(logging.WARNING, logger="scanflow.agents.analyzer"):
        assert _analyzer(settings, store).tick("drift") == 2
    evidence = [d.evidence for d in store.list_decisions("analyzer")]
    assert all(e["calibrated"] is False for e in evidence)
    assert "the reference has 30 rows" in evidence[0]["calibration"]["note"]
    assert evidence[0]["summary"].endswith("(not calibrated)")
    assert sum("cannot calibrate" in r.getMessage() for r in caplog.records) == 1  # logged once


def test_the_fixed_alpha_mode_stays_selectable_and_a_missing_reference_names_the_helper(
    settings: Settings, store: Store
) -> None:
    import mlflow
    from sklearn.dummy import DummyClassifier

    rng = np.random.default_rng(5)
    v1 = _register(settings, rng.normal(size=(300, 4)))
    _deploy(settings, store, v1)
    _windows(store, v1, [rng.normal(size=(100, 4))])
    assert _analyzer(settings, store, calibrate=False, ks_alpha=0.01).tick("drift") == 1
    (d,) = store.list_decisions("analyzer")
    assert d.evidence["calibrated"] is False and d.evidence["summary"].endswith("(fixed alphas)")
    assert [t["test"] for t in d.evidence["tests"]] == ["ks", "mmd"]

    # A version logged without its reference sample: the error names the contract's helper.
    with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name("analyzer").experiment_id):
        info = mlflow.sklearn.log_model(DummyClassifier().fit([[0.0]], [0]), name="model",
                                        pip_requirements=["scikit-learn"])
    bare = str(mlflow.register_model(info.model_uri, "m").version)
    _deploy(settings, store, bare)
    _windows(store, bare, [rng.normal(size=(100, 4))], prefix="bare")
    agent = _analyzer(settings, store)
    agent.tick("drift")
    (dead,) = store.list_messages("analyzer", status="dead")
    error = dead.error or ""
    assert "scanflow.tracking.contracts.log_model_with_reference" in error, error
    assert "scanflow.tracking.contracts.REFERENCE_ARTIFACT" in error


def test_the_default_check_holds_its_false_alarm_rate_and_sees_a_clear_shift_on_tabular_data() -> None:
    """At small scale, what bench/drift_tabular.py measures: different reference rows, clean
    windows from the other rows, and a shifted feature."""
    from scipy import stats

    from scanflow.agents.analyzer import CheckParams, fitted_check

    rng = np.random.default_rng(7)
    cov = 0.6 ** np.abs(np.subtract.outer(np.arange(6), np.arange(6)))
    data = rng.multivariate_normal(np.zeros(6), cov, size=6000) * [1, 10, 100, 1, 5, 0.1]
    data[:, 5] = np.round(data[:, 5] * 20)  # an integer-coded column
    n_refs, n_clean, false, detected = 3, 60, 0, 0
    for _ in range(n_refs):
        order = rng.permutation(len(data))
        ref, rest = data[order[:400]], data[order[400:]]
        check = fitted_check(ref, 100, CheckParams(), "test")
        assert check["calibrated"]
        for _ in range(n_clean):
            false += check["check"].verdict(rest[rng.choice(len(rest), 100, replace=False)]).drift
        for _ in range(5):
            w = rest[rng.choice(len(rest), 100, replace=False)].copy()
            w[:, 1] += 10.0  # one standard deviation
            detected += check["check"].verdict(w).drift
    windows = n_refs * n_clean
    # at most the stated 1 % plus binomial slack (99.9 % quantile of Binomial(n, 0.01))
    assert false <= stats.binom.ppf(0.999, windows, 0.01), false
    assert detected == n_refs * 5


def test_the_sensor_defaults_are_the_benchmarked_ones() -> None:
    import inspect

    from scanflow.agents.analyzer import CheckParams
    from scanflow.agents.builtin import drift_check

    sig = inspect.signature(drift_check).parameters
    for name, value in vars(CheckParams()).items():
        if name in sig:
            assert sig[name].default == value, name


def test_a_backlog_of_windows_is_skipped_to_the_newest_and_the_skip_recorded(settings: Settings, store: Store
                                                                              ) -> None:
    """A spike cuts windows faster than they are judged: the analyzer judges the newest
    `max_backlog` (where drift would show now), acknowledges the older ones unjudged and says so
    in one event; a backlog within the bound is judged whole, oldest first."""
    rng = np.random.default_rng(5)
    clean = rng.normal(size=(3000, 4))
    v1 = _register(settings, clean[:600])
    _deploy(settings, store, v1)
    shifted = clean[2000:2100] + 2.0
    _windows(store, v1, [clean[600 + 100 * k: 700 + 100 * k] for k in range(6)] + [shifted])
    agent = _analyzer(settings, store, max_backlog=3)
    assert agent.tick("drift") == 3
    judged = {d.key.rsplit(":", 1)[-1]: d.evidence for d in store.list_decisions("analyzer")}
    assert sorted(judged) == ["w4", "w5", "w6"] and judged["w6"]["drift"] is True
    assert not store.inbox("analyzer")  # nothing left behind, nothing judged twice
    (skip,) = store.list_events("svc", ["windows_skipped"])
    assert skip.payload["count"] == 4 and "4 oldest skipped" in skip.payload["reason"], skip.payload
    assert skip.payload["first_id"] < skip.payload["last_id"] < judged["w4"]["first_id"], skip.payload
    # within the bound: every window judged, nothing skipped
    _windows(store, v1, [clean[1300 + 100 * k: 1400 + 100 * k] for k in range(3)], prefix="x")
    assert agent.tick("drift") == 3
    assert len(store.list_events("svc", ["windows_skipped"])) == 1
