"""Ray Serve serving backend: each service is one Serve application at `/<service>` on the
cluster's HTTP proxies, its replicas Ray actors placed by the service's `resources:`.

- A replica runs the same FastAPI app as a local gunicorn worker (`app.create_app`), built on
  its node (`@serve.ingress()` late-bound), so `/predict`, `/labels`, `/health`, `/metrics` and
  the V2 protocol answer with the same bodies and errors on both backends.
- Its service config travels with the deployment (an init argument), not as a file: a node
  shares no disk with the deployer. The replica writes it, its prediction log's journal and
  its announcement into a folder of its node's own temporary directory.
- The deployment is named after the version it serves (`v3`) and pinned to it.
- Replicas are decided by scanflow (the planner, `scanflow scale`), not by Serve's autoscaler:
  the application is deployed with Serve's external scaler enabled and scaled through its
  controller, which changes the count without restarting the replicas already serving.
- The prediction log's collector writes to the shared store (PostgreSQL), like a local
  worker's; the agents read the same windows on both backends.

Not built yet on this backend (refused with `NotOnThisBackend`): rollout, rollback, canary,
shadow and resize.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from scanflow.serving.app import Limits, PredLogConfig, ServiceConfig
from scanflow.serving.backend import Deployer, NotOnThisBackend, UnknownService, default_actor
from scanflow.serving.batching import BatchConfig
from scanflow.settings import Settings
from scanflow.spec.models import Resources
from scanflow.store import Store
from scanflow.store.schema import Deployment
from scanflow.tracking import MlflowTracker, Tracker

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
SOURCE = "deployer"
WORKDIR = "scanflow-serve"  # under each node's temporary directory: one folder per service
MAX_ONGOING = 64  # requests Serve hands one replica at once (its micro-batcher groups them)
log = logging.getLogger(__name__)


def deployment_name(version: str) -> str:
    """The Serve deployment serving (and pinned to) one model version."""
    return f"v{version}"


def replica_workdir(service: str) -> Path:
    """A service's folder on this node, shared by its replicas here: a replica killed with
    kill -9 leaves its journal segments where a sibling's collector finds them."""
    return Path(tempfile.gettempdir()) / WORKDIR / service


class ServeReplica:
    """One replica: writes its service config on its node, then Serve builds the app from it
    (`__serve_build_asgi_app__`) and runs its lifespan (models loaded, prediction log started)."""

    def __init__(self, config_json: str) -> None:
        cfg = ServiceConfig.model_validate_json(config_json)
        wd = replica_workdir(cfg.service)
        wd.mkdir(parents=True, exist_ok=True)
        cfg.workdir = str(wd)
        self._config_path = wd / f"service-{os.getpid()}.json"
        cfg.save(self._config_path)

    def __serve_build_asgi_app__(self) -> Any:
        from scanflow.serving.app import create_app

        return create_app(str(self._config_path))


def _deployment_class() -> Any:
    """`ServeReplica` as a Serve ingress deployment (made on first use: it imports Ray Serve)."""
    from ray import serve  # lazy: only the ray backend loads Ray Serve

    return serve.deployment(serve.ingress()(ServeReplica), name="replica")


