"""The ray backend's agents: each agent is a named, detached Ray actor that Ray restarts when
its process dies.

Why an actor rather than the local supervisor: on a cluster no single machine can `waitpid`
the agents, and Ray already owns placement and restarts. The actor runs the same `Agent` loop a
local agent process runs, in its own worker process; everything the loop knows (messages,
leases, decisions, watermarks) is in the shared store, so a restarted actor resumes where the
killed one stopped, with no action repeated (the runtime's idempotency keys) and no message
lost. Ray restarts an actor at once (it has no backoff); `max_restarts` is the settings'
`agent_restart_limit` (Ray counts restarts over the actor's life, not in a window), after
which the agent stays dead until a person starts it again. A restarted actor records
`agent_restarted` (with Ray's restart count) in the store, as the local supervisor does.

What a node needs travels with the actor's name, not with the caller: the app's folder (zipped,
as the ray engine ships it) and its loaded spec are kept in Ray's internal key-value store, so
an actor restarted after `scanflow agents start` has exited still finds them.
"""

from __future__ import annotations

import logging
import os
import pickle
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scanflow.settings import Settings
from scanflow.spec.models import Application
from scanflow.store import Store
from scanflow.store.signing import MessageSigner, load_or_create_key

log = logging.getLogger("scanflow.agents.ray")

NAMESPACE = "scanflow"  # the Ray namespace of scanflow's named actors (as `ray_backend.connect`)
KV_NAMESPACE = "scanflow-agents"  # Ray internal KV: actor name -> pickled AgentPackage
RECORDS = "_ray_agents"  # store state owner: "<app>:<agent>" -> the agent's actor, while wanted
STOP_TIMEOUT = 15.0  # seconds an agent has to stop gracefully before its actor is killed


def actor_name(app: str, agent: str) -> str:
    return f"scanflow-agent:{app}:{agent}"


class AgentActor:
    """One agent in a Ray actor's process (see the module docstring). Decorated with
    `ray.remote` where it is created, so this module imports without Ray."""

    def __init__(self, name: str) -> None:
        import ray  # lazy: this class only runs inside a Ray worker
        from ray.experimental.internal_kv import _internal_kv_get  # lazy: ray

        from scanflow.agents.runtime import Agent  # lazy: the runtime imports the agents' parts
        from scanflow.engine.ray_task import (  # lazy: ray-only helpers
            CODE_DIR,
            apps_dir,
            shipped_code,
            unpack_app,
        )

        blob = _internal_kv_get(name, namespace=KV_NAMESPACE)
        if blob is None:
            raise RuntimeError(f"no app recorded for Ray agent actor {name!r}; start it with "
                               "`scanflow agents start`")
        app, package, env, agent, named, message_key = pickle.loads(blob)
        os.environ.update(env)  # this worker process is the actor's own
        # its logs and scratch files stay on its node, not in the worker's working directory
        os.environ["SCANFLOW_WORKSPACE"] = str(Path(tempfile.gettempdir()) / "scanflow-agents" / name
                                               .replace(":", "_"))
        ctx = ray.get_runtime_context()
        home = unpack_app(package, apps_dir(ctx.get_node_id()))
        code = home / CODE_DIR
        if code.is_dir() and str(code) not in sys.path:
            sys.path.insert(0, str(code))
        app = app.model_copy(update={"base_dir": home, "code_paths": []})
        settings = Settings().ensure()
        self.store = Store(settings.store, signer=MessageSigner(message_key))
        self.agent_name = agent
        self.node_id = ctx.get_node_id()
        self.restarts = _restart_count(name) if ctx.was_current_actor_reconstructed else 0
        if self.restarts:
            self.store.add_event(agent, "agent_restarted", agent=agent, app=app.app,
                                 new_pid=os.getpid(), restarts=self.restarts, node=self.node_id,
                                 reason="its Ray actor's process died; Ray restarted the actor")
        self._stop = threading.Event()
        self.agent = Agent(settings, self.store, app, agent)
        for value, (spec, pkg) in named.items():  # the apps its params name, unpacked here too
            there = unpack_app(pkg, apps_dir(ctx.get_node_id()))
            self.agent.ctx.named_apps[value] = spec.model_copy(
                update={"base_dir": there, "code_paths": shipped_code(spec)})
        self._thread = threading.Thread(target=self.agent.run_forever, name=f"agent-{agent}",
                                        kwargs={"stop": self._stop.is_set, "api": True}, daemon=True)
        self._thread.start()

    def info(self) -> dict[str, Any]:
        """Where and what this agent is: pid, node, restarts, whether its loop runs."""
        return {"pid": os.getpid(), "node": self.node_id, "restarts": self.restarts,
                "running": self._thread.is_alive()}

    def stop(self, timeout: float = STOP_TIMEOUT) -> bool:
        """Stop the loop (it finishes what it is doing and records `stopped`)."""
        self._stop.set()
        self._thread.join(timeout)
        return not self._thread.is_alive()


