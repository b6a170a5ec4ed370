"""Who may post labels to a model server: labels become the next retrain's training data, so
once the installation has identities (`scanflow admin create-token`), `POST /labels` needs a
bearer token allowed `label` on this service: its user is an admin, or operator or owner in
the service's team, and the token is unscoped or scoped `label` / `label:<service>` (a
labeller's token is best scoped so: it can then do nothing else).

Checks hit the store at most every `ttl` seconds per token (a revoked token stops working
within that time); the token itself is never logged nor kept, only its SHA-256.
"""

from __future__ import annotations

import hashlib
import ipaddress
import threading
import time

from scanflow.store import Store
from scanflow.store.identity import Identity, Refused


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def refuse_open_bind(host: str, store: Store, what: str) -> None:
    """A server reachable from other machines with nobody able to authenticate would take
    labels (training data) from anyone: refuse it, saying how to enable auth."""
    if not is_loopback(host) and not store.identities.has_identities():
        raise ValueError(f"refusing to start {what} on {host}, a non-loopback address, with auth "
                         "not configured: make a team, a user and a token first (scanflow admin "
                         "create-team / create-user / create-token), or set SCANFLOW_HOST=127.0.0.1")


class LabelDenied(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class LabelGate:
    def __init__(self, store: Store, service: str, team: str, ttl: float = 5.0) -> None:
        self.store, self.service, self.team, self.ttl = store, service, team, ttl
        self._lock = threading.Lock()
        self._auth_on: tuple[float, bool] = (0.0, False)
        self._seen: dict[str, tuple[float, Identity | Refused]] = {}

    def auth_on(self) -> bool:
        now = time.monotonic()
        with self._lock:
            at, on = self._auth_on
        if on or now - at < self.ttl:
            return on  # once on, auth stays on for this process
        on = self.store.identities.has_identities()
        with self._lock:
            self._auth_on = (now, on)
        return on

    def check(self, authorization: str | None) -> str | None:
        """The caller's name (None with auth off), or LabelDenied (401 / 403)."""
        if not self.auth_on():
            return None
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise LabelDenied(401, "labels need a token: send `Authorization: Bearer <token>` "
                              "with `label` on this service")
        who = self._verify(token)
        if isinstance(who, Refused):
            raise LabelDenied(401, f"token refused: {who.reason}")
        if not who.may("label", self.team, self.service):
            raise LabelDenied(403, f"{who.user} may not label {self.service} (needs operator in "
                              f"team {self.team!r} or a token scoped label:{self.service})")
        return who.who

    def _verify(self, token: str) -> Identity | Refused:
        key = hashlib.sha256(token.encode()).hexdigest()
        now = time.monotonic()
        with self._lock:
            hit = self._seen.get(key)
        if hit is not None and now - hit[0] < self.ttl:
            return hit[1]
        found = self.store.identities.verify(token)
        with self._lock:
            if len(self._seen) > 1000:
                self._seen.clear()
            self._seen[key] = (now, found)
        return found
