"""Ray Serve serving backend: each service is one Serve application at `/<service>` on the
cluster's HTTP proxies, its replicas Ray actors placed by the service's `resources:`.

- The application is one deployment whose replicas run the same FastAPI app as a local
  gunicorn worker (`ray_replicas`), so `/predict`, `/labels`, `/health`, `/metrics` and the V2
  protocol answer alike on both backends, reached by Serve's proxies with no hop in between.
- A config travels with the deployment (an init argument) and is kept in the store
  (`deployments.config`), never in a file: a node shares no disk with the deployer, and any
  machine's deployer may act on the service next.
- Each replica is pinned to one config (its Serve version is the config's hash). rollout,
  rollback, canary and shadow change the config (`serving.changes`, as on the local backend),
  and Serve rolls every replica over with a 100 % surge: the new replicas start beside the old
  ones, which serve until their replacements run. Canary and shadow versions are loaded by the
  same replicas as the champion, as local workers do.
- Replicas are decided by scanflow (the planner, `scanflow scale`), not by Serve's autoscaler:
  the application is deployed with Serve's external scaler enabled and scaled through its
  controller, which changes the count without restarting the replicas already serving.
- The prediction log commits each answered request to the shared store (PostgreSQL) before its
  response leaves (`predlog.commit = "store"`, one insert for all requests waiting meanwhile:
  `group_commit`), so a node lost with its disk loses no record of an answer; the agents read
  the same windows on both backends.

Not offered on this backend: resize (Ray's CPUs are a scheduling claim, not a quota).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any

import httpx

from scanflow.engine.ray_backend import alive_nodes, unfit
from scanflow.serving import changes
from scanflow.serving.app import Limits, PredLogConfig, ServiceConfig
from scanflow.serving.backend import (
    Deployer,
    NotOnThisBackend,
    UnknownService,
    check_service,
    default_actor,
)
from scanflow.serving.batching import BatchConfig
from scanflow.serving.label_auth import refuse_open_bind
from scanflow.serving.ray_metrics import delete_service
from scanflow.settings import Settings
from scanflow.spec.models import Resources
from scanflow.spec.policy import Policy
from scanflow.store import Store
from scanflow.store.schema import Deployment
from scanflow.tracking import MlflowTracker, Tracker

SOURCE = "deployer"
DEPLOYMENT = "server"  # the application's one deployment: the service's replicas
MAX_ONGOING = 64  # requests Serve hands one replica at once (its micro-batcher groups them)
log = logging.getLogger(__name__)


def _below_warning(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING


def config_label(cfg: ServiceConfig) -> str:
    """What a config serves, for messages: `v3-g0`, `v3-canary-v4-g1` (versions, generation)."""
    name = f"v{cfg.model_version}"
    if cfg.canary:
        name += f"-canary-v{cfg.canary.version}"
    if cfg.shadow_version:
        name += f"-shadow-v{cfg.shadow_version}"
    return f"{name}-g{cfg.generation}"


def _version_of(cfg: ServiceConfig, options: dict[str, Any]) -> str:
    """The Serve version the replicas of a config are pinned to: what they serve, not how many
    they are, so that a scale or a redeploy of the same config restarts nothing, and any other
    change is a rollout of every replica."""
    kept = cfg.model_dump(mode="json", exclude={"replicas"})
    return hashlib.sha256(json.dumps([kept, options], sort_keys=True).encode()).hexdigest()[:16]


def _kept_row(cfg: ServiceConfig, options: dict[str, Any],
              autoscaling: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the store keeps of a service on Ray (`deployments.config`; read by `_kept`)."""
    return {"service": cfg.model_dump(mode="json"), "ray_actor_options": options,
            "autoscaling": autoscaling}


def _autoscaling_of(dep: Deployment) -> dict[str, Any] | None:
    """Serve's autoscaling config of a service deployed with `policy.scaling: serve`, else None."""
    kept = (dep.config or {}).get("autoscaling")
    return dict(kept) if kept else None


