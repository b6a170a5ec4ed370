"""Local serving backend: each service is one gunicorn master, each worker one replica.

- scale: SIGTTIN/SIGTTOU, one at a time, each confirmed on /proc and the worker files before
  the next (identical signals sent back to back coalesce into one);
- rollout: rewrite the service config, SIGHUP; gunicorn forks workers that read the new
  version and SIGTERMs the old ones, which keep serving until a new one is ready and then
  hand their keep-alive clients over (`gunicorn_conf.DrainingUvicornWorker`);
- the master runs in its own session, so services outlive the process that deployed them;
  every fact a later process needs (pid, port, version) is in the store and the workdir.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from scanflow.procs import child_pids, group_pids, pid_alive
from scanflow.serving import cgroups, changes
from scanflow.serving.app import (
    CONFIG_ENV,
    Limits,
    PredLogConfig,
    ServiceConfig,
    read_workers,
    workers_dir,
)
from scanflow.serving.backend import (
    Deployer,
    NotOnThisBackend,
    UnknownService,
    check_service,
    default_actor,
)
from scanflow.serving.batching import BatchConfig
from scanflow.serving.label_auth import refuse_open_bind
from scanflow.serving.master import (
    BASE_PRELOAD,
    FLAVOUR_LIBS,
    REQUIREMENT_LIBS,
    free_port,
    start_master,
    tail,
)
from scanflow.serving.predlog import collect_all
from scanflow.serving.preflight import Preflight, PreflightFailed
from scanflow.settings import Settings
from scanflow.spec.models import Resources
from scanflow.spec.policy import Policy
from scanflow.store import Store
from scanflow.store.schema import Deployment
from scanflow.tracking import MlflowTracker, Tracker

SOURCE = "deployer"
USAGE_SAMPLE_S = 0.25  # CPU use in `status`: over this interval, unless a recent sample exists
log = logging.getLogger(__name__)


class LocalDeployer(Deployer):
    """Services as gunicorn masters on 127.0.0.1, state in the store and the services dir."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        *,
        ready_timeout: float = 120.0,
        stop_timeout: float = 75.0,
        preflight: bool = True,
        limits: Limits | None = None,
        batching: BatchConfig | None = None,
        predlog: PredLogConfig | None = None,
        actor: str | None = None,
        tracker: Tracker | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.tracker: Tracker = tracker or MlflowTracker(settings)  # connects on first use
        self.limits = limits or Limits()
        self.batching = batching or BatchConfig()
        self.predlog = predlog or PredLogConfig()
        # Who the audit trail says acted: a person at the CLI, or an agent's name.
        self.actor = actor or default_actor()
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.preflight = preflight
        self._procs: dict[int, subprocess.Popen[bytes]] = {}  # masters we started: reap them
        self._loader = Preflight({**os.environ, **settings.child_env(), "OMP_NUM_THREADS": "1",
                                  "MLFLOW_DISABLE_TELEMETRY": "true"}, BASE_PRELOAD)

    # -- paths and small helpers -------------------------------------------------------------
    def workdir(self, service: str) -> Path:
        return self.settings.services_dir / service

    def _config_path(self, service: str) -> Path:
        return self.workdir(service) / "service.json"

    def _log_path(self, service: str) -> Path:
        return self.workdir(service) / "server.log"

    @contextmanager
    def _locked(self, service: str) -> Iterator[None]:
        """Serialise actions on one service, also across processes (two controllers)."""
        wd = self.workdir(service)
        wd.mkdir(parents=True, exist_ok=True)
        with open(wd / ".lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _alive(self, pid: int | None) -> bool:
        if not pid:
            return False
        proc = self._procs.get(pid)
        if proc is not None and proc.poll() is not None:
            return False
        return pid_alive(pid)

    def _master_alive(self, dep: Deployment) -> bool:
        """The recorded master still runs (and the pid was not reused by something else)."""
        if not self._alive(dep.pid):
            return False
        try:
            argv = Path(f"/proc/{dep.pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return any(b"gunicorn" in a for a in argv) and f"{dep.host}:{dep.port}".encode() in argv

    def _get(self, service: str) -> Deployment:
        dep = self.store.get_deployment(service)
        if dep is None:
            raise UnknownService(f"unknown service {service!r}: not deployed")
        return dep

    def _running(self, service: str) -> Deployment:
        dep = self._get(service)
        if dep.status != "running" or not self._master_alive(dep):
            raise RuntimeError(
                f"service {service!r} is not running (status {dep.status}, pid {dep.pid})"
            )
        return dep

    def _resolve(self, model: str, alias: str) -> str:
        return self.tracker.version_by_alias(model, alias)

    def _preload(self, model: str, version: str) -> list[str]:
        """Modules worth importing in the master for this model version."""
        mods = list(BASE_PRELOAD)
        kind = "rest" if self.settings.tracking.startswith(("http:", "https:")) else "sqlalchemy"
        mods += [f"mlflow.store.tracking.{kind}_store", f"mlflow.store.model_registry.{kind}_store"]
        try:
            loader = self.tracker.model_loader(model, version)
            required = self.tracker.model_requirements(model, version)
        except Exception:  # an unreadable model fails in the worker with a proper message
            loader, required = None, []
        if loader:
            mods += [loader, *FLAVOUR_LIBS.get(loader, [])]
        for name in required:
            mods += [m for m in REQUIREMENT_LIBS.get(name, []) if m not in mods]
        return mods

    def _workers(self, master: int, workdir: Path) -> list[dict[str, Any]]:
        """The master's live children, each with what its announcement file says."""
        infos = read_workers(workdir)
        out = []
        for pid in child_pids(master):
            info = infos.get(pid)
            out.append({
                "pid": pid,
                "ready": info is not None,
                "draining": bool(info and info.get("draining")),
                "model_version": info.get("model_version") if info else None,
                "versions": info.get("versions", []) if info else [],
                "generation": info.get("generation", 0) if info else None,
            })
        return out

    def _active(self, master: int, workdir: Path) -> list[dict[str, Any]]:
        return [w for w in self._workers(master, workdir) if not w["draining"]]

    def _env(self, config_path: Path, metrics_dir: Path) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.settings.child_env())
        env.update({
            CONFIG_ENV: str(config_path),
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
            "OMP_NUM_THREADS": "1",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "PYTHONUNBUFFERED": "1",
        })
        return env

    def _wait(self, what: str, cond: Any, timeout: float, service: str, pid: int) -> None:
        """Poll `cond()` until true; a dead master or the deadline raise with the log tail."""
        end = time.monotonic() + timeout
        while True:
            if cond():
                return
            if not self._alive(pid):
                raise RuntimeError(
                    f"service {service!r}: gunicorn master {pid} exited while waiting for "
                    f"{what}; last lines of {self._log_path(service)}:\n"
                    f"{tail(self._log_path(service))}"
                )
            if time.monotonic() > end:
                raise TimeoutError(
                    f"service {service!r}: no {what} after {timeout:.0f}s; last lines of "
                    f"{self._log_path(service)}:\n{tail(self._log_path(service))}"
                )
            time.sleep(0.05)

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
        check_service(service, replicas, self.settings.max_replicas)
        refuse_open_bind(self.settings.host, self.store, f"service {service!r}")
        if policy is not None and policy.scaling == "serve":
            raise NotOnThisBackend(
                f"service {service!r}: its policy says scaling: serve (Ray Serve's autoscaler "
                "decides replicas), which needs the ray backend (SCANFLOW_BACKEND=ray); on this "
                "backend the planner scales: use scaling: planner")
        with self._locked(service):
            self._clear_previous(service)
            version = self._resolve(model, alias)
            host = self.settings.host
            port = port or free_port(host)
            wd = self.workdir(service)
            metrics_dir = wd / "metrics"
            for d in (metrics_dir, workers_dir(wd)):
                shutil.rmtree(d, ignore_errors=True)  # counters of a previous run are stale
                d.mkdir(parents=True)
            cpus, memory = resources.declared() if resources is not None else (None, None)
            # Named per workspace too: two workspaces may each deploy a service called `web`.
            group = f"{service}.{hashlib.sha256(str(self.settings.root).encode()).hexdigest()[:8]}"
            plan = cgroups.plan(group, cpus, memory, root=self.settings.cgroup_root)
            if plan.wanted and not plan.enforced:
                log.warning("service %s: limits not enforced: %s", service, plan.unenforced)
            cfg = ServiceConfig(
                service=service, app=app, team=team, model_name=model, alias=alias,
                model_version=version, tracking_uri=self.settings.tracking,
                registry_uri=self.settings.registry_uri, store_url=self.settings.store,
                workdir=str(wd), replicas=replicas, preload=self._preload(model, version),
                limits=self.limits, batching=batching or self.batching, predlog=self.predlog,
                resources=plan,
            )
            self._materialise(cfg)
            cfg.save(self._config_path(service))
            proc = start_master(host, port, wd, self._log_path(service),
                                self._env(self._config_path(service), metrics_dir))
            self._procs[proc.pid] = proc
            t0 = time.monotonic()
            facts: dict[str, Any] = dict(
                service=service, app=app, team=team, model_name=model, alias=alias,
                model_version=version, host=host, port=port, replicas=replicas, workdir=str(wd))
            try:
                self._wait(
                    f"{replicas} ready worker(s)",
                    lambda: self._all_serving(proc.pid, wd, cfg.generation, replicas)
                    and self._health_ok(f"http://{host}:{port}"),
                    self.ready_timeout, service, proc.pid,
                )
            except Exception:
                self._kill_tree(proc.pid, grace=5.0)
                cgroups.remove_all(plan)
                self.store.put_deployment(**facts, pid=None, status="failed")
                self.store.add_event(SOURCE, "deploy_failed", service, model=model,
                                     model_version=version)
                raise
            dep = self.store.put_deployment(**facts, pid=proc.pid, status="running")
            self.store.add_event(
                SOURCE, "deployed", service, app=app, team=team, model=model, alias=alias,
                model_version=version, replicas=replicas, port=port, pid=proc.pid,
                seconds=round(time.monotonic() - t0, 3), actor=self.actor,
                **({"resources": _limits(plan)} if plan.wanted else {}),
            )
            return dep

    def _clear_previous(self, service: str) -> None:
        """Refuse a service that runs; stop the orphaned workers of a master that died."""
        old = self.store.get_deployment(service)
        if old is not None and old.status == "running" and self._master_alive(old):
            raise ValueError(
                f"service {service!r} is already running (pid {old.pid}, "
                f"http://{old.host}:{old.port}): stop it first, or use scale/rollout"
            )
        if old is not None and old.pid and group_pids(old.pid):
            self._kill_tree(old.pid, grace=10.0)  # orphans of a master that died

    def _all_serving(self, master: int, wd: Path, generation: int, n: int) -> bool:
        """Exactly n workers, all announced with config `generation`, none draining."""
        ws = self._workers(master, wd)
        return len(ws) == n and all(
            w["ready"] and not w["draining"] and w["generation"] == generation for w in ws
        )

    @staticmethod
    def _health_ok(url: str) -> bool:
        try:
            return httpx.get(f"{url}/health", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def scale(self, service: str, replicas: int, *, reason: str = "") -> Deployment:
        check_service(replicas=replicas, most=self.settings.max_replicas)
        with self._locked(service):
            dep = self._running(service)
            wd, master = Path(dep.workdir), int(dep.pid or 0)
            cfg = ServiceConfig.load(self._config_path(service))
            before = len(self._active(master, wd))
            cfg.replicas = replicas
            cfg.save(self._config_path(service))  # a later HUP keeps this count
            end = time.monotonic() + self.ready_timeout
            while True:
                n = len(self._active(master, wd))
                if n == replicas:
                    break
                if time.monotonic() > end or not self._alive(master):
                    raise RuntimeError(
                        f"service {service!r}: stuck at {n} workers, wanted {replicas}; "
                        f"last lines of the log:\n{tail(self._log_path(service))}"
                    )
                os.kill(master, signal.SIGTTIN if n < replicas else signal.SIGTTOU)
                # One signal, one step: wait until the master acted before the next one.
                step_end = time.monotonic() + 3.0
                while len(self._active(master, wd)) == n and time.monotonic() < step_end:
                    time.sleep(0.05)
            self._wait(
                f"{replicas} ready worker(s)",
                lambda: self._all_serving(master, wd, cfg.generation, replicas),
                self.ready_timeout, service, master,
            )
            self.store.update_deployment(service, replicas=replicas)
            self.store.add_event(SOURCE, "scaled", service, actor=self.actor,
                                 **{"from": before, "to": replicas},
                                 **({"reason": reason} if reason else {}))
            return self._get(service)

    def resize(self, service: str, cpus: float, *, reason: str = "") -> Deployment:
        """A new CPU quota per replica, in place: written into the service config (replicas
        forked later join with it) and into each running replica's cgroup (applied from the
        next scheduler period: no restart, no request lost). Refused where the quota is not
        enforced: a limit nobody holds is not one to report as changed."""
        if not cpus > 0:
            raise ValueError(f"cpus must be > 0, got {cpus}")
        with self._locked(service):
            dep = self._running(service)
            cfg = ServiceConfig.load(self._config_path(service))
            if not (cfg.resources.enforced and cfg.resources.cpus is not None):
                raise ValueError(f"service {service!r} has no enforced CPU quota to change"
                                 + (f" ({cfg.resources.unenforced})" if cfg.resources.unenforced else
                                    ": deploy it with resources: {cpus: ...}"))
            before = cfg.resources.cpus
            cfg.resources = cfg.resources.model_copy(update={"cpus": float(cpus)})
            cfg.save(self._config_path(service))
            pids = [int(w["pid"]) for w in self._workers(int(dep.pid or 0), Path(dep.workdir))]
            cgroups.resize(cfg.resources, pids)
            self.store.add_event(SOURCE, "resized", service, actor=self.actor,
                                 **{"from": {"cpus": before}, "to": {"cpus": float(cpus)}},
                                 **({"reason": reason} if reason else {}))
            return self._get(service)

    def rollout(self, service: str, version: str | None = None, *, reason: str = "") -> Deployment:
        """Rolling update of every replica to `version` (default: what the alias points to)."""
        with self._locked(service):
            dep = self._running(service)
            cfg = ServiceConfig.load(self._config_path(service))
            new = str(version) if version is not None else self._resolve(cfg.model_name, cfg.alias)
            change = changes.rollout(cfg, new, reason)
            if change is None:
                return dep
            self._reconfigure(service, dep, change)
            return self._get(service)

    def rollback(self, service: str, *, reason: str = "") -> Deployment:
        """Back to the version served before the last rollout, in one step (the alias follows:
        `changes.rollback`)."""
        with self._locked(service):
            dep = self._running(service)
            cfg = ServiceConfig.load(self._config_path(service))
            self._reconfigure(service, dep, changes.rollback(service, cfg, self.tracker, reason))
            return self._get(service)

    def set_canary(self, service: str, version: str | None, share: float = 0.1, *,
                   reason: str = "") -> Deployment:
        """Send `share` of the traffic to `version` (None: stop the canary)."""
        with self._locked(service):
            dep = self._running(service)
            cfg = ServiceConfig.load(self._config_path(service))
            self._reconfigure(service, dep, changes.canary(service, cfg, version, share, reason))
            return self._get(service)

    def set_shadow(self, service: str, version: str | None, *, reason: str = "") -> Deployment:
        """Score a copy of live traffic with `version`, logged, never returned (None: stop)."""
        with self._locked(service):
            dep = self._running(service)
            cfg = ServiceConfig.load(self._config_path(service))
            self._reconfigure(service, dep, changes.shadow(service, cfg, version, reason))
            return self._get(service)

    def _reconfigure(self, service: str, dep: Deployment, change: changes.Change) -> None:
        """Apply `change` to the service config and replace every worker (SIGHUP), with
        0 failed requests: preflight the versions, wait for the new generation everywhere,
        put the old config back if it does not come up. Caller holds the lock."""
        wd, master = Path(dep.workdir), int(dep.pid or 0)
        path = self._config_path(service)
        old_cfg = ServiceConfig.load(path)
        cfg = old_cfg.model_copy(deep=True)
        change.apply(cfg)
        kind, payload = change.kind, change.payload
        cfg.generation = old_cfg.generation + 1
        cfg.replicas = dep.replicas
        self._materialise(cfg)
        if self.preflight:
            for v in cfg.versions:
                if v not in old_cfg.versions:
                    self._preflight(cfg.model_name, v, cfg.model_paths[v])
        cfg.preload = self._preload(cfg.model_name, cfg.model_version)
        t0 = time.monotonic()
        cfg.save(path)
        self.store.add_event(SOURCE, f"{kind}_started", service, actor=self.actor,
                             replicas=dep.replicas, **payload)
        os.kill(master, signal.SIGHUP)
        try:
            self._wait(
                f"{dep.replicas} worker(s) on config generation {cfg.generation} "
                f"(versions {', '.join(cfg.versions)})",
                lambda: self._all_serving(master, wd, cfg.generation, dep.replicas),
                self.ready_timeout, service, master,
            )
        except Exception as exc:
            old_cfg.generation = cfg.generation + 1
            old_cfg.save(path)  # workers forked from now on serve the old config again
            alive = self._alive(master)
            if alive:
                os.kill(master, signal.SIGHUP)
            self.store.update_deployment(service, status="running" if alive else "failed")
            self.store.add_event(SOURCE, f"{kind}_failed", service, actor=self.actor,
                                 error=str(exc)[:2000], **payload)
            raise
        self.store.update_deployment(
            service, model_version=cfg.model_version, previous_version=cfg.previous_version,
            canary_version=cfg.canary.version if cfg.canary else None,
            canary_share=cfg.canary.share if cfg.canary else 0.0,
            shadow_version=cfg.shadow_version, replicas=dep.replicas,
        )
        self.store.add_event(SOURCE, f"{kind}_completed", service, actor=self.actor,
                             seconds=round(time.monotonic() - t0, 3), **payload)

    def _materialise(self, cfg: ServiceConfig) -> None:
        """A local copy of every served version under the workdir (downloaded once): workers
        load from disk, not through the registry, and survive a registry outage."""
        root = self.workdir(cfg.service) / "models"
        for v in cfg.versions:
            dst = root / v
            if v in cfg.model_paths and (dst / "MLmodel").exists():
                continue
            tmp = root / f".{v}.{os.getpid()}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            path = self.tracker.download_model(cfg.model_name, v, tmp)
            shutil.rmtree(dst, ignore_errors=True)
            os.replace(path if path != tmp else tmp, dst)
            shutil.rmtree(tmp, ignore_errors=True)
            cfg.model_paths[v] = str(dst)
        for v in list(cfg.model_paths):
            if v not in cfg.versions and v != cfg.previous_version:
                cfg.model_paths.pop(v)

    def _preflight(self, model: str, version: str, path: str) -> None:
        """Load the new version's local copy (what the workers will load) in a throw-away
        process: a worker that fails to boot makes gunicorn halt the whole service, so never
        HUP into a version that does not load (`serving.preflight`)."""
        try:
            self._loader.check(path, self.ready_timeout)
        except PreflightFailed as exc:
            raise RuntimeError(f"models:/{model}/{version} does not load, rollout refused:\n{exc}") from None

    def warm_up(self, service: str) -> None:
        try:
            modules = ServiceConfig.load(self._config_path(service)).preload
        except (OSError, ValueError):
            modules = list(BASE_PRELOAD)
        self._loader.warm_up(modules)

    def stop(self, service: str) -> None:
        with self._locked(service):
            dep = self._get(service)
            pid = dep.pid
            if pid and (self._master_alive(dep) or group_pids(pid)):
                self._kill_tree(pid, grace=self.stop_timeout)
            plan = self._plan(service)
            if plan.dirs:
                cgroups.remove_all(plan)  # the workers are gone: their groups are empty
            # What workers journaled but had not yet moved to the store (e.g. killed ones).
            collected = collect_all(self.store, dep.workdir)
            self.store.update_deployment(service, status="stopped", pid=None)
            self.store.add_event(SOURCE, "stopped", service, pid=pid, actor=self.actor,
                                 predlog_collected=collected)

    def _kill_tree(self, master: int, grace: float) -> None:
        """SIGTERM the master (it stops its workers gracefully), or the process group when
        the master is gone but orphaned workers still hold the port; SIGKILL what is left."""
        try:
            if self._alive(master):
                os.kill(master, signal.SIGTERM)
            else:
                os.killpg(master, signal.SIGTERM)
        except ProcessLookupError:
            pass
        end = time.monotonic() + grace
        while time.monotonic() < end and group_pids(master):
            self._alive(master)  # reaps our own child as soon as it exits
            time.sleep(0.05)
        if group_pids(master):
            try:
                os.killpg(master, signal.SIGKILL)
            except ProcessLookupError:
                pass
            end = time.monotonic() + 10.0
            while time.monotonic() < end and group_pids(master):
                self._alive(master)
                time.sleep(0.05)
        proc = self._procs.pop(master, None)
        if proc is not None:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    def _plan(self, service: str) -> cgroups.CgroupPlan:
        try:
            return ServiceConfig.load(self._config_path(service)).resources
        except (OSError, ValueError):
            return cgroups.CgroupPlan()

    def _replica_use(self, service: str, plan: cgroups.CgroupPlan,
                     workers: list[dict[str, Any]]) -> None:
        """Add each worker's limits and use (from its cgroup) to its row. CPU use is CPU-seconds
        per second since the previous `status` when that was 0.2-10 s ago, else over a fresh
        USAGE_SAMPLE_S interval (the one sleep of this call)."""
        if not plan.dirs or not workers:
            return
        samples_path = self.workdir(service) / "usage.json"
        try:
            prev = {int(k): v for k, v in json.loads(samples_path.read_text()).items()}
        except (OSError, ValueError):
            prev = {}
        now, use = time.time(), {w["pid"]: cgroups.usage(plan, w["pid"]) for w in workers}
        if any(w["pid"] not in prev or not 0.2 <= now - prev[w["pid"]][0] <= 10 for w in workers
               if use[w["pid"]]["cpu_seconds"] is not None):
            prev = {p: [now, u["cpu_seconds"]] for p, u in use.items()}
            time.sleep(USAGE_SAMPLE_S)
            now, use = time.time(), {w["pid"]: cgroups.usage(plan, w["pid"]) for w in workers}
        for w in workers:
            u, before = use[w["pid"]], prev.get(w["pid"])
            rate = None
            if u["cpu_seconds"] is not None and before and before[1] is not None and now > before[0]:
                rate = round(max(0.0, (float(u["cpu_seconds"]) - before[1]) / (now - before[0])), 3)
            w.update(in_cgroup=cgroups.member(plan, w["pid"]), cpu_limit=u["cpus"],
                     cpu_use=rate, memory_limit=u["memory_limit"], memory_use=u["memory_bytes"],
                     oom_kills=u["oom_kills"])
        tmp = samples_path.with_name(f".usage.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({p: [now, u["cpu_seconds"]] for p, u in use.items()}))
        os.replace(tmp, samples_path)

    def cpu_counters(self, service: str) -> dict[int, dict[str, int | float | None]]:
        dep = self.store.get_deployment(service)
        if dep is None or not dep.pid or not self._master_alive(dep):
            return {}
        plan = self._plan(service)
        if not plan.enforced:
            return {}
        return {pid: cgroups.usage(plan, pid) for pid in child_pids(int(dep.pid))}

    def _last_oom_kill(self, service: str) -> dict[str, Any] | None:
        """The newest replica of this deployment the kernel killed for memory (pid, time)."""
        deployed = self.store.latest_events(service, ["deployed"], limit=1)
        since = deployed[0].ts if deployed else 0.0
        for e in self.store.latest_events(service, ["replica_oom_killed"], limit=1):
            if e.ts >= since:
                return {"pid": e.payload.get("pid"), "at": e.ts,
                        "memory_limit": e.payload.get("memory_limit")}
        return None

    def status(self, service: str) -> dict[str, Any]:
        dep = self._get(service)
        alive = self._master_alive(dep)
        workers = self._workers(int(dep.pid), Path(dep.workdir)) if alive and dep.pid else []
        cfg: ServiceConfig | None = None
        try:
            cfg = ServiceConfig.load(self._config_path(service))
        except (OSError, ValueError):
            pass
        if cfg is not None:
            self._replica_use(service, cfg.resources, workers)
        return {
            "service": service,
            "status": dep.status if alive or dep.status != "running" else "dead",
            "canary": cfg.canary.model_dump() if cfg and cfg.canary else None,
            "shadow_version": cfg.shadow_version if cfg else None,
            "previous_version": cfg.previous_version if cfg else None,
            "batching": cfg.batching.model_dump() if cfg else None,
            "resources": _limits(cfg.resources) if cfg else None,
            "last_oom_kill": self._last_oom_kill(service) if cfg and cfg.resources.memory else None,
            "pid": dep.pid,
            "alive": alive,
            "port": dep.port,
            "url": self.url(service),
            "model_name": dep.model_name,
            "alias": dep.alias,
            "model_version": dep.model_version,
            "replicas": dep.replicas,
            "workers": workers,
            "worker_pids": [w["pid"] for w in workers],
            "versions": sorted({v for w in workers for v in (w["versions"] or [w["model_version"]])
                                if v}),
        }

    def url(self, service: str) -> str:
        dep = self._get(service)
        return f"http://{dep.host}:{dep.port}"


def _limits(plan: cgroups.CgroupPlan) -> dict[str, Any]:
    """The declared per-replica limits and whether they hold (`status`, the deploy event)."""
    return {"cpus": plan.cpus, "memory": plan.memory,
            "enforced": plan.enforced,
            "cgroup": f"v{plan.version}" if plan.enforced else None,
            "warning": f"limits not enforced: {plan.unenforced}" if plan.unenforced else None}
