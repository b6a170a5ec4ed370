"""Each agent runs in its own process; the supervisor starts, finds and stops them.

An application is named by its spec (a `scanflow.yaml` or the folder holding it) or, for
agents declared in Python, by 'path/to/file.py:attribute' or 'package.module:attribute'
(an `Application`, or a function returning one).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import importlib.util
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from scanflow.agents import supervision
from scanflow.agents.api import KEY_HEADER, key_file, read_key
from scanflow.agents.registry import agent_issues
from scanflow.agents.runtime import HEALTH, Agent
from scanflow.control import backends
from scanflow.procs import pid_alive
from scanflow.settings import Settings, get_settings
from scanflow.spec.loader import load_application, validate_application
from scanflow.spec.models import Application
from scanflow.store import Store

LIVE = ("running", "failing")
"""The statuses of an agent whose process is up (and answers on its API)."""


def _python_ref(ref: str) -> tuple[str, str] | None:
    """('file.py' or 'module', attribute) if `ref` names a Python object rather than a spec."""
    target, sep, attr = ref.rpartition(":")
    if not sep or not attr.isidentifier() or Path(ref).exists():
        return None
    return target, attr


def load_app(ref: str | Path) -> Application:
    """A spec file/folder, or an Application declared in Python ('file.py:app', 'mod:app')."""
    py = _python_ref(str(ref))
    if py is None:
        return load_application(ref, checks=[agent_issues])
    target, attr = py
    if target.endswith(".py"):
        path = Path(target).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"no Python file {target!r}")
        if str(path.parent) not in sys.path:
            sys.path.insert(0, str(path.parent))
        spec = importlib.util.spec_from_file_location(path.stem, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
        base = path.parent
    else:
        module = importlib.import_module(target)
        base = Path(getattr(module, "__file__", ".") or ".").parent
    try:
        obj = getattr(module, attr)
    except AttributeError:
        raise AttributeError(f"{target!r} has no attribute {attr!r}") from None
    app = obj() if callable(obj) and not isinstance(obj, Application) else obj
    if not isinstance(app, Application):
        raise TypeError(f"{ref} is a {type(app).__name__}, not a scanflow Application")
    if app.base_dir == Path("."):
        app.base_dir = base.resolve()
    return validate_application(app, checks=[agent_issues])


def _absolute(ref: str | Path) -> str:
    py = _python_ref(str(ref))
    if py is None:
        return str(Path(ref).resolve())
    target, attr = py
    return f"{Path(target).resolve()}:{attr}" if target.endswith(".py") else str(ref)


class AgentSupervisor:
    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings.ensure()
        self.store = store

    @property
    def on_ray(self) -> bool:
        return backends.backend_of(self.settings) == "ray"

    def _ray(self) -> Any:
        from scanflow.agents.ray_agents import RayAgents  # lazy: ray, on the ray backend only

        return RayAgents(self.settings, self.store)

    def _ray_actor_gone(self, app: str, name: str) -> bool:
        return bool(self._ray().info(app, name, timeout=5.0) is None)

    def log_path(self, name: str) -> Path:
        return self.settings.agents_dir / f"{name}.log"

    def start(
        self, app_path: str | Path, names: list[str] | None = None, wait: float = 30.0,
        supervise: bool = False,
    ) -> dict[str, int]:
        """Start agents of an application, each in its own process; their pids once each has
        registered. `supervise` (what `scanflow agents start` does): the application's
        supervisor starts them and restarts a dead one (`scanflow.agents.supervision`);
        otherwise they are started here and a dead one stays dead."""
        app = load_app(app_path)
        chosen = names or list(app.agents)
        unknown = [n for n in chosen if n not in app.agents]
        if unknown:
            raise KeyError(f"no agent(s) {unknown} in {app_path} (known: {sorted(app.agents)})")
        if self.on_ray:  # Ray's actor restarts supervise them (`scanflow.agents.ray_agents`)
            return self._ray().start(app, chosen, wait=max(wait, 60.0))
        running = {a.name: a.pid for a in self.store.list_agents() if a.status == "running"}
        # agents left running by a supervisor that died are adopted by the new one, not refused
        orphans = supervise and supervision.supervisor_info(self.store, app.app)["status"] == "down"
        wanted = supervision.wants(self.store, app.app) if orphans else {}
        for name in chosen:
            if pid_alive(running.get(name)) and (wanted.get(name) or {}).get("want") != "running":
                raise ValueError(f"agent {name!r} is already running (pid {running[name]})")
        if supervise:
            return self._start_supervised(app.app, _absolute(app_path), chosen, wait)
        pids: dict[str, int] = {}
        procs: list[subprocess.Popen[bytes]] = []
        for name in chosen:
            supervision.clear_want(self.store, app.app, name)
            env = {**os.environ, **self.settings.child_env(), "PYTHONUNBUFFERED": "1"}
            with open(self.log_path(name), "ab") as logf:
                p = subprocess.Popen(
                    [sys.executable, "-m", "scanflow.agents.process", "--app", _absolute(app_path),
                     "--agent", name],
                    stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env=env, start_new_session=True,
                )
            procs.append(p)
            pids[name] = p.pid
        deadline = time.time() + wait
        while time.time() < deadline:
            registered = {a.name: a.pid for a in self.store.list_agents() if a.status == "running"}
            if all(registered.get(n) == pid for n, pid in pids.items()):
                return pids
            dead = [n for n, p in zip(pids, procs, strict=True) if p.poll() is not None]
            if dead:
                raise RuntimeError(f"agent {dead[0]} exited at start; see {self.log_path(dead[0])}")
            time.sleep(0.2)
        raise TimeoutError(f"agents {sorted(pids)} did not register within {wait:.0f}s")

    def _start_supervised(self, app: str, ref: str, chosen: list[str], wait: float) -> dict[str, int]:
        """Want `chosen` running, make sure the app's supervisor runs, and wait until it has
        started each (a supervisor that exits idle at that moment is started again)."""
        since = {n: supervision.set_want(self.store, app, n, "running", ref) for n in chosen}
        deadline = time.time() + wait
        ensured = 0.0
        while True:
            if time.time() - ensured > 1.0:
                supervision.ensure_supervisor(self.settings, self.store, app)
                ensured = time.time()
            rows = {a.name: a for a in self.store.list_agents()}
            recs = supervision.records(self.store, app)
            pids: dict[str, int] = {}
            for n in chosen:
                rec = recs.get(n) or {}
                if rec.get("since") != since[n]:
                    continue  # the supervisor has not seen this start yet
                if rec.get("last_exit") and rec.get("state") in ("backoff", "given_up"):
                    raise RuntimeError(
                        f"agent {n} exited at start ({supervision.describe_exit(rec['last_exit'])}); "
                        f"see {self.log_path(n)}. Its supervisor starts it again with backoff and gives "
                        f"up after {self.settings.agent_restart_limit} restarts; "
                        f"`scanflow agents stop -a {n}` stops it")
                row = rows.get(n)
                if row is not None and row.pid is not None and row.pid == rec.get("pid") \
                        and row.status == "running" and pid_alive(row.pid):
                    pids[n] = row.pid
            if len(pids) == len(chosen):
                return pids
            if time.time() >= deadline:
                raise TimeoutError(f"agents {sorted(set(chosen) - set(pids))} did not register within "
                                   f"{wait:.0f}s; see {supervision.log_path(self.settings, app)}")
            time.sleep(0.2)

    def stop(self, names: list[str] | None = None, timeout: float = 15.0) -> list[str]:
        """Stop agents (all, or `names`): first their want is written down as stopped, so that
        no supervisor restarts them; with no `names`, the supervisors are stopped too."""
        from scanflow.agents import ray_agents  # (imports no ray until an actor is touched)

        on_ray = ray_agents.records(self.store)
        if on_ray:
            by_app: dict[str, list[str]] = {}
            for rec in on_ray.values():
                if not names or rec["agent"] in names:
                    by_app.setdefault(rec["app"], []).append(rec["agent"])
            done = [n for app, agents in by_app.items() for n in self._ray().stop(app, agents, timeout)]
            if names and set(names) <= set(done):
                return done
        else:
            done = []
        up = {a.name for a in self.store.list_agents() if pid_alive(a.pid) and a.name not in done}
        for app in supervision.apps(self.store):
            for n, w in supervision.wants(self.store, app).items():
                if (not names or n in names) and w.get("want") == "running":
                    supervision.set_want(self.store, app, n, "stopped")
            if not names:
                supervision.stop_supervisor(self.store, app)
        stopped = list(done)
        for a in self.store.list_agents():
            if (names and a.name not in names) or a.name in done:
                continue
            if a.name in up:  # (its supervisor may be stopping it too)
                assert a.pid is not None
                with contextlib.suppress(ProcessLookupError):
                    os.kill(a.pid, signal.SIGTERM)
                deadline = time.time() + timeout
                while pid_alive(a.pid) and time.time() < deadline:
                    time.sleep(0.1)
                if pid_alive(a.pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(a.pid, signal.SIGKILL)
                stopped.append(a.name)
            self.store.agent_heartbeat(a.name, status="stopped")
        return stopped

    def status(self) -> list[dict[str, Any]]:
        """Every agent started here: `running`, `failing` (running, but a sensor's ticks fail:
        see `Agent.health`; `failing` lists them with their last error), `stopped` or `dead`."""
        from scanflow.agents import ray_agents  # (imports no ray until an actor is touched)

        out = []
        sup = _Supervision(self.store)
        listed = set()
        on_ray = ray_agents.records(self.store)
        for a in self.store.list_agents():
            ray_rec = on_ray.get(f"{a.app}:{a.name}")
            if ray_rec is not None:
                gone = functools.partial(self._ray_actor_gone, a.app, a.name)
                out.append(ray_agents.status_row(self.store, self.settings, a, ray_rec, gone))
                listed.add(a.name)
                continue
            alive = pid_alive(a.pid)
            state = a.status if alive or a.status != "running" else "dead"
            url = f"http://{a.api_host}:{a.api_port}" if a.api_port and state == "running" else None
            health = self.store.get_state(a.name, HEALTH) if state == "running" else None
            failing = (health or {}).get("failing")
            info = sup.of(a.app, a.name)
            new = info.pop("supervised_pid")
            if state == "dead" and info["supervision"] == "starting" and new != a.pid and pid_alive(new):
                state = "starting"  # restarted: the new process has not registered yet
            out.append({"name": a.name, "app": a.app, "role": a.role, "pid": a.pid,
                        "status": "failing" if failing else state, "failing": failing or [],
                        "heartbeat": a.heartbeat, "started_at": a.started_at, "api": url, **info})
            listed.add(a.name)
        for app in supervision.apps(self.store):  # wanted, but never registered (crashed at start)
            for n, w in supervision.wants(self.store, app).items():
                if n not in listed and w.get("want") == "running":
                    info = sup.of(app, n)
                    info.pop("supervised_pid")
                    status = "starting" if info["supervision"] in ("starting", "running") else "dead"
                    out.append({"name": n, "app": app, "role": "-", "pid": None, "status": status,
                                "failing": [], "heartbeat": None, "started_at": None, "api": None, **info})
        return out

    def api_url(self, name: str) -> str:
        """The running agent's HTTP API; a clear error if it is unknown or not running."""
        rows = {r["name"]: r for r in self.status()}
        row = rows.get(name)
        if row is None:
            known = ", ".join(sorted(rows)) or "none"
            raise KeyError(f"no agent {name!r} has been started here (agents: {known})")
        if row["status"] not in LIVE:
            raise ValueError(f"agent {name!r} is {row['status']}; start it with `scanflow agents start`")
        if not row["api"]:
            raise ValueError(f"agent {name!r} runs without an HTTP API")
        return str(row["api"])

    def client(self, name: str, timeout: float = 30.0) -> httpx.Client:
        """A client of the agent's API that sends its local key (if this machine has it) and
        `SCANFLOW_TOKEN` (if set), so the API knows who calls."""
        headers = {}
        key = read_key(key_file(self.settings.agents_dir, name))
        if key:
            headers[KEY_HEADER] = key
        token = os.environ.get("SCANFLOW_TOKEN")
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return httpx.Client(base_url=self.api_url(name), timeout=timeout, headers=headers)


