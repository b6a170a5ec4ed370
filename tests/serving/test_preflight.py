"""The rollout's load check: a real MLflow model directory loads in a spare process kept warm;
a broken one is refused with the loader's own last lines; the spare is used once."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import mlflow.sklearn
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from scanflow.serving.preflight import Preflight, PreflightFailed


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("preflight")
    x = np.random.default_rng(0).normal(size=(40, 3))
    good = root / "good"
    mlflow.sklearn.save_model(LogisticRegression().fit(x, x[:, 0] > 0), str(good),
                              serialization_format="skops")
    broken = root / "broken"
    shutil.copytree(good, broken)
    for f in broken.glob("model.*"):
        f.unlink()
    return str(good), str(broken)


def test_a_warm_spare_checks_one_model_then_a_new_one_is_started(model_dirs: tuple[str, str]) -> None:
    good, broken = model_dirs
    pf = Preflight({**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}, ["sklearn"])
    try:
        pf.warm_up()
        spare = pf._spare
        assert spare is not None and spare.proc.poll() is None  # waiting, imports done or under way
        pf.warm_up()
        assert pf._spare is spare  # one spare at a time
        pf.check(good, timeout=120)
        assert spare.proc.returncode == 0 and pf._spare is None  # used once, gone
        with pytest.raises(PreflightFailed) as e:
            pf.check(broken, timeout=120)  # no spare: a new process, same check
        assert "model.skops" in str(e.value) or "No such file" in str(e.value), str(e.value)
    finally:
        pf.close()


def test_a_spare_whose_owner_goes_away_ends_on_its_own(model_dirs: tuple[str, str]) -> None:
    pf = Preflight({**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    pf.warm_up()
    spare = pf._spare
    assert spare is not None and spare.proc.stdin is not None
    spare.proc.stdin.close()  # what the owner's exit does to the pipe
    assert spare.proc.wait(timeout=120) == 0
    pf.close()


def test_a_model_that_does_not_load_in_time_is_refused(tmp_path: Path, model_dirs: tuple[str, str]) -> None:
    pf = Preflight({**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    with pytest.raises(PreflightFailed, match="loading took longer than 0s"):
        pf.check(model_dirs[0], timeout=0.01)  # a cold process cannot import MLflow in 10 ms
    pf.close()
