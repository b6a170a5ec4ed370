"""The model operations: the one path for every change to what a service serves.

`promote`, `rollout`, `rollback`, `scale`, `canary` and `shadow` are the only code that moves a
registry alias or asks a `Deployer` to change a service. Every one of them

- holds the service's lease (:mod:`scanflow.control.leases`) for its whole duration, so two
  controllers - a person at the CLI, the planner, an executor agent - never act on one service at
  once; a lease held elsewhere makes it wait `lease_wait_s`, then raise `LeaseBusy` having
  changed nothing;
- records one event saying who acted (`person:<user>`, `agent:<name>`, `policy:<name>`), why,
  and the evidence, next to the deployer's own `scaled` / `rollout_completed` / ... events;
- is safe to call again after a crash or a failed try: a call with the same `key` (an agent's
  action key) records its event once, and a change already made is not made twice.

They take a `Deployer`, a `Store` and a model registry (the `Tracker`) as parameters and build
no backend themselves, so a Ray deployer plugs in unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from scanflow.control.leases import lease, process_holder, service_lease
from scanflow.jsonsafe import json_safe
from scanflow.serving.backend import Deployer, UnknownService
from scanflow.spec.access import NotAllowed
from scanflow.store import Store
from scanflow.store.schema import Deployment

log = logging.getLogger("scanflow.control.operations")

ActorKind = Literal["person", "agent", "policy"]
#: The kind of the event each operation records (the deployer records its own as well).
EVENTS = {"promote": "promoted", "rollout": "rolled_out", "rollback": "rolled_back",
          "scale": "replicas_set", "canary": "canary_set", "shadow": "shadow_set",
          "resize": "resources_set"}
_DEDUPE_WINDOW = 200  # recent events of the source searched for a retried call's record


class ModelRegistry(Protocol):
    """What the operations need from the model registry (the `Tracker` provides it)."""

    def alias_version(self, model: str, alias: str) -> str | None: ...

    def set_alias(self, model: str, alias: str, version: str) -> None: ...

    def model_version(self, model: str, version: str) -> Any: ...


@dataclass(frozen=True)
class Actor:
    """Who acts, as the audit trail names them, and the lease holder they act as."""

    kind: ActorKind
    name: str
    holder: str
    source: str = "control"  # the source column of the events it records
    # The identity it acts as (an agent's token's user: `agent:<team>.<agent>`), recorded on
    # its events; and the check of that identity's roles, (action, team, service) -> raises
    # `NotAllowed`, made on the deployment read under the lease. None: not checked here (a
    # person's roles are checked by the server or the CLI before the call).
    by: str | None = None
    authorize: Callable[[str, str, str | None], None] | None = field(default=None, compare=False)

    @property
    def who(self) -> str:
        return f"{self.kind}:{self.name}"

    @classmethod
    def person(cls, user: str, *, source: str = "cli") -> Actor:
        """A person (at the CLI, or through `promotion.offer`)."""
        return cls("person", user, f"person:{user}", source)

    @classmethod
    def agent(cls, name: str) -> Actor:
        """An agent acting on a rule of its spec (one process of it holds the lease)."""
        return cls("agent", name, process_holder(name), name)

    @classmethod
    def policy(cls, name: str) -> Actor:
        """An agent carrying out a service policy's judgement (the planner)."""
        return cls("policy", name, process_holder(name), name)


class ServiceChanged(ValueError):
    """The service no longer serves the version the caller judged against."""


@dataclass
class Outcome:
    """What an operation did: `changed` is False when the service was already so."""

    operation: str
    service: str | None
    changed: bool
    before: Any = None
    after: Any = None
    event_id: int | None = None
    deployment: Deployment | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"operation": self.operation, "service": self.service, "changed": self.changed,
                "before": self.before, "after": self.after, "event_id": self.event_id}


def check_registered(registry: ModelRegistry, model: str, version: str) -> None:
    """Raise ValueError naming the model when `version` is not in the registry."""
    try:
        registry.model_version(model, str(version))
    except Exception as exc:  # noqa: BLE001 - MLflow's own message names no model
        raise ValueError(f"models:/{model}/{version} is not registered") from exc


def record_once(store: Store, actor: Actor, kind: str, service: str | None, key: str | None,
                payload: dict[str, Any]) -> int:
    """Add the event, unless a call with the same `key` recorded it already (a retry or a resume
    after a crash); returns the event's id either way."""
    if key is not None:
        for e in store.recent_events(actor.source, _DEDUPE_WINDOW):
            if e.kind == kind and e.payload.get("action") == key:
                return int(e.id)
    body = {**payload, "actor": actor.who, **({"by": actor.by} if actor.by else {}),
            **({"action": key} if key is not None else {})}
    # `Store.add_event` takes source, kind and service as arguments: evidence keys so named are kept
    body = {f"{k}_" if k in ("source", "kind", "service") else k: v for k, v in body.items()}
    return int(store.add_event(actor.source, kind, service, **json_safe(body)).id)