def named_apps(app: Application, names: list[str]) -> dict[str, Application]:
    """The applications the `app:` params of these agents name (a spec path relative to the
    agent's app folder, as `run_workflow` and `retrain_and_promote` take), loaded here: they
    travel with the agents, since a node has only what is shipped to it."""
    from scanflow.spec.loader import load_application  # lazy: the spec loader (YAML, checks)

    out: dict[str, Application] = {}
    for name in names:
        for sensor in app.agents[name].sensors:
            calls = [sensor.params, *(c.params for c in sensor.actuators)]
            for params in calls:
                value = params.get("app")
                if isinstance(value, str) and value not in out:
                    path = Path(value)
                    out[value] = load_application(path if path.is_absolute()
                                                  else (app.base_dir / path).resolve())
    return out


def records(store: Store) -> dict[str, dict[str, Any]]:
    """"<app>:<agent>" -> its Ray actor record, for every agent started on Ray and not stopped."""
    return {k: v for k, v in store.state_items(RECORDS, "").items() if isinstance(v, dict)}


def restarts(store: Store, agent: str, record: dict[str, Any]) -> int:
    """Restarts of `agent`'s actor since it was started (its `agent_restarted` events)."""
    return sum(1 for e in store.list_events(kinds=["agent_restarted"], since=record.get("since"))
               if e.source == agent)


def status_row(store: Store, settings: Settings, a: Any, record: dict[str, Any],
               actor_gone: Callable[[], bool]) -> dict[str, Any]:
    """An agent on Ray as `AgentSupervisor.status` lists it. Its process may be on another
    machine, so it is alive while it heartbeats (not by its pid); when it does not, it is
    `restarting` while Ray brings its actor back and `dead` once Ray gave the actor up
    (`actor_gone`, asked of the cluster only then)."""
    from scanflow.agents.runtime import HEALTH  # lazy: the runtime (its parts' imports)

    fresh = a.heartbeat is not None and time.time() - a.heartbeat <= settings.agent_stale_after
    alive = a.status == "running" and fresh
    if alive or a.status != "running":
        state = "running" if alive else a.status
    else:
        state = "dead" if actor_gone() else "restarting"
    failing = (store.get_state(a.name, HEALTH) or {}).get("failing") if alive else None
    return {"name": a.name, "app": a.app, "role": a.role, "pid": a.pid,
            "status": "failing" if failing else state, "failing": failing or [],
            "heartbeat": a.heartbeat, "started_at": a.started_at,
            "api": f"http://{a.api_host}:{a.api_port}" if a.api_port and alive else None,
            "supervision": "ray actor", "restarts": restarts(store, a.name, record),
            "last_exit": None, "next_try": None, "supervisor": None}


def _restart_count(name: str) -> int:
    """How many times Ray has restarted the actor `name` (this one included), counted in the KV
    store: the actor's own state does not survive its restarts."""
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_put  # lazy: ray

    key = f"{name}:restarts"
    n = int(_internal_kv_get(key, namespace=KV_NAMESPACE) or b"0") + 1
    _internal_kv_put(key, str(n).encode(), overwrite=True, namespace=KV_NAMESPACE)
    return n


