"""Gunicorn configuration of one scanflow service, and the draining worker class.

Gunicorn executes this file at start and again on every SIGHUP, so `workers` follows the
replica count the deployer last wrote into the service config (a HUP would otherwise reset
a count changed with SIGTTIN/SIGTTOU to the command-line value).

`DrainingUvicornWorker` is `uvicorn_worker.UvicornWorker` with a hand-over on SIGTERM
(which gunicorn sends to the worker it retires on TTOU and to old workers on HUP):

1. mark itself draining in `<workdir>/workers/<pid>.json`;
2. keep serving until a sibling is ready (on HUP the new workers are still loading the
   model when the old ones are told to stop: without this wait there is a gap);
3. answer `grace` seconds with `Connection: close`, so keep-alive clients move away
   between two requests instead of racing the close of an idle connection;
4. stop accepting, let accepted connections finish, then run uvicorn's normal shutdown.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from gunicorn.arbiter import Arbiter
from prometheus_client import multiprocess
from uvicorn.server import Server
from uvicorn_worker import UvicornWorker

from scanflow.procs import child_pids
from scanflow.serving import cgroups


def _service_config() -> dict[str, Any]:
    path = os.environ.get("SCANFLOW_SERVICE_CONFIG")
    if not path:
        return {}
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


_cfg = _service_config()


def _preload(modules: list[str]) -> None:
    """Import the app and the model's flavour in the master: forked workers then boot in
    a fraction of a second instead of paying ~3 s of imports (on a busy machine much more),
    which shortens scale-ups and the overlap of a rollout. A failure here is not fatal:
    the worker imports again and reports the error itself."""
    for mod in modules:
        try:
            importlib.import_module(mod)
        except Exception as exc:  # the worker will report it properly
            print(f"scanflow: preload of {mod} failed: {exc}", file=sys.stderr)


_preload(list(_cfg.get("preload", [])))


def _preload_models() -> None:
    """Load the served versions in the master (from their local copies): a worker forked to
    replace one that died serves in milliseconds. Off with `preload_models: false` for
    models that start threads at load (forking those is unsafe)."""
    if not _cfg or not _cfg.get("preload_models", True):
        return
    try:
        from scanflow.serving.app import ServiceConfig, preload_models  # lazy: FastAPI, MLflow (see _preload)

        preload_models(ServiceConfig.model_validate(_cfg))
    except Exception as exc:  # the worker loads it itself and reports a real error
        print(f"scanflow: model preload failed: {exc}", file=sys.stderr)


_preload_models()
# What the master imported and loaded is shared with every worker it forks: frozen, the cyclic
# collector never walks it (long pauses) nor writes to its pages (copy-on-write stays shared).
# Thawed and collected first: on a HUP, the versions no longer served go now, not never.
gc.unfreeze()
gc.collect()
gc.freeze()

# -- gunicorn settings (bind and worker class come from the command line) ----------------------
workers = int(_cfg.get("replicas", 1))
proc_name = f"scanflow-{_cfg.get('service', 'service')}"
timeout = 120  # heartbeat (uvicorn notifies while serving and draining; a model load must fit)
graceful_timeout = 60  # > drain.max_wait + grace + settle
keepalive = 5  # uvicorn's idle keep-alive timeout
errorlog = "-"
loglevel = "info"
capture_output = True
control_socket_disable = True  # one shared default path for all services, and a master thread
if os.path.isdir("/dev/shm"):
    worker_tmp_dir = "/dev/shm"


def _plan() -> cgroups.CgroupPlan:
    try:
        return cgroups.CgroupPlan.model_validate(_service_config().get("resources") or {})
    except ValueError:
        return cgroups.CgroupPlan()


def when_ready(server: Any) -> None:
    """The master (re)starts: remove groups left by workers of a master that was killed."""
    plan = _plan()
    if plan.dirs:
        gone = cgroups.sweep(plan, set(child_pids(os.getpid())))
        if gone:
            server.log.info("scanflow: removed the cgroups of dead replicas %s", gone)
    elif plan.unenforced:
        server.log.warning("scanflow: limits not enforced: %s", plan.unenforced)


def post_fork(server: Any, worker: Any) -> None:
    """In the new worker, before it loads or serves anything: join its own cgroup, so the
    per-replica CPU quota and memory limit hold from its first instruction."""
    plan = _plan()
    if not plan.enforced:
        return
    try:
        cgroups.join(plan, os.getpid())
    except (cgroups.CgroupError, OSError) as exc:  # serve anyway, unlimited, and say so
        server.log.warning("scanflow: limits not enforced for worker %s: %s", os.getpid(), exc)


def child_exit(server: Any, worker: Any) -> None:
    """A worker is gone: drop its live gauges, its announcement file and its cgroup; a
    worker its memory limit killed is logged and recorded as `replica_oom_killed`."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(worker.pid)
    cfg = _service_config()
    workdir = cfg.get("workdir")
    if workdir:
        (Path(workdir) / "workers" / f"{worker.pid}.json").unlink(missing_ok=True)
    plan = _plan()
    if plan.dirs:
        oom = cgroups.release(plan, worker.pid)
        if oom:
            _record_oom(server, cfg, plan, worker.pid)


