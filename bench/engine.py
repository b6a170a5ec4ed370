"""Per-step overhead of scanflow's workflow engine against plain Python, Prefect 3 and Dask.

Not a test: a benchmark you run by hand (see bench/README.md)::

    .venv/bin/python bench/engine.py            # full run, ~5-10 min on 2 cores
    .venv/bin/python bench/engine.py --quick    # small sizes, 1 repetition

Every system runs in its own process (peers with the python of their own virtualenv under
bench/.venvs/, created here on first use) and hands its raw timings back as one JSON line. This
process only orchestrates, computes overhead = (system - baseline) / steps from the medians and
writes bench/results/engine.json (+ engine.meta.json).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import inspect
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from peers.common import MARKER, emit, join, kind_of, measure, noop, run_pass, timed

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
VENVS = BENCH / ".venvs"
LOGS = BENCH / ".logs"
RESULTS = BENCH / "results"

FULL = {"chain_500": 500, "fanout_1000": 1000, "subprocess_100": 100}
QUICK = {"chain_500": 50, "fanout_1000": 100, "subprocess_100": 10}
SYSTEMS = ["baseline", "scanflow", "scanflow_untracked", "prefect", "dask"]
PEERS = {"prefect": "requirements-prefect.txt", "dask": "requirements-dask.txt"}
PEER_PACKAGES = {"prefect": ["prefect"], "dask": ["dask", "distributed"]}
TRACKING_SWITCHES = ("tracking", "track", "track_steps", "tracking_enabled", "mlflow_tracking")
CASE_TEXT = {
    "chain": "chain of no-op in-process steps, each after the previous one",
    "fanout": "one root, N independent no-op steps after it, one join step after all of them",
    "subprocess": "chain of steps each running `python -c pass` (sequential, so nothing hides "
                  "overhead behind parallelism)",
}


# --------------------------------------------------------------------------------------------
# Workers (run in child processes)
# --------------------------------------------------------------------------------------------
def baseline_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Plain Python doing the same work: calls, a thread pool for the fan-out, subprocess.run."""
    python: str = spec["python"]
    workers = int(spec["workers"])

    def chain(n: int) -> None:
        prev = None
        for _ in range(n):
            prev = noop(prev)

    def fanout(n: int) -> None:
        root = noop()
        with ThreadPoolExecutor(max_workers=workers) as pool:
            join(list(pool.map(noop, [root] * n)))

    def subproc(n: int) -> None:
        prev = None
        for _ in range(n):
            prev = run_pass(python, prev)

    runs: dict[str, Callable[[int], None]] = {"chain": chain, "fanout": fanout, "subprocess": subproc}
    return {
        "system": "baseline", "version": f"Python {platform.python_version()}",
        "cases": measure(spec, lambda kind, n: timed(lambda: runs[kind](n))),
        "included": "the plain-Python work only",
    }


def _off_value(annotation: Any, default: Any) -> Any:
    """The value that turns a tracking switch off, judged from its annotation/default; or ...."""
    text = str(annotation)
    if isinstance(default, bool) or "bool" in text:
        return False
    for word in ("off", "none", "disabled"):
        if f"'{word}'" in text or f'"{word}"' in text:
            return word
    return ...


def tracking_switch(engine_cls: type, settings_cls: type) -> tuple[dict[str, Any], dict[str, Any], str] | str:
    """Find how to switch MLflow tracking off: (engine kwargs, settings kwargs, how) or why not."""
    params = inspect.signature(engine_cls.__init__).parameters
    fields: dict[str, Any] = getattr(settings_cls, "model_fields", {})
    for name in TRACKING_SWITCHES:
        if name in params:
            value = _off_value(params[name].annotation, params[name].default)
            if value is not ...:
                return {name: value}, {}, f"LocalEngine(..., {name}={value!r})"
        if name in fields:
            value = _off_value(fields[name].annotation, fields[name].default)
            if value is not ...:
                return {}, {name: value}, f"Settings(..., {name}={value!r})"
    return (f"no switch for MLflow tracking: neither LocalEngine(...) nor Settings has any of "
            f"{', '.join(TRACKING_SWITCHES)}")


