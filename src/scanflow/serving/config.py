"""What a model-server worker is told to serve: one JSON file per service, written (atomically)
by the deployer and read by each worker at start (named by `SCANFLOW_SERVICE_CONFIG`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from scanflow.serving.batching import BatchConfig
from scanflow.serving.cgroups import CgroupPlan

CONFIG_ENV = "SCANFLOW_SERVICE_CONFIG"


class Limits(BaseModel):
    """Refuse oversized requests before parsing them."""

    max_instances: int = Field(default=10_000, ge=1, le=99_999)
    max_body_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    request_timeout_s: float = Field(default=30.0, gt=0, description="slower requests get 504")
    keepalive_max_s: float = Field(
        default=2.0, ge=0, description="a keep-alive connection older than this is told to "
        "reconnect (Connection: close), so added replicas get clients; 0: never")


class PredLogConfig(BaseModel):
    """The prediction log (see predlog.py): journal on the request path, collector behind."""

    enabled: bool = Field(default=True, description="off: nothing is logged (benchmarks only)")
    interval: float = Field(default=0.2, gt=0, description="seconds between collector passes")
    batch_size: int = Field(default=500, ge=1, description="records per store insert")
    orphan_interval: float = Field(default=1.0, gt=0,
                                   description="seconds between looks for dead workers' segments")
    fsync: bool = Field(default=False, description="fsync each append: survive power loss, not "
                                                   "only kill -9 (costs a disk flush per request)")
    commit: Literal["journal", "store"] = Field(
        default="journal",
        description="when a response may leave: `journal`, once its record is on this node's "
                    "disk (survives kill -9 of the worker); `store`, once it is in the shared "
                    "store (survives losing the node: the ray backend's default; group_commit.py)")
    commit_timeout: float = Field(default=1.0, gt=0,
                                  description="with commit=store: wait this long for the store, "
                                              "then journal on this node instead")


class CanaryConfig(BaseModel):
    """A challenger answering a share of live traffic (its answers are returned and logged)."""

    version: str
    share: float = Field(gt=0, le=1, description="fraction of requests the challenger answers")


class DrainConfig(BaseModel):
    """How a worker told to stop hands over (see gunicorn_conf.DrainingServer)."""

    max_wait: float = Field(default=45.0, ge=0, description="wait this long for a successor")
    grace: float = Field(default=0.5, ge=0, description="answer with Connection: close")
    settle: float = Field(default=1.0, ge=0, description="let accepted connections finish")


class ServiceConfig(BaseModel):
    """Everything a worker needs; written by the deployer, read at worker start."""

    service: str
    app: str = ""
    team: str = ""
    model_name: str
    alias: str = "champion"
    model_version: str
    tracking_uri: str
    registry_uri: str | None = None
    store_url: str
    workdir: str
    replicas: int = Field(default=1, ge=1)
    preload: list[str] = Field(
        default_factory=list, description="modules the gunicorn master imports before forking"
    )
    limits: Limits = Field(default_factory=Limits)
    batching: BatchConfig = Field(default_factory=BatchConfig)
    predlog: PredLogConfig = Field(default_factory=PredLogConfig)
    canary: CanaryConfig | None = None
    shadow_version: str | None = Field(
        default=None, description="scores a copy of every request; logged, never returned"
    )
    previous_version: str | None = Field(default=None, description="what `rollback` returns to")
    generation: int = Field(default=0, description="bumped by every change the workers must load")
    model_paths: dict[str, str] = Field(
        default_factory=dict,
        description="version -> local copy of the model (workers never need the registry)",
    )
    preload_models: bool = Field(
        default=True, description="load models in the gunicorn master, before forking workers"
    )
    drain: DrainConfig = Field(default_factory=DrainConfig)
    resources: CgroupPlan = Field(
        default_factory=CgroupPlan,
        description="per-replica CPU/memory limits and their cgroups (see serving.cgroups)",
    )

    @property
    def model_uri(self) -> str:
        return f"models:/{self.model_name}/{self.model_version}"

    @property
    def versions(self) -> list[str]:
        """Every version a worker of this config loads: champion first."""
        out = [self.model_version]
        for v in (self.canary.version if self.canary else None, self.shadow_version):
            if v and v not in out:
                out.append(v)
        return out

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ServiceConfig:
        return cls.model_validate_json(Path(path).read_text())

    def save(self, path: str | os.PathLike[str]) -> None:
        """Atomic: a worker starting at this moment reads the old or the new file, not half."""
        p = Path(path)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        tmp.write_text(self.model_dump_json(indent=2))
        os.replace(tmp, p)
