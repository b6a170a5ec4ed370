"""The deployer interface every serving backend implements (local gunicorn now, Ray Serve later).

Agents and the CLI only talk to this interface, so switching `backend: ray` changes no
calling code. Every method returns or records the store's `Deployment` row, the one place
where the control plane reads what runs.
"""

from __future__ import annotations

import getpass
import os
import re
from abc import ABC, abstractmethod
from typing import Any

from scanflow.settings import Settings
from scanflow.store.schema import Deployment


class UnknownService(KeyError):
    """No deployment of that name in the store."""

    def __str__(self) -> str:  # KeyError would print the repr of its argument
        return str(self.args[0]) if self.args else "unknown service"


SERVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def check_service(service: str | None = None, replicas: int | None = None,
                  most: int | None = None) -> None:
    """Refuse a service name or replica count no backend can use, or more replicas than the
    platform allows (`most`: `Settings.max_replicas`) - ValueError: the CLI's exit 2, a 4xx."""
    if service is not None and not SERVICE_NAME.match(service):
        raise ValueError(f"service name {service!r}: use letters, digits, '.', '_', '-'")
    if replicas is not None and replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    if replicas is not None and most is not None and replicas > most:
        raise ValueError(f"{replicas} replicas is more than this platform allows ({most}; "
                         "SCANFLOW_MAX_REPLICAS sets it)")


class NotOnThisBackend(ValueError):
    """An action the chosen serving backend does not offer (the CLI exits 2 with the message)."""


def default_actor() -> str:
    """Who the audit trail names when nobody is given: `SCANFLOW_ACTOR`, else the OS user."""
    try:
        return os.environ.get("SCANFLOW_ACTOR") or getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


class Deployer(ABC):
    """Runs model services: deploy, scale, roll out a new model version, stop, inspect."""

    settings: Settings
    actor: str  # who the audit trail says acted: a person at the CLI, or an agent's name

    @abstractmethod
    def deploy(
        self,
        service: str,
        *,
        app: str,
        team: str,
        model: str,
        alias: str = "champion",
        replicas: int = 1,
        port: int = 0,
    ) -> Deployment:
        """Serve `models:/<model>@<alias>` (resolved to a version now) as `service`."""

    @abstractmethod
    def scale(self, service: str, replicas: int, *, reason: str = "") -> Deployment:
        """Change the replica count at run time without failing a request."""

    @abstractmethod
    def rollout(self, service: str, version: str | None = None, *, reason: str = "") -> Deployment:
        """Serve `version` (default: what the alias points to now) on every replica;
        a no-op when it is already served."""

    @abstractmethod
    def rollback(self, service: str, *, reason: str = "") -> Deployment:
        """Serve the version served before the last rollout again (one step)."""

    @abstractmethod
    def set_canary(self, service: str, version: str | None, share: float = 0.1, *,
                   reason: str = "") -> Deployment:
        """Let `version` answer `share` of the requests (None stops the canary)."""

    @abstractmethod
    def set_shadow(self, service: str, version: str | None, *, reason: str = "") -> Deployment:
        """Let `version` score a copy of every request, logged, not returned (None stops)."""

    @abstractmethod
    def stop(self, service: str) -> None:
        """Stop every process of the service and mark it stopped."""

    @abstractmethod
    def status(self, service: str) -> dict[str, Any]:
        """Liveness, replicas and versions served right now."""

    def warm_up(self, service: str) -> None:  # noqa: B027 - optional: most backends need nothing
        """A rollout of `service` is likely soon (a retrain started): get ready for it now,
        e.g. start the process that checks a new version loads. Optional."""

    def cpu_counters(self, service: str) -> dict[int, dict[str, int | float | None]]:
        """Each serving replica's CPU counters now (CPU-seconds used, quota in CPUs, scheduler
        periods and throttled periods), for rates over a window: the planner tells a replica
        held by its quota from one starved by a busy machine. {} where nothing is measured."""
        return {}

    def resize(self, service: str, cpus: float, *, reason: str = "") -> Deployment:
        """Change the CPU quota of every replica, running and future, without a restart
        (`kubectl set resources`, in place). Optional: backends that cannot say so."""
        raise NotImplementedError(f"{type(self).__name__} cannot change a running service's resources")

    @abstractmethod
    def url(self, service: str) -> str:
        """Base URL of the service (`<url>/predict`)."""
