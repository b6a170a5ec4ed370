"""Prefect 3 peer: tasks in a flow, offline against Prefect's ephemeral local server.

Run by bench/engine.py with bench/.venvs/prefect/bin/python; prints one marked JSON line.
The first (warm-up) flows start the ephemeral server and create its SQLite database; they are
timed separately and excluded from the case timings.

Prefect records task runs asynchronously: the flow call returns while the server is still
ingesting the task-run events. `seconds` is the flow call; `seconds_until_recorded` runs until
the server holds every task run as COMPLETED (what scanflow's `engine.run` guarantees on return).
Each repetition waits for that point before the next one starts, so no backlog leaks into it.
"""

from __future__ import annotations

import time
from typing import Any

from common import emit, join, measure, noop, read_spec, run_pass, timed, total_steps

DRAIN_TIMEOUT = 300.0
POLL = 0.5


def main() -> None:
    """Warm up, then time each case's flow call (and until all its task runs are recorded)."""
    spec = read_spec()
    python: str = spec["python"]
    t0 = time.perf_counter()
    import prefect
    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.task_runners import ThreadPoolTaskRunner

    import_s = time.perf_counter() - t0

    noop_t = task(noop, name="noop")
    join_t = task(join, name="join")
    pass_t = task(run_pass, name="pass")
    runner = ThreadPoolTaskRunner(max_workers=int(spec["workers"]))

    @flow(name="chain", task_runner=runner)
    def chain(n: int) -> Any:
        prev = None
        for _ in range(n):
            prev = noop_t(prev)
        return prev

    @flow(name="fanout", task_runner=runner)
    def fanout(n: int) -> Any:
        root = noop_t()
        futures = [noop_t.submit(root) for _ in range(n)]
        return join_t(futures)  # resolves (waits for) every future

    @flow(name="subprocess", task_runner=runner)
    def subproc(n: int) -> Any:
        prev = None
        for _ in range(n):
            prev = pass_t(python, prev)
        return prev

    flows = {"chain": chain, "fanout": fanout, "subprocess": subproc}

    api: list[Any] = []  # one API client, opened after the warm-up started the server

    def recorded(flow_run_id: Any) -> int:
        """Task runs of this flow run the server holds as COMPLETED."""
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

    # Warm-up: starts the ephemeral API server (one-time cost, excluded from the timings).
    warm = timed(lambda: [run_case(k, 3) for k in flows])
    try:
        cases = measure(spec, run_case)
    finally:
        if api:
            api[0].__exit__(None, None, None)
    emit({
        "system": "prefect", "version": prefect.__version__, "import_seconds": import_s,
        "warmup_seconds": warm, "cases": cases,
        "excluded": "import, ephemeral server start and DB creation (a warm-up flow of each kind)",
        "included": "the flow call (flow run + task runs through the local API server); "
                    "seconds_until_recorded also waits until the server has stored every task run",
    })


if __name__ == "__main__":
    main()
