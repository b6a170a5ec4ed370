"""What runs on the nodes of a service on Ray Serve: its replicas, made into a Serve deployment
by `ray_serve`; imported by Ray on the nodes.

A replica runs the same FastAPI app as a local gunicorn worker (`app.create_app`), built on its
node after its constructor (`@serve.ingress()` late-bound) and reached by Serve's proxies
directly, so bodies, errors and the prediction log are the same on both backends, with no hop
in between.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

from scanflow.serving import metrics
from scanflow.serving.config import ServiceConfig
from scanflow.serving.ray_metrics import ReplicaMetrics

WORKDIR = "scanflow-serve"  # under each node's temporary directory: one folder per service


def service_key(service: str, store_url: str) -> str:
    """A service's name on the cluster's nodes and in its key-value store: named after the store
    too, so that another installation's service of the same name stays apart."""
    return f"{service}-{hashlib.sha256(store_url.encode()).hexdigest()[:10]}"


def replica_workdir(cfg: ServiceConfig) -> Path:
    """A service's folder on this node, shared by its replicas here: a replica killed with
    kill -9 leaves its journal segments where a sibling's collector finds them."""
    return Path(tempfile.gettempdir()) / WORKDIR / service_key(cfg.service, cfg.store_url)


class ConfigReplica:
    """One replica of one service config: writes the config on its node, then Serve builds the
    model server's app from it (`__serve_build_asgi_app__`) and runs its lifespan (models
    loaded, prediction log started)."""

    def __init__(self, config_json: str) -> None:
        cfg = ServiceConfig.model_validate_json(config_json)
        wd = replica_workdir(cfg)
        wd.mkdir(parents=True, exist_ok=True)
        cfg.workdir = str(wd)
        self._config_path = wd / f"service-{os.getpid()}.json"
        cfg.save(self._config_path)
        self._metrics = ReplicaMetrics(service_key(cfg.service, cfg.store_url)).start()
        metrics.render_with(self._metrics.render)  # `/metrics`: every replica's, summed

    def __serve_build_asgi_app__(self) -> Any:
        from scanflow.serving.app import create_app  # lazy: FastAPI and MLflow, on the node

        return create_app(str(self._config_path))

    def __del__(self) -> None:
        """Serve stops the replica: its last counts stay in the service's sum, its gauges leave."""
        self._metrics.close()
