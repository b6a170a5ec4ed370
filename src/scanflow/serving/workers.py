"""Which workers of a service are up: each ready worker announces itself in
`<workdir>/workers/<pid>.json` (version, generation, draining); the deployer and draining
siblings read those files."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from scanflow.serving import metrics
from scanflow.serving.config import ServiceConfig


def workers_dir(workdir: str | os.PathLike[str]) -> Path:
    return Path(workdir) / "workers"


def read_workers(workdir: str | os.PathLike[str]) -> dict[int, dict[str, Any]]:
    """Announcements of the workers of one service, by pid (may include dead ones)."""
    out: dict[int, dict[str, Any]] = {}
    d = workers_dir(workdir)
    if not d.is_dir():
        return out
    for f in d.glob("*.json"):
        try:
            info = json.loads(f.read_text())
            out[int(info["pid"])] = info
        except (OSError, ValueError, KeyError):
            continue  # being replaced right now, or a crash left half a file
    return out


class WorkerLifecycle:
    """This process's announcement and drain state (one per worker process)."""

    def __init__(self) -> None:
        self.config: ServiceConfig | None = None
        self.draining = False  # told to stop; siblings and deployer see it in the file
        self.close_connections = False  # answer with Connection: close
        self.info: dict[str, Any] = {}
        self.replica_labels: list[tuple[str, str, str]] = []

    @property
    def path(self) -> Path | None:
        if self.config is None:
            return None
        return workers_dir(self.config.workdir) / f"{os.getpid()}.json"

    def announce(self, config: ServiceConfig) -> None:
        self.config = config
        self.info = {
            "pid": os.getpid(),
            "service": config.service,
            "model_version": config.model_version,
            "versions": config.versions,
            "generation": config.generation,
            "ready_at": time.time(),
            "draining": False,
        }
        self._write()

    def begin_drain(self) -> None:
        self.draining = True
        for labels in self.replica_labels:  # a draining worker is no longer a replica
            metrics.REPLICAS.labels(*labels).set(0)
        if self.info:
            self.info["draining"] = True
            self.info["draining_at"] = time.time()
            self._write()

    def retire(self) -> None:
        p = self.path
        if p is not None:
            p.unlink(missing_ok=True)

    def _write(self) -> None:
        p = self.path
        if p is None:
            return
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.info))
        os.replace(tmp, p)


LIFECYCLE = WorkerLifecycle()
