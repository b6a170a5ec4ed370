"""Cache keys: a step's code, params, inputs' content and environment, hashed. Two step runs
with the same key compute the same thing, so the second can reuse the first's outputs."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scanflow.spec.models import Step

_file_memo: dict[tuple[str, int, int], str] = {}


def file_digest(path: Path) -> str:
    """sha256 of a file, or of a folder's files (names and contents), memoised by mtime."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key in _file_memo:
        return _file_memo[key]
    h = hashlib.sha256()
    if path.is_dir():
        for p in sorted(path.rglob("*")):
            if p.is_file():
                h.update(str(p.relative_to(path)).encode())
                h.update(file_digest(p).encode())
    else:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    digest = h.hexdigest()
    _file_memo[key] = digest
    return digest


def code_fingerprint(step: Step, base_dir: Path, fn: Callable[..., Any] | None) -> str:
    """What the step runs: the command and the files it names, or the function's source file."""
    h = hashlib.sha256()
    if step.run is not None:
        h.update(step.run.encode())
        for token in shlex.split(step.run):
            p = base_dir / token
            if p.is_file():
                h.update(file_digest(p).encode())
    else:
        target = fn if fn is not None else step.call
        name = getattr(target, "__module__", "") + "." + getattr(target, "__qualname__", str(target))
        h.update(name.encode())
        try:
            src = inspect.getsourcefile(target) if callable(target) else None
        except TypeError:
            src = None
        if src and os.path.exists(src):
            h.update(file_digest(Path(src)).encode())
    return h.hexdigest()


def cache_key(code: str, params: dict[str, Any], inputs: dict[str, str], env: dict[str, str]) -> str:
    """The key of a step run; `inputs` are the inputs' identities (local: `file_digest`)."""
    payload = {
        "code": code,
        "params": params,
        "inputs": dict(sorted(inputs.items())),
        "env": env,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
