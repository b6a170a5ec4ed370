"""A real `scanflow server` (uvicorn in a thread of the test process) on a workspace, and the
environment that sends the CLI through it: for tests that run the CLI both ways."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import uvicorn

from scanflow.server.app import create_app
from scanflow.settings import Settings
from support.waiting import wait_for


@dataclass(frozen=True)
class ControlServer:
    url: str
    token: str  # an admin's

    def env(self) -> dict[str, str]:
        """What makes the CLI a client of this server."""
        return {"SCANFLOW_SERVER": self.url, "SCANFLOW_TOKEN": self.token}


@contextmanager
def control_server(settings: Settings, teams: tuple[str, ...] = ()) -> Iterator[ControlServer]:
    """The server on `settings`' workspace, with `teams` and an admin `root` whose token it
    hands out; stopped (its run queue too) on exit."""
    from scanflow.control import backends

    store = backends.store(settings)
    ids = store.identities
    for team in teams:
        ids.create_team(team)
    ids.create_user("root", admin=True)
    token = ids.create_token("root")[1]
    config = uvicorn.Config(create_app(settings, max_runs=2), host="127.0.0.1", port=0,
                            log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: srv.started, 30, what="the server started")
        port = srv.servers[0].sockets[0].getsockname()[1]
        yield ControlServer(f"http://127.0.0.1:{port}", token)
    finally:
        srv.should_exit = True
        thread.join(timeout=30)
        store.close()
