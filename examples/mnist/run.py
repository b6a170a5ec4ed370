"""The MNIST case study, end to end, on the local backend.

data publishes MNIST -> datascience trains two candidates and registers the best as champion
-> dataengineer deploys it and starts the agents -> traffic: clean digits, then a corrupted
stream -> the agents detect the drift, retrain on newly labelled samples, gate, promote and
roll out -> report/summary.json and report/timeline.png in the workspace.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

SERVICE = "mnist"
console = Console()


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


def say(t0: float, msg: str) -> None:
    console.print(f"[dim]{time.time() - t0:6.1f}s[/] {msg}", highlight=False)


def reset(settings: Any) -> None:
    """A fresh case study: stop what a previous run left, keep only the downloaded data."""
    from scanflow.agents.process import AgentSupervisor
    from scanflow.serving import LocalDeployer
    from scanflow.store import Store

    root = settings.root
    if (root / "scanflow.db").exists():
        store = Store(settings.store)
        AgentSupervisor(settings, store).stop()
        dep = LocalDeployer(settings, store)
        for d in store.list_deployments():
            if d.status == "running":
                try:
                    dep.stop(d.service)
                except Exception:  # noqa: BLE001 - best effort on leftovers
                    pass
        store.close()
    for name in ("scanflow.db", "scanflow.db-wal", "scanflow.db-shm", "mlflow.db"):
        (root / name).unlink(missing_ok=True)
    for name in ("artifacts", "runs", "services", "agents", "report"):
        shutil.rmtree(root / name, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workspace", default=os.environ.get("SCANFLOW_WORKSPACE", ".scanflow"))
    p.add_argument("--corruption", default="fog")
    p.add_argument("--severity", type=int, default=2)
    p.add_argument("--rate", type=float, default=100.0, help="requests per second")
    p.add_argument("--clean", type=int, default=3000, help="clean requests before the drift")
    p.add_argument("--after", type=int, default=2000, help="corrupted requests after the rollout")
    p.add_argument("--train-subset", type=int, default=0, help="0 = all 60k for the first model")
    p.add_argument("--drift-timeout", type=float, default=360.0)
    p.add_argument("--keep", action="store_true", help="keep the previous state")
    args = p.parse_args(argv)
    # A SIGTERM (CI timeout, `kill`) must still stop the agents and the service we started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    os.environ["SCANFLOW_WORKSPACE"] = str(Path(args.workspace).resolve())
    from corruptions import corrupt
    from mnist_common import test_split
    from mnist_data import load_mnist
    from report import write_report
    from traffic import OracleLabeller, Traffic, accuracy

    from scanflow.agents.process import AgentSupervisor
    from scanflow.engine import LocalEngine
    from scanflow.serving import LocalDeployer
    from scanflow.settings import get_settings
    from scanflow.spec import load_application
    from scanflow.store import Store

    get_settings.cache_clear()
    settings = get_settings().ensure()
    if not args.keep:
        reset(settings)
    settings.ensure()
    t0 = time.time()
    store = Store(settings.store)
    engine = LocalEngine(settings, store)
    data_app = load_application(HERE / "data")
    ds_app = load_application(HERE / "datascience")
    de_app = load_application(HERE / "dataengineer")
    console.rule(f"scanflow MNIST case study — workspace {settings.root}")

    say(t0, "[bold]data[/]: publishing MNIST (60k/10k) and the reference sample")
    res = engine.run(data_app, "publish")
    if not res.ok:
        console.print(res.error)
        return 1
    say(t0, "[bold]datascience[/]: training two candidates in parallel, registering the best")
    params = {"clean_subset": args.train_subset} if args.train_subset else {}
    res = engine.run(ds_app, "train", {f"train_a.{k}": v for k, v in params.items()}
                     | {f"train_b.{k}": v for k, v in params.items()})
    if not res.ok:
        console.print(res.error)
        return 1

    deployer = LocalDeployer(settings, store)
    supervisor = AgentSupervisor(settings, store)
    svc = de_app.services[SERVICE]
    _, _, x_test, y_test = load_mnist(settings.root)
    _, served_idx = test_split(len(y_test))
    if args.clean + args.after + 1000 > len(served_idx):
        p.error("--clean plus --after leave fewer than 1000 test digits for the drifted stream")
    try:
        dep = deployer.deploy(SERVICE, app=de_app.app, team=de_app.team, model=svc.model,
                              alias=svc.alias, replicas=svc.replicas, port=svc.port)
        url = f"http://{dep.host}:{dep.port}"
        say(t0, f"[bold]dataengineer[/]: serving {svc.model} v{dep.model_version} "
                f"x{dep.replicas} at {url}")
        supervisor.start(HERE / "dataengineer")
        say(t0, f"agents running: {', '.join(de_app.agents)}")

        labeller = OracleLabeller(url, fraction=0.5, delay_s=2.0)
        traffic = Traffic(url, labeller, rate=args.rate)
        phases: list[dict[str, Any]] = []

        say(t0, f"traffic: {args.clean} clean digits at {args.rate:.0f} req/s")
        t = time.time()
        clean_idx = served_idx[: args.clean]
        clean = traffic.phase("clean", x_test[clean_idx], y_test[clean_idx])
        phases.append({"name": "clean", "start": iso(t), "end": iso(time.time()),
                       "requests": len(clean), "accuracy": accuracy(clean)})

        # Served digits never include the reference sample; the after-rollout digits are never
        # among those labelled for retraining (so `drift_after` is measured on unseen data).
        after_idx = served_idx[args.clean:args.clean + args.after]
        drift_idx = served_idx[args.clean + args.after:]
        reps = 5
        pool_x = np.concatenate([corrupt(x_test[drift_idx], args.corruption, args.severity, seed=10 + r)
                                 for r in range(reps)])
        pool_y = np.tile(y_test[drift_idx], reps)
        after_x = corrupt(x_test[after_idx], args.corruption, args.severity, seed=99)
        drift_start = time.time()
        seen: set[int] = set()
        state = {"last": 0.0, "rolled": False}

        def rolled_out() -> bool:
            if time.time() - state["last"] < 0.5:
                return bool(state["rolled"])
            state["last"] = time.time()
            for e in store.list_events(since=drift_start):
                if e.id not in seen:
                    seen.add(e.id)
                    say(t0, f"  event [bold]{e.kind}[/] ({e.source}) "
                            f"{_brief(e.payload)}")
                if e.kind == "rollout_completed":
                    state["rolled"] = True
            return bool(state["rolled"])

        say(t0, f"traffic: corrupted stream ({args.corruption}, severity {args.severity}) "
                "until the agents have rolled out a new model")
        drift = traffic.phase("drift", pool_x, pool_y, stop=rolled_out, timeout_s=args.drift_timeout,
                              cycle=True)
        rolled_at = time.time()
        after: list[Any] = []
        if state["rolled"]:
            say(t0, f"traffic: {args.after} more corrupted digits on the new model")
            after = traffic.phase("after_rollout", after_x, y_test[after_idx])
        else:
            say(t0, "[red]no rollout within the drift timeout[/]")
        labeller.close()
        rolled_out()
        phases.append({"name": "drift", "corruption": args.corruption, "severity": args.severity,
                       "start": iso(drift_start), "end": iso(rolled_at), "requests": len(drift),
                       "accuracy": accuracy(drift)})
        phases.append({"name": "after_rollout", "corruption": args.corruption,
                       "severity": args.severity, "start": iso(rolled_at), "end": iso(time.time()),
                       "requests": len(after), "accuracy": accuracy(after)})
        time.sleep(2.0)  # let the last windows be judged for the timeline
    finally:
        supervisor.stop()
        for d in store.list_deployments():
            if d.status == "running":
                deployer.stop(d.service)

    summary = write_report(settings, store, traffic.served, phases, t0, args)
    _print_summary(summary, time.time() - t0)
    ok = summary["targets"]["all_met"]
    return 0 if ok else 1


def _brief(payload: dict[str, Any]) -> str:
    keep = ("version", "previous_version", "candidate_version", "episode", "labelled", "to_version",
            "candidate_acc_new", "champion_acc_new", "seconds")
    parts = []
    for k in keep:
        if k in payload:
            v = payload[k]
            parts.append(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)


def _print_summary(summary: dict[str, Any], seconds: float) -> None:
    t = Table(title=f"MNIST case study — {seconds:.0f}s end to end")
    t.add_column("figure")
    t.add_column("value", justify="right")
    acc = summary["accuracy"]
    for k in ("clean", "drift_before", "drift_after"):
        t.add_row(f"served accuracy: {k}", "-" if acc.get(k) is None else f"{acc[k]:.3f}")
    for k, v in summary["timings"].items():
        t.add_row(k, "-" if v is None else f"{v:.1f}s")
    t.add_row("promoted versions", ", ".join(str(p["version"]) for p in summary["promotions"]) or "-")
    for k, v in summary["targets"].items():
        t.add_row(f"target: {k}", "[green]yes[/]" if v else "[red]no[/]")
    console.print(t)
    console.print(f"wrote {summary['files']['summary']} and {summary['files']['timeline']}")


if __name__ == "__main__":
    sys.exit(main())
