"""Fixtures and helpers for the serving tests: a real MLflow registry in a tmp workspace,
two registered digits models, and a keep-alive HTTP load generator."""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from scanflow.settings import Settings  # noqa: E402
from scanflow.store import Store  # noqa: E402

MODEL = "digits"


@dataclass
class DigitsWorkspace:
    """A tmp workspace whose registry holds `digits` v1 (all data) and v2 (a subset)."""

    settings: Settings
    store: Store
    X: np.ndarray
    y: np.ndarray
    models: dict[str, Any]  # version -> fitted sklearn estimator

    def set_champion(self, version: str) -> None:
        from mlflow import MlflowClient

        MlflowClient(tracking_uri=self.settings.tracking).set_registered_model_alias(
            MODEL, "champion", version
        )


def _train_and_register(settings: Settings) -> DigitsWorkspace:
    import mlflow
    from mlflow import MlflowClient
    from mlflow.models import infer_signature
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    X, y = load_digits(return_X_y=True)
    mlflow.set_tracking_uri(settings.tracking)
    client = MlflowClient(tracking_uri=settings.tracking)
    exp_id = client.create_experiment(
        "serving-tests", artifact_location=(settings.artifacts / "mlruns").as_uri()
    )
    signature = infer_signature(X, y)
    models: dict[str, Any] = {}
    for n_train in (len(X), 300):  # v1 on everything, v2 on a subset (other predictions)
        est = LogisticRegression(max_iter=300).fit(X[:n_train], y[:n_train])
        with mlflow.start_run(experiment_id=exp_id):
            info = mlflow.sklearn.log_model(
                est, name="model", signature=signature, pip_requirements=["scikit-learn"]
            )
        mv = mlflow.register_model(info.model_uri, MODEL)
        models[str(mv.version)] = est
    client.set_registered_model_alias(MODEL, "champion", "1")
    return DigitsWorkspace(settings=settings, store=Store(settings.store), X=X, y=y,
                           models=models)


@pytest.fixture(scope="module")
def digits_workspace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DigitsWorkspace]:
    root: Path = tmp_path_factory.mktemp("serving-ws")
    settings = Settings(workspace=root).ensure()
    ws = _train_and_register(settings)
    try:
        yield ws
    finally:
        ws.store.close()


def stop_everything(deployer: Any, store: Store) -> None:
    """Stop whatever a test module started, even after a failure halfway through."""
    import signal

    for dep in store.list_deployments():
        if dep.status == "running":
            try:
                deployer.stop(dep.service)
            except Exception:  # noqa: BLE001 - fall back to killing the process group
                pass
    for pid in list(deployer._procs):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        deployer._procs.pop(pid).wait(timeout=10)


# -- load generator ---------------------------------------------------------------------------
@dataclass
class LoadResult:
    ok: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    # (monotonic time the request was sent, model version of the answer)
    versions: list[tuple[float, str]] = field(default_factory=list)
    max_latency: float = 0.0  # seconds, slowest successful request (reported, never asserted)
    told_to_reconnect: int = 0  # answers carrying `Connection: close` (a draining worker)
    ids: list[str] = field(default_factory=list)  # prediction ids of every 200 answer


class KeepAliveLoad:
    """N threads, each with its own keep-alive httpx.Client, posting /predict until stopped.

    No retries: any exception or non-200 answer counts as a failed request. Odd-numbered
    clients pause up to `pause` seconds between requests: their connections sit idle at
    random moments, which is when a stopping server that closes idle keep-alive connections
    races the next request (even-numbered clients send back to back)."""

    def __init__(
        self, url: str, X: np.ndarray, clients: int = 4, batch: int = 1, pause: float = 0.03
    ) -> None:
        self.url = url
        self.pause = pause
        self.X = X
        self.clients = clients
        self.batch = batch
        self.result = LoadResult()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)
        ]

    def __enter__(self) -> KeepAliveLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> LoadResult:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)
        return self.result

    def _run(self, seed: int) -> None:
        rnd = random.Random(seed)
        with httpx.Client(base_url=self.url, timeout=30.0) as client:
            while not self._stop.is_set():
                if seed % 2 and self.pause:
                    time.sleep(rnd.uniform(0, self.pause))
                rows = [rnd.randrange(len(self.X)) for _ in range(self.batch)]
                body = {"instances": self.X[rows].tolist()}
                sent = time.monotonic()
                try:
                    r = client.post("/predict", json=body)
                except httpx.HTTPError as exc:
                    with self._lock:
                        self.result.failed += 1
                        self.result.errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                with self._lock:
                    if r.status_code == 200:
                        self.result.ok += 1
                        self.result.max_latency = max(self.result.max_latency,
                                                      time.monotonic() - sent)
                        answer = r.json()
                        self.result.versions.append((sent, answer["model_version"]))
                        self.result.ids.extend(answer["ids"])
                        if r.headers.get("connection", "").lower() == "close":
                            self.result.told_to_reconnect += 1
                    else:
                        self.result.failed += 1
                        self.result.errors.append(f"HTTP {r.status_code}: {r.text[:200]}")


# -- a column-signature model that can fail ---------------------------------------------------
COLUMN_MODEL = "adder"
_ADDER_CODE = '''
import mlflow
from mlflow.pyfunc import PythonModel


class Adder(PythonModel):
    """a + b per row; raises on a == 13 (to prove a failing model does not kill a worker)."""

    def predict(self, context, model_input, params=None):
        import time

        if (model_input["a"] == 13).any():
            raise ValueError("unlucky 13")
        if (model_input["a"] == 7).any():  # a slow request: sleeps b seconds
            time.sleep(float(model_input["b"].max()))
        return (model_input["a"] + model_input["b"]).to_numpy()


mlflow.models.set_model(Adder())
'''


def register_column_model(ws: DigitsWorkspace) -> str:
    """Register `adder` (models-from-code, so workers need no test module) as champion."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    code = ws.settings.root / "adder_model.py"
    code.write_text(_ADDER_CODE)
    sig = ModelSignature(
        inputs=Schema([ColSpec("double", "a"), ColSpec("long", "b"),
                       ColSpec("string", "note", required=False)]),
        outputs=Schema([ColSpec("double")]),
    )
    mlflow.set_tracking_uri(ws.settings.tracking)
    exp = MlflowClient(tracking_uri=ws.settings.tracking).get_experiment_by_name("serving-tests")
    with mlflow.start_run(experiment_id=exp.experiment_id):
        info = mlflow.pyfunc.log_model(name="model", python_model=str(code), signature=sig,
                                       pip_requirements=["pandas"])
    mv = mlflow.register_model(info.model_uri, COLUMN_MODEL)
    MlflowClient(tracking_uri=ws.settings.tracking).set_registered_model_alias(
        COLUMN_MODEL, "champion", mv.version
    )
    return str(mv.version)


def register_broken_version(ws: DigitsWorkspace, like: str) -> str:
    """A `digits` version whose model file is missing: registered fine, fails to load."""
    import shutil

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=ws.settings.tracking)
    src = client.get_model_version_download_uri(MODEL, like).removeprefix("file://")
    dst = ws.settings.artifacts / "broken-model"
    shutil.copytree(src, dst)
    for f in dst.glob("model.*"):
        f.unlink()
    return str(client.create_model_version(MODEL, source=str(dst)).version)
