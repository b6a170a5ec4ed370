"""Per-step cost of scanflow's Ray backend against raw Ray tasks and Prefect 3 on Ray.

Not a test: a benchmark you run by hand (bench/README.md, "Ray engine benchmark")::

    .venv/bin/python bench/ray_engine.py            # full run
    .venv/bin/python bench/ray_engine.py --quick    # sizes / 10, 1 repetition

For each system it starts its own local 3-node Ray cluster (`ray start --head` + 2 x `ray start
--address`, 1 CPU each, all on 127.0.0.1) from that system's virtualenv (the project's `.venv` with
the `ray` extra for scanflow; bench/.venvs/ray and bench/.venvs/prefect-ray, created here on first
use, for the peers: a cluster runs one Python environment, and Prefect's tasks need Prefect on the
workers), runs the system's driver in its own process, and stops exactly the processes of that
cluster (never `ray stop`, which would stop every Ray process on the machine). scanflow also gets a
fresh PostgreSQL database and an `mlflow server --serve-artifacts` on 127.0.0.1, as its Ray backend
requires. It refuses to report a system it cannot run as it should (e.g. a scanflow without the Ray
backend) instead of measuring something weaker.

Writes bench/results/ray_engine.json: {"<case>": {"<system>": {"ms_per_step": float, "wall_s":
float, ...}}} with ms_per_step = median wall seconds / steps (absolute, not an overhead: raw Ray is
the baseline here), and prints the issue's targets as PASS/FAIL.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from engine import LOGS, RESULTS, VENVS, ensure_venv, machine
from peers.common import MARKER

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
FULL = {"fanout_1000": 1000, "chain_200": 200, "subprocess_100": 100, "fanout_10000": 10000}
QUICK = {"fanout_1000": 100, "chain_200": 20, "subprocess_100": 10, "fanout_10000": 1000}
SCANFLOW_ONLY = {"fanout_10000"}
SYSTEMS = ["ray_raw", "scanflow_ray", "prefect_ray"]
PEER_VENVS = {"ray_raw": ("ray", "requirements-ray.txt", ["ray"]),
              "prefect_ray": ("prefect-ray", "requirements-prefect-ray.txt",
                              ["prefect", "prefect-ray", "ray"])}
NODES = 3
NODE_CPUS = 1
TARGET_VS_RAY = 2.0  # scanflow's per-step time on Ray <= 2x raw Ray's per task
TARGET_VS_PREFECT = 10.0  # ... and >= 10x lower than Prefect-on-Ray's
TARGET_DRIVER_MB = 500.0  # the 10,000-step fan-out's driver memory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def python_of(system: str) -> Path:
    if system == "scanflow_ray":
        return Path(sys.executable)
    return VENVS / PEER_VENVS[system][0] / "bin" / "python"


class LocalCluster:
    """A head and NODES-1 worker nodes from one virtualenv's `ray`, stopped by port."""

    def __init__(self, python: Path, env: dict[str, str], log: Path) -> None:
        self.ray = python.parent / "ray"
        self.env = env
        self.log = log
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        # short: Ray's unix sockets live under it (108-byte limit)
        self.temp = Path(tempfile.mkdtemp(prefix="rb", dir="/tmp"))

    def start(self) -> None:
        common = [f"--num-cpus={NODE_CPUS}", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
        with open(self.log, "a") as f:
            subprocess.run([str(self.ray), "start", "--head", f"--port={self.port}",
                            f"--temp-dir={self.temp}", "--include-dashboard=false", *common],
                           check=True, env=self.env, stdout=f, stderr=subprocess.STDOUT, timeout=120)
            for _ in range(NODES - 1):
                subprocess.run([str(self.ray), "start", f"--address={self.address}", *common],
                               check=True, env=self.env, stdout=f, stderr=subprocess.STDOUT,
                               timeout=120)

    def stop(self) -> None:
        """Kill the processes of this cluster only (never `ray stop`, which stops every Ray
        process on the machine): those naming its temp dir or GCS port, and their descendants
        (agents and workers rename themselves `ray::...`)."""
        mark = re.compile(rf"({re.escape(str(self.temp))}|:{self.port}\b|gcs_server_port={self.port}\b)")
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = cluster_pids(mark)
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            if not pids:
                break
            time.sleep(2.0)
        shutil.rmtree(self.temp, ignore_errors=True)


def cluster_pids(mark: re.Pattern[str]) -> set[int]:
    """Processes whose command line matches `mark`, with all their descendants."""
    parent: dict[int, int] = {}
    found: set[int] = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (d / "stat").read_text()
        except OSError:
            continue
        parent[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
        if mark.search(cmd):
            found.add(int(d.name))
    grew = True
    while grew:
        more = {pid for pid, pp in parent.items() if pp in found and pid not in found}
        found |= more
        grew = bool(more)
    return found


def start_mlflow(tmp: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`mlflow server --serve-artifacts` on a free 127.0.0.1 port; its URL once it answers."""

    port = free_port()
    out = open(log, "ab")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port",
         str(port), "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}", "--serve-artifacts",
         "--artifacts-destination", str(tmp / "artifacts"), "--workers", "1"],
        stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    url = f"http://127.0.0.1:{port}"
    return proc, answering(proc, url, 120, "mlflow server", log)


def start_prefect_server(python: Path, env: dict[str, str], log: Path
                         ) -> tuple[subprocess.Popen[bytes], str]:
    """`prefect server start` on a free 127.0.0.1 port; its API URL once it answers."""

    port = free_port()
    out = open(log, "ab")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen([str(python.parent / "prefect"), "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True, env=env)
    url = f"http://127.0.0.1:{port}/api"
    return proc, answering(proc, url, 180, "prefect server", log)


def answering(proc: subprocess.Popen[bytes], url: str, timeout: float, what: str, log: Path) -> str:
    """`url` once its `/health` answers 200; the server's process group killed if it never does."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)
    raise RuntimeError(f"{what} did not answer on {url} (log: {log})")


def postgres_database(name: str) -> str:
    """A fresh database on the local PostgreSQL (trust auth); its SQLAlchemy URL."""
    from sqlalchemy import create_engine, text

    admin = create_engine("postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
                          isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        c.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


def scanflow_has_ray() -> str | None:
    """Why scanflow's Ray backend cannot be measured here, or None."""
    try:
        from scanflow.control import backends
    except ImportError as exc:
        return f"scanflow is not importable: {exc}"
    if "ray" not in getattr(backends, "BACKENDS", ()):
        return "this scanflow has no Ray backend (SCANFLOW_BACKEND=ray is refused)"
    try:
        import ray  # noqa: F401
    except ImportError:
        return "ray is not installed in the project's venv (make install installs the `ray` extra)"
    return None


def run_system(system: str, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Start this system's cluster (and scanflow's store and tracker), run its driver, stop all."""
    LOGS.mkdir(parents=True, exist_ok=True)
    python = python_of(system)
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-ray-{system}-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SCANFLOW_", "PREFECT_", "RAY_"))}
    env.update({"RAY_USAGE_STATS_ENABLED": "0", "DO_NOT_TRACK": "true", "PYTHONUNBUFFERED": "1",
                "MLFLOW_DISABLE_TELEMETRY": "true",
                # the workers import the steps' functions (bench/peers/common.py) by module name
                "PYTHONPATH": os.pathsep.join([str(BENCH / "peers"), str(BENCH)])})
    cluster = LocalCluster(python, env, LOGS / f"ray-{system}-cluster.log")
    mlflow_proc: subprocess.Popen[bytes] | None = None
    prefect_proc: subprocess.Popen[bytes] | None = None
    spec = dict(spec)
    try:
        if system == "prefect_ray":
            # Tasks run in the cluster's worker processes: they must report to one API server
            # (as a Prefect-on-Ray deployment does), not each start an ephemeral one.
            env.update({"PREFECT_HOME": str(tmp / "prefect-home"),
                        "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
            prefect_proc, url = start_prefect_server(python, env, LOGS / "ray-prefect-server.log")
            env["PREFECT_API_URL"] = url
        t0 = time.perf_counter()
        cluster.start()
        spec["address"] = cluster.address
        started = time.perf_counter() - t0
        if system == "scanflow_ray":
            mlflow_proc, spec["tracking"] = start_mlflow(tmp, LOGS / "ray-scanflow-mlflow.log")
            spec["store"] = postgres_database(f"scanflow_bench_{os.getpid()}")
            spec["workspace"] = str(tmp / "driver-workspace")
            argv = [str(python), str(BENCH / "peers" / "scanflow_ray_case.py")]
        else:
            argv = [str(python), str(BENCH / "peers" / f"{system}_case.py")]
        out_path, err_path = LOGS / f"ray-{system}.stdout", LOGS / f"ray-{system}.log"
        with open(out_path, "w") as out, open(err_path, "w") as err:
            proc = subprocess.Popen([*argv, "--spec", json.dumps(spec)], cwd=tmp, env=env,
                                    stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
            try:
                code: int | None = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                code = None
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        lines = [ln for ln in out_path.read_text().splitlines() if ln.startswith(MARKER)]
        if code is None:
            return {"system": system, "error": f"timed out after {timeout:.0f}s (log: {err_path})"}
        if code != 0 or not lines:
            tail = "\n".join(err_path.read_text().splitlines()[-15:])
            return {"system": system, "error": f"exit code {code} (log: {err_path}):\n{tail}"}
        res: dict[str, Any] = json.loads(lines[-1][len(MARKER):])
        res["cluster_start_seconds"] = round(started, 1)
        return res
    finally:
        cluster.stop()
        for server in (mlflow_proc, prefect_proc):
            if server is not None:
                os.killpg(server.pid, signal.SIGTERM)
                server.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)


def summarise(raw: dict[str, dict[str, Any]], cases: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for case in cases:
        row: dict[str, Any] = {}
        for system, res in raw.items():
            got = res.get("cases", {}).get(case)
            if not got:
                continue
            med = statistics.median(got["seconds"])
            entry: dict[str, Any] = {"ms_per_step": round(med / got["steps"] * 1e3, 4),
                                     "wall_s": round(med, 4), "steps": got["steps"],
                                     "seconds": [round(s, 4) for s in got["seconds"]],
                                     "version": res.get("version")}
            rec = got.get("seconds_until_recorded")
            if rec and None not in rec:
                entry["ms_per_step_until_recorded"] = round(statistics.median(rec) / got["steps"] * 1e3, 4)
            if got.get("driver_peak_mb"):
                entry["driver_peak_mb"] = max(got["driver_peak_mb"])
            row[system] = entry
        out[case] = row
    return out


def targets(summary: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets, judged on this run; `met` is None where a system was not measured."""
    res: dict[str, Any] = {}
    for case, row in summary.items():
        sf = row.get("scanflow_ray", {}).get("ms_per_step")
        if case in SCANFLOW_ONLY:
            mb = row.get("scanflow_ray", {}).get("driver_peak_mb")
            res[f"{case}_driver_memory"] = {"rule": f"driver peak RSS <= {TARGET_DRIVER_MB:.0f} MB",
                                            "mb": mb, "met": None if mb is None else mb <= TARGET_DRIVER_MB}
            continue
        ray_ms = row.get("ray_raw", {}).get("ms_per_step")
        pf = row.get("prefect_ray", {})
        pf_ms = pf.get("ms_per_step_until_recorded", pf.get("ms_per_step"))
        res[f"{case}_vs_ray"] = {"rule": f"scanflow ms/step <= {TARGET_VS_RAY:g}x raw Ray's",
                                 "ratio": None if not (sf and ray_ms) else round(sf / ray_ms, 2),
                                 "met": None if not (sf and ray_ms) else sf <= TARGET_VS_RAY * ray_ms}
        res[f"{case}_vs_prefect"] = {
            "rule": f"scanflow ms/step >= {TARGET_VS_PREFECT:g}x lower than Prefect-on-Ray's",
            "ratio": None if not (sf and pf_ms) else round(pf_ms / sf, 2),
            "met": None if not (sf and pf_ms) else pf_ms >= TARGET_VS_PREFECT * sf}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--quick", action="store_true", help="sizes / 10, 1 repetition")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma list of {','.join(SYSTEMS)}")
    ap.add_argument("--cases", default=",".join(FULL), help=f"comma list of {','.join(FULL)}")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 3, --quick 1)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds allowed per system")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    bad = [c for c in cases if c not in FULL] + [s for s in systems if s not in SYSTEMS]
    if bad or not cases or not systems:
        ap.error(f"unknown case/system: {', '.join(bad) or '(none given)'}")
    sizes = QUICK if args.quick else FULL
    reps = args.reps or (1 if args.quick else 3)
    out = args.out or RESULTS / ("ray_engine.quick.json" if args.quick else "ray_engine.json")
    meta: dict[str, Any] = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "reps": reps,
        "machine": machine(), "cluster": f"{NODES} nodes x {NODE_CPUS} CPU on 127.0.0.1, one per system",
        "installs": {}, "refused": {}, "errors": {},
    }
    why = scanflow_has_ray() if "scanflow_ray" in systems else None
    if why:
        sys.exit(f"cannot measure scanflow on Ray: {why}. Refusing to run without it "
                 "(--systems ray_raw,prefect_ray measures the peers alone).")
    for system in systems:
        if system in PEER_VENVS:
            name, req, pkgs = PEER_VENVS[system]
            meta["installs"][system] = ensure_venv(name, print, req, pkgs)
    raw: dict[str, dict[str, Any]] = {}
    for system in systems:
        spec = {"cases": {c: sizes[c] for c in cases if system == "scanflow_ray" or c not in SCANFLOW_ONLY},
                "reps": reps}
        print(f"running {system} on its own {NODES}-node cluster ...", flush=True)
        t0 = time.perf_counter()
        raw[system] = run_system(system, spec, args.timeout)
        status = raw[system].get("error") or raw[system].get("unavailable") or "ok"
        print(f"  {system}: {status} ({time.perf_counter() - t0:.0f}s)", flush=True)
        if "error" in raw[system]:
            meta["errors"][system] = raw[system]["error"]
    summary = summarise(raw, cases)
    judged = targets(summary)
    meta["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    meta["systems"] = {s: {k: v for k, v in r.items() if k != "cases"} for s, r in raw.items()}
    meta["targets"] = judged
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    out.with_suffix(".meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"\n{'case':<16}{'steps':>7}" + "".join(f"{s:>22}" for s in systems))
    for case, row in summary.items():
        if not row:
            continue
        steps = next(iter(row.values()))["steps"]
        cells = []
        for s in systems:
            e = row.get(s)
            mark = " *" if e and "ms_per_step_until_recorded" in e else "  "
            cells.append(f"{e['ms_per_step']:>10.3f} ms/step{mark}" if e else f"{'—':>22}")
        print(f"{case:<16}{steps:>7}" + "".join(f"{c:>22}" for c in cells))
    print("(* Prefect: the flow call; its ms_per_step_until_recorded, used for the target, is in the JSON)")
    for name, t in judged.items():
        verdict = "not measured" if t["met"] is None else ("PASS" if t["met"] else "FAIL")
        print(f"  {name:<32} {verdict:<13} {t['rule']} ({t.get('ratio', t.get('mb'))})")
    print(f"wrote {out} and {out.with_suffix('.meta.json')}")


if __name__ == "__main__":
    main()
