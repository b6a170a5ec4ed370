"""The KubeRay example manifest stays in step with what the project pins (it cannot be applied
here: there is no Kubernetes API on this machine)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "deploy" / "kuberay-raycluster.yaml"


def _docs() -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in yaml.safe_load_all(MANIFEST.read_text())}


def _containers(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    spec = cluster["spec"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_the_cluster_runs_the_ray_the_extra_pins() -> None:
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["ray"]
    ray_req = next(Requirement(r) for r in extra if Requirement(r).name == "ray")
    cluster = _docs()["RayCluster"]
    version = cluster["spec"]["rayVersion"]
    assert ray_req.specifier.contains(version), (version, str(ray_req.specifier))
    for c in _containers(cluster):
        assert c["image"].split(":")[1].startswith(f"{version}-py311"), c["image"]
        assert "scanflow[ray]" in " ".join(c["args"])


def test_state_comes_from_a_secret_and_runs_stay_quiet() -> None:
    docs = _docs()
    secret = docs["Secret"]
    assert set(secret["stringData"]) == {"SCANFLOW_STORE_URL", "SCANFLOW_TRACKING_URI"}
    assert secret["stringData"]["SCANFLOW_STORE_URL"].startswith("postgresql")  # no SQLite on a cluster
    assert secret["stringData"]["SCANFLOW_TRACKING_URI"].startswith("http")
    for c in _containers(docs["RayCluster"]):
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        assert "SCANFLOW_STORE_URL" not in env and "SCANFLOW_TRACKING_URI" not in env
        assert {"secretRef": {"name": secret["metadata"]["name"]}} in c["envFrom"]
        assert env["RAY_USAGE_STATS_ENABLED"] == "0"


def test_the_secret_sets_what_scanflow_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    from scanflow.settings import Settings

    data = _docs()["Secret"]["stringData"]
    for k, v in data.items():
        monkeypatch.setenv(k, v)
    s = Settings()
    assert (s.store, s.tracking) == (data["SCANFLOW_STORE_URL"], data["SCANFLOW_TRACKING_URI"])
