"""The request and response bodies of the REST API (the OpenAPI document is built from these).

Times are epoch seconds (`*_at`, `ts`) as in the store; the CLI formats them.
"""

from __future__ import annotations

from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    """One page of a long list; pass `next` back as `cursor` for the following one (null: the end)."""

    items: list[T]
    next: str | None = None


class Strict(BaseModel):
    """A request body: unknown fields are an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


# -- applications ---------------------------------------------------------------------------
class AppIn(Strict):
    path: str = Field(description="the spec file or folder, on the server's machine",
                      min_length=1, max_length=4096)


class AppOut(BaseModel):
    name: str
    team: str
    spec_path: str
    registered_by: str
    registered_at: float
    workflows: list[str] = []
    services: list[str] = []
    agents: list[str] = []


class ValidateIn(AppIn):
    registry: bool = Field(default=False, description="also check that the services' models "
                           "are registered (in the server's MLflow)")


class Validation(BaseModel):
    ok: bool
    app: str | None = None
    team: str | None = None
    source: str | None = Field(default=None, description="the spec file read")
    workflows: int = 0
    services: int = 0
    agents: int = 0
    problems: list[str] = []


# -- runs -------------------------------------------------------------------------------------
class RunIn(Strict):
    app: str = Field(min_length=1, max_length=200)
    team: str | None = Field(default=None, max_length=200,
                             description="whose spec of the app (needed when several teams have one)")
    workflow: str = Field(min_length=1, max_length=200)
    params: dict[str, Any] = Field(default_factory=dict, description="name or step.name -> value")
    cache: bool = True


class StepOut(BaseModel):
    step: str
    status: str
    exit_code: int | None
    attempts: int
    cache_key: str | None
    cached_from: str | None
    mlflow_run_id: str | None
    log_path: str | None = Field(default=None, description="on the machine that ran the step")
    outputs: dict[str, Any]
    error: str | None
    started_at: float | None
    ended_at: float | None


class RunOut(BaseModel):
    id: str
    app: str
    team: str
    workflow: str
    status: str
    params: dict[str, Any]
    trigger: dict[str, Any]
    mlflow_run_id: str | None
    error: str | None
    created_at: float
    started_at: float | None
    ended_at: float | None


class RunDetail(RunOut):
    steps: list[StepOut]


class RunState(BaseModel):
    id: str
    status: str


# -- services ---------------------------------------------------------------------------------
class ReplicaOut(BaseModel):
    model_config = ConfigDict(extra="allow")
    pid: int | None = None
    model_version: str | None = None
    ready: bool = False
    draining: bool = False
    node: str | None = None
    cpu_limit: float | None = None
    cpu_use: float | None = None
    memory_limit: int | None = None
    memory_use: int | None = None


class ServiceOut(BaseModel):
    model_config = ConfigDict(extra="allow")
    service: str
    app: str
    team: str
    status: str
    url: str | None = None
    model_name: str
    alias: str
    model_version: str | None
    previous_version: str | None = None
    replicas: int
    canary: dict[str, Any] | None = None
    shadow_version: str | None = None
    workers: list[ReplicaOut] = []


class DeployIn(Strict):
    app: str = Field(min_length=1, max_length=200, description="a registered application")
    team: str | None = Field(default=None, max_length=200,
                             description="whose spec of the app (needed when several teams have one)")


class ScaleIn(Strict):
    replicas: int = Field(ge=1, le=64)


class ResizeIn(Strict):
    cpus: float = Field(ge=0.01, le=64.0)
    reason: str = Field(default="", max_length=2000)


class RolloutIn(Strict):
    version: str | None = Field(default=None, max_length=50)
    reason: str = Field(default="", max_length=2000)


class ReasonIn(Strict):
    reason: str = Field(default="", max_length=2000)


class CanaryIn(Strict):
    version: str | None = Field(default=None, max_length=50, description="null stops the canary")
    share: float = Field(default=0.1, ge=0.001, le=1.0)


class ShadowIn(Strict):
    version: str | None = Field(default=None, max_length=50, description="null stops the shadow")


class PromoteIn(Strict):
    version: str = Field(min_length=1, max_length=50)
    force: bool = False
    reason: str = Field(default="", max_length=2000)


class Done(BaseModel):
    """What an operation did."""

    service: str
    operation: str
    model_version: str | None = None
    previous_version: str | None = None
    replicas: int | None = None
    detail: dict[str, Any] = {}


class PromoteOut(BaseModel):
    service: str
    version: str
    promoted: bool
    forced: bool
    passed: bool
    champion_version: str | None
    served_version: str | None
    reasons: list[str]


# -- audit ------------------------------------------------------------------------------------
class EventOut(BaseModel):
    id: int
    ts: float
    source: str
    kind: str
    service: str | None
    payload: dict[str, Any]


class DecisionOut(BaseModel):
    id: int
    ts: float
    agent: str
    sensor: str
    rule: str
    fired: bool
    service: str | None
    key: str | None
    evidence: dict[str, Any]
    actions: list[Any]
    by: str | None = Field(default=None, description="the identity the agent acted as")


class AgentsStartIn(Strict):
    app: str = Field(min_length=1, max_length=200, description="a registered application")
    team: str | None = Field(default=None, max_length=200)
    agents: list[str] | None = Field(default=None, description="only these (default: all)")


class AgentOut(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    app: str
    team: str | None
    role: str
    status: str
    pid: int | None = None
    heartbeat: float | None = None


class Health(BaseModel):
    status: Literal["ok"]
    version: str


class StoreSchema(BaseModel):
    """The server's store, as `scanflow db current` shows it (never its URL: it may hold a
    password)."""

    backend: str = Field(description="sqlite or postgresql")
    revision: str | None
    head: str
    at_head: bool


# -- identities (admin) ------------------------------------------------------------------------
class TeamIn(Strict):
    name: str = Field(min_length=1, max_length=64)


class UserIn(Strict):
    name: str = Field(min_length=1, max_length=64)
    admin: bool = False
    kind: Literal["person", "agent"] = "person"


class RoleIn(Strict):
    role: Literal["viewer", "operator", "owner"]


class GrantIn(Strict):
    to: str = Field(min_length=1, max_length=64, description="the team that may read")


class TokenIn(Strict):
    user: str = Field(min_length=1, max_length=64)
    expires_at: float | None = Field(default=None, description="epoch seconds; none: never")
    scopes: list[str] | None = Field(default=None, max_length=20)
    note: str = Field(default="", max_length=200)


class TokenMade(BaseModel):
    id: str
    user: str
    token: str = Field(description="shown once, here: the server keeps only its SHA-256")


class TokenOut(BaseModel):
    id: str
    user: str
    scopes: list[str] | None
    note: str
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    last_used_at: float | None


class UserOut(BaseModel):
    name: str
    kind: str
    admin: bool
    roles: dict[str, str]


class Identities(BaseModel):
    teams: list[str]
    users: list[UserOut]
    tokens: list[TokenOut]
