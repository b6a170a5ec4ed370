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

from scanflow.serving.config import ServiceConfig

WORKDIR = "scanflow-serve"  # under each node's temporary directory: one folder per service


def replica_workdir(cfg: ServiceConfig) -> Path:
    """A service's folder on this node, shared by its replicas here: a replica killed with
    kill -9 leaves its journal segments where a sibling's collector finds them. Named after the
    store too: another cluster's service of the same name on this machine logs elsewhere."""
    store = hashlib.sha256(cfg.store_url.encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / WORKDIR / f"{cfg.service}-{store}"


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

    def __serve_build_asgi_app__(self) -> Any:
        from scanflow.serving.app import create_app  # lazy: FastAPI and MLflow, on the node

        return create_app(str(self._config_path))
