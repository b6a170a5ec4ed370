"""A real multi-node Ray cluster on this machine (`ray.cluster_utils.Cluster`, as Ray's own
tests do), joined by this process, and the settings of a person running scanflow on it."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from scanflow.engine.ray_task import apps_dir
from scanflow.settings import Settings, get_settings
from support.mlflow_server import free_port


@contextmanager
def ray_cluster(workers: list[dict[str, float]], dashboard: bool = False,
                client: bool = False) -> Iterator[Any]:
    """A 1-CPU head plus one 1-CPU worker node per entry of `workers` (its custom resources);
    stopped, with the app folders its nodes unpacked, when the block ends. `dashboard`: with
    Ray's dashboard (its log and jobs APIs) on free ports of 127.0.0.1, not another cluster's.
    `client`: with the Ray client server too; its address (`ray://...`) is `client_address`."""
    import ray
    from ray.cluster_utils import Cluster

    head: dict[str, Any] = {"num_cpus": 1, "include_dashboard": dashboard}
    if dashboard:
        head.update(dashboard_host="127.0.0.1", dashboard_port=free_port(),
                    dashboard_agent_listen_port=free_port())
    client_port = free_port() if client else None
    if client_port:
        head["ray_client_server_port"] = client_port
    c = Cluster(initialize_head=True, head_node_args=head)
    c.client_address = f"ray://127.0.0.1:{client_port}" if client_port else None  # type: ignore[attr-defined]
    nodes = [c.head_node.node_id]
    try:
        for resources in workers:
            nodes.append(c.add_node(num_cpus=1, resources=resources).node_id)
        c.wait_for_nodes()
        ray.init(address=c.address, namespace="scanflow", log_to_driver=False)
        _warm()
        yield c
    finally:
        nodes += [n["NodeID"] for n in ray.nodes()] if ray.is_initialized() else []  # added by the test
        ray.shutdown()
        c.shutdown()
        for node in set(nodes):  # the app folders this cluster's nodes unpacked, no other's
            shutil.rmtree(apps_dir(node), ignore_errors=True)


def _warm() -> None:
    """Start a worker on every node with what a step attempt imports (scanflow, MLflow), so
    that tests timing their steps do not time a cold worker on a busy machine."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=1)
    def imports() -> None:
        import mlflow.tracking  # noqa: F401

        import scanflow.engine.ray_task  # noqa: F401

    ray.get([imports.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
             .remote() for n in ray.nodes() if n["Alive"]])


def ray_settings(address: str, tracking: str, store_url: str, workspace: Path,
                 monkeypatch: pytest.MonkeyPatch) -> Settings:
    """SCANFLOW_BACKEND=ray and its shared state, in the environment (the CLI reads it too)."""
    env = {"SCANFLOW_BACKEND": "ray", "SCANFLOW_STORE_URL": store_url, "SCANFLOW_TRACKING_URI": tracking,
           "SCANFLOW_RAY_ADDRESS": address, "SCANFLOW_WORKSPACE": str(workspace),
           "SCANFLOW_RAY_PYTHON": sys.executable}  # runs a detached run's driver (same machine)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    get_settings.cache_clear()
    return Settings().ensure()
