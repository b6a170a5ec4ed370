"""Pydantic models of the spec. Unknown keys are errors: a typo must never be silently ignored."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from datetime import UTC, datetime
from datetime import date as date_type
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from scanflow.spec.batching import BatchConfig
from scanflow.spec.durations import parse_duration
from scanflow.spec.policy import Policy
from scanflow.spec.triggers import cron_trigger, legacy_workflow_trigger, workflow_ref

NAME = r"^[A-Za-z][A-Za-z0-9_.-]{0,99}$"
PARAM_TYPES: dict[str, type] = {"int": int, "float": float, "str": str, "bool": bool, "path": str}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)


class ParamSpec(_Strict):
    type: Literal["int", "float", "str", "bool", "path"] = "str"
    default: Any = None
    help: str = ""

    @model_validator(mode="after")
    def _default_has_type(self) -> ParamSpec:
        if self.default is not None:
            object.__setattr__(self, "default", coerce_param(self.type, self.default))
        return self


def coerce_param(kind: str, value: Any) -> Any:
    """Convert a CLI or YAML value to a declared parameter type, or raise ValueError."""
    if kind == "bool":
        if isinstance(value, bool):
            return value
        s = str(value).strip().lower()
        if s in {"true", "1", "yes", "on"}:
            return True
        if s in {"false", "0", "no", "off"}:
            return False
        raise ValueError(f"expected a bool, got {value!r}")
    if kind == "int":
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"expected an int, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected an int, got {value!r}") from None
    if kind == "float":
        if isinstance(value, bool):
            raise ValueError(f"expected a float, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a float, got {value!r}") from None
    if isinstance(value, dict | list):
        raise ValueError(f"expected a {kind}, got {type(value).__name__}")
    return str(value)


def _params_from_short_form(value: Any) -> Any:
    """`params: {epochs: 5}` is short for `{epochs: {type: int, default: 5}}`."""
    if not isinstance(value, dict):
        return value
    out: dict[str, Any] = {}
    for k, v in value.items():
        if isinstance(v, dict) or isinstance(v, ParamSpec):
            out[k] = v
        elif isinstance(v, bool):
            out[k] = {"type": "bool", "default": v}
        elif isinstance(v, int):
            out[k] = {"type": "int", "default": v}
        elif isinstance(v, float):
            out[k] = {"type": "float", "default": v}
        else:
            out[k] = {"type": "str", "default": v}
    return out


_MEM = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(k|ki|m|mi|g|gi|kb|mb|gb)?\s*$", re.I)


def parse_memory(value: int | float | str) -> int:
    """Bytes from 512, '512Mi', '2G', '1.5GiB'."""
    if isinstance(value, bool):
        raise ValueError("memory must be bytes or a string like '512Mi'")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("memory must not be negative")
        return int(value)
    m = _MEM.match(str(value).replace("iB", "i").replace("B", ""))
    if not m:
        raise ValueError(f"cannot read {value!r} as memory (use e.g. 512Mi, 2G)")
    unit = (m.group(2) or "").lower().rstrip("b")
    mult = {"": 1, "k": 10**3, "ki": 2**10, "m": 10**6, "mi": 2**20, "g": 10**9, "gi": 2**30}[unit]
    return int(float(m.group(1)) * mult)


class RetryPolicy(_Strict):
    """How a failed step is tried again: `count` more times, waiting `backoff * 2**k`
    seconds (at most `max_backoff`) plus up to `jitter` of that at random."""

    count: int = Field(default=0, ge=0, le=100)
    backoff: float = Field(default=1.0, ge=0)
    max_backoff: float = Field(default=60.0, ge=0)
    jitter: float = Field(default=0.5, ge=0, le=1)
    on_exit_codes: list[int] | None = Field(default=None, description="retry only these (None: any)")
    on_exceptions: list[str] | None = Field(default=None, description="exception class names")
    on_timeout: bool = True

    @model_validator(mode="before")
    @classmethod
    def _short(cls, v: Any) -> Any:
        return {"count": v} if isinstance(v, int) and not isinstance(v, bool) else v


class Resources(_Strict):
    """CPUs and memory a step claims, or a service's limit per replica. On a service only
    the fields written in the spec are enforced (`declared`): `resources: {memory: 1GiB}`
    limits memory and leaves the CPU unlimited."""

    cpus: float = Field(default=1.0, gt=0, le=1024, description="cores; accepts 0.5 or '500m'")
    memory: int = Field(default=0, ge=0, description="bytes; accepts '512Mi', '2G'")

    @field_validator("cpus", mode="before")
    @classmethod
    def _cpus(cls, v: Any) -> Any:
        if isinstance(v, str) and re.fullmatch(r"\s*\d+(\.\d+)?m\s*", v):
            return float(v.strip()[:-1]) / 1000  # Kubernetes millicores
        return v

    @field_validator("memory", mode="before")
    @classmethod
    def _mem(cls, v: Any) -> Any:
        return parse_memory(v)

    def declared(self) -> tuple[float | None, int | None]:
        """(cpus, memory bytes) as limits: None for what the spec did not set (or memory 0)."""
        cpus = self.cpus if "cpus" in self.model_fields_set else None
        memory = self.memory if "memory" in self.model_fields_set and self.memory > 0 else None
        return cpus, memory


class StepResources(Resources):
    """What a step claims: CPUs and memory on every backend; GPUs and named custom resources
    only where nodes offer them (the ray backend maps the four to Ray's `num_cpus`, `memory`,
    `num_gpus` and `resources`)."""

    gpus: float = Field(default=0.0, ge=0, le=1024, description="GPUs (ray backend)")
    custom: dict[str, float] = Field(
        default_factory=dict, description="other resources a node must offer, by name (ray "
        "backend: Ray's custom resources, e.g. {node_a: 1})",
    )

    @field_validator("custom")
    @classmethod
    def _positive(cls, v: dict[str, float]) -> dict[str, float]:
        bad = [k for k, n in v.items() if n <= 0]
        if bad:
            raise ValueError(f"custom resources must be > 0: {', '.join(bad)}")
        return v


MIN_REPLICA_MEMORY = 64 * 2**20


class ServiceResources(Resources):
    """A service's limits per replica: a memory limit a server process cannot even start in
    is refused here rather than as replicas the kernel kills in a loop."""

    @field_validator("memory")
    @classmethod
    def _enough(cls, v: int) -> int:
        if 0 < v < MIN_REPLICA_MEMORY:
            raise ValueError(f"{v} bytes is too little for a model server replica "
                             f"(at least {MIN_REPLICA_MEMORY // 2**20}Mi)")
        return v


class Step(_Strict):
    """A batch step: a command run as a subprocess, or a Python callable run in-process."""

    name: str = Field(pattern=NAME)
    run: str | None = Field(default=None, description="command; params become --name value")
    call: str | Callable[..., Any] | None = Field(default=None, description="'module:function'")
    params: dict[str, ParamSpec] = Field(default_factory=dict)
    after: list[str] = Field(default_factory=list)
    inputs: dict[str, str] = Field(default_factory=dict, description="local name -> 'step.output'")
    outputs: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    registers: list[str] = Field(default_factory=list, description="model names this step registers")
    retries: RetryPolicy = Field(default_factory=RetryPolicy)
    timeout: float | None = Field(default=None, description="seconds; kills the step's process tree")
    cache: bool = Field(default=True, description="reuse a successful run with the same inputs")
    resources: StepResources = Field(default_factory=StepResources)

    _short_params = field_validator("params", mode="before")(_params_from_short_form)

    @field_validator("timeout", mode="before")
    @classmethod
    def _timeout(cls, v: Any) -> Any:
        return None if v is None else parse_duration(v)

    def deps(self) -> list[str]:
        """`after` plus the steps whose outputs this step reads (data implies order)."""
        out = list(dict.fromkeys(self.after))
        for ref in self.inputs.values():
            src = ref.partition(".")[0]
            if src not in out:
                out.append(src)
        return out

    @model_validator(mode="after")
    def _one_action(self) -> Step:
        if (self.run is None) == (self.call is None):
            raise ValueError("a step needs exactly one of `run` (a command) or `call` (a function)")
        if isinstance(self.call, str) and not re.match(r"^[\w.]+:[\w.]+$", self.call):
            raise ValueError(f"`call` must look like 'package.module:function', got {self.call!r}")
        return self


class Workflow(_Strict):
    description: str = ""
    triggers: list[Trigger] = Field(
        default_factory=list, description="what starts this workflow on its own (`engine serve`): "
        "the triggers agents' sensors use; `params` are the run's")
    steps: list[Step] = Field(min_length=1)
    params: dict[str, ParamSpec] = Field(default_factory=dict, description="shared by all steps")

    _short_params = field_validator("params", mode="before")(_params_from_short_form)

    @field_validator("triggers", mode="before")
    @classmethod
    def _legacy_triggers(cls, v: Any) -> Any:
        return [legacy_workflow_trigger(t) for t in v] if isinstance(v, list) else v

    @model_validator(mode="after")
    def _workflow_triggers(self) -> Workflow:
        problems: list[str] = []
        seen: dict[str, int] = {}
        for i, t in enumerate(self.triggers):
            if t.event is not None and t.event.message is not None:
                problems.append(f"triggers[{i}].event.message: a workflow has no inbox (messages go "
                                "to agents: let an agent's `run_workflow` start it)")
            pw = t.event.prediction_window if t.event is not None else None
            if pw is not None and pw.service is None:
                problems.append(f"triggers[{i}].event.prediction_window.service: needed (a "
                                "workflow has no service of its own)")
            if t.key in seen:
                problems.append(f"triggers[{i}] repeats triggers[{seen[t.key]}] (id {t.key!r}: "
                                "give one an `id`)")
            seen.setdefault(t.key, i)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def step(self, name: str) -> Step:
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(name)


class Service(_Strict):
    """An online model server for `models:/<model>@<alias>`."""

    model: str = Field(pattern=NAME)
    alias: str = Field(default="champion", pattern=NAME)
    replicas: int = Field(default=1, ge=1, le=64)
    port: int = Field(default=0, ge=0, le=65535, description="0 picks a free port")
    reference: str | None = Field(default=None, description="artifact with the reference sample")
    policy: Policy = Field(default_factory=Policy, description="the planner's policy (scanflow.spec.policy)")
    batching: BatchConfig = Field(default_factory=BatchConfig,
                                  description="micro-batching of each replica (scanflow.serving.batching)")
    resources: ServiceResources | None = Field(
        default=None, description="limits per replica, enforced with cgroups on the local backend "
        "(absent: unlimited); only the fields given are enforced")


# -- agents -----------------------------------------------------------------------------------
_CALL_REF = re.compile(r"^(?:[\w.]+:[\w.]+|[A-Za-z_][\w.-]*)$")


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


RunEnd = Literal["succeeded", "failed", "cancelled", "interrupted"]
_FINISHED: tuple[RunEnd, ...] = ("succeeded", "failed", "cancelled")  # an interrupted run can resume


class WorkflowFinishedEvent(_Strict):
    """A run of `workflow` ended with one of `status` ('wf', 'team/wf' or 'app/team/wf';
    a bare name means this application's team)."""

    workflow: str
    status: list[RunEnd] = Field(default_factory=lambda: list(_FINISHED), min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _short(cls, v: Any) -> Any:
        return {"workflow": v} if isinstance(v, str) else v

    @field_validator("workflow")
    @classmethod
    def _ref(cls, v: str) -> str:
        parts = v.split("/")
        if len(parts) > 3 or not all(re.match(NAME, p) for p in parts):
            raise ValueError(f"expected 'workflow', 'team/workflow' or 'app/team/workflow', got {v!r}")
        return v

    def target(self, app: str, team: str) -> tuple[str, str, str]:
        """(app, team, workflow) that the ref names, seen from a spec of `app`/`team`."""
        return workflow_ref(self.workflow, app, team)


class ModelEvent(_Strict):
    """A registry event: a new version of `name`, or `alias` moved to another version."""

    name: str = Field(pattern=NAME)
    event: Literal["version_registered", "alias_moved"] = "version_registered"
    alias: str | None = Field(default=None, pattern=NAME)

    @model_validator(mode="after")
    def _alias(self) -> ModelEvent:
        if self.event == "alias_moved" and not self.alias:
            raise ValueError("`event: alias_moved` needs `alias`")
        if self.event == "version_registered" and self.alias:
            raise ValueError("`alias` only goes with `event: alias_moved`")
        return self


class PredictionWindowEvent(_Strict):
    """`size` new records of a service's prediction log (after the watermark) are there."""

    service: str | None = Field(default=None, description="default: the agent's service")
    size: int = Field(ge=1, le=1_000_000)
    settle: float = Field(default=1.0, ge=0, description="records younger than this wait (s)")

    @field_validator("settle", mode="before")
    @classmethod
    def _settle(cls, v: Any) -> Any:
        return 0.0 if v in (0, "0") else parse_duration(v)


class MessageEvent(_Strict):
    """A message for this agent arrived (of `kind`, one of a list, or any)."""

    kind: str | list[str] | None = None

    def kinds(self) -> list[str] | None:
        return [self.kind] if isinstance(self.kind, str) else self.kind


class EventTrigger(_Strict):
    """Fires on something that happened; exactly one kind. Polled every `poll` seconds."""

    workflow_finished: WorkflowFinishedEvent | None = None
    model: ModelEvent | None = None
    prediction_window: PredictionWindowEvent | None = None
    message: MessageEvent | None = None
    poll: float = Field(default=1.0, description="seconds between checks")

    @field_validator("poll", mode="before")
    @classmethod
    def _poll(cls, v: Any) -> Any:
        return parse_duration(v)

    @model_validator(mode="after")
    def _one_kind(self) -> EventTrigger:
        kinds = [k for k in EVENT_KINDS if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(f"an event trigger needs exactly one of {', '.join(EVENT_KINDS)}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in EVENT_KINDS if getattr(self, k) is not None)


EVENT_KINDS = ("workflow_finished", "model", "prediction_window", "message")
TRIGGER_KINDS = ("interval", "cron", "date", "event")


class Trigger(_Strict):
    """When a sensor fires, or a workflow starts (`engine serve`): every `interval`, on a `cron`
    schedule (UTC), once at a `date` (ISO 8601; a date already past fires once at start, never
    twice), or on an `event`. One vocabulary, served by `scanflow.control`."""

    id: str | None = Field(default=None, pattern=NAME, description="default: derived from the content")
    interval: float | None = Field(default=None, description="seconds between fires")
    cron: str | None = Field(default=None, description="5 crontab fields, or 6 with seconds first; UTC")
    date: datetime | None = Field(default=None, description="ISO 8601; without an offset, UTC")
    event: EventTrigger | None = None
    params: dict[str, Any] | None = Field(
        default=None, description="a workflow trigger: the params of the run it starts")
    misfire: Literal["coalesce", "skip"] | None = Field(
        default=None,
        description="fires missed while the agent was down (interval, cron, date): `coalesce` "
        "(default) fires once at restart, `skip` does not fire",
    )

    @field_validator("interval", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> Any:
        return None if v is None else parse_duration(v)

    @field_validator("date", mode="before")
    @classmethod
    def _date(cls, v: Any) -> Any:
        if v is None or isinstance(v, datetime):
            return v
        if isinstance(v, date_type):  # YAML reads an unquoted 2026-12-01 as a date
            return datetime(v.year, v.month, v.day)
        if not isinstance(v, str):
            raise ValueError(f"expected an ISO 8601 date-time like '2026-12-01T03:00:00Z', got {v!r}")
        try:
            return datetime.fromisoformat(v.strip())
        except ValueError:
            raise ValueError(
                f"cannot read {v!r} as an ISO 8601 date-time (e.g. '2026-12-01T03:00:00Z')"
            ) from None

    @model_validator(mode="after")
    def _one_kind(self) -> Trigger:
        kinds = [k for k in TRIGGER_KINDS if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError("a trigger needs exactly one of `interval`, `cron`, `date`, `event`")
        if self.cron is not None:
            try:
                cron_trigger(self.cron)
            except ValueError as exc:
                raise ValueError(f"bad cron expression {self.cron!r}: {exc}") from None
        if self.date is not None:
            object.__setattr__(self, "date", _utc(self.date))
        if self.event is not None and self.misfire is not None:
            raise ValueError("`misfire` applies to interval, cron and date triggers (an event "
                             "trigger catches up from its cursor)")
        return self

    @property
    def misfire_policy(self) -> str:
        """`coalesce` unless the trigger says `skip`."""
        return self.misfire or "coalesce"

    @property
    def kind(self) -> str:
        return next(k for k in TRIGGER_KINDS if getattr(self, k) is not None)

    @property
    def key(self) -> str:
        """Stable id (given, or kind + digest of the content): durable state hangs on it (the
        misfire policy and a workflow run's params are not part of it: changing them keeps the
        trigger's last fire time and cursor)."""
        if self.id:
            return self.id
        body = self.model_dump(mode="json", exclude={"id", "misfire", "params"}, exclude_none=True)
        digest = hashlib.sha1(json.dumps(body, sort_keys=True).encode()).hexdigest()[:8]
        kind = self.kind if self.event is None else self.event.kind
        return f"{kind}-{digest}"

    def describe(self) -> str:
        if self.interval is not None:
            return f"every {self.interval:g}s"
        if self.cron is not None:
            return f"cron {self.cron!r} (UTC)"
        if self.date is not None:
            return f"once at {self.date.isoformat()}"
        assert self.event is not None
        ev = getattr(self.event, self.event.kind)
        return f"on {self.event.kind} {ev.model_dump(exclude_none=True)}"


class CallSpec(_Strict):
    """A rule or an actuator: 'module:function', or a name registered with @rule/@actuator."""

    func: str | Callable[..., Any]
    params: dict[str, Any] = Field(default_factory=dict)
    on_interrupted: Literal["resume", "abandon"] = Field(
        default="resume",
        description="an actuator cut off by a crash is called again with the same idempotency "
        "key (resume) or recorded as interrupted (abandon)",
    )

    @model_validator(mode="before")
    @classmethod
    def _short(cls, v: Any) -> Any:
        return {"func": v} if isinstance(v, str) or callable(v) else v

    @field_validator("func")
    @classmethod
    def _callable_path(cls, v: Any) -> Any:
        if isinstance(v, str) and not _CALL_REF.match(v):
            raise ValueError(f"expected 'package.module:function' or a registered name, got {v!r}")
        return v


class SensorSpec(_Strict):
    """What an agent watches. `func` makes observations; without it, each fire of a trigger
    (the event, or the scheduled time) is itself the observation."""

    name: str = Field(pattern=NAME)
    func: str | Callable[..., Any] | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    trigger: Trigger | None = Field(default=None, exclude=True, description="short for one trigger")
    triggers: list[Trigger] = Field(default_factory=list)
    rule: CallSpec | None = None
    actuators: list[CallSpec] = Field(default_factory=list)

    _callable_path = field_validator("func")(CallSpec._callable_path.__func__)  # type: ignore[attr-defined]

    @model_validator(mode="after")
    def _triggers(self) -> SensorSpec:
        again = bool(self.triggers) and self.triggers[0] is self.trigger  # validated before
        if self.trigger is not None and "triggers" in self.model_fields_set and not again:
            raise ValueError("give `trigger` (one) or `triggers` (a list), not both")
        if self.trigger is not None and not again:
            self.triggers = [self.trigger]
        elif "triggers" not in self.model_fields_set:
            self.triggers = [Trigger(interval=5.0)]  # the historical default
        seen: dict[str, int] = {}
        for i, t in enumerate(self.triggers):
            if t.params is not None:
                raise ValueError(f"triggers[{i}].params: only a workflow trigger takes `params` "
                                 "(a sensor has its own)")
            if t.key in seen:
                raise ValueError(f"triggers[{i}] repeats triggers[{seen[t.key]}] (id {t.key!r})")
            seen[t.key] = i
        self.trigger = self.triggers[0] if self.triggers else None
        return self


class AgentSpec(_Strict):
    role: Literal["monitor", "analyzer", "planner", "executor", "custom"]
    service: str | None = None
    description: str = ""
    params: dict[str, Any] = Field(default_factory=dict)
    imports: list[str] = Field(
        default_factory=list, description="modules (from the app folder) whose @sensor/@rule/@actuator "
        "functions this agent names",
    )
    max_attempts: int | None = Field(
        default=None, ge=1, le=1000,
        description="tries at handling one message (sensor, rule and actuators) before it is "
        "dead-lettered; default: the `agent_max_attempts` setting (5)",
    )
    retry_backoff: float | None = Field(
        default=None, description="seconds before the 2nd try of a failed message, doubling each "
        "try; default: the `agent_retry_backoff` setting (1s)",
    )
    sensors: list[SensorSpec] = Field(min_length=1)

    @field_validator("retry_backoff", mode="before")
    @classmethod
    def _backoff(cls, v: Any) -> Any:
        return None if v is None else parse_duration(v)

    @field_validator("imports")
    @classmethod
    def _modules(cls, v: list[str]) -> list[str]:
        bad = [m for m in v if not re.match(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$", m)]
        if bad:
            raise ValueError(f"not module names: {bad}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> AgentSpec:
        problems = []
        names: dict[str, int] = {}
        listeners: list[tuple[str, set[str] | None]] = []
        for i, s in enumerate(self.sensors):
            if s.name in names:
                problems.append(f"sensors[{i}].name: duplicate sensor name {s.name!r} "
                                f"(also sensors[{names[s.name]}])")
            names.setdefault(s.name, i)
            for j, t in enumerate(s.triggers):
                where = f"sensors[{i}].triggers[{j}].event"
                if t.event is None:
                    continue
                if t.event.prediction_window is not None and not (
                    t.event.prediction_window.service or self.service
                ):
                    problems.append(f"{where}.prediction_window.service: needed (the agent has no "
                                    "`service`)")
                if t.event.message is not None:
                    kinds = t.event.message.kinds()
                    mine = set(kinds) if kinds is not None else None
                    for other, theirs in listeners:
                        if mine is None or theirs is None or mine & theirs:
                            problems.append(f"{where}.message: overlaps {other} (a message is handled "
                                            "by one sensor: give each its own kinds)")
                    listeners.append((f"{where}.message", mine))
        if problems:
            raise ValueError("; ".join(problems))
        return self


class Application(_Strict):
    app: str = Field(pattern=NAME)
    team: str = Field(pattern=NAME)
    description: str = ""
    models: list[str] = Field(default_factory=list, description="models this application registers")
    workflows: dict[str, Workflow] = Field(default_factory=dict)
    services: dict[str, Service] = Field(default_factory=dict)
    agents: dict[str, AgentSpec] = Field(default_factory=dict)
    code_paths: list[str] = Field(
        default_factory=list,
        description="Python modules (.py files or package folders) outside the app folder that its "
        "steps import, relative to the spec file, e.g. ../shared_utils.py: importable by name in "
        "every step, and shipped with the app where steps run on other machines (ray backend)",
    )
    base_dir: Path = Field(default=Path("."), exclude=True, description="folder of the spec file")
    source: str | None = Field(default=None, exclude=True)

    @field_validator("code_paths")
    @classmethod
    def _portable_code_paths(cls, v: list[str]) -> list[str]:
        problems = []
        for i, entry in enumerate(v):
            p = Path(entry)
            if not entry.strip() or p.is_absolute():
                problems.append(f"code_paths[{i}]: {entry!r} must be a path relative to the spec "
                                "file (an absolute path does not exist on the cluster's machines)")
            elif p.suffix not in ("", ".py"):
                problems.append(f"code_paths[{i}]: {entry!r} is neither a .py file nor a package folder")
        names = [Path(e).stem for e in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            problems.append(f"code_paths: two entries import as {', '.join(dup)}")
        if problems:
            raise ValueError("; ".join(problems))
        return v

    def code_modules(self) -> dict[str, Path]:
        """`code_paths` resolved against the spec's folder: import name -> file or folder."""
        return {Path(e).stem: (self.base_dir / e).resolve() for e in self.code_paths}

    def workflow(self, name: str) -> Workflow:
        try:
            return self.workflows[name]
        except KeyError:
            known = ", ".join(sorted(self.workflows)) or "none"
            raise KeyError(f"no workflow {name!r} in app {self.app!r} (known: {known})") from None

    def registered_models(self) -> set[str]:
        names = set(self.models)
        for wf in self.workflows.values():
            for st in wf.steps:
                names.update(st.registers)
        return names
