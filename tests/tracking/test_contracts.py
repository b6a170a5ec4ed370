"""The step-side contracts of the built-in agents: what a retrain step reads and publishes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from scanflow.control.evaluation import candidate_evaluation
from scanflow.settings import Settings
from scanflow.tracking import (
    MlflowTracker,
    log_model_with_reference,
    publish_evaluation,
)
from scanflow.tracking.contracts import (
    REFERENCE_ARTIFACT,
    ContractError,
    NewData,
    evaluate_candidate,
    read_new_data,
    write_new_data,
)


class Threshold:
    """A one-feature classifier: class 1 above `k`."""

    def __init__(self, k: float) -> None:
        self.k = k

    def predict(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x)[:, 0] > self.k).astype(int)


def test_new_data_round_trips_and_names_what_is_missing(tmp_path: Path) -> None:
    data = NewData(np.ones((4, 2)), np.arange(4), np.zeros((2, 2)), np.arange(2))
    got = read_new_data(write_new_data(tmp_path / "d.npz", data))
    assert got.x_new.shape == (4, 2) and list(got.y_holdout) == [0, 1]
    np.savez(tmp_path / "bad.npz", x_new=np.ones(3), y_new=np.ones(3))
    with pytest.raises(ContractError, match="lacks array\\(s\\) x_holdout, y_holdout"):
        read_new_data(tmp_path / "bad.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ContractError, match="not a readable .npz"):
        read_new_data(tmp_path / "junk.npz")
    with pytest.raises(ContractError, match="is not a file"):
        read_new_data(tmp_path / "missing.npz")


def test_evaluation_counts_the_rows_only_one_model_gets_right() -> None:
    x = np.arange(10).reshape(-1, 1)
    y = (x[:, 0] > 4).astype(int)
    ev = evaluate_candidate(Threshold(4), Threshold(6), (x, y), (x[:5], y[:5]))
    assert ev["candidate_acc_new"] == 1.0 and ev["champion_acc_new"] == 0.8
    assert ev["new_candidate_only"] == 2 and ev["new_champion_only"] == 0
    assert ev["n_holdout"] == 10 and ev["n_clean"] == 5
    with pytest.raises(ContractError, match="empty"):
        evaluate_candidate(Threshold(4), Threshold(6), (x[:0], y[:0]), (x, y))


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowTracker]:
    """A real MLflow (sqlite) for the module, its artifacts in the tmp folder (creating the
    database costs seconds); the fluent API points at it while the module runs."""
    import mlflow

    root = tmp_path_factory.mktemp("contracts-mlflow")
    settings = Settings(workspace=root).ensure()
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(settings.tracking)
    exp = mlflow.create_experiment("contracts", artifact_location=(root / "artifacts").as_uri())
    mlflow.set_experiment(experiment_id=exp)
    try:
        yield MlflowTracker(settings)
    finally:
        mlflow.set_tracking_uri(before)
        os.environ.pop("MLFLOW_EXPERIMENT_ID", None)  # set_experiment exports it to subprocesses


def _fitted(seed: int) -> tuple[object, np.ndarray]:
    from sklearn.linear_model import LogisticRegression

    x = np.random.default_rng(seed).normal(size=(60, 3))
    return LogisticRegression().fit(x, (x[:, 0] > 0).astype(int)), x


def test_a_model_is_logged_with_its_reference_where_the_analyzer_reads_it(
    registry: MlflowTracker, tmp_path: Path
) -> None:
    import mlflow

    model, x = _fitted(0)
    version = log_model_with_reference(model, x[:40], "ref-model", alias="champion")
    assert registry.alias_version("ref-model", "champion") == version
    run_id = registry.model_version("ref-model", version).run_id
    assert REFERENCE_ARTIFACT in registry.list_artifacts(run_id, "reference")
    assert mlflow.active_run() is None  # the run it started is closed
    got = np.load(registry.download(run_id, REFERENCE_ARTIFACT, str(tmp_path)))
    assert np.array_equal(got, x[:40])
    assert registry.model_loader("ref-model", version) == "mlflow.sklearn"

    with mlflow.start_run() as run:  # a step's run is active: the model and sample go there
        again = log_model_with_reference(model, x[40:], "ref-model")
    assert registry.model_version("ref-model", again).run_id == run.info.run_id
    assert int(again) == int(version) + 1 and registry.alias_version("ref-model", "champion") == version

    with pytest.raises(ContractError, match="at least 2 rows"):
        log_model_with_reference(model, x[:1], "ref-model")
    with pytest.raises(ContractError, match="must be numeric"):
        log_model_with_reference(model, np.array([["a", "b"], ["c", "d"]]), "ref-model")


PYFUNC_MODULE = """
import mlflow.pyfunc
import numpy as np