class RayServeDeployer(Deployer):
    """Services as Ray Serve applications on the cluster at `settings.ray_address`; their facts
    (version, replicas, URL) in the shared store."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        *,
        ready_timeout: float = 180.0,
        limits: Limits | None = None,
        batching: BatchConfig | None = None,
        predlog: PredLogConfig | None = None,
        actor: str | None = None,
        tracker: Tracker | None = None,
        **_local_only: Any,
    ) -> None:
        from scanflow.engine.ray_backend import connect  # lazy: ray

        self.settings = settings
        self.store = store
        self.tracker: Tracker = tracker or MlflowTracker(settings)
        self.limits = limits or Limits()
        self.batching = batching or BatchConfig()
        self.predlog = predlog or PredLogConfig()
        self.actor = actor or default_actor()
        self.ready_timeout = ready_timeout
        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # "Deploying app...": not news
        connect(settings.ray_address)

    # -- helpers -----------------------------------------------------------------------------
    def _client(self) -> Any:
        """Serve's client, Serve started with scanflow's HTTP address if it did not run yet."""
        from ray import serve  # lazy: Ray Serve
        from ray.serve.context import _get_global_client

        try:
            return _get_global_client()
        except Exception:  # noqa: BLE001 - Serve not running on the cluster yet (RayServeException)
            serve.start(http_options={"host": self.settings.host, "port": self.settings.serve_port})
            return _get_global_client()

    def _get(self, service: str) -> Deployment:
        dep = self.store.get_deployment(service)
        if dep is None:
            raise UnknownService(f"unknown service {service!r}: not deployed")
        return dep

    def _details(self, service: str) -> dict[str, Any] | None:
        """What Serve's controller says of the application (deployments, replicas, nodes)."""
        details = self._client().get_serve_details()
        app: dict[str, Any] | None = details.get("applications", {}).get(service)
        return app

    def _replicas(self, service: str) -> list[dict[str, Any]]:
        """Each replica of the application: its deployment (version), state, pid and node."""
        app = self._details(service) or {}
        out = []
        for name, d in (app.get("deployments") or {}).items():
            version = name.removeprefix("v")
            for r in d.get("replicas") or []:
                # The keys of a local worker's entry (`LocalDeployer.status`), and where it runs.
                out.append({"pid": r.get("pid"), "ready": r.get("state") == "RUNNING",
                            "draining": r.get("state") == "STOPPING", "model_version": version,
                            "versions": [version], "deployment": name, "state": r.get("state"),
                            "node": r.get("node_id"), "node_ip": r.get("node_ip"),
                            "replica_id": r.get("replica_id")})
        return out

    def _running_count(self, service: str, deployment: str) -> int:
        return sum(1 for r in self._replicas(service) if r["deployment"] == deployment and r["ready"])

    def _wait(self, what: str, cond: Any, service: str) -> None:
        end = time.monotonic() + self.ready_timeout
        while not cond():
            app = self._details(service) or {}
            if app.get("status") == "DEPLOY_FAILED":
                raise RuntimeError(f"service {service!r}: Serve could not deploy it: "
                                   f"{app.get('message') or 'no message'}")
            if time.monotonic() > end:
                raise TimeoutError(f"service {service!r}: no {what} after {self.ready_timeout:.0f}s "
                                   f"(Serve says: {app.get('status')} {app.get('message') or ''})")
            time.sleep(0.1)

    def _health_ok(self, url: str) -> bool:
        try:
            return httpx.get(f"{url}/health", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    # -- Deployer ----------------------------------------------------------------------------
    def deploy(
        self,
        service: str,
        *,
        app: str,
        team: str,
        model: str,
        alias: str = "champion",
        replicas: int = 1,
        port: int = 0,
        batching: BatchConfig | None = None,
        resources: Resources | None = None,
    ) -> Deployment:
        """Serve `models:/<model>@<alias>` (resolved now) as the Serve application `service`;
        `port` is the cluster's (Serve's proxies answer every service on one port)."""
        from ray import serve  # lazy: Ray Serve

        if not _NAME.match(service):
            raise ValueError(f"service name {service!r}: use letters, digits, '.', '_', '-'")
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        old = self.store.get_deployment(service)
        if old is not None and old.status == "running" and self._details(service):
            raise ValueError(f"service {service!r} is already running ({self.url(service)}): stop "
                             "it first, or use scale/rollout")
        version = self.tracker.version_by_alias(model, alias)
        client = self._client()
        host, serve_port = client.http_config.host, int(client.http_config.port)
        if host in ("0.0.0.0", "::", ""):
            host = self.settings.host
        cfg = ServiceConfig(
            service=service, app=app, team=team, model_name=model, alias=alias,
            model_version=version, tracking_uri=self.settings.tracking,
            registry_uri=self.settings.registry_uri, store_url=self.settings.store,
            workdir="", replicas=replicas, limits=self.limits,
            batching=batching or self.batching, predlog=self.predlog, preload_models=False,
        )
        options: dict[str, Any] = {"num_cpus": 1.0}
        cpus, memory = resources.declared() if resources is not None else (None, None)
        if cpus is not None:
            options["num_cpus"] = cpus
        if memory is not None:
            options["memory"] = memory
        options["runtime_env"] = {"env_vars": {"OMP_NUM_THREADS": "1",
                                               "MLFLOW_DISABLE_TELEMETRY": "true"}}
        name = deployment_name(version)
        target = _deployment_class().options(
            name=name, num_replicas=replicas, ray_actor_options=options,
            max_ongoing_requests=MAX_ONGOING, health_check_period_s=2.0,
        ).bind(cfg.model_dump_json())
        facts: dict[str, Any] = dict(
            service=service, app=app, team=team, model_name=model, alias=alias,
            model_version=version, host=host, port=serve_port, replicas=replicas,
            workdir=f"ray-serve:{service}")
        t0 = time.monotonic()
        url = f"http://{host}:{serve_port}/{service}"
        try:
            serve.run(target, name=service, route_prefix=f"/{service}",
                      external_scaler_enabled=True)
            self._wait(f"{replicas} running replica(s)",
                       lambda: self._running_count(service, name) == replicas
                       and self._health_ok(url), service)
        except Exception:
            self._delete(service)
            self.store.put_deployment(**facts, pid=None, status="failed")
            self.store.add_event(SOURCE, "deploy_failed", service, model=model, model_version=version)
            raise
        dep = self.store.put_deployment(**facts, pid=None, status="running")
        self.store.add_event(
            SOURCE, "deployed", service, app=app, team=team, model=model, alias=alias,
            model_version=version, replicas=replicas, port=serve_port, backend="ray",
            seconds=round(time.monotonic() - t0, 3), actor=self.actor,
            **({"resources": {"cpus": cpus, "memory": memory}} if resources is not None else {}),
        )
        return dep

    def _delete(self, service: str) -> None:
        from ray import serve  # lazy: Ray Serve

        try:
            serve.delete(service)
        except Exception:  # noqa: BLE001 - nothing of it on the cluster
            log.debug("no Serve application %s to delete", service, exc_info=True)

    def scale(self, service: str, replicas: int, *, reason: str = "") -> Deployment:
        """A new replica count through Serve's external scaler: replicas already serving are
        kept; Serve drains the ones it removes."""
        import ray  # lazy: ray
        from ray.serve._private.common import DeploymentID  # the controller's key (Serve's own)

        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        dep = self._running(service)
        name = deployment_name(str(dep.model_version))
        before = self._running_count(service, name)
        controller = self._client()._controller

        ray.get(controller.update_deployment_replicas.remote(
            DeploymentID(name=name, app_name=service), replicas))
        self._wait(f"{replicas} running replica(s)",
                   lambda: self._running_count(service, name) == replicas
                   and len([r for r in self._replicas(service) if r["deployment"] == name]) == replicas,
                   service)
        self.store.update_deployment(service, replicas=replicas)
        self.store.add_event(SOURCE, "scaled", service, actor=self.actor,
                             **{"from": before, "to": replicas},
                             **({"reason": reason} if reason else {}))
        return self._get(service)

    def _running(self, service: str) -> Deployment:
        dep = self._get(service)
        if dep.status != "running" or not self._details(service):
            raise RuntimeError(f"service {service!r} is not running on the cluster "
                               f"(status {dep.status})")
        return dep

    def rollout(self, service: str, version: str | None = None, *, reason: str = "") -> Deployment:
        raise NotOnThisBackend("rollout is not built on the ray backend yet: stop and deploy the "
                               "new version, or serve it on the local backend")

    def rollback(self, service: str, *, reason: str = "") -> Deployment:
        raise NotOnThisBackend("rollback is not built on the ray backend yet")

    def set_canary(self, service: str, version: str | None, share: float = 0.1, *,
                   reason: str = "") -> Deployment:
        raise NotOnThisBackend("canary traffic is not built on the ray backend yet")

    def set_shadow(self, service: str, version: str | None, *, reason: str = "") -> Deployment:
        raise NotOnThisBackend("shadow traffic is not built on the ray backend yet")

    def stop(self, service: str) -> None:
        dep = self._get(service)
        self._delete(service)
        self.store.update_deployment(service, status="stopped", pid=None)
        self.store.add_event(SOURCE, "stopped", service, actor=self.actor,
                             model_version=dep.model_version)

    def status(self, service: str) -> dict[str, Any]:
        dep = self._get(service)
        app = self._details(service) or {}
        replicas = self._replicas(service) if app else []
        alive = app.get("status") == "RUNNING"
        return {
            "service": service,
            "backend": "ray",
            "status": dep.status if alive or dep.status != "running" else "dead",
            "serve_status": app.get("status") if app else None,
            "alive": alive,
            "url": self.url(service),
            "port": dep.port,
            "model_name": dep.model_name,
            "alias": dep.alias,
            "model_version": dep.model_version,
            "replicas": dep.replicas,
            "workers": replicas,
            "worker_pids": [r["pid"] for r in replicas],
            "nodes": sorted({r["node"] for r in replicas if r["node"]}),
            "versions": sorted({r["model_version"] for r in replicas}),
            "canary": None,
            "shadow_version": None,
            "previous_version": None,
            "batching": None,
            "resources": None,
        }

    def url(self, service: str) -> str:
        dep = self._get(service)
        return f"http://{dep.host}:{dep.port}/{service}"
