"""The one place that builds backends: the engine, deployer, tracker and store that settings
choose (`SCANFLOW_BACKEND`, `backend:`), like MLflow picks a store from its URI or Dagster its
storage from dagster.yaml. Everything else types against the interfaces (`Engine`, `Deployer`,
`Tracker`, `Store`) and never names a concrete class, so adding a backend changes only here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from scanflow.settings import Settings
from scanflow.store import Store
from scanflow.store.signing import MessageSigner, load_or_create_key

if TYPE_CHECKING:
    from scanflow.engine import Engine
    from scanflow.serving import Deployer
    from scanflow.tracking import Tracker

BACKENDS = ("local", "ray")  # what `SCANFLOW_BACKEND` may name today
COMING: dict[str, str] = {}  # backends named but not built yet: why they are refused


class UnknownBackend(ValueError):
    """`SCANFLOW_BACKEND` names no backend this scanflow has, or one the other settings
    cannot run (the CLI exits 2 with the message)."""


def backend_of(settings: Settings) -> str:
    """The backend settings name, refused with the allowed values when unknown, or with what
    to set when the rest of the settings cannot serve it."""
    name = settings.backend.strip().lower()
    if name not in BACKENDS:
        why = f" ({COMING[name]})" if name in COMING else ""
        raise UnknownBackend(f"unknown backend {settings.backend!r} in SCANFLOW_BACKEND{why}; "
                             f"allowed: {', '.join(BACKENDS)}")
    if name == "ray":
        _check_shared_state(settings)
    return name


def _check_shared_state(settings: Settings) -> None:
    """The ray backend's steps run on other machines, which share no disk with this one: the
    store and the tracker must be servers every node reaches."""
    if not settings.store.startswith(("postgresql", "postgres")):
        raise UnknownBackend(
            f"the ray backend needs a shared store, not {settings.store.split(':', 1)[0]} (a "
            "file on this machine that the cluster's nodes cannot reach): set "
            "SCANFLOW_STORE_URL to a PostgreSQL URL, e.g. postgresql+psycopg://user@db-host:5432/scanflow")
    if not settings.tracking.startswith(("http://", "https://")):
        raise UnknownBackend(
            f"the ray backend needs an MLflow tracking server, not {settings.tracking.split(':', 1)[0]} "
            "(step outputs travel between nodes through its artifact store): run `mlflow server "
            "--serve-artifacts ...` and set SCANFLOW_TRACKING_URI to its http(s):// URL")


def store(settings: Settings) -> Store:
    """The control-plane store at `settings.store` (SQLite or PostgreSQL, by URL). Settings
    are checked first, so a bad backend is refused before any state is touched."""
    backend_of(settings)
    return Store(settings.store, signer=message_signer(settings))


def message_signer(settings: Settings) -> MessageSigner:
    """What signs and checks agents' messages: the key at `settings.message_key_path`."""
    return MessageSigner(load_or_create_key(settings.message_key_path))


def tracker(settings: Settings) -> Tracker:
    """The experiment tracker and model registry (MLflow at `settings.tracking`)."""
    backend_of(settings)
    # Lazy: importing the tracker loads MLflow (~1.5 s), which commands that only read the
    # store must not pay for.
    from scanflow.tracking import MlflowTracker  # lazy: MLflow (~1.5 s)

    return MlflowTracker(settings)


def engine(settings: Settings, store: Store, tracker: Tracker | None = None, **options: Any) -> Engine:
    """The workflow engine; `options` go to the backend (e.g. `concurrency`, `track`, `pool`)."""
    if backend_of(settings) == "local":
        # Lazy: only the chosen backend is imported (the local engine loads MLflow; a Ray
        # engine will load ray).
        from scanflow.engine.local import LocalEngine  # lazy: MLflow, via the engine

        return LocalEngine(settings, store, tracker, **options)
    # Lazy: ray (~0.5 s to import, a cluster connection) only when it is the backend.
    from scanflow.engine.ray_backend import ClusterUnavailable, RayEngine  # lazy: ray

    try:
        return RayEngine(settings, store, tracker, **options)
    except ClusterUnavailable as exc:
        raise UnknownBackend(str(exc)) from exc


def deployer(settings: Settings, store: Store, *, actor: str | None = None,
             tracker: Tracker | None = None, **options: Any) -> Deployer:
    """The service deployer; what it does is recorded as done by `actor` (a person at the
    CLI by default, or an agent's name). `options` go to the backend (timeouts, limits...).
    On the ray backend services are Ray Serve applications (`serving.ray_serve`)."""
    if backend_of(settings) == "local":
        # Lazy: only the chosen backend is imported (the local deployer loads the model
        # server's modules: FastAPI, gunicorn's config; the Ray one loads Ray Serve on use).
        from scanflow.serving.deployer import LocalDeployer  # lazy: FastAPI, gunicorn config

        return LocalDeployer(settings, store, actor=actor, tracker=tracker, **options)
    from scanflow.engine.ray_address import ClusterUnavailable  # lazy: as the deployer below
    from scanflow.serving.ray_serve import RayServeDeployer  # lazy: Ray Serve, joins the cluster

    try:
        return RayServeDeployer(settings, store, actor=actor, tracker=tracker, **options)
    except ClusterUnavailable as exc:
        raise UnknownBackend(str(exc)) from exc


__all__ = ["BACKENDS", "UnknownBackend", "backend_of", "deployer", "engine", "store", "tracker"]
