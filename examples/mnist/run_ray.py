"""`make demo-ray`: the MNIST case study on a local 3-node Ray cluster, its files unchanged.

Starts what a cluster deployment has (README, "Running on Ray"): a Ray cluster of a head and two
worker nodes of 1 CPU each on this machine (`ray.cluster_utils.Cluster`, as Ray's own tests do),
a fresh PostgreSQL database on 127.0.0.1:5432 for scanflow's store and an `mlflow server
--serve-artifacts` on 127.0.0.1; then runs, through the `scanflow` CLI with `SCANFLOW_BACKEND=ray`:
the data team's `publish` (the MNIST wheel `make data` fetched is a `type: path` parameter: it
travels to the node that converts it), the data science team's `train` (two candidates in
parallel on two nodes, the better one registered as champion), and its `retrain` on 500 labelled
brightness-shifted digits (the executor's `new_data` file, shipped the same way). It prints where
each step ran and stops everything it started.

By default (`--loop`) it then runs the whole case study of `make demo` (`run.py`: the service, its
agents, the traffic phases, the report) with everything on the cluster: the workflows as Ray
tasks, the agents as detached Ray actors, the service on Ray Serve. Arguments it does not know
go to `run.py` (e.g. `--rate 50`). `--no-loop` stops after the three workflows.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from corruptions import corrupt
from mnist_common import flat
from mnist_data import WHEEL_GLOB, convert_wheel, load_mnist_cache

HERE = Path(__file__).resolve().parent
NODES = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(check: object, what: str, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.3)
    raise SystemExit(f"timed out waiting for {what}")


def start_mlflow(folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    import httpx

    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--workers", "1", "--host", "127.0.0.1", "--port",
         str(port), "--backend-store-uri", f"sqlite:///{folder / 'server.db'}", "--serve-artifacts",
         "--artifacts-destination", str(folder / "artifacts")],
        stdout=open(folder / "mlflow-server.log", "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
        start_new_session=True, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            raise SystemExit(f"mlflow server exited: see {folder / 'mlflow-server.log'}")
        try:
            return httpx.get(f"{url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(up, "the MLflow server")
    return proc, url


def fresh_database(name: str) -> str:
    from sqlalchemy import create_engine, text

    admin = create_engine("postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
                          isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        c.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


def scanflow(env: dict[str, str], *args: str) -> str:
    """One CLI command on the cluster; its output, echoed; exits on failure."""
    cmd = [str(Path(sys.executable).parent / "scanflow"), *args]
    print("$ scanflow " + " ".join(args), flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    print(proc.stdout.rstrip(), flush=True)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"scanflow {' '.join(args)} failed (exit {proc.returncode})")
    return proc.stdout


def where_steps_ran(env: dict[str, str], run_id: str, steps: list[str]) -> None:
    for step in steps:
        log = subprocess.run([str(Path(sys.executable).parent / "scanflow"), "logs", run_id, step],
                             env=env, capture_output=True, text=True).stdout
        heads = re.findall(r"--- attempt (\d+) on Ray node (\w+) \(([^,]+), working dir ([^)]+)\)", log)
        for attempt, node, host, cwd in heads:
            print(f"    {step:<8} attempt {attempt}: node {node} ({host}), working dir {cwd}")
        for line in log.splitlines():  # what the step found, in its own words
            if line.startswith(("MNIST:", "candidate v", "candidates ")):
                print(f"             {line[:400]}")


def last_run_id(env: dict[str, str]) -> str:
    """The newest run (`runs list` lists the newest first)."""
    out = subprocess.run([str(Path(sys.executable).parent / "scanflow"), "runs", "list", "--json",
                          "--limit", "1"], env=env, capture_output=True, text=True, check=True).stdout
    return str(json.loads(out)[0]["id"])


def case_study(env: dict[str, str], ws: Path, wheel: Path, store: str, rest: list[str]) -> int:
    """`make demo`'s case study (run.py) with this cluster, a fresh store and the same MLflow
    server: the workflows, the agents and the service on Ray. Its exit code (1: a target missed)."""
    import run  # this folder's `make demo`: imported here, where the environment is the cluster's

    print("\nthe case study of `make demo` on the cluster (service on Ray Serve, agents as Ray "
          "actors)", flush=True)
    driver = ws / "loop"
    shutil.rmtree(driver, ignore_errors=True)
    (driver / "downloads").mkdir(parents=True)
    shutil.copy(wheel, driver / "downloads" / wheel.name)  # the driver's own reads of MNIST
    mlflow_proc, tracking = start_mlflow(driver / "mlflow-server")  # a registry of its own
    os.environ.update({**env, "SCANFLOW_STORE_URL": store, "SCANFLOW_TRACKING_URI": tracking})
    try:
        return int(run.main(["--workspace", str(driver), "--wheel", str(wheel), *rest]))
    finally:
        os.killpg(mlflow_proc.pid, signal.SIGTERM)
        mlflow_proc.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", type=Path, default=Path(".scanflow/ray-demo"))
    ap.add_argument("--downloads", type=Path, default=Path(".scanflow/downloads"),
                    help="where `make data` put the MNIST wheel")
    ap.add_argument("--database", default="scanflow_demo_ray",
                    help="the PostgreSQL database (on 127.0.0.1:5432) made afresh for the store")
    ap.add_argument("--train-subset", type=int, default=0,
                    help="clean training images for the two candidates (0 = all 60k; the CNN's 2 "
                         "epochs on all of them take ~1 min on a 1-CPU node)")
    ap.add_argument("--loop", action=argparse.BooleanOptionalAction, default=True,
                    help="after the workflows, the whole case study (run.py) on the cluster")
    args, rest = ap.parse_known_args()
    wheels = sorted(args.downloads.glob(WHEEL_GLOB))
    if not wheels:
        raise SystemExit(f"no MNIST wheel in {args.downloads}: run `make data` first")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    # SIGTERM (a CI timeout, `kill`) still stops the cluster and the servers it started
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    import ray
    from ray.cluster_utils import Cluster

    from scanflow.engine.ray_task import apps_dir

    ws = args.workspace.resolve()
    ws.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    mlflow_proc = None
    try:
        for _ in range(NODES - 1):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        shutil.rmtree(ws / "mlflow-server", ignore_errors=True)  # a fresh registry per demo
        mlflow_proc, tracking = start_mlflow(ws / "mlflow-server")
        store = fresh_database(args.database)
        print(f"cluster {cluster.address}: {NODES} nodes x 1 CPU; store {store}; MLflow {tracking} "
              f"({time.time() - t0:.0f} s)", flush=True)
        env = {**os.environ, "SCANFLOW_BACKEND": "ray", "SCANFLOW_RAY_ADDRESS": cluster.address,
               "SCANFLOW_STORE_URL": store, "SCANFLOW_TRACKING_URI": tracking,
               "SCANFLOW_WORKSPACE": str(ws / "driver"), "MLFLOW_DISABLE_TELEMETRY": "true"}

        scanflow(env, "run", str(HERE / "data"), "publish", "-p", f"load.wheel={wheels[-1].resolve()}")
        where_steps_ran(env, last_run_id(env), ["load", "publish"])
        subset = [arg for step in ("train_a", "train_b")
                  for arg in ("-p", f"{step}.clean_subset={args.train_subset}")] if args.train_subset else []
        scanflow(env, "run", str(HERE / "datascience"), "train", *subset)
        where_steps_ran(env, last_run_id(env), ["fetch", "train_a", "train_b", "select"])

        # 500 labelled brightness-shifted test digits, as the executor collects them
        convert_wheel(wheels[-1], ws / "mnist.npz")
        _, _, x_test, y_test = load_mnist_cache(ws / "mnist.npz")
        pick = np.random.default_rng(0).permutation(len(y_test))[:500]
        x_new = corrupt(x_test[pick], "brightness", 2, seed=0)
        new = ws / "new_data.npz"
        np.savez(new, x_new=flat(x_new[:350]), y_new=y_test[pick][:350],
                 x_holdout=flat(x_new[350:]), y_holdout=y_test[pick][350:])
        scanflow(env, "run", str(HERE / "datascience"), "retrain", "-p", f"new_data={new}")
        where_steps_ran(env, last_run_id(env), ["retrain"])
        print(f"workflows done in {time.time() - t0:.0f} s", flush=True)
        if args.loop:
            code = case_study(env, ws, wheels[-1].resolve(), fresh_database(args.database + "_loop"),
                              rest)
            if code:
                raise SystemExit(code)
        print(f"done in {time.time() - t0:.0f} s; the records stay in {store} and {ws}",
              flush=True)
    finally:
        if mlflow_proc is not None:
            os.killpg(mlflow_proc.pid, signal.SIGTERM)
            mlflow_proc.wait(timeout=30)
        nodes = [n.node_id for n in cluster.list_all_nodes()]
        ray.shutdown()
        cluster.shutdown()
        for node in nodes:  # the app folders this cluster's nodes unpacked, no other's
            shutil.rmtree(apps_dir(node), ignore_errors=True)


if __name__ == "__main__":
    main()
