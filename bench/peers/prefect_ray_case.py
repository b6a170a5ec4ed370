"""Prefect 3 on Ray peer: tasks in a flow with prefect-ray's `RayTaskRunner` on an existing
cluster, offline against Prefect's ephemeral local server.

Run by bench/ray_engine.py with bench/.venvs/prefect-ray/bin/python; prints one marked JSON
line. Every task is `.submit()`ted (a task called directly would run in the driver, not on Ray);
the chain passes each future to the next task. As in bench/peers/prefect_case.py, `seconds` is
the flow call and `seconds_until_recorded` waits until the server holds every task run as
COMPLETED (what scanflow's `engine.run` guarantees on return).
"""

from __future__ import annotations

import sys
import time
from typing import Any

from common import emit, join, measure, noop, read_spec, run_pass, timed, total_steps

DRAIN_TIMEOUT = 300.0
POLL = 0.5


def _pass(prev: Any = None) -> Any:
    return run_pass(sys.executable, prev)


def main() -> None:
    spec = read_spec()
    t0 = time.perf_counter()
    import prefect
    import prefect_ray
    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect_ray import RayTaskRunner

    import_s = time.perf_counter() - t0
    noop_t = task(noop, name="noop")
    join_t = task(join, name="join")
    pass_t = task(_pass, name="pass")
    runner = RayTaskRunner(address=spec["address"],
                           init_kwargs={"logging_level": "ERROR", "log_to_driver": False})

    @flow(name="chain", task_runner=runner)
    def chain(n: int) -> Any:
        prev = None
        for _ in range(n):
            prev = noop_t.submit(prev)
        return prev.result()

    @flow(name="fanout", task_runner=runner)
    def fanout(n: int) -> Any:
        root = noop_t.submit()
        futures = [noop_t.submit(root) for _ in range(n)]
        return join_t.submit(futures).result()

    @flow(name="subprocess", task_runner=runner)
    def subproc(n: int) -> Any:
        prev = None
        for _ in range(n):
            prev = pass_t.submit(prev)
        return prev.result()

    flows = {"chain": chain, "fanout": fanout, "subprocess": subproc}
    api: list[Any] = []

    def recorded(flow_run_id: Any) -> int:
        if not api:
            api.append(get_client(sync_client=True).__enter__())
        body = {"flow_runs": {"id": {"any_": [str(flow_run_id)]}},
                "task_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}}
        return int(api[0]._client.post("/task_runs/count", json=body).json())

    def run_case(kind: str, n: int) -> dict[str, Any]:
        t = time.perf_counter()
        state = flows[kind](n, return_state=True)
        seconds = time.perf_counter() - t
        if not state.is_completed():
            raise RuntimeError(f"prefect {kind} flow ended {state.type}")
        expected = total_steps(kind, n)
        while recorded(state.state_details.flow_run_id) < expected:
            if time.perf_counter() - t > seconds + DRAIN_TIMEOUT:
                return {"seconds": seconds, "seconds_until_recorded": None}
            time.sleep(POLL)
        return {"seconds": seconds, "seconds_until_recorded": time.perf_counter() - t}

    warm = timed(lambda: [run_case(k, 3) for k in flows])
    try:
        cases = measure(spec, run_case)
    finally:
        if api:
            api[0].__exit__(None, None, None)
    emit({"system": "prefect_ray", "version": f"prefect {prefect.__version__}, prefect-ray "
          f"{getattr(prefect_ray, '__version__', '?')}", "import_seconds": import_s,
          "warmup_seconds": warm, "cases": cases,
          "excluded": "import, the ephemeral server start, Ray connection (a warm-up flow of each kind)",
          "included": "the flow call (flow run + task runs on Ray through the local API server); "
                      "seconds_until_recorded also waits until the server has stored every task run"})


if __name__ == "__main__":
    main()
