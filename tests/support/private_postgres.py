"""A PostgreSQL server of the test's own (initdb in a temporary folder, on a free port), for
tests that stop and restart it: the machine's shared server on 5432 serves other tests at the
same time and is never restarted by a test."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from support.mlflow_server import free_port

OWNER = "postgres"  # initdb refuses to run as root: the server runs as this system user


@dataclass
class PrivatePostgres:
    data: Path
    port: int

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _ctl(self, *args: str) -> None:
        subprocess.run(_as_owner("pg_ctl", "-D", str(self.data), "-w", "-t", "60", *args),
                       check=True, capture_output=True)

    def start(self) -> None:
        self._ctl("-l", str(self.data / "server.log"), "-o",
                  f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1", "start")

    def stop(self) -> None:
        self._ctl("-m", "fast", "stop")


def _as_owner(*cmd: str) -> list[str]:
    exe = shutil.which(cmd[0])
    if exe is None:
        pytest.skip(f"{cmd[0]} is not on PATH (PostgreSQL server binaries)")
    return ["runuser", "-u", OWNER, "--", exe, *cmd[1:]] if os.geteuid() == 0 else [exe, *cmd[1:]]


@contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    """A running server with trust auth on 127.0.0.1; removed when the block ends."""
    data = Path(tempfile.mkdtemp(prefix="scanflow-pg-"))
    if os.geteuid() == 0:
        shutil.chown(data, OWNER)
    subprocess.run(_as_owner("initdb", "-D", str(data), "-A", "trust", "-U", "postgres"),
                   check=True, capture_output=True)
    pg = PrivatePostgres(data, free_port())
    pg.start()
    try:
        yield pg
    finally:
        try:
            pg.stop()
        finally:
            shutil.rmtree(data, ignore_errors=True)
