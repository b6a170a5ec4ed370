"""An append-only journal per run: every step transition is one line written with `os.write`
before the engine acts on it. A `kill -9` of the engine cannot lose a written line (the kernel
has it), so recovery knows exactly which steps finished; the store is updated in batches."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def write(self, step: str, status: str, **fields: Any) -> None:
        line = json.dumps({"step": step, "status": status, **fields}, default=str) + "\n"
        os.write(self._fd, line.encode())

    def close(self, sync: bool = True) -> None:
        if sync:
            os.fsync(self._fd)
        os.close(self._fd)


def replay(path: Path) -> dict[str, dict[str, Any]]:
    """The last journalled state of each step (a torn last line is ignored)."""
    out: dict[str, dict[str, Any]] = {}
    try:
        text = path.read_text()
    except OSError:
        return out
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        out[rec["step"]] = {**out.get(rec["step"], {}), **rec}
    return out
