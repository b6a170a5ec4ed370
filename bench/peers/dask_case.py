"""Dask peer: futures on a `LocalCluster(n_workers=W, threads_per_worker=1)`.

Run by bench/engine.py with bench/.venvs/dask/bin/python; prints one marked JSON line.
Cluster and client start (and a warm-up of each kind) are excluded from the case timings.
"""

from __future__ import annotations

import time
from typing import Any

from common import emit, join, measure, noop, read_spec, run_pass, timed


def main() -> None:
    """Start the cluster, warm up, then time each case from first submit to final result."""
    spec = read_spec()
    python: str = spec["python"]
    t0 = time.perf_counter()
    import dask
    import distributed
    from dask.distributed import Client, LocalCluster

    import_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    cluster = LocalCluster(
        n_workers=int(spec["workers"]), threads_per_worker=1, processes=True, dashboard_address=None
    )
    client = Client(cluster)
    start_s = time.perf_counter() - t0

    def chain(n: int) -> Any:
        prev = client.submit(noop, None, pure=False)
        for _ in range(n - 1):
            prev = client.submit(noop, prev, pure=False)
        return prev.result()

    def fanout(n: int) -> Any:
        root = client.submit(noop, None, pure=False)
        futures = client.map(noop, [root] * n, pure=False)
        return client.submit(join, futures, pure=False).result()

    def subproc(n: int) -> Any:
        prev = client.submit(run_pass, python, None, pure=False)
        for _ in range(n - 1):
            prev = client.submit(run_pass, python, prev, pure=False)
        return prev.result()

    runs = {"chain": chain, "fanout": fanout, "subprocess": subproc}
    try:
        warm = timed(lambda: [f(3) for f in runs.values()])
        cases = measure(spec, lambda kind, n: timed(lambda: runs[kind](n)))
    finally:
        client.close()
        cluster.close()
    emit({
        "system": "dask", "version": f"dask {dask.__version__}, distributed {distributed.__version__}",
        "import_seconds": import_s, "cluster_start_seconds": start_s, "warmup_seconds": warm,
        "cases": cases,
        "excluded": "import, LocalCluster + Client start and stop, a warm-up of each kind",
        "included": "submitting every task and waiting for the last result",
    })


if __name__ == "__main__":
    main()
