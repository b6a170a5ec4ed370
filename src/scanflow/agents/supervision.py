"""The local backend's agent supervisor: one small process per application that starts its
agents, watches them and restarts a dead one with exponential backoff.

`scanflow agents start APP` writes down which agents a person wants running (the *want*), makes
sure the application's supervisor runs, and the supervisor starts them as its own children: so
it learns each one's exit status or signal from `waitpid`, which no other process can. An agent
is dead when its process is gone, or when its heartbeat is older than `agent_stale_after` (the
process is up but hung: it is killed with SIGKILL first). A dead agent is started again after
`agent_restart_backoff` seconds, doubled with each restart in the last `agent_restart_window`
seconds (at most `agent_restart_max_backoff`), and an `agent_restarted` event is recorded; after
`agent_restart_limit` restarts in the window it is given up (`agent_given_up`) and stays dead
until a person starts it again. `scanflow agents stop` first writes the want down as stopped, so
a stopped agent is never taken for a dead one. A supervisor killed in turn is started again by
its agents (`watch_supervisor`, in each agent process) and adopts them.

Exactly one supervisor runs per application: it holds the store lease
`agents-supervisor:<app>` and renews it every half second (a supervisor killed with -9 blocks
the next one for at most `LEASE_S`). Everything it knows is in the store, under the state owner
`_supervisor:<app>` (`want:<agent>`, written by the CLI; `agent:<agent>` and `supervisor`,
written by the supervisor), so `scanflow agents list` reads it without asking the process.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scanflow.control import backends
from scanflow.procs import pid_alive, start_time
from scanflow.settings import Settings, get_settings
from scanflow.store import Store

log = logging.getLogger("scanflow.agents.supervisor")

LEASE_S = 10.0
"""How long the supervisor's lease lasts unless renewed (it is renewed every `TICK_S`)."""
TICK_S = 0.5
START_GRACE_S = 120.0
"""How long a new agent process may take to register before it is taken for hung (its imports
and store connection; at least `agent_stale_after`)."""
APPS = "_supervisors"
"""The state owner listing every application that ever had a supervisor (`app:<name>`)."""


def owner(app: str) -> str:
    """The state owner under which an application's supervision is recorded."""
    return f"_supervisor:{app}"


def lease_name(app: str) -> str:
    return f"agents-supervisor:{app}"


def holder_pid(holder: str) -> int | None:
    """The pid in a supervisor's lease holder (`pid:<pid>:<start time>`), if it still runs."""
    parts = holder.split(":")
    if len(parts) != 3 or parts[0] != "pid" or not parts[1].isdigit():
        return None
    pid = int(parts[1])
    return pid if pid_alive(pid) and str(start_time(pid)) == parts[2] else None


def _holder() -> str:
    return f"pid:{os.getpid()}:{start_time(os.getpid())}"


# -- what the CLI writes and reads ----------------------------------------------------------------
def set_want(store: Store, app: str, name: str, want: str, ref: str | None = None) -> float:
    """Record that a person wants `name` `running` (from app `ref`) or `stopped`; returns the
    want's time, which names this start (a new one resets the agent's restart count)."""
    now = time.time()
    old = store.get_state(owner(app), f"want:{name}") or {}
    store.set_state(owner(app), f"want:{name}", {"want": want, "ref": ref or old.get("ref"), "since": now})
    store.set_state(APPS, f"app:{app}", {"app": app})
    return now


def clear_want(store: Store, app: str, name: str) -> None:
    """`name` runs without a supervisor now (`agents start --no-supervise`): a supervisor lets
    it go, and `agents list` shows its supervision as `-`."""
    store.delete_state(owner(app), f"want:{name}")


def wants(store: Store, app: str) -> dict[str, dict[str, Any]]:
    return {k.removeprefix("want:"): v for k, v in store.state_items(owner(app), "want:").items()}


def records(store: Store, app: str) -> dict[str, dict[str, Any]]:
    """What the supervisor recorded of each agent: state, restarts, last exit, next try."""
    return {k.removeprefix("agent:"): v for k, v in store.state_items(owner(app), "agent:").items()}


def apps(store: Store) -> list[str]:
    return sorted(k.removeprefix("app:") for k in store.state_items(APPS, "app:"))


def supervisor_info(store: Store, app: str) -> dict[str, Any]:
    """`{"status": "running" | "down" | "stopped", "pid": ...}`: `down` when agents of the app
    are wanted running but no supervisor holds its lease (it was killed: the next `agents start`
    starts one)."""
    lease = store.get_lease(lease_name(app))
    pid = holder_pid(lease.holder) if lease is not None else None
    if pid is not None:
        return {"status": "running", "pid": pid}
    running = any(w.get("want") == "running" for w in wants(store, app).values())
    return {"status": "down" if running else "stopped", "pid": None}


