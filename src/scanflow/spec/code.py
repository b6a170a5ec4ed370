"""An application's `code_paths`: the modules outside its folder that its steps import.

Each entry is made importable *by its own name only*, as Ray's `py_modules` does, not by putting
its parent folder on the path: a step that imports a sibling the spec did not list fails on this
machine too, not first on a cluster where only the listed modules are shipped. Locally that is a
folder of symbolic links (one per module) put first on the import path.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

from scanflow.spec.models import Application

_STAGED: dict[str, Path] = {}  # this process's folders, by the modules they hold


def stage(app: Application, into: Path) -> Path | None:
    """A folder under `into` with one link per module of `app.code_paths` (None when it lists
    none); made once per set of modules and reused."""
    modules = app.code_modules()
    if not modules:
        return None
    key = hashlib.sha256("\n".join(f"{n}={p}" for n, p in sorted(modules.items())).encode())
    folder = into / f"code-{key.hexdigest()[:16]}"
    if not folder.is_dir():
        tmp = Path(tempfile.mkdtemp(prefix=".code-", dir=into))
        for path in modules.values():
            os.symlink(path, tmp / path.name)
        try:
            tmp.rename(folder)
        except OSError:  # another run staged the same modules first
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def importable(app: Application) -> None:
    """Make `app.code_paths` importable in this process (for steps that run in it)."""
    modules = app.code_modules()
    if not modules:
        return
    key = "\n".join(f"{n}={p}" for n, p in sorted(modules.items()))
    folder = _STAGED.get(key)
    if folder is None:
        root = Path(tempfile.mkdtemp(prefix="scanflow-code-"))
        atexit.register(shutil.rmtree, root, True)
        staged = stage(app, root)
        assert staged is not None  # it lists modules
        folder = _STAGED[key] = staged
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))


def pythonpath(folder: Path | None, env: dict[str, str]) -> dict[str, str]:
    """`env` with `folder` first on PYTHONPATH (for steps that run as processes)."""
    if folder is None:
        return env
    rest = env.get("PYTHONPATH")
    return {**env, "PYTHONPATH": os.pathsep.join([str(folder), *([rest] if rest else [])])}
