"""Raw Ray peer: the same steps as `ray.remote` tasks on an existing cluster.

Run by bench/ray_engine.py with bench/.venvs/ray/bin/python; prints one marked JSON line. The
cluster is started by the harness; this driver only connects (`ray.init(address=...)`).
Chain: each task gets the previous one's ObjectRef; fan-out: a root task, N tasks on its result,
a join task on all of them; subprocess: a chain of tasks each running `python -c pass` with the
worker's own interpreter.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from common import emit, join, measure, noop, read_spec, run_pass, timed


def main() -> None:
    spec = read_spec()
    t0 = time.perf_counter()
    import ray

    import_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ray.init(address=spec["address"], logging_level="ERROR", log_to_driver=False)
    init_s = time.perf_counter() - t0

    noop_r = ray.remote(num_cpus=spec.get("task_cpus", 1))(noop)
    join_r = ray.remote(num_cpus=spec.get("task_cpus", 1))(join)

    def _pass(prev: Any = None) -> Any:
        return run_pass(sys.executable, prev)

    pass_r = ray.remote(num_cpus=spec.get("task_cpus", 1))(_pass)

    def join_all(*values: Any) -> int:
        return join(list(values))

    join_many = ray.remote(num_cpus=spec.get("task_cpus", 1))(join_all)
    del join_r

    def chain(n: int) -> None:
        prev = None
        for _ in range(n):
            prev = noop_r.remote(prev)
        ray.get(prev)

    def fanout(n: int) -> None:
        root = noop_r.remote()
        refs = [noop_r.remote(root) for _ in range(n)]
        ray.get(join_many.remote(*refs))

    def subproc(n: int) -> None:
        prev = None
        for _ in range(n):
            prev = pass_r.remote(prev)
        ray.get(prev)

    runs = {"chain": chain, "fanout": fanout, "subprocess": subproc}
    warm = timed(lambda: [runs[k](3) for k in runs])
    cases = measure(spec, lambda kind, n: timed(lambda: runs[kind](n)))
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    emit({"system": "ray_raw", "version": f"ray {ray.__version__}", "import_seconds": import_s,
          "init_seconds": init_s, "warmup_seconds": warm, "cases": cases, "nodes": nodes,
          "excluded": "import, ray.init (connecting to the running cluster), a warm-up of each kind",
          "included": "submitting the tasks and ray.get of the last/join result"})
    ray.shutdown()


if __name__ == "__main__":
    main()
