"""What rollout, rollback, canary and shadow change in a service's config, the same on every
serving backend: each backend only decides how its replicas take the new config (gunicorn's
SIGHUP locally, a new Serve deployment on Ray). Each change names its events' kind
(`<kind>_started`, `_completed`, `_failed`) and the evidence they carry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from scanflow.serving.config import CanaryConfig, ServiceConfig
from scanflow.tracking import Tracker


@dataclass(frozen=True)
class Change:
    kind: str  # rollout | rollback | canary | shadow
    apply: Callable[[ServiceConfig], None]  # edits a copy of the config in place
    payload: dict[str, Any]  # what the events record


def rollout(cfg: ServiceConfig, version: str, reason: str = "") -> Change | None:
    """Serve `version` as the champion; None when it already is."""
    old, new = cfg.model_version, str(version)
    if new == old:
        return None

    def apply(c: ServiceConfig) -> None:
        c.previous_version, c.model_version = old, new
        if c.canary and c.canary.version == new:
            c.canary = None  # the challenger won: it is the champion now
        if c.shadow_version == new:
            c.shadow_version = None

    return Change("rollout", apply, {"from_version": old, "to_version": new, "reason": reason})


def rollback(service: str, cfg: ServiceConfig, tracker: Tracker, reason: str = "") -> Change:
    """Back to the version served before the last rollout. The registry alias follows when it
    still points at the version rolled back, so an agent rolling out "the champion" does not
    bring the bad version back (done here, before the replicas change)."""
    prev, bad = cfg.previous_version, cfg.model_version
    if not prev:
        raise ValueError(f"service {service!r}: no previous version to roll back to")
    alias_moved = False
    try:
        if tracker.version_by_alias(cfg.model_name, cfg.alias) == bad:
            tracker.set_alias(cfg.model_name, cfg.alias, prev)
            alias_moved = True
    except ValueError:
        pass  # the alias is gone: serving still rolls back

    def apply(c: ServiceConfig) -> None:
        c.previous_version, c.model_version = bad, prev
        c.canary = None

    return Change("rollback", apply, {"from_version": bad, "to_version": prev, "reason": reason,
                                      "alias": cfg.alias, "alias_moved": alias_moved})


def canary(service: str, cfg: ServiceConfig, version: str | None, share: float,
           reason: str = "") -> Change:
    """`version` answers `share` of the requests (None stops the canary)."""
    new = CanaryConfig(version=str(version), share=share) if version is not None else None
    if new is not None and new.version == cfg.model_version:
        raise ValueError(f"version {version} is already the champion of {service!r}")

    def apply(c: ServiceConfig) -> None:
        c.canary = new

    return Change("canary", apply, {"version": new.version if new else None,
                                    "share": new.share if new else 0.0, "reason": reason})


def shadow(service: str, cfg: ServiceConfig, version: str | None, reason: str = "") -> Change:
    """`version` scores a copy of every request, logged, never returned (None stops)."""
    v = str(version) if version is not None else None
    if v is not None and v == cfg.model_version:
        raise ValueError(f"version {v} is already the champion of {service!r}")

    def apply(c: ServiceConfig) -> None:
        c.shadow_version = v

    return Change("shadow", apply, {"version": v, "reason": reason})
