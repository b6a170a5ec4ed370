"""Does a second replica add capacity? One vs two replicas of a CPU-bound model, each replica
held to the same CPU limit by its cgroup (`resources: {cpus: 0.5}`), loaded with wrk.

Not a test: a benchmark you run by hand (as root, on a machine whose cgroups are writable)::

    .venv/bin/python bench/scaling.py                     # ~1 min
    .venv/bin/python bench/scaling.py --cpus 0.5 --spin-ms 20 --seconds 15 --connections 8

The model burns `--spin-ms` of CPU per request (a busy loop on the thread's CPU clock), so a
replica's capacity is its CPU limit divided by that. Each configuration is deployed fresh in a
temporary workspace, warmed up, then loaded by `wrk -t1 -c<connections>`; CPU use is read from
the replicas' own cgroup counters over the measured interval (CPU-seconds per second, summed
over the replicas). Prints a table and writes bench/results/scaling.json.

Refuses to run (exit 2) without wrk (it tries `apt-get install -y wrk` first) or when the
limits cannot be enforced here: an in-process client or unlimited replicas would measure
something else.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
sys.path.insert(0, str(BENCH))

from engine import machine  # noqa: E402 - bench/engine.py: cores, CPU, memory, load
from serving import lua_script, parse_wrk  # noqa: E402 - bench/serving.py: wrk's body, its output

MODEL = "spin"
_MODEL_CODE = '''
import time

import mlflow
from mlflow.pyfunc import PythonModel


class Spin(PythonModel):
    """Burns `ms` milliseconds of CPU per row: capacity is CPU divided by that."""

    def predict(self, context, model_input, params=None):
        end = time.thread_time() + float(model_input["ms"].sum()) / 1000
        n = 0
        while time.thread_time() < end:
            n += 1
        return model_input["ms"].to_numpy()


mlflow.models.set_model(Spin())
'''


def find_wrk() -> str:
    """wrk, installed with apt-get when missing; exit 2 when neither works."""
    wrk = shutil.which("wrk")
    if wrk:
        return wrk
    if shutil.which("apt-get") and os.geteuid() == 0:
        print("wrk not found: apt-get install -y wrk", flush=True)
        subprocess.run(["apt-get", "install", "-y", "wrk"], check=False)
        wrk = shutil.which("wrk")
        if wrk:
            return wrk
    raise SystemExit("error: this benchmark needs wrk (apt-get install wrk); it does not fall "
                     "back to an in-process client, which would share the measured CPUs")


def register(settings: Any) -> None:
    import mlflow
    from mlflow import MlflowClient
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    code = settings.root / "spin_model.py"
    code.write_text(_MODEL_CODE)
    mlflow.set_tracking_uri(settings.tracking)
    client = MlflowClient(tracking_uri=settings.tracking)
    exp = client.create_experiment("scaling", artifact_location=(settings.artifacts / "mlruns").as_uri())
    sig = ModelSignature(inputs=Schema([ColSpec("double", "ms")]), outputs=Schema([ColSpec("double")]))
    with mlflow.start_run(experiment_id=exp):
        info = mlflow.pyfunc.log_model(name="model", python_model=str(code), signature=sig,
                                       pip_requirements=["pandas"])
    mv = mlflow.register_model(info.model_uri, MODEL)
    client.set_registered_model_alias(MODEL, "champion", mv.version)


def cpu_seconds(deployer: Any, service: str) -> float:
    """CPU-seconds the service's replicas used so far, from their cgroup counters."""
    from scanflow.serving import cgroups

    plan = deployer._plan(service)
    pids = [w["pid"] for w in deployer._workers(int(deployer._get(service).pid), Path(
        deployer._get(service).workdir))]
    return sum(float(cgroups.usage(plan, p)["cpu_seconds"] or 0.0) for p in pids)