class RayAgents:
    """Start, stop and list an application's agents as Ray actors (what `AgentSupervisor` does
    on the local backend, and delegates to this on the ray backend)."""

    def __init__(self, settings: Settings, store: Store) -> None:
        from scanflow.engine.ray_backend import connect  # lazy: ray

        self.settings = settings
        self.store = store
        connect(settings.ray_address)

    def _handle(self, app: str, agent: str) -> Any:
        import ray  # lazy: ray backend only

        try:
            return ray.get_actor(actor_name(app, agent), namespace=NAMESPACE)
        except ValueError:  # no such actor, or dead for good
            return None

    def start(self, app: Application, names: list[str], wait: float = 60.0) -> dict[str, int]:
        """Create a detached actor per agent of `names`; their pids once each has registered."""
        import ray  # lazy: ray backend only
        from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_put  # lazy: ray

        from scanflow.engine.ray_task import pack_app  # lazy: ray-only helpers

        for name in names:
            if self._handle(app.app, name) is not None:
                raise ValueError(f"agent {name!r} is already running as a Ray actor; "
                                 f"`scanflow agents stop -a {name}` first")
        package = pack_app(app.base_dir, skip=[self.settings.root], code=app.code_modules())
        named = {value: (spec, pack_app(spec.base_dir, skip=[self.settings.root],
                                        code=spec.code_modules()))
                 for value, spec in named_apps(app, names).items()}
        # the workspace and the message key's path are this machine's: the key itself travels
        env = {k: v for k, v in self.settings.child_env().items()
               if k not in ("SCANFLOW_WORKSPACE", "SCANFLOW_MESSAGE_KEY_FILE")}
        message_key = load_or_create_key(self.settings.message_key_path)
        actors: dict[str, Any] = {}
        cls: Any = ray.remote(AgentActor)
        for name in names:
            aname = actor_name(app.app, name)
            _internal_kv_put(aname, pickle.dumps((app, package, env, name, named, message_key)),
                             overwrite=True, namespace=KV_NAMESPACE)
            _internal_kv_del(f"{aname}:restarts", namespace=KV_NAMESPACE)
            actors[name] = cls.options(
                name=aname, namespace=NAMESPACE, lifetime="detached", num_cpus=0,
                max_restarts=self.settings.agent_restart_limit, max_concurrency=4,
            ).remote(aname)
        deadline = time.time() + wait
        pids: dict[str, int] = {}
        for name, actor in actors.items():
            try:
                info: dict[str, Any] = ray.get(actor.info.remote(),
                                               timeout=max(deadline - time.time(), 1.0))
            except Exception as exc:  # noqa: BLE001  (RayActorError, GetTimeoutError: reported)
                raise RuntimeError(f"agent {name} did not start as a Ray actor: {exc}") from None
            pids[name] = int(info["pid"])
            self.store.set_state(RECORDS, f"{app.app}:{name}",
                                 {"app": app.app, "agent": name, "actor": actor_name(app.app, name),
                                  "since": time.time()})
        while time.time() < deadline:
            rows = {a.name: a.pid for a in self.store.list_agents() if a.status == "running"}
            if all(rows.get(n) == p for n, p in pids.items()):
                return pids
            time.sleep(0.2)
        raise TimeoutError(f"agents {sorted(pids)} did not register within {wait:.0f}s")

    def stop(self, app: str, names: list[str], timeout: float = STOP_TIMEOUT) -> list[str]:
        """Stop each agent's loop, then its actor for good (no restart)."""
        import ray  # lazy: ray backend only

        stopped = []
        for name in names:
            actor = self._handle(app, name)
            if actor is None:
                continue
            try:
                ray.get(actor.stop.remote(timeout), timeout=timeout + 5)
            except Exception:  # noqa: BLE001  (a dead or hung actor is killed below)
                log.warning("agent %s did not stop in %.0fs: killing its actor", name, timeout)
            ray.kill(actor, no_restart=True)
            self.store.agent_heartbeat(name, status="stopped")
            self.store.delete_state(RECORDS, f"{app}:{name}")
            stopped.append(name)
        return stopped

    def info(self, app: str, name: str, timeout: float = 2.0) -> dict[str, Any] | None:
        """The live actor's `info()`, or None when it is gone or does not answer in time
        (restarting)."""
        import ray  # lazy: ray backend only

        actor = self._handle(app, name)
        if actor is None:
            return None
        try:
            return dict(ray.get(actor.info.remote(), timeout=timeout))
        except Exception:  # noqa: BLE001  (restarting or dead: the caller shows it as such)
            return None

