"""Who is calling, and may they: bearer tokens checked against the store, roles per team.

Every route but `/health` and the OpenAPI document depends on `caller`. A missing, malformed,
unknown, revoked or expired token is a 401 that says which (never echoing the token); a client
that keeps failing is told to wait (429 with `Retry-After`) so tokens cannot be guessed at speed.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Annotated

from fastapi import Depends, Request

from scanflow.server.errors import ApiError
from scanflow.spec.access import needs, scope_allows
from scanflow.store.identity import Identity, Refused

_WHY = {"malformed": "the token is not a scanflow token (sft_...)",
        "unknown": "unknown token", "revoked": "the token was revoked",
        "expired": "the token has expired"}


class FailedLogins:
    """Failures per client address in a sliding window; over `limit`, calls are refused until
    the oldest failure leaves the window."""

    def __init__(self, limit: int = 10, window: float = 60.0) -> None:
        self.limit, self.window = limit, window
        self._seen: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def wait_for(self, client: str) -> float:
        """Seconds `client` must wait before trying again (0: it may try now)."""
        now = time.monotonic()
        with self._lock:
            seen = self._seen.get(client)
            if not seen:
                return 0.0
            while seen and now - seen[0] > self.window:
                seen.popleft()
            return self.window - (now - seen[0]) if len(seen) >= self.limit else 0.0

    def failed(self, client: str) -> None:
        with self._lock:
            self._seen.setdefault(client, deque()).append(time.monotonic())


def bearer(request: Request) -> str | None:
    value = request.headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def caller(request: Request) -> Identity:
    """The identity of the request's token, or a 401 / 429."""
    state = request.app.state
    client = request.client.host if request.client else "?"
    wait = state.failed_logins.wait_for(client)
    if wait > 0:
        raise ApiError(429, "too_many_failures", f"too many failed logins; try again in {wait:.0f} s",
                       headers={"Retry-After": str(max(1, round(wait)))})
    token = bearer(request)
    if token is None:
        raise ApiError(401, "unauthenticated", "no token: send `Authorization: Bearer <token>` "
                       "(make one with `scanflow admin create-token`)",
                       headers={"WWW-Authenticate": "Bearer"})
    found = state.store.identities.verify(token)
    if isinstance(found, Refused):
        state.failed_logins.failed(client)
        raise ApiError(401, f"token_{found.reason}" if found.reason != "unknown" else "unauthenticated",
                       _WHY[found.reason], headers={"WWW-Authenticate": "Bearer"})
    return found


Caller = Annotated[Identity, Depends(caller)]


def authorize(who: Identity, action: str, team: str, resource: str | None = None) -> None:
    """Raise 403 unless `who` may take `action` on team `team`'s `resource`."""
    if not who.may(action, team, resource):
        role = who.role_in(team)
        held = f"you are {role.name} in team {team!r}" if role else f"you are not in team {team!r}"
        least = needs(action)
        wants = f"needs {least.name}" if least else "needs an admin"
        raise ApiError(403, "forbidden", f"{action} on {resource or team}: {wants}; {held}"
                       + ("" if scope_allows(who.scopes, action, resource) else
                          " (and this token's scopes do not allow it)"))


def readable_teams(who: Identity) -> list[str] | None:
    """The teams whose things `who` may list; None: all (an admin)."""
    return None if who.admin else sorted(who.teams)