class AboveModel(mlflow.pyfunc.PythonModel):
    def __init__(self, k):
        self.k = k

    def predict(self, model_input: np.ndarray, params=None) -> np.ndarray:
        return (np.asarray(model_input)[:, 0] > self.k).astype(int)
"""


def test_a_python_model_is_logged_with_its_code_and_loads_where_that_code_is_not(
    registry: MlflowTracker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any framework's model as an mlflow.pyfunc.PythonModel (the MNIST example's torch CNN):
    logged with the file that defines its class, it loads in a process that cannot import it,
    as the model server and the promotion gate load it."""
    import subprocess
    import sys

    code_dir = tmp_path / "code"
    code_dir.mkdir()
    (code_dir / "above_model.py").write_text(PYFUNC_MODULE)
    monkeypatch.syspath_prepend(str(code_dir))
    import above_model

    x = np.random.default_rng(0).normal(size=(40, 3))
    model = above_model.AboveModel(0.5)
    version = log_model_with_reference(model, x, "py-model", code_paths=[str(code_dir / "above_model.py")],
                                       pip_requirements=["numpy", "scikit-learn>=1"])
    assert registry.model_loader("py-model", version) == "mlflow.pyfunc.model"
    assert {"numpy", "scikit-learn"} <= set(registry.model_requirements("py-model", version))
    # The model server preloads what the requirements name: the loader says nothing of it.
    from scanflow.serving.deployer import LocalDeployer
    from scanflow.store import Store

    deployer = LocalDeployer(registry.settings, Store(registry.settings.store), tracker=registry)
    assert "sklearn" in deployer._preload("py-model", version)
    uri = registry.uri
    load = ("import sys, mlflow, numpy as np\n"
            f"mlflow.set_tracking_uri({uri!r})\n"
            f"m = mlflow.pyfunc.load_model('models:/py-model/{version}')\n"
            "print(m.predict(np.array([[0.0, 1, 1], [0.9, 0, 0]])).tolist())")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[-2] == "[0, 1]"

    sk, _ = _fitted(1)
    with pytest.raises(ContractError, match="code_paths and pip_requirements are for"):
        log_model_with_reference(sk, x, "py-model", code_paths=[str(code_dir / "above_model.py")])
    assert registry.alias_version("py-model", "champion") is None
    assert [str(v.version) for v in registry.client.search_model_versions("name='py-model'")] == [version]


def test_published_evaluation_is_what_the_gate_reads(registry: MlflowTracker) -> None:
    candidate, x = _fitted(1)
    champion, _ = _fitted(2)
    y = (x[:, 0] > 0).astype(int)
    version = log_model_with_reference(candidate, x, "eval-model")
    figures = evaluate_candidate(candidate, champion, (x[:30], y[:30]), (x[30:], y[30:]))
    publish_evaluation("eval-model", version, figures)

    assert registry.alias_version("eval-model", "challenger") == version
    tags = registry.model_version("eval-model", version).tags
    assert set(tags) >= {f"eval.{k}" for k in figures}
    ev = candidate_evaluation(registry, "eval-model", version)  # the executor's reader
    assert ev.candidate_acc_new == pytest.approx(figures["candidate_acc_new"], abs=1e-6)
    assert ev.figures["new_candidate_only"] == figures["new_candidate_only"]
    assert ev.n_holdout == 30

    with pytest.raises(ContractError, match="lacks champion_acc_new"):
        publish_evaluation("eval-model", version, {k: v for k, v in figures.items()
                                                   if k != "champion_acc_new"})
    with pytest.raises(ContractError, match="candidate_acc_clean is nan"):
        publish_evaluation("eval-model", version, {**figures, "candidate_acc_clean": float("nan")})
    with pytest.raises(ContractError, match="n_clean is 'many', not a number"):
        publish_evaluation("eval-model", version, {**figures, "n_clean": "many"})  # type: ignore[dict-item]
    later = log_model_with_reference(candidate, x, "eval-model")
    publish_evaluation("eval-model", later, figures, alias=None)  # tags only: the alias stays
    assert registry.alias_version("eval-model", "challenger") == version


def test_the_helpers_are_exported_without_loading_mlflow() -> None:
    import subprocess
    import sys

    code = ("import sys, scanflow.tracking as t; assert 'mlflow' not in sys.modules; "
            "assert 'numpy' not in sys.modules; "
            "from scanflow.tracking import log_model_with_reference, read_new_data, evaluate_candidate, "
            "publish_evaluation; assert 'mlflow' not in sys.modules; print(publish_evaluation.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "scanflow.tracking.contracts"