def run_one(deployer: Any, wrk: str, lua: Path, replicas: int, cpus: float, args: argparse.Namespace
            ) -> dict[str, Any]:
    from scanflow.spec.models import ServiceResources

    service = f"spin-{replicas}r"
    deployer.deploy(service, app="bench", team="bench", model=MODEL, replicas=replicas,
                    resources=ServiceResources.model_validate({"cpus": cpus}))
    try:
        st = deployer.status(service)
        if not st["resources"]["enforced"]:
            raise SystemExit(f"error: {st['resources']['warning']}: refusing to measure "
                             "unlimited replicas")
        url = f"{deployer.url(service)}/predict"
        subprocess.run([wrk, "-t1", f"-c{args.connections}", f"-d{args.warmup}s", "-s", str(lua),
                        url], capture_output=True, check=True, timeout=args.warmup + 60)
        c0, t0 = cpu_seconds(deployer, service), time.monotonic()
        res = subprocess.run([wrk, "-t1", f"-c{args.connections}", f"-d{args.seconds}s",
                              "--latency", "--timeout", "10s", "-s", str(lua), url],
                             capture_output=True, text=True, timeout=args.seconds + 60)
        used, wall = cpu_seconds(deployer, service) - c0, time.monotonic() - t0
        if res.returncode != 0:
            raise RuntimeError(f"wrk failed: {res.stderr or res.stdout}")
        p = parse_wrk(res.stdout)
        return {"replicas": replicas, "cpus_per_replica": cpus, "req_per_s": round(p.rps, 1),
                "p50_ms": round(p.p50_ms, 1), "p99_ms": round(p.p99_ms, 1),
                "cpu_s_per_s": round(used / wall, 3), "requests": p.requests,
                "non_2xx": p.non2xx, "socket_errors": p.errors}
    finally:
        deployer.stop(service)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpus", type=float, default=0.5, help="CPU limit per replica")
    ap.add_argument("--replicas", default="1,2", help="replica counts to compare")
    ap.add_argument("--spin-ms", type=float, default=20.0, help="CPU milliseconds per request")
    ap.add_argument("--connections", type=int, default=8, help="wrk connections")
    ap.add_argument("--seconds", type=int, default=15, help="measured seconds per configuration")
    ap.add_argument("--warmup", type=int, default=3, help="seconds of load before measuring")
    ap.add_argument("--out", type=Path, default=RESULTS / "scaling.json")
    args = ap.parse_args(argv)
    try:
        counts = [int(n) for n in args.replicas.split(",")]
    except ValueError:
        ap.error(f"--replicas: a comma-separated list of integers, got {args.replicas!r}")
    if not 0 < args.cpus <= 64 or args.spin_ms <= 0 or args.seconds < 1 or min(counts) < 1:
        ap.error("--cpus in (0, 64], --spin-ms > 0, --seconds >= 1, replicas >= 1")
    wrk = find_wrk()

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from scanflow.serving import LocalDeployer, cgroups
    from scanflow.settings import Settings
    from scanflow.store import Store

    probe = cgroups.plan("bench-probe", args.cpus, None)
    cgroups.remove_all(probe)
    if not probe.enforced:
        raise SystemExit(f"error: limits not enforced here ({probe.unenforced}): nothing to measure")
    meta = machine()
    with tempfile.TemporaryDirectory(prefix="scanflow-scaling-") as tmp:
        settings = Settings(workspace=Path(tmp) / "ws").ensure()
        store = Store(settings.store)
        register(settings)
        body = json.dumps({"instances": [{"ms": args.spin_ms}]}).encode()
        lua = lua_script(body, Path(tmp) / "body.lua")
        deployer = LocalDeployer(settings, store)
        results = []
        for n in counts:
            print(f"{n} replica(s) x {args.cpus} CPU ...", flush=True)
            results.append(run_one(deployer, wrk, lua, n, args.cpus, args))
        store.close()
    meta["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    meta["cgroup"] = f"v{probe.version}"
    out = {"bench": "scaling", "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
           "machine": meta,
           "setup": {"model": f"pyfunc burning {args.spin_ms} ms of CPU per request",
                     "loadgen": f"wrk -t1 -c{args.connections} -d{args.seconds}s (after "
                                f"{args.warmup}s warm-up)",
                     "capacity_per_replica_req_per_s": round(args.cpus * 1000 / args.spin_ms, 1)},
           "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")

    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{args.spin_ms:g} ms of CPU per request, {args.cpus:g} CPU per replica, "
                    f"wrk -c{args.connections} ({args.seconds}s)")
    for c in ("replicas", "req/s", "p50 ms", "p99 ms", "CPU-s/s (all replicas)", "non-2xx"):
        t.add_column(c, justify="right")
    for r in results:
        t.add_row(str(r["replicas"]), f"{r['req_per_s']:.0f}", f"{r['p50_ms']:.0f}",
                  f"{r['p99_ms']:.0f}", f"{r['cpu_s_per_s']:.2f}", str(r["non_2xx"]))
    Console(width=120).print(t)
    print(f"load average {meta['loadavg_start']} -> {meta['loadavg_end']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
