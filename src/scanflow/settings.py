"""One place for configuration: every path and URL derives from the workspace unless set."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

# MLflow phones home and Ray counts usage unless told not to; we run offline.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")


class Settings(BaseSettings):
    """Read from `SCANFLOW_*` environment variables; defaults keep all state in `./.scanflow`."""

    model_config = SettingsConfigDict(env_prefix="SCANFLOW_", extra="ignore")

    workspace: Path = Field(default=Path(".scanflow"), description="folder holding all state")
    store_url: str | None = Field(default=None, description="SQLAlchemy URL of the control-plane store")
    tracking_uri: str | None = Field(default=None, description="MLflow tracking URI")
    registry_uri: str | None = Field(default=None, description="MLflow registry URI")
    backend: str = Field(default="local", description="engine backend: local or ray (workflows on a "
                         "Ray cluster); read by scanflow.control.backends")
    ray_address: str = Field(default="auto", description="the Ray cluster the ray backend joins: "
                             "auto (the one `ray start` runs here), host:port or ray://host:10001")
    store_wait: float = Field(default=120.0, ge=0.0, description="seconds a process waits for its "
                              "PostgreSQL store when it stops answering (restarting, failing "
                              "over) before its next connection fails; 0: fail at once")
    ray_python: str = Field(default="python", description="the Python, with scanflow installed, that "
                            "runs a detached run's driver on the Ray cluster's head (`run --detach`)")
    run_stale_after: float = Field(
        default=60.0, gt=0, description="seconds without a heartbeat after which a running run whose "
        "driver is on another host counts as dead (`recover()` marks it interrupted)")
    concurrency: int = Field(default=2, ge=1, description="max steps run at once by the engine")
    ray_in_flight: int = Field(
        default=32, ge=1, le=1024, description="step attempts one run on the ray backend keeps "
        "submitted at once (each waits on a driver thread; Ray's scheduler admits them by their "
        "resources, so more than the cluster's CPUs keeps its nodes busy)")
    host: str = Field(default="127.0.0.1", description="address services bind to")
    serve_port: int = Field(default=8000, ge=1, le=65535, description="the port of Ray Serve's "
                            "HTTP proxies on the ray backend (services answer at /<service>); "
                            "fixed when Serve first starts on the cluster")
    serve_proxies: Literal["head", "every_node"] = Field(
        default="head", description="where Ray Serve runs its HTTP proxies when scanflow starts "
        "Serve on the cluster: `head`, the one address `scanflow deploy` prints; `every_node`, for a "
        "load balancer of your own in front of the nodes (Serve drains the proxy of a node that "
        "holds no replica, closing its connections)")
    auth_failure_limit: int = Field(
        default=20, ge=1, description="failed token checks one client address may make in a "
        "minute before the control-plane server answers it 429 (slows down guessing)")
    max_cpus: float | None = Field(default=None, description="CPUs steps may use [all]")
    max_memory: int | None = Field(default=None, description="bytes steps may use [all]")
    cgroup_root: Path = Field(default=Path("/sys/fs/cgroup"), description="where the cgroup "
                              "hierarchies are mounted (services' per-replica resource limits)")
    agent_max_attempts: int = Field(
        default=5, ge=1, le=1000,
        description="tries at handling one agent message before it is dead-lettered (an agent's "
        "`max_attempts` overrides it)",
    )
    agent_retry_backoff: float = Field(
        default=1.0, gt=0, description="seconds before the 2nd try of a failed message; doubles each "
        "try (an agent's `retry_backoff` overrides it)",
    )
    agent_retry_max_backoff: float = Field(default=300.0, gt=0, description="longest wait between tries")
    agent_restart_backoff: float = Field(
        default=1.0, gt=0, description="seconds before the supervisor restarts a dead agent; doubles "
        "with each restart within `agent_restart_window`",
    )
    agent_restart_max_backoff: float = Field(default=60.0, gt=0, description="longest wait before a restart")
    agent_restart_limit: int = Field(
        default=5, ge=1, le=1000, description="restarts within `agent_restart_window` after which a "
        "crash-looping agent is given up (`agent_given_up`)",
    )
    agent_restart_window: float = Field(default=300.0, gt=0, description="seconds over which restarts count")
    max_replicas: int = Field(
        default=16, ge=1, le=64, description="the most replicas a service may be scaled to, by hand "
        "or by an agent (a service's policy may allow fewer)",
    )
    message_key_file: Path | None = Field(
        default=None, description="file holding the key agents sign their messages with (made, "
        "mode 0600, at first use) [<workspace>/agents/messages.key]; machines sharing one "
        "PostgreSQL store point it at the same key",
    )
    agent_stale_after: float = Field(
        default=30.0, gt=0, description="an agent whose heartbeat is older than this (its process "
        "up but hung) is killed and restarted by its supervisor",
    )

    @property
    def root(self) -> Path:
        return self.workspace.expanduser().resolve()

    @property
    def store(self) -> str:
        return self.store_url or f"sqlite:///{self.root / 'scanflow.db'}"

    @property
    def tracking(self) -> str:
        return self.tracking_uri or f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def services_dir(self) -> Path:
        return self.root / "services"

    @property
    def agents_dir(self) -> Path:
        return self.root / "agents"

    @property
    def message_key_path(self) -> Path:
        """The key agents sign their messages with (`scanflow.store.signing`), made at first use."""
        return (self.message_key_file.expanduser() if self.message_key_file
                else self.agents_dir / "messages.key")

    def ensure(self) -> Settings:
        for d in (self.root, self.artifacts, self.runs_dir, self.services_dir, self.agents_dir):
            d.mkdir(parents=True, exist_ok=True)
        return self

    def child_env(self) -> dict[str, str]:
        """Environment that hands this configuration to a child process."""
        env = {
            "SCANFLOW_WORKSPACE": str(self.root),
            "SCANFLOW_STORE_URL": self.store,
            "SCANFLOW_MAX_REPLICAS": str(self.max_replicas),
            "SCANFLOW_MESSAGE_KEY_FILE": str(self.message_key_path),
            "SCANFLOW_TRACKING_URI": self.tracking,
            "SCANFLOW_BACKEND": self.backend,
            "SCANFLOW_RAY_ADDRESS": self.ray_address,
            "SCANFLOW_RAY_PYTHON": self.ray_python,
            "SCANFLOW_CONCURRENCY": str(self.concurrency),
            "SCANFLOW_RAY_IN_FLIGHT": str(self.ray_in_flight),
            "SCANFLOW_STORE_WAIT": str(self.store_wait),
            "SCANFLOW_RUN_STALE_AFTER": str(self.run_stale_after),
            "SCANFLOW_HOST": self.host,
            "SCANFLOW_SERVE_PORT": str(self.serve_port),
            "SCANFLOW_SERVE_PROXIES": self.serve_proxies,
            "SCANFLOW_AGENT_MAX_ATTEMPTS": str(self.agent_max_attempts),
            "SCANFLOW_AGENT_RETRY_BACKOFF": str(self.agent_retry_backoff),
            "SCANFLOW_AGENT_RETRY_MAX_BACKOFF": str(self.agent_retry_max_backoff),
            "SCANFLOW_AGENT_RESTART_BACKOFF": str(self.agent_restart_backoff),
            "SCANFLOW_AGENT_RESTART_MAX_BACKOFF": str(self.agent_restart_max_backoff),
            "SCANFLOW_AGENT_RESTART_LIMIT": str(self.agent_restart_limit),
            "SCANFLOW_AGENT_RESTART_WINDOW": str(self.agent_restart_window),
            "SCANFLOW_AGENT_STALE_AFTER": str(self.agent_stale_after),
            "MLFLOW_TRACKING_URI": self.tracking,
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "true",
        }
        if self.registry_uri:
            env["SCANFLOW_REGISTRY_URI"] = self.registry_uri
            env["MLFLOW_REGISTRY_URI"] = self.registry_uri
        return env


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