def serve_autoscaling(policy: Policy, replicas: int) -> dict[str, Any]:
    """The policy in Serve's terms (`autoscaling_config`): its replica limits, its in-flight
    target per replica (Serve's default of 2 when the policy sets none) and its cooldowns as
    how long a signal must hold before Serve scales up or down, then `serve_autoscaling`'s own
    keys; what Serve would refuse is a ValueError here, before anything is deployed."""
    from ray.serve.config import AutoscalingConfig  # lazy: Ray Serve

    lim, obj, cd = policy.limits, policy.objectives, policy.cooldowns
    cfg = {"min_replicas": lim.min_replicas, "max_replicas": lim.max_replicas,
           "initial_replicas": min(max(replicas, lim.min_replicas), lim.max_replicas),
           "target_ongoing_requests": obj.in_flight_per_replica or 2.0,
           "upscale_delay_s": cd.scale_up, "downscale_delay_s": cd.scale_down,
           **policy.serve_autoscaling}
    try:
        AutoscalingConfig(**cfg)
    except ValueError as exc:  # pydantic's ValidationError: what Serve would refuse
        raise ValueError(f"policy.serve_autoscaling: Ray Serve refuses {cfg}: "
                         f"{' '.join(str(exc).split())[:600]}") from None
    return cfg


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
        from scanflow.engine.ray_backend import connect  # lazy: ray (the module imports it on use)

        self.settings = settings
        self.store = store
        self.tracker: Tracker = tracker or MlflowTracker(settings)
        self.limits = limits or Limits()
        self.batching = batching or BatchConfig()
        self.predlog = predlog or PredLogConfig(commit="store")  # a node may die with its disk
        self.actor = actor or default_actor()
        self.ready_timeout = ready_timeout
        # "Started Serve", "Application ... is ready": not news at the CLI. A filter, not a
        # level: Serve sets its logger's level again when it starts.
        serve_log = logging.getLogger("ray.serve")
        if _below_warning not in serve_log.filters:
            serve_log.addFilter(_below_warning)
        connect(settings.ray_address)

    # -- helpers -----------------------------------------------------------------------------
    def _client(self) -> Any:
        """Serve's client, Serve started with scanflow's HTTP address if it did not run yet."""
        from ray import serve  # lazy: Ray Serve
        from ray.serve.context import _get_global_client  # lazy: Ray Serve (its only client getter)

        try:
            return _get_global_client()
        except Exception:  # noqa: BLE001 - Serve not running on the cluster yet (RayServeException)
            # One proxy on the head by default: on one machine the nodes' proxies share the port
            # (SO_REUSEPORT), and Serve draining the proxy of a node left without replicas
            # dropped a client's keep-alive connection mid-rollout (seen in CI, 1 of 2,359).
            where = "HeadOnly" if self.settings.serve_proxies == "head" else "EveryNode"
            serve.start(proxy_location=where,
                        http_options={"host": self.settings.host, "port": self.settings.serve_port})
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
        """Each replica of the application: its state, pid and node, and the champion version of
        the config it serves (during a rollout, the new one's)."""
        app = self._details(service) or {}
        dep = self.store.get_deployment(service)
        version = str(dep.model_version) if dep is not None else ""
        out = []
        for name, d in (app.get("deployments") or {}).items():
            for r in d.get("replicas") or []:
                # The keys of a local worker's entry (`LocalDeployer.status`), and where it runs.
                out.append({"pid": r.get("pid"), "ready": r.get("state") == "RUNNING",
                            "draining": r.get("state") == "STOPPING", "model_version": version,
                            "versions": [version], "deployment": name, "state": r.get("state"),
                            "node": r.get("node_id"), "node_ip": r.get("node_ip"),
                            "replica_id": r.get("replica_id")})
        return out

    def _running_count(self, service: str) -> int:
        return sum(1 for r in self._replicas(service) if r["ready"])

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

    def _serve(self, service: str, cfg: ServiceConfig, options: dict[str, Any],
               autoscaling: dict[str, Any] | None = None) -> None:
        """Make the application's deployment serve `cfg` (its replicas with `options`). A
        changed config is a surge rollout: all its replicas start beside the old ones, which
        keep serving until their replacements run, then drain (`max_surge_percent` 100); if
        they do not come up, the old ones stay. Returns at once: the caller waits."""
        from ray import serve  # lazy: Ray Serve
        from ray.serve.api import _run  # Serve's own non-blocking run: `_wait` bounds the wait

        from scanflow.serving.ray_replicas import ConfigReplica  # lazy: imported on the nodes

        env = {"env_vars": {"OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}}
        deployment: Any = serve.deployment  # typed for decorator use only
        count: dict[str, Any] = ({"autoscaling_config": autoscaling} if autoscaling
                                 else {"num_replicas": cfg.replicas})
        replica = deployment(serve.ingress()(ConfigReplica)).options(
            name=DEPLOYMENT, ray_actor_options={**options, "runtime_env": env}, **count,
            max_ongoing_requests=MAX_ONGOING, health_check_period_s=2.0, max_surge_percent=100,
        ).options(version=_version_of(cfg, options), _internal=True)
        # Not `serve.run`: it waits for the application with no deadline (forever when a
        # replica waits for resources no node frees); every caller waits with `_wait`.
        _run(replica.bind(cfg.model_dump_json()), _blocking=False, name=service,
             route_prefix=f"/{service}", external_scaler_enabled=autoscaling is None)

    def _kept(self, dep: Deployment) -> tuple[ServiceConfig, dict[str, Any]]:
        """The config the service serves and its replicas' Ray options, as the store keeps them."""
        if not dep.config:
            raise RuntimeError(f"service {dep.service!r} was not deployed by the ray backend")
        return (ServiceConfig.model_validate(dep.config["service"]),
                dict(dep.config["ray_actor_options"]))

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
        policy: Policy | None = None,
    ) -> Deployment:
        """Serve `models:/<model>@<alias>` (resolved now) as the Serve application `service`;
        `port` is the cluster's (Serve's proxies answer every service on one port). With
        `policy.scaling: serve`, Serve's autoscaler decides its replicas (`serve_autoscaling`)."""
        check_service(service, replicas, self.settings.max_replicas)
        refuse_open_bind(self.settings.host, self.store, f"service {service!r}")
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
        cpus, memory = resources.declared() if resources is not None else (None, None)
        actor_options: dict[str, Any] = {"num_cpus": 1.0 if cpus is None else cpus}
        if memory is not None:
            actor_options["memory"] = memory
        need = {"CPU": float(actor_options["num_cpus"]), "memory": float(memory or 0)}
        why = unfit({k: v for k, v in need.items() if v > 0}, list(alive_nodes().values()))
        if why:  # Serve would wait for such a node forever
            raise ValueError(f"service {service!r}: each replica {why}; change its resources:")
        autoscaling = (serve_autoscaling(policy, replicas)
                       if policy is not None and policy.scaling == "serve" else None)
        if autoscaling:
            replicas = cfg.replicas = autoscaling["initial_replicas"]
        facts: dict[str, Any] = dict(
            service=service, app=app, team=team, model_name=model, alias=alias,
            model_version=version, host=host, port=serve_port, replicas=replicas,
            workdir=f"ray-serve:{service}", config=_kept_row(cfg, actor_options, autoscaling),
            previous_version=None, canary_version=None, canary_share=0.0, shadow_version=None)
        t0 = time.monotonic()
        url = f"http://{host}:{serve_port}/{service}"
        self._forget_metrics(service)
        try:
            self._serve(service, cfg, actor_options, autoscaling)
            self._wait(f"{replicas} running replica(s)",
                       lambda: self._serving(service, cfg, replicas, url), service)
        except Exception:
            self._delete(service)
            self.store.put_deployment(**facts, pid=None, status="failed")
            self.store.add_event(SOURCE, "deploy_failed", service, model=model, model_version=version)
            raise
        dep = self.store.put_deployment(**facts, pid=None, status="running")
        self.store.add_event(
            SOURCE, "deployed", service, app=app, team=team, model=model, alias=alias,
            model_version=version, replicas=replicas, port=serve_port, backend="ray",
            scaling="serve" if autoscaling else "planner",
            seconds=round(time.monotonic() - t0, 3), actor=self.actor,
            **({"resources": {"cpus": cpus, "memory": memory}} if resources is not None else {}),
        )
        return dep

    def _forget_metrics(self, service: str) -> None:
        """Drop the replicas' metric snapshots of the service (`ray_metrics`): a new deployment
        counts from zero, as a local one does."""
        from scanflow.serving.ray_replicas import service_key  # lazy: as ConfigReplica

        try:
            delete_service(service_key(service, self.settings.store))
        except Exception:  # noqa: BLE001 - figures only: never fail a stop or deploy for them
            log.warning("service %s: could not delete its metric snapshots", service, exc_info=True)

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

        check_service(replicas=replicas, most=self.settings.max_replicas)
        dep = self._running(service)
        if _autoscaling_of(dep):
            raise ValueError(f"service {service!r} is scaled by Ray Serve's autoscaler (its policy "
                             "says scaling: serve); change the policy's limits and deploy again")
        cfg, options = self._kept(dep)
        before = self._running_count(service)
        controller = self._client()._controller

        ray.get(controller.update_deployment_replicas.remote(
            DeploymentID(name=DEPLOYMENT, app_name=service), replicas))
        self._wait(f"{replicas} running replica(s)",  # and none starting or stopping
                   lambda: (reps := self._replicas(service)) and len(reps) == replicas
                   and all(r["ready"] for r in reps), service)
        cfg.replicas = replicas
        self.store.update_deployment(service, replicas=replicas, config=_kept_row(cfg, options))
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
        """Serve `version` (default: what the alias points to) on as many replicas as now: the
        new replicas start beside the old ones, which serve until their replacements run and
        then drain (Serve lets their requests finish)."""
        dep = self._running(service)
        cfg, _ = self._kept(dep)
        new = str(version) if version is not None else self.tracker.version_by_alias(
            cfg.model_name, cfg.alias)
        change = changes.rollout(cfg, new, reason)
        if change is None:
            return dep
        return self._reconfigure(dep, change)

    def rollback(self, service: str, *, reason: str = "") -> Deployment:
        """Back to the version served before the last rollout (the alias follows)."""
        dep = self._running(service)
        cfg, _ = self._kept(dep)
        return self._reconfigure(dep, changes.rollback(service, cfg, self.tracker, reason))

    def set_canary(self, service: str, version: str | None, share: float = 0.1, *,
                   reason: str = "") -> Deployment:
        dep = self._running(service)
        cfg, _ = self._kept(dep)
        return self._reconfigure(dep, changes.canary(service, cfg, version, share, reason))

    def set_shadow(self, service: str, version: str | None, *, reason: str = "") -> Deployment:
        dep = self._running(service)
        cfg, _ = self._kept(dep)
        return self._reconfigure(dep, changes.shadow(service, cfg, version, reason))

    def _reconfigure(self, dep: Deployment, change: changes.Change) -> Deployment:
        """Serve the changed config as a new deployment of the application; once its replicas
        all run and the old deployment is gone, record it. If it does not come up, the old
        config is served again and the change fails with Serve's reason."""
        service = dep.service
        old_cfg, options = self._kept(dep)
        cfg = old_cfg.model_copy(deep=True)
        change.apply(cfg)
        cfg.generation, cfg.replicas = old_cfg.generation + 1, dep.replicas
        for v in cfg.versions:
            if v not in old_cfg.versions:
                self._check_registered(cfg.model_name, v)
        t0 = time.monotonic()
        self.store.add_event(SOURCE, f"{change.kind}_started", service, actor=self.actor,
                             replicas=dep.replicas, **change.payload)
        autoscaling = _autoscaling_of(dep)
        n = None if autoscaling else dep.replicas  # Serve's autoscaler may change the count
        try:
            self._serve(service, cfg, options, autoscaling)
            self._wait(f"{dep.replicas} replica(s) serving {config_label(cfg)}",
                       lambda: self._serving(service, cfg, n, self.url(service)), service)
        except Exception as exc:
            try:
                self._serve(service, old_cfg, options, autoscaling)  # the replicas Serve kept serve it still
            except Exception:  # noqa: BLE001 - the change's own error is the one to report
                log.exception("service %s: could not serve the previous config again", service)
            self.store.add_event(SOURCE, f"{change.kind}_failed", service, actor=self.actor,
                                 error=str(exc)[:2000], **change.payload)
            raise
        self.store.update_deployment(
            service, model_version=cfg.model_version, previous_version=cfg.previous_version,
            canary_version=cfg.canary.version if cfg.canary else None,
            canary_share=cfg.canary.share if cfg.canary else 0.0,
            shadow_version=cfg.shadow_version,
            config=_kept_row(cfg, options, autoscaling))
        self.store.add_event(SOURCE, f"{change.kind}_completed", service, actor=self.actor,
                             seconds=round(time.monotonic() - t0, 3), **change.payload)
        return self._get(service)

    def resize(self, service: str, cpus: float, *, reason: str = "") -> Deployment:
        raise NotOnThisBackend("resize is not offered on the ray backend: a replica's CPUs there "
                               "are what Ray schedules by, not a quota it holds; deploy with other "
                               "resources instead")

    def _check_registered(self, model: str, version: str) -> None:
        """Refuse a version the registry does not hold before any replica tries to load it
        (a replica that cannot load fails its deployment only after Serve's retries)."""
        try:
            self.tracker.model_version(model, version)
        except Exception as exc:  # noqa: BLE001 - MLflow raises its own kinds for a missing version
            raise ValueError(f"model {model!r} has no version {version!r} in the registry: "
                             f"{str(exc).splitlines()[0][:200]}") from None

    def _serving(self, service: str, cfg: ServiceConfig, n: int | None, url: str) -> bool:
        """`n` replicas (any number when None: Serve's autoscaler decides) run, Serve says the
        application RUNNING, and it answers as `cfg` says (the champion, canary and shadow of
        its `/health`)."""
        app = self._details(service) or {}
        reps = self._replicas(service)
        if (app.get("status") != "RUNNING" or not reps or (n is not None and len(reps) != n)
                or not all(r["ready"] for r in reps)):
            return False
        try:
            health = httpx.get(f"{url}/health", timeout=5.0).json()
        except (httpx.HTTPError, ValueError):
            return False
        canary = cfg.canary.model_dump() if cfg.canary else None
        return bool(health.get("model_version") == cfg.model_version and health.get("canary") == canary
                    and health.get("shadow_version") == cfg.shadow_version)

    def stop(self, service: str) -> None:
        dep = self._get(service)
        self._delete(service)
        self._forget_metrics(service)
        self.store.update_deployment(service, status="stopped", pid=None)
        self.store.add_event(SOURCE, "stopped", service, actor=self.actor,
                             model_version=dep.model_version)

    def status(self, service: str) -> dict[str, Any]:
        dep = self._get(service)
        app = self._details(service) or {}
        replicas = self._replicas(service) if app else []
        alive = app.get("status") == "RUNNING"
        cfg = self._kept(dep)[0] if dep.config else None
        autoscaling = _autoscaling_of(dep)
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
            "replicas": len(replicas) if autoscaling else dep.replicas,
            "scaling": "serve" if autoscaling else "planner",
            "autoscaling": autoscaling,
            "workers": replicas,
            "worker_pids": [r["pid"] for r in replicas],
            "nodes": sorted({r["node"] for r in replicas if r["node"]}),
            "versions": sorted({r["model_version"] for r in replicas}),
            "canary": cfg.canary.model_dump() if cfg and cfg.canary else None,
            "shadow_version": cfg.shadow_version if cfg else None,
            "previous_version": cfg.previous_version if cfg else None,
            "batching": cfg.batching.model_dump() if cfg else None,
            "resources": None,
        }

    def url(self, service: str) -> str:
        dep = self._get(service)
        return f"http://{dep.host}:{dep.port}/{service}"
