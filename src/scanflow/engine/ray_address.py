"""Checking a Ray cluster address before Ray itself is asked (it retries for minutes): shared
by the engine (`ray_backend`), live logs (`ray_logs`) and detached runs (`ray_jobs`)."""

from __future__ import annotations

import socket


class ClusterUnavailable(ConnectionError):
    """The Ray cluster at `SCANFLOW_RAY_ADDRESS` could not be joined."""


def probe(address: str, timeout: float = 3.0) -> None:
    """Fail fast when nothing listens at a `host:port` address (Ray itself retries for
    minutes); `auto` is left to Ray, which fails at once when no local cluster runs."""
    if address in ("", "auto", "local"):
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        raise ClusterUnavailable(f"SCANFLOW_RAY_ADDRESS {address!r} is not auto, host:port or "
                                 "ray://host:port")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ClusterUnavailable(
            f"cannot join the Ray cluster at {address!r} (SCANFLOW_RAY_ADDRESS): nothing answers "
            f"there ({exc.strerror or exc}); start one with `ray start --head` or point "
            "SCANFLOW_RAY_ADDRESS at it") from exc


__all__ = ["ClusterUnavailable", "probe"]