class ModelOps:
    """The operations on one deployer, store and registry, each under the service's lease."""

    def __init__(self, deployer: Deployer, store: Store, registry: ModelRegistry | None = None, *,
                 lease_ttl_s: float = 30.0, lease_wait_s: float = 10.0) -> None:
        self.deployer = deployer
        self.store = store
        self.registry = registry
        self.lease_ttl_s = lease_ttl_s
        self.lease_wait_s = lease_wait_s

    # -- shared plumbing ----------------------------------------------------------------------
    def _deployment(self, service: str) -> Deployment:
        dep = self.store.get_deployment(service)
        if dep is None:
            raise UnknownService(f"unknown service {service!r}: not deployed")
        return dep

    @contextmanager
    def _leased(self, service: str, actor: Actor, operation: str) -> Iterator[Deployment]:
        """The service's lease for the block, and its deployment as read under the lease."""
        dep = self._deployment(service)  # an unknown service is refused before any lease is taken
        if actor.authorize is not None:  # and one the actor may not touch, too
            actor.authorize(operation, dep.team, service)
        with service_lease(self.store, service, actor.holder, ttl_s=self.lease_ttl_s,
                           wait_s=self.lease_wait_s, purpose=f"{operation} by {actor.who}"):
            yield self._deployment(service)

    def _record(self, operation: str, actor: Actor, service: str | None, key: str | None,
                reason: str, evidence: dict[str, Any] | None, record_as: str | None,
                **payload: Any) -> int:
        return record_once(self.store, actor, record_as or EVENTS[operation], service, key,
                           {**(evidence or {}), "reason": reason, **payload})

    # -- the operations -----------------------------------------------------------------------
    def scale(self, service: str, replicas: int, *, actor: Actor, reason: str = "",
              evidence: dict[str, Any] | None = None, key: str | None = None,
              record_as: str | None = None) -> Outcome:
        """Run `replicas` replicas of the service (no-op when it already does)."""
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        with self._leased(service, actor, "scale") as dep:
            before = int(dep.replicas)
            if before == replicas:  # a replay after a crash, or someone did it
                return Outcome("scale", service, False, before, before, deployment=dep)
            new = self.deployer.scale(service, replicas, reason=reason)
            eid = self._record("scale", actor, service, key, reason, evidence, record_as,
                               from_replicas=before, replicas=int(new.replicas))
        return Outcome("scale", service, True, before, int(new.replicas), eid, new)

    def resize(self, service: str, cpus: float, *, actor: Actor, reason: str = "",
               evidence: dict[str, Any] | None = None, key: str | None = None) -> Outcome:
        """Give every replica of the service a CPU quota of `cpus`, in place (no restart)."""
        if not cpus > 0:
            raise ValueError(f"cpus must be > 0, got {cpus}")
        with self._leased(service, actor, "resize") as dep:
            quotas = {c.get("cpus") for c in self.deployer.cpu_counters(service).values()}
            before = quotas.pop() if len(quotas) == 1 else None  # what the replicas hold now
            if before is not None and abs(float(before) - cpus) < 1e-9:
                return Outcome("resize", service, False, before, before, deployment=dep)
            new = self.deployer.resize(service, cpus, reason=reason)
            eid = self._record("resize", actor, service, key, reason, evidence, None,
                               from_cpus=before, cpus=cpus)
        return Outcome("resize", service, True, before, cpus, eid, new)

    def rollout(self, service: str, version: str | None = None, *, actor: Actor, reason: str = "",
                evidence: dict[str, Any] | None = None, key: str | None = None) -> Outcome:
        """Serve `version` (default: what the service's alias points to) on every replica."""
        with self._leased(service, actor, "rollout") as dep:
            before = dep.model_version
            new = self.deployer.rollout(service, None if version is None else str(version), reason=reason)
            changed = str(new.model_version) != str(before)
            eid = self._record("rollout", actor, service, key, reason, evidence, None,
                               from_version=before, to_version=new.model_version) if changed else None
        return Outcome("rollout", service, changed, before, new.model_version, eid, new)

    def rollback(self, service: str, *, actor: Actor, reason: str = "",
                 evidence: dict[str, Any] | None = None, expect_serving: str | None = None,
                 key: str | None = None, approved_by: str | None = None) -> Outcome:
        """Serve the version served before the last rollout again (the deployer moves the alias
        back too). With `expect_serving`, only if the service still serves that version: a
        retry after the rollback happened, or a service someone else moved, is left alone."""
        with self._leased(service, actor, "rollback") as dep:
            before = dep.model_version
            if expect_serving is not None and str(before) != str(expect_serving):
                return Outcome("rollback", service, False, expect_serving, before, deployment=dep)
            new = self.deployer.rollback(service, reason=reason)
            eid = self._record("rollback", actor, service, key, reason, evidence, None,
                               from_version=before, to_version=new.model_version,
                               approved_by=approved_by or actor.who)
        return Outcome("rollback", service, True, before, new.model_version, eid, new)

    def canary(self, service: str, version: str | None, share: float = 0.1, *, actor: Actor,
               reason: str = "", key: str | None = None) -> Outcome:
        """Let `version` answer `share` of the requests (None stops the canary)."""
        with self._leased(service, actor, "canary") as dep:
            before = dep.canary_version
            new = self.deployer.set_canary(service, version, share, reason=reason)
            eid = self._record("canary", actor, service, key, reason, None, None, from_version=before,
                               version=new.canary_version, share=new.canary_share)
        return Outcome("canary", service, before != new.canary_version, before, new.canary_version, eid, new)

    def shadow(self, service: str, version: str | None, *, actor: Actor, reason: str = "",
               key: str | None = None) -> Outcome:
        """Let `version` score a copy of every request, logged, not returned (None stops)."""
        with self._leased(service, actor, "shadow") as dep:
            before = dep.shadow_version
            new = self.deployer.set_shadow(service, version, reason=reason)
            eid = self._record("shadow", actor, service, key, reason, None, None, from_version=before,
                               version=new.shadow_version)
        return Outcome("shadow", service, before != new.shadow_version, before, new.shadow_version, eid, new)

    def promote(self, service: str | None, candidate: str, *, actor: Actor,
                evidence: dict[str, Any] | None = None, force: bool = False, reason: str = "",
                model: str | None = None, alias: str | None = None, expect_serving: str | None = None,
                previous: str | None = None, approved_by: str | None = None, key: str | None = None,
                rollout: bool = True) -> Outcome:
        """Point the service's alias at `candidate` and roll it out, recorded as `promoted`.

        The version must be registered; under the lease, the service must still serve
        `expect_serving` (what the caller judged the candidate against). Evidence whose
        `passed` is False (a gate said no) is refused unless `force`, and the record says so.
        `previous` is the alias's version before the first try (for a resumed call). Without a
        service, `model`'s alias moves under a lease of the model, and nothing rolls out."""
        if self.registry is None:
            raise ValueError("promote needs a model registry")
        forced = (evidence or {}).get("passed") is False
        if forced and not force:
            raise ValueError(f"version {candidate} did not pass the gate; force it to overrule")
        if service is not None:
            known = self._deployment(service)
            model, alias = model or known.model_name, alias or known.alias
            if forced and actor.authorize is not None:
                actor.authorize("force", known.team, service)
        elif actor.authorize is not None:  # a model alone names no team to check against
            raise NotAllowed(f"{actor.by or actor.who} promotes through a service of its team only")
        if model is None:
            raise ValueError("promote needs a service or a model")
        alias = alias or "champion"
        candidate = str(candidate)
        check_registered(self.registry, model, candidate)
        with self._promotion_lease(service, model, actor) as dep:
            served = None if dep is None else str(dep.model_version)
            if expect_serving is not None and served is not None and served != str(expect_serving):
                raise ServiceChanged(
                    f"{service} changed while the candidate was judged (it serves version "
                    f"{served} now, not {expect_serving})")
            now = self.registry.alias_version(model, alias)  # None if the alias is new
            before = now if previous is None else previous
            serves = dep is None or not rollout or str(dep.model_version) == candidate
            if now != candidate:
                self.registry.set_alias(model, alias, candidate)
            elif str(before) == candidate and serves:  # nothing to do, nothing to record
                return Outcome("promote", service, False, before, candidate, deployment=dep)
            elif str(before) == candidate and dep is not None:  # the alias moved, the service not
                before = dep.model_version
            eid = self._record("promote", actor, service, key, reason, evidence, None, model=model,
                               alias=alias, version=candidate, previous_version=before, forced=forced,
                               approved_by=approved_by or actor.who)
            new = dep
            if rollout and service is not None:
                why = f"{reason} ({approved_by or actor.who})" if reason else (approved_by or actor.who)
                new = self.deployer.rollout(service, candidate, reason=why)
        return Outcome("promote", service, True, before, candidate, eid, new)

    @contextmanager
    def _promotion_lease(self, service: str | None, model: str, actor: Actor) -> Iterator[Deployment | None]:
        if service is not None:
            with self._leased(service, actor, "promote") as dep:
                yield dep
            return
        with lease(self.store, f"model:{model}", actor.holder, ttl_s=self.lease_ttl_s,
                   wait_s=self.lease_wait_s, purpose=f"promote by {actor.who}"):
            yield None


__all__ = ["EVENTS", "Actor", "ModelOps", "ModelRegistry", "Outcome", "ServiceChanged", "check_registered",
           "record_once"]
