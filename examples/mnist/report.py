"""report/summary.json and report/timeline.png for the case study, from what was served (the
traffic's own records) and what the agents stored (events and decisions)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import numpy as np


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


def _acc(records: list[Any]) -> float | None:
    ok = [r for r in records if r.status == 200]
    return float(np.mean([r.prediction == r.label for r in ok])) if ok else None


def write_report(settings: Any, store: Any, served: list[Any], phases: list[dict[str, Any]],
                 t0: float, args: Any) -> dict[str, Any]:
    out_dir = settings.root / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    events = list(store.list_events(limit=100_000))
    by_kind: dict[str, list[Any]] = {}
    for e in events:
        by_kind.setdefault(e.kind, []).append(e)

    drift_recs = [r for r in served if r.phase == "drift"]
    after_recs = [r for r in served if r.phase == "after_rollout"]
    clean_recs = [r for r in served if r.phase == "clean"]
    drift_start = drift_recs[0].t if drift_recs else None
    promoted = [e for e in by_kind.get("promoted", []) if drift_start and e.ts >= drift_start]
    first_promo = promoted[0].ts if promoted else float("inf")
    before = [r for r in drift_recs if r.t < first_promo]

    detected = [e for e in by_kind.get("drift_detected", []) if drift_start and e.ts >= drift_start]
    false_alarms = [e for e in by_kind.get("drift_detected", []) if drift_start and e.ts < drift_start]

    def first(kind: str) -> float | None:
        xs = [e.ts for e in by_kind.get(kind, []) if drift_start and e.ts >= drift_start]
        return xs[0] if xs else None

    t_det, t_rs, t_rf, t_roll = (first(k) for k in
                                 ("drift_detected", "retrain_started", "retrain_finished",
                                  "rollout_completed"))
    delay_samples = (sum(1 for r in drift_recs if r.t < t_det) if t_det else None)

    acc = {"clean": _acc(clean_recs), "drift_before": _acc(before), "drift_after": _acc(after_recs)}
    targets = {
        "drift_detected": bool(detected),
        "no_false_alarm_in_clean_phase": not false_alarms,
        "promoted_and_rolled_out": bool(promoted) and t_roll is not None,
        "after_within_5_points_of_clean": (acc["drift_after"] is not None and acc["clean"] is not None
                                           and acc["drift_after"] >= acc["clean"] - 0.05),
        "after_10_points_above_before": (acc["drift_after"] is not None
                                         and acc["drift_before"] is not None
                                         and acc["drift_after"] >= acc["drift_before"] + 0.10),
    }
    targets["all_met"] = all(targets.values())

    windows = []
    for d in store.list_decisions("analyzer"):
        tests = {t["test"]: t for t in d.evidence.get("tests", [])}
        windows.append({"time": _iso(d.evidence.get("t1", d.ts)), "t1": d.evidence.get("t1", d.ts),
                        "first_id": d.evidence.get("first_id"), "last_id": d.evidence.get("last_id"),
                        "drift": d.fired,
                        **{f"{k}_p": v.get("p_value") for k, v in tests.items()},
                        **{f"{k}_threshold": v.get("threshold") for k, v in tests.items()}})

    summary = {
        "accuracy": acc,
        "phases": phases,
        "events": [{"time": _iso(e.ts), "kind": e.kind, "source": e.source, "service": e.service,
                    **{k: v for k, v in e.payload.items() if not isinstance(v, list | dict)}}
                   for e in events],
        "detection": {"drift_start": _iso(drift_start) if drift_start else None,
                      "detected_at": _iso(t_det) if t_det else None,
                      "delay_seconds": (t_det - drift_start) if t_det and drift_start else None,
                      "delay_samples": delay_samples, "false_alarms_clean": len(false_alarms)},
        "timings": {
            "detection_delay": (t_det - drift_start) if t_det and drift_start else None,
            "retrain": (t_rf - t_rs) if t_rf and t_rs else None,
            "drift_to_rollout": (t_roll - drift_start) if t_roll and drift_start else None,
        },
        "promotions": [{"time": _iso(e.ts), "version": e.payload.get("version"),
                        "previous_version": e.payload.get("previous_version"),
                        "approved_by": e.payload.get("approved_by")} for e in promoted],
        "windows": windows,
        "targets": targets,
        "config": {"corruption": args.corruption, "severity": args.severity, "rate": args.rate},
        "files": {"summary": str(out_dir / "summary.json"), "timeline": str(out_dir / "timeline.png")},
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    _plot(out_dir / "timeline.png", served, windows, events, t0 if not served else served[0].t)
    return summary


def _plot(path: Any, served: list[Any], windows: list[dict[str, Any]], events: list[Any],
          origin: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True,
                                   gridspec_kw={"height_ratios": [3, 2]})
    ok = [r for r in served if r.status == 200]
    if ok:
        t = np.array([r.t - origin for r in ok])
        hit = np.array([r.prediction == r.label for r in ok], dtype=float)
        w = min(200, len(hit))
        roll = np.convolve(hit, np.ones(w) / w, mode="valid")
        ax1.plot(t[w - 1:], roll, color="tab:blue", label=f"served accuracy (rolling {w})")
        for phase, colour in (("drift", "tab:red"), ("after_rollout", "tab:green")):
            ts = [r.t - origin for r in ok if r.phase == phase]
            if ts:
                ax1.axvspan(min(ts), max(ts), color=colour, alpha=0.07)
    ax1.set_ylabel("accuracy")
    ax1.set_ylim(0, 1.02)
    marks = {"drift_detected": "tab:red", "retrain_started": "tab:orange",
             "retrain_finished": "tab:purple", "promoted": "tab:green",
             "rollout_completed": "tab:olive", "promotion_rejected": "black"}
    for e in events:
        if e.kind in marks and e.ts >= origin:
            for ax in (ax1, ax2):
                ax.axvline(e.ts - origin, color=marks[e.kind], ls="--", lw=1)
            ax1.text(e.ts - origin, 0.03, e.kind, rotation=90, fontsize=7, color=marks[e.kind])
    ax1.legend(loc="lower left")
    for key, colour in (("ks_p", "tab:blue"), ("mmd_p", "tab:red")):
        pts = [(w["t1"] - origin, max(w[key], 1e-6)) for w in windows if w.get(key) is not None]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax2.semilogy(xs, ys, "o-", ms=3, color=colour, label=key.replace("_p", " p-value"))
    thr = [w.get("ks_threshold") for w in windows if w.get("ks_threshold")]
    if thr:
        ax2.axhline(thr[0], color="tab:blue", ls=":", lw=1, label="KS threshold (Bonferroni)")
    thr = [w.get("mmd_threshold") for w in windows if w.get("mmd_threshold")]
    if thr:
        ax2.axhline(thr[0], color="tab:red", ls=":", lw=1, label="MMD threshold")
    ax2.set_ylabel("drift p-value per window")
    ax2.set_xlabel("seconds since traffic started")
    ax2.legend(loc="lower left", fontsize=7)
    fig.suptitle("scanflow MNIST: served accuracy, drift tests and agent actions")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
