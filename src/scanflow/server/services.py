"""`/api/v1/services`: deploy a registered application's service, see services and their
replicas, and every model operation (scale, resize, rollout, rollback, promote, canary, shadow,
stop). Each operation goes through the control layer (under the service's lease, recorded as
done by the caller) exactly as the CLI's does."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends

from scanflow.control.leases import LeaseBusy
from scanflow.control.operations import Actor, ModelOps
from scanflow.server.auth import Caller, authorize, readable_teams
from scanflow.server.errors import ERROR_RESPONSES, ApiError
from scanflow.server.models import (
    CanaryIn,
    DeployIn,
    Done,
    PromoteIn,
    PromoteOut,
    ReasonIn,
    ResizeIn,
    RolloutIn,
    ScaleIn,
    ServiceOut,
    ShadowIn,
)
from scanflow.server.platform import Platform, platform
from scanflow.spec.policy import Policy
from scanflow.store.identity import Identity

router = APIRouter(prefix="/api/v1/services", tags=["services"], responses=ERROR_RESPONSES)
Plat = Annotated[Platform, Depends(platform)]


def actor_of(who: Identity) -> Actor:
    """The audit trail's name for the caller: a person, or an agent acting with its own token."""
    if who.kind == "agent":
        return Actor("agent", who.user, f"agent:{who.user}", "server")
    return Actor.person(who.user, source="server")


def _deployment(plat: Platform, who: Identity, service: str, action: str) -> Any:
    dep = plat.store.get_deployment(service)
    if dep is None:  # named with those the caller may see, as the CLI names them locally
        teams = readable_teams(who)
        known = ", ".join(d.service for d in plat.store.list_deployments()
                          if teams is None or d.team in teams) or "none deployed"
        raise ApiError(404, "not_found", f"no service {service!r} (known: {known})")
    authorize(who, action, dep.team, service)
    return dep


def _call(action: Callable[[], Any]) -> Any:
    """Bad input is a 4xx naming it; a service another controller holds is a 409 to retry."""
    try:
        return action()
    except LeaseBusy as exc:
        raise ApiError(409, "lease_busy", f"{exc}; try again later") from exc
    except KeyError as exc:
        raise ApiError(404, "not_found", str(exc).strip("'\"")) from exc
    except ValueError as exc:
        raise ApiError(409, "conflict", str(exc).strip("'\"")) from exc


def service_out(plat: Platform, who: Identity, dep: Any) -> ServiceOut:
    live = plat.deployer(who).status(dep.service) if dep.status == "running" else {}
    fields = {k: v for k, v in live.items() if k not in {"service", "app", "team"}}
    fields.setdefault("status", dep.status)
    for k in ("model_name", "alias", "model_version", "previous_version", "replicas"):
        fields.setdefault(k, getattr(dep, k))
    return ServiceOut(service=dep.service, app=dep.app, team=dep.team, **fields)


@router.get("", response_model=list[ServiceOut])
def list_services(who: Caller, plat: Plat) -> list[ServiceOut]:
    """The services of the teams you may read, with their replicas and versions."""
    teams = readable_teams(who)
    return [service_out(plat, who, d) for d in plat.store.list_deployments()
            if teams is None or d.team in teams]


@router.get("/{service}", response_model=ServiceOut)
def status(service: str, who: Caller, plat: Plat) -> ServiceOut:
    return service_out(plat, who, _deployment(plat, who, service, "read"))


@router.post("/{service}/deploy", response_model=ServiceOut, status_code=201)
def deploy(service: str, body: DeployIn, who: Caller, plat: Plat) -> ServiceOut:
    """Start a service of a registered application (or redeploy it)."""
    spec, team = plat.spec_of(body.app, body.team)
    authorize(who, "deploy", team, service)
    if service not in spec.services:
        raise ApiError(404, "not_found", f"no service {service!r} in app {body.app!r} "
                       f"(known: {', '.join(sorted(spec.services))})")
    known = plat.store.get_deployment(service)
    if known is not None and known.team != team:
        raise ApiError(409, "conflict", f"service {service!r} belongs to team {known.team!r}")
    svc = spec.services[service]
    _call(lambda: plat.deployer(who).deploy(
        service, app=spec.app, team=team, model=svc.model, alias=svc.alias,
        replicas=svc.replicas, port=svc.port, batching=svc.batching, resources=svc.resources,
        policy=svc.policy))
    dep = plat.store.get_deployment(service)
    return service_out(plat, who, dep)


