"""A newcomer's path, end to end: `scanflow init` on a table the test makes itself, then the
commands the generated README lists (validate, run train, deploy, agents start) and the app's
own `send.py` for traffic and labels. A covariate shift whose labels the old model gets wrong
must be detected, retrained on, promoted through the gate and rolled out - with nothing but the
generated files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from support.waiting import wait_for

SERVICE = "churn"


def table(n: int, seed: int, shifted: bool = False) -> Any:
    """Five numeric features and a categorical one; the label is a linear rule. Shifted: feature
    f2 moves far from where the clean data lives, and there the rule is inverted - the champion,
    which never saw such rows, is wrong on almost all of them."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5))
    region = rng.choice(["north", "south", "east"], size=n)
    y = (x[:, 0] + x[:, 1] + 0.5 * (region == "north") > 0).astype(int)
    if shifted:
        x[:, 2] += 6.0
        y = 1 - y
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(5)])
    frame["region"] = region
    frame["churned"] = y
    return frame


@pytest.mark.slow
@pytest.mark.timeout(900)  # ≈ 3-6 min on 2 cores; far more when the machine is shared
def test_an_init_app_detects_retrains_promotes_and_rolls_out(tmp_path: Path) -> None:
    from scanflow.store import Store

    ws, app = tmp_path / "ws", tmp_path / SERVICE
    env = {**os.environ, "SCANFLOW_WORKSPACE": str(ws), "MLFLOW_DISABLE_TELEMETRY": "true"}
    table(3000, seed=0).to_csv(tmp_path / "customers.csv", index=False)
    table(1000, seed=1).to_csv(tmp_path / "clean.csv", index=False)
    table(6000, seed=2, shifted=True).to_csv(tmp_path / "shifted.csv", index=False)
    table(500, seed=3, shifted=True).to_csv(tmp_path / "unseen.csv", index=False)  # unseen by the retrain

    t0, phases = time.monotonic(), []  # (seconds since start, what happened): printed, never asserted

    def done(what: str) -> None:
        phases.append((round(time.monotonic() - t0, 1), what))
        print(f"{phases[-1][0]:7.1f}s {what}")

    def scanflow(*args: str, timeout: float = 180) -> str:
        res = subprocess.run([sys.executable, "-m", "scanflow.cli.main", *args], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=timeout)
        assert res.returncode == 0, (args, res.stdout[-3000:], res.stderr[-3000:], phases)
        done(" ".join(args[:2]))
        return res.stdout

    def send(file: str, rows: int, start: int = 0) -> dict[str, Any]:
        res = subprocess.run([sys.executable, str(app / "send.py"), url, file, "--rows", str(rows),
                              "--start", str(start), "--batch", "5", "--labels", "0.6"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr[-3000:]
        return dict(json.loads(res.stdout.strip().splitlines()[-1]))

    scanflow("init", SERVICE, "--data", "customers.csv", "--target", "churned")
    scanflow("validate", SERVICE)
    scanflow("run", SERVICE, "train")
    scanflow("deploy", SERVICE)
    store = Store(f"sqlite:///{ws / 'scanflow.db'}")
    dep = store.get_deployment(SERVICE)
    url = f"http://{dep.host}:{dep.port}"
    try:
        scanflow("agents", "start", SERVICE)
        clean = send("clean.csv", 1000)
        assert clean["accuracy"] > 0.9 and clean["versions"] == {"1": 1000}, clean

        def events(kind: str) -> list[Any]:
            return list(store.list_events(SERVICE, [kind]))

        sent = {"rows": 0, "accuracy": []}

        def rolled_out() -> Any:
            """Shifted traffic (and its labels), 300 rows at a time, until a new version serves."""
            got = send("shifted.csv", 300, start=sent["rows"] % 6000)
            sent["rows"] += 300
            sent["accuracy"].append(got["accuracy"])
            d = store.get_deployment(SERVICE)
            return d.model_version if d.model_version != "1" and events("rollout_completed") else None

        done("clean traffic")
        version = wait_for(rolled_out, timeout=300, interval=0, what="a retrained model rolled out")
        done(f"version {version} serves, after {sent['rows']} shifted rows")
        assert sent["accuracy"][0] < 0.3, sent  # the champion is wrong on the shifted rows
        for kind in ("drift_detected", "retrain_started", "retrain_finished", "promoted"):
            assert events(kind), (kind, [e.kind for e in store.list_events(SERVICE)])
        # drift was raised on the shifted rows (ids after the 1,000 clean ones)
        assert any(e.payload["window"]["first_id"] > 1000 for e in events("drift_detected"))
        (promoted,) = events("promoted")
        assert str(promoted.payload.get("version") or promoted.payload.get("to_version")) == version, promoted
        assert not events("promotion_rejected")
        (retrain,) = [r for r in store.list_runs(workflow="retrain")]
        assert retrain.status == "succeeded" and retrain.trigger["agent"] == "executor"
        after = send("unseen.csv", 500)
        assert after["versions"] == {version: 500} and after["accuracy"] > 0.8, after
        assert "promot" in scanflow("why", SERVICE)
    finally:
        subprocess.run([sys.executable, "-m", "scanflow.cli.main", "agents", "stop"], cwd=tmp_path, env=env,
                       capture_output=True, timeout=120)
        subprocess.run([sys.executable, "-m", "scanflow.cli.main", "stop", SERVICE], cwd=tmp_path, env=env,
                       capture_output=True, timeout=120)
        store.close()
