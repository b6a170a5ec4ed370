"""Checking a Ray cluster address before Ray itself is asked (it retries for minutes): shared
by the engine (`ray_backend`), live logs (`ray_logs`) and detached runs (`ray_jobs`)."""

from __future__ import annotations

import socket
from typing import Any


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




def gcs_and_dashboard(address: str) -> tuple[Any, str]:
    """A GCS client of the cluster at `address` (host:port or auto) and its dashboard's URL,
    asked once (Ray's own lookup retries for 40 s when the cluster runs no dashboard);
    ValueError saying what to do when there is none."""
    from ray._private import ray_constants, services  # lazy: ray
    from ray._raylet import GcsClient  # type: ignore[attr-defined]  # lazy: ray

    if address.startswith("ray://"):
        raise ValueError("a ray:// client address does not reach the cluster's GCS; set "
                         "SCANFLOW_RAY_ADDRESS to the head's host:port (6379)")
    probe(address)
    gcs = GcsClient(address=services.canonicalize_bootstrap_address_or_die(address))
    url = gcs.internal_kv_get(ray_constants.DASHBOARD_ADDRESS.encode(),
                              ray_constants.KV_NAMESPACE_DASHBOARD)
    if not url:
        raise ValueError(f"the Ray cluster at {address!r} runs no dashboard (its log and jobs "
                         "APIs); start its head with one (`ray start --head --include-dashboard "
                         "true`)")
    return gcs, f"http://{url.decode()}"


__all__ = ["ClusterUnavailable", "gcs_and_dashboard", "probe"]