def _operate(plat: Platform, who: Identity, service: str, action: str,
             op: Callable[[ModelOps, Actor], Any]) -> Any:
    _deployment(plat, who, service, action)
    return _call(lambda: op(ModelOps(plat.deployer(who), plat.store), actor_of(who)))


def _done(service: str, operation: str, outcome: Any) -> Done:
    dep = outcome.deployment
    return Done(service=service, operation=operation, model_version=dep.model_version if dep else None,
                previous_version=dep.previous_version if dep else None,
                replicas=dep.replicas if dep else None)


@router.post("/{service}/scale", response_model=Done)
def scale(service: str, body: ScaleIn, who: Caller, plat: Plat) -> Done:
    done = _operate(plat, who, service, "scale",
                    lambda ops, me: ops.scale(service, body.replicas, actor=me))
    return _done(service, "scale", done)


@router.post("/{service}/resize", response_model=Done)
def resize(service: str, body: ResizeIn, who: Caller, plat: Plat) -> Done:
    done = _operate(plat, who, service, "resize",
                    lambda ops, me: ops.resize(service, body.cpus, actor=me, reason=body.reason))
    out = _done(service, "resize", done)
    out.detail = {"cpus": done.after, "changed": done.changed}
    return out


@router.post("/{service}/rollout", response_model=Done)
def rollout(service: str, body: RolloutIn, who: Caller, plat: Plat) -> Done:
    done = _operate(plat, who, service, "rollout",
                    lambda ops, me: ops.rollout(service, body.version, actor=me, reason=body.reason))
    return _done(service, "rollout", done)


@router.post("/{service}/rollback", response_model=Done)
def rollback(service: str, body: ReasonIn, who: Caller, plat: Plat) -> Done:
    done = _operate(plat, who, service, "rollback",
                    lambda ops, me: ops.rollback(service, actor=me, reason=body.reason))
    return _done(service, "rollback", done)


@router.post("/{service}/canary", response_model=Done)
def canary(service: str, body: CanaryIn, who: Caller, plat: Plat) -> Done:
    done = _operate(plat, who, service, "canary",
                    lambda ops, me: ops.canary(service, body.version, body.share, actor=me))
    return _done(service, "canary", done)


@router.post("/{service}/shadow", response_model=Done)
def shadow(service: str, body: ShadowIn, who: Caller, plat: Plat) -> Done:
    done = _operate(plat, who, service, "shadow",
                    lambda ops, me: ops.shadow(service, body.version, actor=me))
    return _done(service, "shadow", done)


@router.post("/{service}/stop", response_model=Done)
def stop(service: str, who: Caller, plat: Plat) -> Done:
    _deployment(plat, who, service, "stop")
    _call(lambda: plat.deployer(who).stop(service))
    return Done(service=service, operation="stop")


@router.post("/{service}/promote", response_model=PromoteOut)
def promote(service: str, body: PromoteIn, who: Caller, plat: Plat) -> PromoteOut:
    """Offer a version: the service policy's gate judges it; `force` (owner) promotes past a
    failed gate, and is recorded."""
    from scanflow.agents.promotion import offer  # the agents' gate (MLflow, numpy)

    dep = _deployment(plat, who, service, "promote")
    if body.force:
        authorize(who, "force", dep.team, service)
    policy = Policy()
    row = plat.store.applications.get_app(dep.app, dep.team)
    if row is not None:
        spec, _ = plat.spec_of(dep.app, dep.team)
        if service in spec.services:
            policy = spec.services[service].policy or Policy()
    res = _call(lambda: offer(plat.settings, plat.store, plat.deployer(who), service, body.version,
                              policy=policy, force=body.force, reason=body.reason))
    return PromoteOut(service=service, version=body.version, promoted=res.promoted,
                      forced=res.forced, passed=res.gate.passed,
                      champion_version=res.champion_version, served_version=res.served_version,
                      reasons=[*res.gate.reasons, *res.notes])