def log_path(settings: Settings, app: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in app)
    return settings.agents_dir / f"_supervisor-{safe}.log"


def spawn_agent(settings: Settings, ref: str, name: str) -> subprocess.Popen[bytes]:
    """One agent process (its own session: a signal to the CLI's terminal does not reach it)."""
    env = {**os.environ, **settings.child_env(), "PYTHONUNBUFFERED": "1"}
    with open(settings.agents_dir / f"{name}.log", "ab") as logf:
        return subprocess.Popen(
            [sys.executable, "-m", "scanflow.agents.process", "--app", ref, "--agent", name],
            stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True,
        )


def ensure_supervisor(settings: Settings, store: Store, app: str) -> int | None:
    """Start the application's supervisor unless one holds its lease; its pid if one runs
    (None: one was just started and has not taken the lease yet)."""
    info = supervisor_info(store, app)
    if info["pid"] is not None:
        return int(info["pid"])
    spawn_supervisor(settings, app)
    return None


def spawn_supervisor(settings: Settings, app: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, **settings.child_env(), "PYTHONUNBUFFERED": "1"}
    with open(log_path(settings, app), "ab") as logf:
        return subprocess.Popen(
            [sys.executable, "-m", "scanflow.agents.supervision", "--app", app],
            stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True,
        )


WATCH_S = 5.0
"""How often a supervised agent checks that its application's supervisor is up."""


def watch_supervisor(settings: Settings, store: Store, app: str, name: str, stop: Callable[[], bool],
                     every: float = WATCH_S) -> None:
    """Run in each agent process: while the agent is wanted running under a supervisor and
    none holds the application's lease (it was killed), start one, which adopts the running
    agents. The lease keeps it to one, however many agents notice at once."""
    spawned = 0.0
    children: list[subprocess.Popen[bytes]] = []
    while not stop():
        time.sleep(every)
        children = [p for p in children if p.poll() is None]  # reap the ones that exited
        try:
            want = wants(store, app).get(name) or {}
            if want.get("want") != "running" or time.time() - spawned < 2 * LEASE_S:
                continue
            if supervisor_info(store, app)["status"] == "down":
                log.warning("the supervisor of app %s is down: starting one", app)
                children.append(spawn_supervisor(settings, app))
                spawned = time.time()
        except Exception:  # noqa: BLE001 - e.g. the database restarting: look again later
            log.exception("cannot check the supervisor of app %s", app)


def stop_supervisor(store: Store, app: str, timeout: float = 10.0) -> int | None:
    """SIGTERM the application's supervisor and wait until it is gone (it leaves the agents
    alone); its pid, or None if none ran."""
    lease = store.get_lease(lease_name(app))
    pid = holder_pid(lease.holder) if lease is not None else None
    if pid is None:
        return None
    os.kill(pid, signal.SIGTERM)
    deadline = time.time() + timeout
    while pid_alive(pid) and time.time() < deadline:
        time.sleep(0.05)
    if pid_alive(pid):
        os.kill(pid, signal.SIGKILL)
    return pid


def describe_exit(ex: dict[str, Any] | None) -> str:
    """'killed by SIGKILL', 'exit status 3', 'heartbeat stale ...': how an agent last ended."""
    if not ex:
        return "-"
    if ex.get("signal"):
        what = f"killed by {ex.get('signal_name') or 'signal ' + str(ex['signal'])}"
    elif ex.get("exit_code") is not None:
        what = f"exit status {ex['exit_code']}"
    else:
        what = "exit status unknown"
    reason = ex.get("reason")
    return what if reason in (None, "exited") else f"{what} ({reason})"


# -- the supervisor process ---------------------------------------------------------------------
@dataclass
class _Slot:
    """One wanted agent as the supervisor watches it."""

    since: float
    ref: str
    proc: subprocess.Popen[bytes] | None = None
    pid: int | None = None
    spawned_at: float = 0.0
    restarts: int = 0
    recent: list[float] = field(default_factory=list)
    due: float | None = None
    backoff: float = 0.0
    last_exit: dict[str, Any] | None = None
    state: str = "starting"
    termed: bool = False