def scanflow_worker(spec: dict[str, Any], untracked: bool) -> dict[str, Any]:
    """scanflow's LocalEngine on a fresh workspace per repetition; only `engine.run(...)` is timed."""
    system = "scanflow_untracked" if untracked else "scanflow"
    t0 = time.perf_counter()
    import scanflow
    from scanflow.engine import LocalEngine
    from scanflow.settings import Settings
    from scanflow.spec import Application
    from scanflow.spec.models import Step, Workflow
    from scanflow.store import Store

    import_s = time.perf_counter() - t0
    fingerprint = engine_fingerprint()  # the engine is under active development: pin what ran
    engine_kw: dict[str, Any] = {}
    settings_kw: dict[str, Any] = {}
    how = "defaults: durable store (SQLite) + MLflow tracking on (track=True)"
    if untracked:
        found = tracking_switch(LocalEngine, Settings)
        if isinstance(found, str):
            return {"system": system, "unavailable": found}
        engine_kw, settings_kw, how = found
    workers = int(spec["workers"])

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

    def run_once(kind: str, n: int) -> float:
        app = apps.setdefault((kind, n), build(kind, n))  # building/validating the spec: untimed
        with tempfile.TemporaryDirectory(prefix="scanflow-bench-") as d:
            settings = Settings(workspace=Path(d), **settings_kw).ensure()
            store = Store(settings.store)
            try:
                engine = LocalEngine(settings, store, concurrency=workers, **engine_kw)
                t = time.perf_counter()
                result = engine.run(app, kind)
                elapsed = time.perf_counter() - t
                # Untimed check that the durable records exist when run() returns (no deferred writes).
                durable = [r.status for r in store.list_steps(result.run_id)]
            finally:
                store.close()
        if not result.ok:
            raise RuntimeError(f"scanflow {kind} run ended {result.status}: {result.error}")
        not_run = {k: v for k, v in result.steps.items() if v != "succeeded"}
        if not_run:  # e.g. a cache hit would make the timing meaningless
            raise RuntimeError(f"scanflow {kind}: {len(not_run)} steps did not execute: "
                               f"{dict(list(not_run.items())[:3])}")
        expected = len(app.workflow(kind).steps)
        if len(durable) != expected or any(st != "succeeded" for st in durable):
            raise RuntimeError(f"scanflow {kind}: the store holds {len(durable)} step runs "
                               f"({set(durable)}) for {expected} steps right after run() returned")
        return elapsed

    warm = timed(lambda: [run_once(k, 3) for k in ("chain", "fanout", "subprocess")])
    cases = measure(spec, run_once)
    import mlflow

    tracked = "MLflow bookkeeping (whatever this engine version logs)" if not untracked else \
        "no MLflow tracking"
    return {
        "system": system, "version": f"scanflow {scanflow.__version__}, mlflow {mlflow.__version__}",
        "how": how, "import_seconds": import_s, "warmup_seconds": warm, "cases": cases,
        "engine": fingerprint,
        "engine_changed_during_run": engine_fingerprint() != fingerprint,
        "excluded": "imports, a warm-up run of each kind, building the spec, creating the workspace, "
                    "Store and LocalEngine (incl. MLflow DB creation)",
        "included": f"engine.run(...): durable store records of the run and every step, {tracked}, "
                    "per-step logs, scheduling",
    }


# --------------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------------
def venv_python(name: str) -> Path:
    """The python of a peer's virtualenv."""
    return VENVS / name / "bin" / "python"


