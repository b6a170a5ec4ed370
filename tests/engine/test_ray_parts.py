"""The ray backend's pieces that need no cluster: what a step asks Ray for, why an unfit step is
refused, and what of the app folder travels to the nodes."""

from __future__ import annotations

from pathlib import Path

import pytest

from scanflow.spec.models import Step

pytest.importorskip("ray")

from scanflow.engine.ray_backend import ray_request, task_options, unfit  # noqa: E402
from scanflow.engine.ray_task import output_uri, pack_app, split_uri, unpack_app  # noqa: E402


def test_step_resources_become_rays_task_options() -> None:
    step = Step(name="fit", run="python fit.py", timeout=5,
                resources={"cpus": "500m", "memory": "1Gi", "gpus": 1, "custom": {"node_a": 1}})
    opts = task_options(step)
    assert (opts["num_cpus"], opts["memory"], opts["num_gpus"], opts["resources"]) == (
        0.5, 2**30, 1.0, {"node_a": 1.0})
    assert opts["max_retries"] == 0  # retries are the step's policy, counted by the driver
    assert "memory" not in task_options(Step(name="s", call="steps:f"))  # none asked: none set


def test_a_step_is_unfit_only_when_no_single_node_has_all_it_asks() -> None:
    need = ray_request(Step(name="s", run="x", resources={"cpus": 2, "memory": "1Gi"}).resources)
    nodes = [{"CPU": 2.0, "memory": 2.0**29}, {"CPU": 1.0, "memory": 2.0**31}]
    why = unfit(need, nodes)
    assert why == ("asks for CPU 2, memory 1024 MiB, which no node of the Ray cluster offers "
                   "(nodes: CPU 2, memory 512 MiB; CPU 1, memory 2048 MiB)")
    assert unfit(need, [*nodes, {"CPU": 4.0, "memory": 2.0**32}]) is None


def test_the_app_folder_travels_without_caches_vcs_and_the_workspace(tmp_path: Path) -> None:
    app = tmp_path / "app"
    for rel in ("steps.py", "data/small.csv", ".git/HEAD", ".venv/bin/python", "__pycache__/s.pyc",
                "ws/scanflow.db", "pkg/mod.pyc"):
        (app / rel).parent.mkdir(parents=True, exist_ok=True)
        (app / rel).write_text(rel)
    home = unpack_app(pack_app(app, skip=[app / "ws"]), tmp_path / "node")
    got = sorted(p.relative_to(home).as_posix() for p in home.rglob("*") if p.is_file())
    assert got == ["data/small.csv", "steps.py"]
    assert (home / "steps.py").read_text() == "steps.py"
    assert unpack_app(pack_app(app, skip=[app / "ws"]), tmp_path / "node") == home  # once per content
    assert [p.name for p in (tmp_path / "node").iterdir()] == [home.name]  # no half-unpacked leftovers


def test_sockets_and_fifos_in_the_app_folder_are_left_behind(tmp_path: Path) -> None:
    import os
    import socket

    app = tmp_path / "app"
    app.mkdir()
    (app / "steps.py").write_text("x = 1\n")
    os.mkfifo(app / "pipe")
    with socket.socket(socket.AF_UNIX) as sock:  # e.g. a Ray session's sockets in a temp folder
        sock.bind(str(app / "plasma_store"))
        home = unpack_app(pack_app(app, skip=[]), tmp_path / "node")
    assert sorted(p.name for p in home.iterdir()) == ["steps.py"]


def test_outputs_are_named_by_mlflow_uris() -> None:
    uri = output_uri("abc123", "train", "model")
    assert uri == "runs:/abc123/scanflow/outputs/train/model"
    assert split_uri(uri) == ("abc123", "scanflow/outputs/train/model")
    with pytest.raises(ValueError, match="not a step output stored in MLflow"):
        split_uri("/tmp/x")
