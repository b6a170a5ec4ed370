"""Service leases: at most one controller acts on a service at a time.

A lease is a row in the store (`Store.acquire_lease`), so it serialises actions across
processes and machines, and it expires: a controller killed while holding it blocks the
service for at most one TTL. Every model operation in :mod:`scanflow.control.operations`
holds the lease of its service for its whole duration.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from scanflow.store import Store

log = logging.getLogger("scanflow.control.leases")


class LeaseBusy(RuntimeError):
    """Another holder acts on the service now."""


def service_lease_name(service: str) -> str:
    """The store name of a service's lease (shared by every caller, so they exclude each other)."""
    return f"service:{service}"


def process_holder(name: str) -> str:
    """`name` in this process: a restarted agent is a new holder, so it waits for the lease of
    the killed one to expire instead of acting next to a process that may still live."""
    return f"{name}:{os.getpid()}"


@contextmanager
def lease(
    store: Store, name: str, holder: str, *, ttl_s: float = 30.0, wait_s: float = 0.0, purpose: str = ""
) -> Iterator[None]:
    """Hold the lease `name` for the block, renewed in the background every ttl/3; raise
    LeaseBusy (having changed nothing) if it stays taken for `wait_s`."""
    deadline = time.monotonic() + wait_s
    while not store.acquire_lease(name, holder, ttl_s, purpose=purpose):
        if time.monotonic() >= deadline:
            cur = store.get_lease(name)
            who = f"{cur.holder} until {cur.expires_at:.0f} ({cur.purpose})" if cur else "another holder"
            kind, _, what = name.partition(":")
            raise LeaseBusy(f"{kind} {what!r} is leased by {who}")
        time.sleep(min(1.0, ttl_s / 5))
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(ttl_s / 3):
            try:
                if not store.renew_lease(name, holder, ttl_s):
                    log.error("lease %s lost by %s", name, holder)
                    return
            except Exception:  # noqa: BLE001 - a store hiccup: try again next period
                log.exception("renewing the lease %s", name)

    t = threading.Thread(target=renew, name=f"lease-{name}", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(timeout=5)
        store.release_lease(name, holder)


@contextmanager
def service_lease(
    store: Store, service: str, holder: str, *, ttl_s: float = 30.0, wait_s: float = 0.0, purpose: str = ""
) -> Iterator[None]:
    """Hold `service`'s lease for the block (see :func:`lease`)."""
    with lease(store, service_lease_name(service), holder, ttl_s=ttl_s, wait_s=wait_s, purpose=purpose):
        yield


__all__ = ["LeaseBusy", "lease", "process_holder", "service_lease", "service_lease_name"]