class _Supervision:
    """What `status` adds to each agent: its supervision (state, restarts, last exit, next
    try) and its application's supervisor, read from the store once per application."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._apps: dict[str, tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = {}

    def of(self, app: str, name: str) -> dict[str, Any]:
        if app not in self._apps:
            self._apps[app] = (supervision.wants(self.store, app), supervision.records(self.store, app),
                               supervision.supervisor_info(self.store, app))
        wants, recs, info = self._apps[app]
        w, rec = wants.get(name) or {}, recs.get(name) or {}
        current = bool(w) and rec.get("since") == w.get("since")
        if not w:
            state = "-"  # started without a supervisor
        elif w.get("want") != "running":
            state = "stopped"
        else:
            state = str(rec.get("state", "starting")) if current else "starting"
        return {"supervision": state, "restarts": int(rec.get("restarts", 0)),  # (of its last start)
                "last_exit": rec.get("last_exit"), "supervised_pid": rec.get("pid") if current else None,
                "next_try": rec.get("next_try") if current and state == "backoff" else None,
                "supervisor": info if w else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scanflow-agent")
    parser.add_argument("--app", required=True, help="spec file/folder, or file.py:attr / module:attr")
    parser.add_argument("--agent", required=True)
    parser.add_argument("--no-api", action="store_true", help="do not serve the HTTP API")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("mlflow", "alembic", "httpx", "uvicorn"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # "skipped: maximum number of running instances" each poll while a long action runs is
    # expected (one tick per trigger at a time), not worth a line a second.
    logging.getLogger("apscheduler").setLevel(logging.ERROR)
    settings = get_settings().ensure()
    store = backends.store(settings)
    app = load_app(args.app)
    agent = Agent(settings, store, app, args.agent)
    stopping = {"flag": False}

    def _term(_sig: int, _frame: Any) -> None:
        stopping["flag"] = True

    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGINT, _term)
    log = logging.getLogger("scanflow.agents")
    log.info("agent %s (%s) started, pid %d", args.agent, agent.spec.role, os.getpid())
    threading.Thread(target=supervision.watch_supervisor, name="supervisor-watch", daemon=True,
                     args=(settings, store, app.app, args.agent, lambda: stopping["flag"])).start()
    agent.run_forever(stop=lambda: stopping["flag"], api=not args.no_api)
    log.info("agent %s stopped", args.agent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