class Supervisor:
    """Starts and restarts the wanted agents of one application; `run` until `stop()`."""

    def __init__(self, settings: Settings, store: Store, app: str) -> None:
        self.settings = settings
        self.store = store
        self.app = app
        self.owner = owner(app)
        self.slots: dict[str, _Slot] = {}
        self.holder = _holder()

    # the lease: exactly one supervisor per application
    def _take(self) -> bool:
        return self.store.acquire_lease(lease_name(self.app), self.holder, LEASE_S,
                                        purpose="agents supervisor")

    def acquire(self, wait: float = LEASE_S * 2 + 1) -> bool:
        """Take the lease, waiting out one left by a supervisor killed with -9; False at once
        if a live supervisor holds it."""
        deadline = time.time() + wait
        while True:
            if self._take():
                return True
            lease = self.store.get_lease(lease_name(self.app))
            if lease is not None and holder_pid(lease.holder) is not None:
                log.info("app %s is already supervised by %s", self.app, lease.holder)
                return False
            if time.time() >= deadline:
                return False
            time.sleep(0.2)

    def run(self, stop: Callable[[], bool]) -> int:
        if not self.acquire():
            return 0
        log.info("supervising the agents of app %s (pid %d)", self.app, os.getpid())
        self.store.set_state(self.owner, "supervisor", {"pid": os.getpid(), "started_at": time.time()})
        try:
            while not stop():
                try:
                    if not self._take():
                        log.error("lost the lease of app %s to another supervisor; exiting", self.app)
                        return 1
                    wanted = self.step()
                except Exception:  # noqa: BLE001 - e.g. the database restarting: keep watching
                    log.exception("supervising app %s failed; trying again", self.app)
                    time.sleep(TICK_S)
                    continue
                if not wanted and not self.slots:
                    log.info("no agent of app %s is wanted running; exiting", self.app)
                    break
                time.sleep(TICK_S)
        finally:
            with contextlib.suppress(Exception):
                self.store.release_lease(lease_name(self.app), self.holder)
            log.info("supervisor of app %s stopped", self.app)
        return 0

    def step(self, now: float | None = None) -> int:
        """One look at every agent; returns how many are wanted running."""
        now = time.time() if now is None else now
        want = wants(self.store, self.app)
        rows = {a.name: a for a in self.store.list_agents()}
        for name in list(self.slots):
            w = want.get(name)
            if w is None or w.get("want") != "running":
                self._release(name, rows.get(name))
        running = {n: w for n, w in want.items() if w.get("want") == "running"}
        for name, w in running.items():
            slot = self.slots.get(name)
            if slot is None or slot.since != w["since"]:
                slot = self._slot(name, w, slot, rows.get(name))
                if slot is None:
                    continue
            self._check(name, slot, rows.get(name), now)
        return len(running)

    def _slot(self, name: str, w: dict[str, Any], old: _Slot | None, row: Any) -> _Slot | None:
        """A slot for a new want (a person's start), adopting a live process; restart counts
        carry over from the store when this supervisor replaces one that died."""
        slot = _Slot(since=float(w["since"]), ref=str(w.get("ref") or ""))
        rec = records(self.store, self.app).get(name) or {}
        if rec.get("since") == slot.since:
            slot.restarts = int(rec.get("restarts", 0))
            slot.recent = [float(t) for t in rec.get("recent", [])]
            slot.last_exit = rec.get("last_exit")
            if rec.get("state") == "given_up":
                slot.state = "given_up"
        self.slots[name] = slot
        if slot.state == "given_up":
            return slot
        if old is not None and old.proc is not None and old.proc.poll() is None:
            slot.proc, slot.pid, slot.spawned_at = old.proc, old.proc.pid, old.spawned_at
            slot.state = "running"
        elif row is not None and row.status == "running" and pid_alive(row.pid):
            slot.pid, slot.spawned_at, slot.state = row.pid, time.time(), "running"  # adopted
        else:
            self._launch(name, slot, restart=False)
        self._save(name, slot)
        return slot

    def _release(self, name: str, row: Any) -> None:
        """A person stopped `name`: never restart it; reap our child once it has exited."""
        slot = self.slots[name]
        slot.due = None
        if slot.proc is not None and slot.proc.poll() is None:
            if not slot.termed:
                slot.proc.send_signal(signal.SIGTERM)
                slot.termed = True
            return
        del self.slots[name]
        slot.state = "stopped"
        self._save(name, slot)

    def _check(self, name: str, slot: _Slot, row: Any, now: float) -> None:
        if slot.state == "given_up":
            return
        if slot.due is not None:
            if now >= slot.due:
                self._launch(name, slot, restart=True)
            return
        exit_info = self._dead(slot, row, now)
        if exit_info is None:
            registered = row is not None and row.pid == slot.pid and row.status == "running"
            if slot.state == "starting" and registered:
                slot.state = "running"
                self._save(name, slot)
            return
        slot.last_exit = exit_info
        slot.proc = None
        window = self.settings.agent_restart_window
        slot.recent = [t for t in slot.recent if now - t < window]
        log.warning("agent %s (pid %s) is dead: %s", name, exit_info.get("pid"), describe_exit(exit_info))
        if len(slot.recent) >= self.settings.agent_restart_limit:
            slot.state = "given_up"
            self._save(name, slot)
            self.store.add_event(name, "agent_given_up", agent=name, app=self.app, restarts=slot.restarts,
                                 limit=self.settings.agent_restart_limit, window_s=window, **exit_info)
            log.error("agent %s given up: %d restarts within %.0f s", name, len(slot.recent), window)
            return
        slot.backoff = min(self.settings.agent_restart_max_backoff,
                           self.settings.agent_restart_backoff * 2 ** len(slot.recent))
        slot.due = now + slot.backoff
        slot.state = "backoff"
        self._save(name, slot)

    def _dead(self, slot: _Slot, row: Any, now: float) -> dict[str, Any] | None:
        """How the watched process ended, or None while it is alive and well. A hung one (its
        heartbeat stale, or never registered) is killed first."""
        pid = slot.pid
        if slot.proc is not None:
            rc = slot.proc.poll()
            if rc is not None:
                return _exit(pid, rc, "exited")
        elif not pid_alive(pid):
            return {"pid": pid, "exit_code": None, "signal": None, "signal_name": None,
                    "reason": "process gone (not started by this supervisor: exit status unknown)"}
        stale = self.settings.agent_stale_after
        if row is not None and row.pid == pid and row.status == "running":
            if row.heartbeat is not None and now - float(row.heartbeat) <= stale:
                return None
            reason = f"heartbeat older than {stale:g} s"
        elif now - slot.spawned_at <= max(stale, START_GRACE_S):
            return None  # still starting (or stopping by itself)
        else:
            reason = f"not registered {max(stale, START_GRACE_S):g} s after its start"
        assert pid is not None
        log.warning("agent pid %d looks hung (%s): killing it", pid, reason)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if slot.proc is not None:
            try:
                rc = slot.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                return None  # not gone yet (uninterruptible): looked at again next tick
            return _exit(pid, rc, reason)
        return {"pid": pid, "exit_code": None, "signal": int(signal.SIGKILL), "signal_name": "SIGKILL",
                "reason": reason}

    def _launch(self, name: str, slot: _Slot, restart: bool) -> None:
        if restart:  # a person may have stopped it while it waited
            w = wants(self.store, self.app).get(name) or {}
            if w.get("want") != "running" or float(w.get("since", 0)) != slot.since:
                slot.due = None
                return
        old_pid = slot.pid
        proc = spawn_agent(self.settings, slot.ref, name)
        slot.proc, slot.pid, slot.spawned_at = proc, proc.pid, time.time()
        slot.due, slot.state, slot.termed = None, "starting", False
        if restart:
            slot.restarts += 1
            slot.recent.append(slot.spawned_at)
            ex = slot.last_exit or {}
            self.store.add_event(name, "agent_restarted", agent=name, app=self.app, pid=old_pid,
                                 new_pid=proc.pid, exit_code=ex.get("exit_code"), signal=ex.get("signal"),
                                 signal_name=ex.get("signal_name"), reason=ex.get("reason"),
                                 restarts=slot.restarts, backoff_s=slot.backoff)
            log.info("agent %s restarted (pid %d, restart %d, after %s)", name, proc.pid, slot.restarts,
                     describe_exit(ex))
        else:
            log.info("agent %s started (pid %d)", name, proc.pid)
        self._save(name, slot)

    def _save(self, name: str, slot: _Slot) -> None:
        self.store.set_state(self.owner, f"agent:{name}", {
            "since": slot.since, "state": slot.state, "pid": slot.pid, "restarts": slot.restarts,
            "recent": slot.recent, "last_exit": slot.last_exit,
            "next_try": slot.due, "supervisor": os.getpid(),
        })


def _exit(pid: int | None, rc: int, reason: str) -> dict[str, Any]:
    if rc < 0:
        try:
            sig_name: str | None = signal.Signals(-rc).name
        except ValueError:
            sig_name = None
        return {"pid": pid, "exit_code": None, "signal": -rc, "signal_name": sig_name, "reason": reason}
    return {"pid": pid, "exit_code": rc, "signal": None, "signal_name": None, "reason": reason}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scanflow-agent-supervisor")
    parser.add_argument("--app", required=True, help="the application's name (its `app:`)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("alembic", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    settings = get_settings().ensure()
    store = backends.store(settings)
    stopping = {"flag": False}

    def _term(_sig: int, _frame: Any) -> None:
        stopping["flag"] = True

    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGINT, _term)
    return Supervisor(settings, store, args.app).run(lambda: stopping["flag"])


if __name__ == "__main__":
    sys.exit(main())
