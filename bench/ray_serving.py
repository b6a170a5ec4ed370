"""scanflow's services on Ray Serve against a raw Ray Serve deployment of the same model, on one
local Ray cluster, with scanflow's local server alongside (issue 16's benchmark).

Not a test: a benchmark you run by hand (README, "Ray Serve benchmark")::

    .venv/bin/python bench/ray_serving.py                  # full run, ~10 min on 2 cores
    .venv/bin/python bench/ray_serving.py --seconds 6 --rounds 2 --concurrency 16

One run: a Ray cluster of a head and two worker nodes of 1 CPU (`ray start`, as
bench/ray_engine.py), a fresh PostgreSQL database and an `mlflow server --serve-artifacts` (the
ray backend's shared state); the MNIST champion of bench/serving.py registered there. Systems,
all up at once and taking turns (the order reversed every round), loaded by wrk at each
concurrency (installed when missing, else the run refuses):

- scanflow_ray: `scanflow deploy` on the ray backend (router + 1 replica of 1 CPU, micro-batching,
  the prediction log on, to PostgreSQL);
- scanflow_ray_nolog: the same with the prediction log off (what the log costs there);
- ray_raw: a raw Ray Serve deployment on the same cluster (1 replica of 1 CPU; `__call__` parses
  the JSON and calls `predict`, no logging) - the same Ray as the cluster's, so it runs from the
  project's virtualenv (a second one could not join this cluster);
- scanflow_local: scanflow's local server (1 replica, log on, SQLite) on the same machine.

Writes bench/results/ray_serving.json (`{"c16": {"scanflow_ray": {"rps", "p50_ms", "p99_ms"}}}`,
as serving.json) and ray_serving_extra.json (non-2xx, the log's cost, the target, versions).
Target (issue 16): scanflow_ray >= 1.5x ray_raw req/s at c=16 with p99 no worse, log on.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from ray_engine import LocalCluster, free_port, postgres_database, start_mlflow  # noqa: E402
from serving import (  # noqa: E402
    EXAMPLES,
    LOGS,
    MODEL,
    RESULTS,
    LoadGen,
    SystemRun,
    Target,
    ensure_wrk,
    first_prediction,
    load_data,
    loadavg,
    measure,
    scanflow_metrics,
)

SYSTEMS = ["scanflow_ray", "scanflow_ray_nolog", "ray_raw", "scanflow_local"]
SERVICE = "mnist"
TARGET_RATIO = 1.5  # scanflow_ray req/s over ray_raw's at c=16, with p99 no worse


class RawClassifier:
    """The raw Ray Serve peer: what a Ray Serve user writes for this model."""

    def __init__(self, model_file: str) -> None:
        import joblib

        self.model = joblib.load(model_file)

    async def __call__(self, request: Any) -> dict[str, Any]:
        import numpy as np

        body = await request.json()
        x = np.asarray(body["instances"], dtype=np.float64)
        return {"predictions": self.model.predict(x).tolist()}


def register(tracking: str, data: tuple[Any, ...], rows: int) -> tuple[Any, str]:
    """The case study's champion (as bench/serving.py), registered on the server (its files in
    the server's proxied artifact store)."""
    import mlflow
    import mnist_common
    from mlflow import MlflowClient

    from scanflow.tracking.mlflow_tracking import log_sklearn_model

    x_train, y_train, x_test, _ = data
    est = mnist_common.build_model(mnist_common.flat(x_train[:rows]), y_train[:rows], 128, 5, seed=0)
    mlflow.set_tracking_uri(tracking)
    with mlflow.start_run():
        _, version = log_sklearn_model(est, mnist_common.flat(x_test[:100]), MODEL)
    MlflowClient(tracking_uri=tracking).set_registered_model_alias(MODEL, "champion", version)
    return est, str(version)


@contextlib.contextmanager
def scanflow_ray(settings: Any, store: Any, name: str, log: bool) -> Iterator[Target]:
    from scanflow.control import backends
    from scanflow.serving.app import PredLogConfig

    deployer = backends.deployer(settings, store, predlog=PredLogConfig(enabled=log))
    t0 = time.perf_counter()
    deployer.deploy(name, app="bench", team="bench", model=MODEL, replicas=1)
    base = deployer.url(name)
    try:
        def behind() -> int:
            return int(scanflow_metrics(base)["predict_200"]) - store.count_predictions(name)[0]

        # /metrics of one replica (the only one): its counters are the service's.
        yield Target(url=f"{base}/predict", base=base, start_seconds=time.perf_counter() - t0,
                     info={"replicas": 1, "num_cpus": 1.0, "predlog": log},
                     metrics=lambda: scanflow_metrics(base), log_behind=behind if log else None)
    finally:
        deployer.stop(name)