def ensure_venv(name: str, log: Callable[[str], None], requirements: str | None = None,
                packages: list[str] | None = None) -> dict[str, Any]:
    """Create bench/.venvs/<name> and install the peer on first use; report how long it took.
    `requirements` (a file under bench/) and `packages` (whose versions to report) default to
    this benchmark's PEERS and PEER_PACKAGES entries for `name`."""
    requirements = requirements or PEERS[name]
    packages = packages or PEER_PACKAGES[name]
    marker = VENVS / name / ".bench-install.json"
    if venv_python(name).exists() and marker.exists():
        return {**json.loads(marker.read_text()), "reused": True}
    if (VENVS / name).exists():
        shutil.rmtree(VENVS / name)  # a half-made venv from an interrupted install
    LOGS.mkdir(parents=True, exist_ok=True)
    req = BENCH / requirements
    log(f"creating bench/.venvs/{name} and installing {req.read_text().strip()} (first use) ...")
    t0 = time.perf_counter()
    with open(LOGS / f"install-{name}.log", "w") as f:
        subprocess.run([sys.executable, "-m", "venv", str(VENVS / name)], check=True, stdout=f,
                       stderr=subprocess.STDOUT)
        subprocess.run([str(venv_python(name)), "-m", "pip", "install", "-r", str(req)], check=True,
                       stdout=f, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    code = ("import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
            f"{packages!r}}}))")
    versions = json.loads(subprocess.run([str(venv_python(name)), "-c", code], check=True,
                                         capture_output=True, text=True).stdout)
    size = sum(p.stat().st_size for p in (VENVS / name).rglob("*") if p.is_file())
    info = {"install_seconds": round(seconds, 1), "size_mb": round(size / 1e6),
            "versions": versions, "installed_at": dt.datetime.now().isoformat(timespec="seconds")}
    marker.write_text(json.dumps(info, indent=1))
    return {**info, "reused": False}


def _kill_group(pgid: int) -> None:
    """Stop whatever is left of a worker's process group (ephemeral servers, nannies)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(1.0)


def run_worker(system: str, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one system's worker in its own process (own session) and read its JSON line back."""
    LOGS.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SCANFLOW_", "PREFECT_"))}
    env.update({"DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1"})
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-{system}-"))
    if system in PEERS:
        argv = [str(venv_python(system)), str(BENCH / "peers" / f"{system}_case.py")]
        if system == "prefect":
            env.update({"PREFECT_HOME": str(tmp / "prefect-home"),
                        "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    else:
        argv = [sys.executable, str(Path(__file__).resolve()), "--worker", system]
    argv += ["--spec", json.dumps(spec)]
    out_path, err_path = LOGS / f"{system}.stdout", LOGS / f"{system}.log"
    try:
        with open(out_path, "w") as out, open(err_path, "w") as err:
            proc = subprocess.Popen(argv, cwd=tmp, env=env, stdout=out, stderr=err,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                code = None
            finally:
                _kill_group(proc.pid)
                proc.wait()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lines = [ln for ln in out_path.read_text().splitlines() if ln.startswith(MARKER)]
    if code is None:
        return {"system": system, "error": f"timed out after {timeout:.0f}s (log: {err_path})"}
    if code != 0 or not lines:
        tail = "\n".join(err_path.read_text().splitlines()[-15:])
        return {"system": system, "error": f"exit code {code} (log: {err_path}):\n{tail}"}
    return json.loads(lines[-1][len(MARKER):])


def machine() -> dict[str, Any]:
    """Cores, CPU model, memory and load of this machine."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)), "cpu": model,
            "memory_gb": round(mem, 1), "platform": platform.platform(),
            "python": platform.python_version(), "loadavg_start": [round(x, 2) for x in os.getloadavg()]}


def engine_fingerprint() -> dict[str, str]:
    """Which scanflow engine was measured: HEAD commit and a hash of the engine sources now."""
    h = hashlib.sha256()
    for p in sorted((ROOT / "src" / "scanflow" / "engine").glob("*.py")):
        h.update(p.read_bytes())
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        head = ""
    return {"git_head": head, "engine_sources_sha256": h.hexdigest()[:12]}


def summarise(raw: dict[str, dict[str, Any]], cases: list[str]) -> dict[str, dict[str, Any]]:
    """{"case": {"system": {"ms_per_step": overhead, ...}}}; the baseline's figure is absolute."""
    out: dict[str, dict[str, Any]] = {}
    base = raw["baseline"]["cases"]
    for case in cases:
        steps = base[case]["steps"]
        base_med = statistics.median(base[case]["seconds"])
        row: dict[str, Any] = {"baseline": {
            "ms_per_step": round(base_med / steps * 1e3, 4), "absolute": True,
            "median_seconds": round(base_med, 4), "seconds": [round(s, 4) for s in base[case]["seconds"]],
            "steps": steps, "version": raw["baseline"]["version"]}}
        for system, res in raw.items():
            if system == "baseline" or "cases" not in res or case not in res["cases"]:
                continue
            got = res["cases"][case]
            med = statistics.median(got["seconds"])
            entry: dict[str, Any] = {
                "ms_per_step": round((med - base_med) / steps * 1e3, 4),
                "total_ms_per_step": round(med / steps * 1e3, 4),
                "median_seconds": round(med, 4), "seconds": [round(s, 4) for s in got["seconds"]],
                "steps": steps, "version": res["version"]}
            for key, values in got.items():  # extra timings, e.g. Prefect's seconds_until_recorded
                if key.startswith("seconds_") and values and None not in values:
                    extra = statistics.median(values)
                    entry[f"ms_per_step_{key[8:]}"] = round((extra - base_med) / steps * 1e3, 4)
                    entry[key] = [round(s, 4) for s in values]
            row[system] = entry
        out[case] = row
    return out


def print_report(summary: dict[str, dict[str, Any]], raw: dict[str, dict[str, Any]],
                 meta: dict[str, Any]) -> None:
    """Rich tables: overhead per step, then raw timings."""
    from rich.console import Console
    from rich.table import Table

    con = Console(width=None if sys.stdout.isatty() else 120)
    m = meta["machine"]
    con.print(f"[bold]scanflow engine benchmark[/] · {meta['date']} · {m['cores']} cores ({m['cpu']}), "
              f"{m['memory_gb']} GB · load {m['loadavg_start']} → {m['loadavg_end']} · "
              f"reps {meta['reps']} · workers {meta['workers']}{' · QUICK' if meta['quick'] else ''}")
    for system, res in raw.items():
        what = res.get("version") or res.get("unavailable") or res.get("error")
        if "engine" in res:
            eng = res["engine"]
            what += f" (HEAD {eng['git_head']}, engine sources {eng['engine_sources_sha256']})"
        con.print(f"  {system:<19} {what}")
    systems = [s for s in SYSTEMS if s != "baseline" and any(s in row for row in summary.values())]
    t = Table(title="Per-step OVERHEAD, ms (median of reps, minus the baseline)")
    t.add_column("case")
    t.add_column("steps", justify="right")
    t.add_column("baseline\n(absolute)", justify="right")
    extras = sorted({(s, k) for row in summary.values() for s, v in row.items() if s != "baseline"
                     for k in v if k.startswith("ms_per_step_")})
    for s in systems:
        t.add_column(s, justify="right")
        for es, key in extras:
            if es == s:
                t.add_column(f"{s}\n({key[12:].replace('_', ' ')})", justify="right")
    if "scanflow" in systems and "prefect" in systems:
        t.add_column("prefect ÷\nscanflow", justify="right")
    for case, row in summary.items():
        cells = [case, str(row["baseline"]["steps"]), f"{row['baseline']['ms_per_step']:.4f}"]
        for s in systems:
            cells.append(f"{row[s]['ms_per_step']:.3f}" if s in row else "—")
            for es, key in extras:
                if es == s:
                    cells.append(f"{row[s][key]:.3f}" if key in row.get(s, {}) else "—")
        if "scanflow" in systems and "prefect" in systems:
            sf, pf = row.get("scanflow", {}).get("ms_per_step"), row.get("prefect", {}).get("ms_per_step")
            cells.append(f"{pf / sf:.2f}×" if sf and pf and sf > 0 else "—")
        t.add_row(*cells)
    con.print(t)
    d = Table(title="Raw wall-clock seconds per repetition")
    d.add_column("case")
    d.add_column("system")
    d.add_column("median s", justify="right")
    d.add_column("all reps, s")
    for case, row in summary.items():
        for s, v in row.items():
            d.add_row(case, s, f"{v['median_seconds']:.3f}", " ".join(f"{x:.3f}" for x in v["seconds"]))
            for key in (k for k in v if k.startswith("seconds_")):
                d.add_row("", f"  {key[8:].replace('_', ' ')}", f"{statistics.median(v[key]):.3f}",
                          " ".join(f"{x:.3f}" for x in v[key]))
    con.print(d)
    for note in meta["notes"]:
        con.print(f"[dim]• {note}[/]")


def main() -> None:
    """Parse flags; either be a worker, or run every selected system and write the results."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (÷10), 1 repetition")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma list of {','.join(SYSTEMS)}")
    ap.add_argument("--cases", default=",".join(FULL), help=f"comma list of {','.join(FULL)}")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 3, --quick 1)")
    ap.add_argument("--workers", type=int, default=2, help="parallelism given to every system (2)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds allowed per system process")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default results/engine.json)")
    ap.add_argument("--worker", choices=SYSTEMS[:3], help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        spec = json.loads(args.spec)
        if args.worker == "baseline":
            emit(baseline_worker(spec))
        else:
            emit(scanflow_worker(spec, untracked=args.worker == "scanflow_untracked"))
        return

    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    bad = [c for c in cases if c not in FULL] + [s for s in systems if s not in SYSTEMS]
    if bad or not cases:
        ap.error(f"unknown case/system: {', '.join(bad) or '(none given)'}")
    sizes = QUICK if args.quick else FULL
    reps = args.reps or (1 if args.quick else 3)
    spec = {"cases": {c: sizes[c] for c in cases}, "reps": reps, "workers": args.workers,
            "python": sys.executable}
    out = args.out or RESULTS / ("engine.quick.json" if args.quick else "engine.json")
    from rich.console import Console

    con = Console(stderr=True, width=None if sys.stderr.isatty() else 120)
    meta: dict[str, Any] = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "quick": args.quick,
        "reps": reps, "workers": args.workers, "machine": machine(),
        "sizes": spec["cases"], "cases": {c: CASE_TEXT[kind_of(c)] for c in cases}, "installs": {},
        "notes": [
            "overhead = (median system seconds - median baseline seconds) / steps; the baseline's own "
            "ms_per_step is its absolute time per step",
            "fanout steps = root + N + join; subprocess_100 is a chain (sequential)",
            f"every system gets the same parallelism: {args.workers} (scanflow concurrency, baseline "
            "thread pool, Prefect ThreadPoolTaskRunner max_workers, Dask LocalCluster n_workers x 1 thread)",
            "baseline runs before and after the others; its reps are pooled",
        ],
    }
    for peer in (s for s in systems if s in PEERS):
        try:
            meta["installs"][peer] = ensure_venv(peer, con.print)
        except subprocess.CalledProcessError as exc:
            meta["installs"][peer] = {"error": str(exc)}
            con.print(f"[red]could not install {peer}: {exc} (log: {LOGS / f'install-{peer}.log'})[/]")
            systems.remove(peer)
    order = ["baseline", *[s for s in SYSTEMS[1:] if s in systems]]
    raw: dict[str, dict[str, Any]] = {}
    t_all = time.perf_counter()
    for system in order:
        con.print(f"running {system} ...")
        t0 = time.perf_counter()
        raw[system] = run_worker(system, spec, args.timeout)
        res = raw[system]
        status = res.get("error") or res.get("unavailable") or "ok"
        con.print(f"  {system}: {status} ({time.perf_counter() - t0:.0f}s)")
        for key in ("excluded", "how"):
            if key in res:
                meta["notes"].append(f"{system}: {key}: {res[key]}")
        if res.get("engine_changed_during_run"):
            meta["notes"].append(f"WARNING {system}: scanflow's engine sources changed during its run")
        if "unavailable" in res:
            meta["notes"].append(f"{system} not measured: {res['unavailable']}")
        if "error" in res:
            meta["notes"].append(f"{system} failed: {res['error'].splitlines()[0]}")
    con.print("running baseline again ...")
    again = run_worker("baseline", spec, args.timeout)
    if "cases" not in raw["baseline"]:
        raw["baseline"] = again
    elif "cases" in again:
        for c in cases:
            raw["baseline"]["cases"][c]["seconds"] += again["cases"][c]["seconds"]
    if "cases" not in raw["baseline"]:
        sys.exit(f"the baseline failed: {raw['baseline'].get('error')}")
    meta["total_seconds"] = round(time.perf_counter() - t_all, 1)
    meta["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    meta["systems"] = {s: {k: v for k, v in r.items() if k != "cases"} for s, r in raw.items()}
    summary = summarise(raw, cases)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    out.with_suffix(".meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print_report(summary, raw, meta)
    con.print(f"wrote {out} and {out.with_suffix('.meta.json')}")


if __name__ == "__main__":
    main()
