"""scanflow on Ray: the same steps as a scanflow workflow run by the Ray backend on an existing
cluster, with its shared state (a PostgreSQL store and an MLflow tracking server) made by
bench/ray_engine.py.

Run with the project's python; prints one marked JSON line. Each repetition is a fresh run (cache
off) of an application built in code like bench/engine.py's: in-process `noop` / `join` steps
(`common.noop`, importable on every node through PYTHONPATH) and `run: python -c pass` steps.
`driver_peak_mb` is this driver's peak resident memory after the case (ru_maxrss).
"""

from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Any

from common import emit, measure, noop, read_spec, timed


def main() -> None:
    spec = read_spec()
    t0 = time.perf_counter()
    import scanflow
    from scanflow.control import backends
    from scanflow.settings import Settings
    from scanflow.spec import Application
    from scanflow.spec.models import Step, Workflow
    from scanflow.store import Store

    import_s = time.perf_counter() - t0
    settings = Settings(workspace=Path(spec["workspace"]), backend="ray", ray_address=spec["address"],
                        store_url=spec["store"], tracking_uri=spec["tracking"]).ensure()
    store = Store(settings.store)
    t0 = time.perf_counter()
    engine = backends.engine(settings, store)
    init_s = time.perf_counter() - t0

    def build(kind: str, n: int) -> Application:
        if kind == "chain":
            steps = [Step(name=f"s{i}", call=noop, after=[f"s{i - 1}"] if i else []) for i in range(n)]
        elif kind == "fanout":
            branches = [Step(name=f"b{i}", call=noop, after=["root"]) for i in range(n)]
            steps = [Step(name="root", call=noop), *branches,
                     Step(name="join", call=noop, after=[b.name for b in branches])]
        else:
            steps = [Step(name=f"p{i}", run="python -c pass", after=[f"p{i - 1}"] if i else [])
                     for i in range(n)]
        return Application(app="bench", team="bench", workflows={kind: Workflow(steps=steps)})

    apps: dict[tuple[str, int], Application] = {}

    def run_case(kind: str, n: int) -> dict[str, Any]:
        app = apps.setdefault((kind, n), build(kind, n))
        t = time.perf_counter()
        result = engine.run(app, kind, cache=False)
        seconds = time.perf_counter() - t
        if not result.ok:
            raise RuntimeError(f"scanflow {kind} run ended {result.status}: {result.error}")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {"seconds": seconds, "driver_peak_mb": round(peak, 1)}

    warm = timed(lambda: [run_case(k, 3) for k in ("chain", "fanout", "subprocess")])
    cases = measure(spec, run_case)
    store.close()
    emit({"system": "scanflow_ray", "version": f"scanflow {scanflow.__version__}",
          "import_seconds": import_s, "engine_seconds": init_s, "warmup_seconds": warm,
          "cases": cases,
          "excluded": "imports, building the engine (connecting to Ray, the store and MLflow), "
                      "building the spec, a warm-up run of each kind",
          "included": "engine.run(...): the run and every step recorded in PostgreSQL, MLflow "
                      "tracking on the server, steps as Ray tasks"})


if __name__ == "__main__":
    main()
