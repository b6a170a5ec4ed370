"""An application's folder as the zip the server's `POST /api/v1/apps/package` takes, for a
client whose files the server's machine cannot see."""

from __future__ import annotations

from pathlib import Path

from scanflow.engine.ray_task import pack_app


def pack_spec(path: Path) -> tuple[bytes, str]:
    """(the zip of the spec's folder, the spec file's name in it). `path` is a spec file or a
    folder holding one; caches, virtualenvs, VCS folders and a workspace inside are left out."""
    if path.is_dir():  # a folder means its scanflow.yaml, as `load_application` reads it
        folder, name = path, "scanflow.yaml"
    else:
        folder, name = path.parent, path.name
    return pack_app(folder, skip=[folder / ".scanflow"]), name
