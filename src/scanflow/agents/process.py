"""Each agent runs in its own process; the supervisor starts, finds and stops them."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from scanflow.procs import pid_alive
from scanflow.settings import Settings, get_settings
from scanflow.spec.loader import load_application
from scanflow.store import Store


class AgentSupervisor:
    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings.ensure()
        self.store = store

    def log_path(self, name: str) -> Path:
        return self.settings.agents_dir / f"{name}.log"

    def start(
        self, app_path: str | Path, names: list[str] | None = None, wait: float = 30.0
    ) -> dict[str, int]:
        app = load_application(app_path)
        chosen = names or list(app.agents)
        unknown = [n for n in chosen if n not in app.agents]
        if unknown:
            raise KeyError(f"no agent(s) {unknown} in {app_path} (known: {sorted(app.agents)})")
        running = {a.name: a.pid for a in self.store.list_agents() if a.status == "running"}
        pids: dict[str, int] = {}
        procs: list[subprocess.Popen[bytes]] = []
        for name in chosen:
            if pid_alive(running.get(name)):
                raise ValueError(f"agent {name!r} is already running (pid {running[name]})")
            env = {**os.environ, **self.settings.child_env(), "PYTHONUNBUFFERED": "1"}
            with open(self.log_path(name), "ab") as logf:
                p = subprocess.Popen(
                    [sys.executable, "-m", "scanflow.agents.process", "--app", str(Path(app_path).resolve()),
                     "--agent", name],
                    stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env=env, start_new_session=True,
                )
            procs.append(p)
            pids[name] = p.pid
        deadline = time.time() + wait
        while time.time() < deadline:
            registered = {a.name: a.pid for a in self.store.list_agents()}
            if all(registered.get(n) == pid for n, pid in pids.items()):
                return pids
            dead = [n for n, p in zip(pids, procs, strict=True) if p.poll() is not None]
            if dead:
                raise RuntimeError(f"agent {dead[0]} exited at start; see {self.log_path(dead[0])}")
            time.sleep(0.2)
        raise TimeoutError(f"agents {sorted(pids)} did not register within {wait:.0f}s")

    def stop(self, names: list[str] | None = None, timeout: float = 15.0) -> list[str]:
        stopped = []
        for a in self.store.list_agents():
            if names and a.name not in names:
                continue
            if pid_alive(a.pid):
                assert a.pid is not None
                os.kill(a.pid, signal.SIGTERM)
                deadline = time.time() + timeout
                while pid_alive(a.pid) and time.time() < deadline:
                    time.sleep(0.1)
                if pid_alive(a.pid):
                    os.kill(a.pid, signal.SIGKILL)
                stopped.append(a.name)
            self.store.agent_heartbeat(a.name, status="stopped")
        return stopped

    def status(self) -> list[dict[str, Any]]:
        return [
            {"name": a.name, "role": a.role, "pid": a.pid,
             "status": a.status if pid_alive(a.pid) or a.status != "running" else "dead",
             "heartbeat": a.heartbeat}
            for a in self.store.list_agents()
        ]


def main(argv: list[str] | None = None) -> int:
    from scanflow.agents.runtime import Agent

    parser = argparse.ArgumentParser(prog="scanflow-agent")
    parser.add_argument("--app", required=True)
    parser.add_argument("--agent", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("apscheduler", "mlflow", "alembic", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    settings = get_settings().ensure()
    store = Store(settings.store)
    app = load_application(args.app)
    agent = Agent(settings, store, app, args.agent)
    stopping = {"flag": False}

    def _term(_sig: int, _frame: Any) -> None:
        stopping["flag"] = True

    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGINT, _term)
    logging.getLogger("scanflow.agents").info("agent %s (%s) started, pid %d",
                                               args.agent, agent.spec.role, os.getpid())
    agent.run_forever(stop=lambda: stopping["flag"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