def _record_oom(server: Any, cfg: dict[str, Any], plan: cgroups.CgroupPlan, pid: int) -> None:
    server.log.error("scanflow: replica %s of %s was killed by the kernel: it exceeded its memory "
                     "limit of %s bytes; a new replica replaces it", pid, cfg.get("service"),
                     plan.memory)
    try:
        from scanflow.store import Store  # lazy: SQLAlchemy (preloaded with the app anyway)

        store = Store(cfg["store_url"])
        try:
            store.add_event("serving", "replica_oom_killed", cfg.get("service"), pid=pid,
                            memory_limit=plan.memory, model_version=cfg.get("model_version"))
        finally:
            store.close()
    except Exception as exc:  # the log line above stays; never take the master down
        server.log.warning("scanflow: could not record replica_oom_killed: %r", exc)


# -- the worker --------------------------------------------------------------------------------
class DrainingServer(Server):
    """uvicorn Server whose first SIGTERM starts a hand-over instead of an immediate stop."""

    _drain_requested = False
    _drain_task: asyncio.Future[None] | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _master = 0

    async def serve(self, sockets: list[Any] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self._master = os.getppid()
        await super().serve(sockets=sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        from scanflow.serving.app import LIFECYCLE  # lazy: FastAPI, MLflow (see _preload)

        if sig == signal.SIGTERM and self._drain_requested:
            # The master repeats SIGTERM every loop while it has too many workers: one drain.
            return
        if sig != signal.SIGTERM or not self.started or LIFECYCLE.config is None:
            super().handle_exit(sig, frame)  # SIGINT, or not serving yet: stop now
            return
        if self._loop is None:
            super().handle_exit(sig, frame)
            return
        self._drain_requested = True
        # Runs inside a signal handler: only hand the work to the loop.
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        try:
            await self._hand_over()
        except Exception as exc:  # never stay up forever because the hand-over broke
            print(f"scanflow: drain of worker {os.getpid()} failed: {exc!r}", flush=True)
        finally:
            super().handle_exit(signal.SIGTERM, None)

    async def _hand_over(self) -> None:
        from scanflow.serving.app import LIFECYCLE, read_workers  # lazy: FastAPI, MLflow (see _preload)

        cfg = LIFECYCLE.config
        assert cfg is not None
        LIFECYCLE.begin_drain()
        me, master = os.getpid(), self._master
        end = time.monotonic() + cfg.drain.max_wait
        while time.monotonic() < end and not self.should_exit and os.getppid() == master:
            sibs = set(child_pids(master)) - {me}
            infos = read_workers(cfg.workdir)
            ready = [p for p in sibs if p in infos and not infos[p].get("draining")]
            booting = [p for p in sibs if p not in infos]
            if ready or not booting:  # someone serves, or nobody will (the master stops)
                break
            await asyncio.sleep(0.1)
        LIFECYCLE.close_connections = True
        await asyncio.sleep(cfg.drain.grace)
        for srv in getattr(self, "servers", []):
            srv.close()  # this process's copy of the listening socket; siblings keep theirs
        end = time.monotonic() + cfg.drain.settle
        while self.server_state.connections and time.monotonic() < end:
            await asyncio.sleep(0.05)


class DrainingUvicornWorker(UvicornWorker):
    """UvicornWorker (uvloop + httptools) running a DrainingServer."""

    async def _serve(self) -> None:
        self.config.app = self.wsgi
        server = DrainingServer(config=self.config)
        self._install_sigquit_handler()
        await server.serve(sockets=self.sockets)
        if not server.started:
            sys.exit(Arbiter.WORKER_BOOT_ERROR)
