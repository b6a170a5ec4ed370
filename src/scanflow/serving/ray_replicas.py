"""What runs on the nodes of a service on Ray Serve: the service's router (the application's
ingress) and the replicas of one service config each. Made into Serve deployments by
`ray_serve`; imported by Ray on the nodes.

Why a router in front: Serve replaces a deployment whose code or arguments change by stopping
an old replica before starting its successor (a gap in serving while the model loads), and an
application whose ingress changes drops the old ingress at once. A config change is instead a
new deployment started beside the one serving; the router's target (its `user_config`, applied
in place) moves to it once every replica of it runs, and only then is the old one removed, its
requests in flight finishing. Each request is forwarded whole (method, path, headers, body) and
answered by the same FastAPI app as a local gunicorn worker (`app.create_app`), so bodies,
errors and the prediction log are the same on both backends.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import MutableMapping
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

from scanflow.serving.config import ServiceConfig

WORKDIR = "scanflow-serve"  # under each node's temporary directory: one folder per service
Forwarded = tuple[int, list[tuple[bytes, bytes]], bytes]  # status, headers, body
HOP_BY_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"content-length"}


def replica_workdir(service: str) -> Path:
    """A service's folder on this node, shared by its replicas here: a replica killed with
    kill -9 leaves its journal segments where a sibling's collector finds them."""
    return Path(tempfile.gettempdir()) / WORKDIR / service


class ConfigReplica:
    """One replica of one service config: the model server's app, its lifespan run here
    (models loaded, prediction log started), answering requests the router forwards."""

    async def __init__(self, config_json: str) -> None:  # type: ignore[misc]  # Serve awaits it
        from scanflow.serving.app import create_app

        cfg = ServiceConfig.model_validate_json(config_json)
        wd = replica_workdir(cfg.service)
        wd.mkdir(parents=True, exist_ok=True)
        cfg.workdir = str(wd)
        path = wd / f"service-{os.getpid()}.json"
        cfg.save(path)
        self._app = create_app(str(path))
        self._lifespan: AbstractAsyncContextManager[Any] = self._app.router.lifespan_context(self._app)
        await self._lifespan.__aenter__()

    async def forward(self, method: str, path: str, query: bytes,
                      headers: list[tuple[bytes, bytes]], body: bytes) -> Forwarded:
        """Answer one HTTP request with the app (an ASGI call in this process)."""
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                 "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
                 "query_string": query, "root_path": "", "headers": headers, "client": None,
                 "server": None}
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        status, out_headers, chunks = 500, [], []

        async def send(message: MutableMapping[str, Any]) -> None:
            nonlocal status, out_headers
            if message["type"] == "http.response.start":
                status = message["status"]
                out_headers = [(k, v) for k, v in message.get("headers", [])
                               if k.lower() not in HOP_BY_HOP]
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self._app(scope, receive, send)
        return status, out_headers, b"".join(chunks)

    async def __del__(self) -> None:
        """Serve stops the replica: flush the prediction log, close the store."""
        lifespan = getattr(self, "_lifespan", None)
        if lifespan is not None:
            await lifespan.__aexit__(None, None, None)


class ServiceRouter:
    """The application's ingress: forwards each request to the deployment named by its
    `user_config` (`{"target": NAME}`), which `reconfigure` changes without a restart. The
    deployments bound to it are its arguments only so that Serve runs them."""

    def __init__(self, service: str, *deployments: Any) -> None:
        self._service = service
        self._target = ""
        self._handles: dict[str, Any] = {}

    def reconfigure(self, config: dict[str, Any]) -> None:
        self._target = str(config["target"])

    def _handle(self) -> Any:
        from ray import serve  # lazy: imported on the node

        handle = self._handles.get(self._target)
        if handle is None:
            handle = serve.get_deployment_handle(self._target, app_name=self._service)
            self._handles = {self._target: handle}  # the old target's handle goes
        return handle

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import Response

        scope = request.scope
        path = scope["path"]
        root = scope.get("root_path") or ""
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        status, headers, body = await self._handle().forward.remote(
            scope["method"], path, scope.get("query_string", b""), list(scope["headers"]),
            await request.body())
        response = Response(body, status_code=status)
        response.raw_headers = [*headers, (b"content-length", str(len(body)).encode())]
        return response
