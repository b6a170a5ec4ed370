"""Tracking against a real `mlflow server` process and the embedded sqlite backend."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from scanflow.engine import LocalEngine
from scanflow.settings import Settings
from scanflow.spec import load_application
from scanflow.store import Store
from scanflow.tracking import MlflowTracker

STEP = '''
import mlflow, numpy as np
from sklearn.linear_model import LogisticRegression
from scanflow.tracking import log_sklearn_model

def train(ctx=None):
    x = np.random.default_rng(0).normal(size=(60, 4)); y = (x[:, 0] > 0).astype(int)
    with ctx.mlflow_run():
        mlflow.log_metric("acc", 0.9)
        log_sklearn_model(LogisticRegression().fit(x, y), x[:3], "tiny")
'''

SPEC = '''
app: demo
team: ds
workflows:
  train:
    steps: [{name: fit, call: "steps:train", registers: [tiny]}]
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    log = open(tmp_path / "mlflow-server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--workers", "1", "--host", "127.0.0.1",
         "--port", str(port), "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise RuntimeError((tmp_path / "mlflow-server.log").read_text()[-2000:])
            time.sleep(0.3)
        else:
            raise RuntimeError("mlflow server did not start")
        yield url
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
        log.close()


def _app(tmp_path: Path) -> object:
    d = tmp_path / "app"
    d.mkdir()
    (d / "steps.py").write_text(textwrap.dedent(STEP))
    (d / "scanflow.yaml").write_text(SPEC)
    return load_application(d)


def _check_registry(settings: Settings, tmp_path: Path) -> None:
    store = Store(settings.store)
    res = LocalEngine(settings, store).run(_app(tmp_path), "train", trigger={"by": "person:ana"})
    assert res.ok, res.error
    tr = MlflowTracker(settings)
    assert "tiny" in tr.registered_models()
    # the version says which team's run, started by whom, made it (issue 17)
    tags = tr.model_version("tiny", "1").tags
    assert {k: tags.get(k) for k in ("scanflow.app", "scanflow.team", "scanflow.by")} == {
        "scanflow.app": "demo", "scanflow.team": "ds", "scanflow.by": "person:ana"}, tags
    tr.set_alias("tiny", "champion", "1")
    assert tr.version_by_alias("tiny", "champion") == "1"
    assert tr.model_version("tiny", "1").current_stage in (None, "None")  # aliases, not stages
    with pytest.raises(ValueError, match="models:/tiny@challenger not found"):
        tr.version_by_alias("tiny", "challenger")
    child = tr.child_runs(res.mlflow_run_id or "")
    assert len(child) == 1 and child[0].data.metrics["acc"] == 0.9


def test_registry_with_aliases_on_sqlite(settings: Settings, tmp_path: Path) -> None:
    _check_registry(settings, tmp_path)
    assert settings.tracking.startswith("sqlite:///")


@pytest.mark.slow
def test_against_a_real_mlflow_server(mlflow_server: str, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCANFLOW_TRACKING_URI", mlflow_server)
    settings = Settings(workspace=tmp_path / "ws", tracking_uri=mlflow_server).ensure()
    _check_registry(settings, tmp_path)
    assert not (settings.root / "mlflow.db").exists()  # everything went to the server
    assert any((tmp_path / "server-artifacts").rglob("MLmodel"))
