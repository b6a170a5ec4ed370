"""Every agent's own small HTTP API, served by uvicorn in a thread of the agent process on
127.0.0.1 (a free port, recorded in the agents table so that `scanflow agents ...` finds it).

    GET    /health                              the agent, its pid, paused sensors
    GET    /sensors                             sensors: triggers, paused, next fire time
    GET    /sensors/{sensor}
    POST   /sensors/{sensor}/fire?wait=true     fire now (by hand; also when paused)
    POST   /sensors/{sensor}/pause | /resume    (POST /pause, /resume: every sensor)
    POST   /sensors/{sensor}/triggers           add a trigger (body: a trigger as in the spec)
    DELETE /sensors/{sensor}/triggers/{id}      remove one
    GET    /decisions?limit=20&fired=true       recent decisions, newest first
    GET    /events?limit=20                     recent events of this agent, newest first
    GET    /messages?status=dead&limit=50       its messages (dead letters: last error, tries)
    POST   /messages/{id}/requeue               deliver a dead-lettered message again

An unknown sensor, trigger or message is a 404, a bad trigger body a 422 that names the field,
a trigger id already used (or requeueing a message that is not dead-lettered) a 409. Changes
made here are stored and survive a restart.

Every route but `/health` needs an identity, else 401 (403 for one not allowed): either the
agent's local key (`X-Scanflow-Agent-Key`, a random secret the agent writes at start to a file
only its user can read: the CLI on the same machine sends it), or a bearer token whose user may
read (GET) or manage agents (`agents`: owner) in the agent's team.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Any, Literal, Protocol

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from scanflow.agents.errors import DuplicateTrigger, UnknownMessage, UnknownSensor, UnknownTrigger
from scanflow.control.audit import why as audit_why
from scanflow.spec.models import AgentSpec, Application, SensorSpec, Trigger
from scanflow.store import Store
from scanflow.store.identity import Refused

HOST = "127.0.0.1"
KEY_HEADER = "X-Scanflow-Agent-Key"


class _Context(Protocol):
    @property
    def app(self) -> Application: ...
    @property
    def service(self) -> str | None: ...


class ServedAgent(Protocol):
    """What the API needs of an agent (`scanflow.agents.runtime.Agent` is one). The runtime
    hands its agent to `ApiServer`; this module never imports the runtime."""

    @property
    def name(self) -> str: ...
    @property
    def ctx(self) -> _Context: ...
    @property
    def spec(self) -> AgentSpec: ...
    @property
    def store(self) -> Store: ...
    @property
    def max_attempts(self) -> int: ...
    @property
    def _paused(self) -> set[str]: ...
    @property
    def _sensors(self) -> dict[str, SensorSpec]: ...

    def sensors_info(self) -> list[dict[str, Any]]: ...
    def sensor_info(self, name: str) -> dict[str, Any]: ...
    def fire(self, name: str, wait: bool = True) -> dict[str, Any]: ...
    def pause(self, name: str | None = None) -> list[str]: ...
    def resume(self, name: str | None = None) -> list[str]: ...
    def add_trigger(self, name: str, trig: Trigger) -> dict[str, Any]: ...
    def remove_trigger(self, name: str, key: str) -> None: ...
    def recent_decisions(self, limit: int = 20, fired: bool | None = None) -> list[dict[str, Any]]: ...
    def recent_events(self, limit: int = 20) -> list[dict[str, Any]]: ...
    def messages(self, status: str | None = None, limit: int = 50) -> list[dict[str, Any]]: ...
    def requeue(self, message_id: int) -> dict[str, Any]: ...


def key_file(agents_dir: Path, name: str) -> Path:
    """Where an agent keeps the key of its API (mode 0600)."""
    return agents_dir / f"{name}.api-key"


def write_key(path: Path) -> str:
    """A new random key, written so that only this user can read it."""
    key = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key)
    os.replace(tmp, path)
    return key


def read_key(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _refused(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status,
                        headers={"WWW-Authenticate": "Bearer"} if status == 401 else None)


def _authenticate(api: FastAPI, agent: ServedAgent, key: str | None) -> None:
    """Refuse every request but `GET /health` that carries neither the key nor an allowed token."""

    @api.middleware("http")
    async def _identity(request: Request, call_next: Any) -> Any:
        if request.url.path == "/health" and request.method == "GET":
            return await call_next(request)
        given = request.headers.get(KEY_HEADER)
        if key is not None and given is not None and hmac.compare_digest(given.encode(), key.encode()):
            return await call_next(request)
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return _refused(401, f"agent {agent.name}: send its key ({KEY_HEADER}) or "
                            "`Authorization: Bearer <token>`")
        who = await run_in_threadpool(agent.store.identities.verify, token.strip())
        if isinstance(who, Refused):
            return _refused(401, f"token refused: {who.reason}")
        action = "read" if request.method == "GET" else "agents"
        team = agent.ctx.app.team
        if not who.may(action, team, agent.name):
            return _refused(403, f"{who.user} may not {'read' if action == 'read' else 'manage'} "
                            f"agent {agent.name} (team {team!r})")
        return await call_next(request)


def create_app(agent: ServedAgent, key: str | None = None) -> FastAPI:
    """The agent's FastAPI app: identity checked, errors as 404/409/422, then the routes over
    `agent`; `key` is the agent's local key (None: tokens only)."""
    api = FastAPI(title=f"scanflow agent {agent.name}", version="1")
    _authenticate(api, agent, key)
    _error_handlers(api)
    _sensor_routes(api, agent)
    _record_routes(api, agent)
    return api


