"""The CLI through a scanflow server: with `SCANFLOW_SERVER` (and `SCANFLOW_TOKEN`) set, the
commands that read or change runs and services call the server's REST API instead of opening
the workspace, and print what they print locally from its answers.

The server's answers are turned into objects with the attributes of the store's rows, so one
piece of code renders a run, an event or a decision in both modes. Exit codes: a refused or bad
request (4xx) is 2 with the server's message, a service held by another controller (409
`lease_busy`) or an unreachable server 1, as locally.
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

from scanflow.cli.common import fail


def server_url() -> str | None:
    url = os.environ.get("SCANFLOW_SERVER", "").strip()
    return url.rstrip("/") or None


def row(data: dict[str, Any]) -> Any:
    """An answer as an object with the attributes of the store's row (`r.status`, ...)."""
    return SimpleNamespace(**data)


class Remote:
    """A client of the server, with the caller's token."""

    def __init__(self, url: str) -> None:
        import httpx  # lazy: only remote commands need it

        token = os.environ.get("SCANFLOW_TOKEN", "").strip()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url
        self.http = httpx.Client(base_url=url, headers=headers, timeout=600.0)

    def call(self, method: str, path: str, *, body: Any = None, params: dict[str, Any] | None = None,
             content: bytes | None = None, content_type: str | None = None, missing_ok: bool = False,
             ) -> Any:
        """The answer's JSON; an error answer ends the command with the server's message (with
        `missing_ok`, a 404 is None instead). `content`: a raw body of `content_type`."""
        import httpx  # lazy: as above, the CLI starts fast

        try:
            r = self.http.request(method, path, json=body, content=content,
                                  headers={"content-type": content_type} if content_type else None,
                                  params={k: v for k, v in (params or {}).items() if v is not None})
        except httpx.HTTPError as exc:
            fail(f"the scanflow server at {self.url} does not answer ({type(exc).__name__})", code=1)
        if missing_ok and r.status_code == 404:
            return None
        _refused(r)
        if r.headers.get("content-type", "").startswith("application/json"):
            return r.json()
        return r.text

    def ensure_app(self, app: str, team: str, path: Any) -> None:
        """Register team `team`'s spec of `app` unless it is registered already (registering
        needs an owner; running and deploying do not): by its path when the server's machine
        sees that path (a shared file system), else by uploading the application's folder."""
        if not any(a["name"] == app and a["team"] == team for a in self.call("GET", "/api/v1/apps")):
            self.register(path)

    def register(self, path: Any) -> Any:
        """Register the spec at `path`: by path if the server sees it, else uploaded."""
        from scanflow.cli.packaging import pack_spec  # lazy: zip, the spec loader

        spec_file = path.resolve()
        by_path = os.environ.get("SCANFLOW_UPLOAD", "").strip().lower() not in ("1", "true", "yes")
        if by_path and self.call("POST", "/api/v1/apps", body={"path": str(spec_file)},
                                 missing_ok=True) is not None:
            return None
        try:
            package, name = pack_spec(spec_file)
        except (OSError, ValueError) as exc:
            fail(f"cannot upload {spec_file.parent}: {exc}")
        return self.call("POST", "/api/v1/apps/package", params={"spec": name}, content=package,
                         content_type="application/zip")

    def pages(self, path: str, params: dict[str, Any] | None = None, *, limit: int | None = None,
              ) -> list[Any]:
        """Every item of a paginated list (at most `limit`)."""
        items: list[Any] = []
        cursor = None
        while True:
            page = self.call("GET", path, params={**(params or {}), "cursor": cursor})
            items += page["items"]
            cursor = page["next"]
            if cursor is None or (limit is not None and len(items) >= limit):
                return items[:limit] if limit is not None else items

    def stream(self, path: str, params: dict[str, Any]) -> Any:
        """The lines of a streamed text answer, as they come."""
        import httpx  # lazy: as above, the CLI starts fast

        try:
            with self.http.stream("GET", path,
                                  params={k: v for k, v in params.items() if v is not None}) as r:
                if r.status_code >= 400:
                    r.read()
                    _refused(r)
                yield from r.iter_lines()
        except httpx.HTTPError as exc:
            fail(f"the scanflow server at {self.url} does not answer ({type(exc).__name__})", code=1)


def _refused(r: Any) -> None:
    """End the command on an error answer with the server's message: exit 1 for a busy lease
    or the server's own failure (as locally), 2 for what the caller asked wrongly."""
    if r.status_code < 400:
        return
    try:
        err = r.json()["error"]
        code, message = err["code"], err["message"]
    except (ValueError, KeyError, TypeError):
        code, message = "error", r.text[:500]
    fail(message, code=1 if code == "lease_busy" or r.status_code >= 500 else 2)


def remote() -> Remote | None:
    """The server client when `SCANFLOW_SERVER` is set; None: the embedded local mode."""
    url = server_url()
    return Remote(url) if url else None