@contextlib.contextmanager
def ray_raw(model_file: Path, port: int) -> Iterator[Target]:
    from ray import serve

    t0 = time.perf_counter()
    serve.start(proxy_location="HeadOnly",  # as scanflow starts it; a no-op once Serve runs
                http_options={"host": "127.0.0.1", "port": port})
    deployment: Any = serve.deployment
    serve.run(deployment(RawClassifier).options(num_replicas=1, ray_actor_options={"num_cpus": 1})
              .bind(str(model_file)), name="raw", route_prefix="/raw")
    base = f"http://127.0.0.1:{port}/raw"
    try:
        yield Target(url=base, base=base, start_seconds=time.perf_counter() - t0,
                     info={"replicas": 1, "num_cpus": 1.0})
    finally:
        serve.delete("raw")


@contextlib.contextmanager
def scanflow_local(workspace: Path, tracking: str) -> Iterator[Target]:
    from scanflow.serving import LocalDeployer
    from scanflow.settings import Settings
    from scanflow.store import Store

    settings = Settings(workspace=workspace, tracking_uri=tracking, backend="local",
                        store_url=f"sqlite:///{workspace / 'scanflow.db'}").ensure()
    store = Store(settings.store)
    deployer = LocalDeployer(settings, store)
    t0 = time.perf_counter()
    deployer.deploy("local", app="bench", team="bench", model=MODEL, replicas=1)
    base = deployer.url("local")
    try:
        yield Target(url=f"{base}/predict", base=base, start_seconds=time.perf_counter() - t0,
                     info={"replicas": 1, "predlog": True}, metrics=lambda: scanflow_metrics(base))
    finally:
        deployer.stop("local")
        store.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=15, help="measured seconds per point [15]")
    ap.add_argument("--rounds", type=int, default=3, help="turns per point, order reversed each [3]")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up seconds before each turn [2]")
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"any of {','.join(SYSTEMS)}")
    ap.add_argument("--data-workspace", type=Path, default=BENCH.parent / ".scanflow")
    ap.add_argument("--train-rows", type=int, default=20_000)
    ap.add_argument("--out", type=Path, default=RESULTS / "ray_serving.json")
    args = ap.parse_args(argv)
    systems = [s for s in SYSTEMS if s in args.systems.split(",")]
    if not systems or len(systems) != len([s for s in args.systems.split(",") if s]):
        ap.error(f"--systems: choose from {', '.join(SYSTEMS)}")
    try:
        concurrency = [int(c) for c in args.concurrency.split(",") if c]
    except ValueError:
        ap.error(f"--concurrency: expected integers like 1,16,64, got {args.concurrency!r}")
    if not concurrency or min(concurrency) < 1 or args.rounds < 1 or args.seconds < args.rounds:
        ap.error("--concurrency values >= 1, --rounds >= 1, --seconds >= --rounds")
    turn = args.seconds // args.rounds

    def say(msg: str) -> None:
        print(msg, flush=True)

    wrk = ensure_wrk(say)
    os.environ.update(RAY_USAGE_STATS_ENABLED="0", MLFLOW_DISABLE_TELEMETRY="true")
    LOGS.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="scanflow-bench-rayserve-"))
    started = dt.datetime.now().astimezone()
    extra: dict[str, Any] = {"date": started.isoformat(timespec="seconds"), "cores": os.cpu_count(),
                             "load_average": {"start": loadavg()}, "skipped": {}}
    cluster = LocalCluster(Path(sys.executable), {**os.environ}, LOGS / "ray-serving-cluster.log")
    mlflow_proc = None
    runs: dict[str, SystemRun] = {}
    try:
        say("starting a Ray cluster (head + 2 workers of 1 CPU), PostgreSQL db, mlflow server ...")
        cluster.start()
        mlflow_proc, tracking = start_mlflow(tmp, LOGS / "ray-serving-mlflow.log")
        pg = postgres_database("scanflow_bench_ray_serving")
        serve_port = free_port()
        os.environ.update(SCANFLOW_BACKEND="ray", SCANFLOW_STORE_URL=pg, SCANFLOW_TRACKING_URI=tracking,
                          SCANFLOW_RAY_ADDRESS=cluster.address, SCANFLOW_SERVE_PORT=str(serve_port),
                          SCANFLOW_WORKSPACE=str(tmp / "ws"))
        from scanflow.settings import Settings
        from scanflow.store import Store

        settings = Settings().ensure()
        store = Store(settings.store)
        from scanflow.engine.ray_backend import connect

        connect(cluster.address)
        sys.path.insert(0, str(EXAMPLES))
        data = load_data(args.data_workspace)
        say("training and registering the MNIST champion ...")
        est, version = register(tracking, data, args.train_rows)
        import joblib
        import mnist_common

        model_file = tmp / "model.joblib"
        joblib.dump(est, model_file)
        body = json.dumps({"instances": mnist_common.flat(data[2][:1]).tolist()}).encode()
        gen = LoadGen(wrk, body, tmp)
        extra.update(model_version=version, request_bytes=len(body), cluster="head + 2 workers, 1 CPU each",
                     loadgen=f"wrk -t1 -c<c> -d{turn}s --latency (POST the row as JSON)")
        with contextlib.ExitStack() as stack:
            for name in systems:
                say(f"starting {name} ...")
                cm = (scanflow_ray(settings, store, name, log=name == "scanflow_ray")
                      if name.startswith("scanflow_ray") else
                      ray_raw(model_file, serve_port) if name == "ray_raw" else
                      scanflow_local(tmp / "local-ws", tracking))
                try:
                    target = stack.enter_context(cm)
                    runs[name] = SystemRun(target, first_prediction=first_prediction(target.url, body))
                except Exception as exc:  # one system failing must not lose the others' figures
                    say(f"  FAILED: {type(exc).__name__}: {exc}")
                    extra["skipped"][name] = f"{type(exc).__name__}: {exc}"[:2000]
                    continue
                say(f"  up in {target.start_seconds:.1f} s at {target.url}")
            say(f"\nmeasuring {', '.join(runs)} (load average {loadavg()})")
            measure(runs, gen, concurrency, args.rounds, turn, args.warmup, say)
        results = {f"c{c}": {n: {k: round(getattr(r.point(c), k), 2) for k in ("rps", "p50_ms", "p99_ms")}
                             for n, r in runs.items()} for c in concurrency}
        extra["non2xx"] = {f"c{c}": {n: r.point(c).non2xx + r.point(c).errors for n, r in runs.items()}
                           for c in concurrency}
        extra["first_prediction"] = {n: r.first_prediction for n, r in runs.items()}
        extra["load_average"]["end"] = loadavg()
        say("\n" + _table(results, list(runs)))
        verdict = _target(results, extra)
        say(verdict)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        args.out.with_name(args.out.stem + "_extra.json").write_text(json.dumps(extra, indent=1) + "\n")
        say(f"wrote {args.out} and {args.out.stem}_extra.json")
        return 0
    finally:
        with contextlib.suppress(Exception):
            import ray

            ray.shutdown()
        if mlflow_proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(mlflow_proc.pid, 9)
        cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _table(results: dict[str, dict[str, dict[str, float]]], names: list[str]) -> str:
    lines = ["| system | " + " | ".join(f"{c}: req/s (p50 / p99 ms)" for c in results) + " |",
             "|---|" + "---|" * len(results)]
    for n in names:
        cells = [f"{results[c][n]['rps']:,.0f} ({results[c][n]['p50_ms']} / {results[c][n]['p99_ms']})"
                 if n in results[c] else "-" for c in results]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _target(results: dict[str, dict[str, dict[str, float]]], extra: dict[str, Any]) -> str:
    """Issue 16's target at c=16, and the prediction log's cost on Ray."""
    c16 = results.get("c16", {})
    out = []
    if "scanflow_ray" in c16 and "ray_raw" in c16:
        ours, raw = c16["scanflow_ray"], c16["ray_raw"]
        ratio = ours["rps"] / raw["rps"] if raw["rps"] else float("inf")
        ok = ratio >= TARGET_RATIO and ours["p99_ms"] <= raw["p99_ms"]
        extra["target"] = {"ratio_rps": round(ratio, 2), "p99_ms": [ours["p99_ms"], raw["p99_ms"]],
                           "pass": ok}
        out.append(f"target c=16: scanflow_ray {ratio:.2f}x ray_raw req/s (>= {TARGET_RATIO}), p99 "
                   f"{ours['p99_ms']} vs {raw['p99_ms']} ms: {'PASS' if ok else 'FAIL'}")
    if "scanflow_ray" in c16 and "scanflow_ray_nolog" in c16:
        cost = 1 - c16["scanflow_ray"]["rps"] / c16["scanflow_ray_nolog"]["rps"]
        extra["predlog_cost_c16"] = round(cost, 3)
        out.append(f"the prediction log costs {cost:.1%} of req/s at c=16 on Ray Serve")
    return "\n".join(out) or "target not evaluated (a system is missing)"


if __name__ == "__main__":
    sys.exit(main())