def _error_handlers(api: FastAPI) -> None:
    @api.exception_handler(UnknownSensor)
    @api.exception_handler(UnknownTrigger)
    @api.exception_handler(UnknownMessage)
    async def _not_found(_req: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @api.exception_handler(RequestValidationError)
    async def _invalid(_req: Request, exc: RequestValidationError) -> JSONResponse:
        """422 with one entry per problem: where (the field's path) and what, in plain words."""
        return JSONResponse({"detail": [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")).removeprefix("Value error, "),
             "type": e.get("type")} for e in exc.errors()]}, status_code=422)

    @api.exception_handler(DuplicateTrigger)
    async def _conflict(_req: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409)


def _sensor_routes(api: FastAPI, agent: ServedAgent) -> None:
    """Health, sensors, firing by hand, pause/resume and run-time triggers."""
    @api.get("/health")
    def health() -> dict[str, Any]:
        return {"agent": agent.name, "app": agent.ctx.app.app, "role": agent.spec.role,
                "service": agent.ctx.service, "pid": os.getpid(),
                "paused": sorted(agent._paused), "sensors": list(agent._sensors),
                "messages": agent.store.count_messages(agent.name), "max_attempts": agent.max_attempts}

    @api.get("/sensors")
    def sensors() -> list[dict[str, Any]]:
        return agent.sensors_info()

    @api.get("/sensors/{sensor}")
    def sensor(sensor: str) -> dict[str, Any]:
        return agent.sensor_info(sensor)

    @api.post("/sensors/{sensor}/fire")
    def fire(sensor: str, wait: bool = True) -> JSONResponse:
        try:
            out = agent.fire(sensor, wait=wait)
        except UnknownSensor:
            raise
        except Exception as exc:  # noqa: BLE001 - the sensor's own failure, said plainly
            return JSONResponse({"detail": f"sensor {sensor!r} failed: {type(exc).__name__}: {exc}"},
                                status_code=500)
        return JSONResponse(out, status_code=200 if wait else 202)

    @api.post("/sensors/{sensor}/pause")
    def pause(sensor: str) -> dict[str, Any]:
        agent.pause(sensor)
        return agent.sensor_info(sensor)

    @api.post("/sensors/{sensor}/resume")
    def resume(sensor: str) -> dict[str, Any]:
        agent.resume(sensor)
        return agent.sensor_info(sensor)

    @api.post("/pause")
    def pause_all() -> dict[str, Any]:
        return {"paused": agent.pause()}

    @api.post("/resume")
    def resume_all() -> dict[str, Any]:
        return {"resumed": agent.resume()}

    @api.post("/sensors/{sensor}/triggers", status_code=201)
    def add_trigger(sensor: str, trigger: Trigger) -> Any:
        try:
            return agent.add_trigger(sensor, trigger)
        except (UnknownSensor, DuplicateTrigger):
            raise
        except ValueError as exc:  # valid alone, not with the agent's other triggers
            return JSONResponse({"detail": [{"loc": ["body"], "msg": str(exc), "type": "value_error"}]},
                                status_code=422)

    @api.delete("/sensors/{sensor}/triggers/{trigger_id}")
    def remove_trigger(sensor: str, trigger_id: str) -> dict[str, Any]:
        agent.remove_trigger(sensor, trigger_id)
        return {"sensor": sensor, "removed": trigger_id}


def _record_routes(api: FastAPI, agent: ServedAgent) -> None:
    """What the agent decided and did, `why`, and its messages (dead letters, requeue)."""
    @api.get("/decisions")
    def decisions(limit: int = Query(20, ge=1, le=1000), fired: bool | None = None) -> list[dict[str, Any]]:
        return agent.recent_decisions(limit, fired)

    @api.get("/events")
    def events(limit: int = Query(20, ge=1, le=1000)) -> list[dict[str, Any]]:
        return agent.recent_events(limit)

    @api.get("/why/{service}")
    def why(service: str) -> JSONResponse:
        """`scanflow why` over HTTP: the chain behind a service's current model and replicas."""
        try:
            chain = audit_why(agent.store, service)
        except KeyError as exc:
            return JSONResponse({"detail": str(exc).strip("'\"")}, status_code=404)
        return JSONResponse(json.loads(json.dumps(chain, default=str)))

    @api.get("/messages")
    def messages(status: Literal["pending", "done", "dead"] | None = None,
                 limit: int = Query(50, ge=1, le=1000)) -> list[dict[str, Any]]:
        return agent.messages(status, limit)

    @api.post("/messages/{message_id}/requeue")
    def requeue(message_id: int) -> Any:
        try:
            return agent.requeue(message_id)
        except UnknownMessage:
            raise
        except ValueError as exc:  # not dead-lettered
            return JSONResponse({"detail": str(exc)}, status_code=409)


class ApiServer:
    """uvicorn in a daemon thread, on a socket bound first (so the port is known up front)."""

    def __init__(self, agent: ServedAgent, host: str = HOST, port: int = 0,
                 key: str | None = None) -> None:
        self.agent = agent
        self.key = key
        self.host = host
        self.port = port
        self._sock: socket.socket | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def bind(self) -> tuple[str, int]:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self._sock = sock
        self.port = sock.getsockname()[1]
        return self.host, self.port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> None:
        import uvicorn  # lazy: the server itself is needed only once the API is started

        if self._sock is None:
            self.bind()
        config = uvicorn.Config(create_app(self.agent, self.key), log_level="warning", access_log=False,
                                lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name=f"{self.agent.name}-api", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP API of agent {self.agent.name!r} did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._sock is not None:
            self._sock.close()
