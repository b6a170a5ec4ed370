"""report/summary.json and report/timeline.png for the case study, from what was served (the
traffic's own records), the prediction log (server-side latency, which version answered) and
what the agents stored (events and decisions)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import numpy as np

SERVICE = "mnist"
WINDOW = 250  # the monitor's window (dataengineer/scanflow.yaml)
BIN_S = 1.0  # latency is judged per second


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


def _acc(records: list[Any]) -> float | None:
    ok = [r for r in records if r.status == 200]
    return float(np.mean([r.prediction == r.label for r in ok])) if ok else None


def _phase(phases: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    return next((p for p in phases if p["name"] == name), None)


def _between(events: list[Any], kind: str, t0: float, t1: float) -> list[Any]:
    return [e for e in events if e.kind == kind and t0 <= e.ts < t1]


def _replicas(events: list[Any]) -> list[tuple[float, int]]:
    out: list[tuple[float, int]] = []
    for e in events:
        if e.service != SERVICE:
            continue
        if e.kind == "deployed":
            out.append((e.ts, int(e.payload.get("replicas", 1))))
        elif e.kind == "scaled":
            out.append((e.ts, int(e.payload.get("to", 0))))
    return out


def _p95_series(ts: np.ndarray, lat: np.ndarray, origin: float) -> list[tuple[float, float, int]]:
    """(seconds since origin, p95 ms, requests) per BIN_S bin."""
    if not len(ts):
        return []
    bins = np.floor((ts - origin) / BIN_S).astype(int)
    out = []
    for b in np.unique(bins):
        sel = lat[bins == b]
        out.append((float(b * BIN_S), float(np.percentile(sel, 95)), int(len(sel))))
    return out


def _spike(phases: list[dict[str, Any]], served: list[Any], events: list[Any],
           latency: list[tuple[float, float, int]], replicas: list[tuple[float, int]], origin: float,
           slo: float, policy: Any, by_phase: dict[str, list[Any]]) -> dict[str, Any]:
    """The spike, from the server's log (p95 per second), the deployer's `scaled` events (a
    replica counts as serving once the deployer confirmed it ready) and the traffic's records.

    The breach is the start of the first second of the spike whose p95 is over the SLO; "p95
    back under the SLO" is the end of the last such second (every later second of the spike is
    under it); "back to the minimum" is the `scaled` event that reached `min_replicas` after
    the spike ended (0 when the service was there already)."""
    ph = _phase(phases, "spike")
    if ph is None:
        return {}
    s0, s1 = ph["start_ts"] - origin, ph["end_ts"] - origin
    during = [(t, p95) for t, p95, n in latency if s0 <= t < s1 and n >= 5]
    breach = [t for t, p95 in during if p95 > slo]
    first = breach[0] if breach else None
    lo = int(policy.limits.min_replicas)
    ups = [(t, n) for t, n in replicas if first is not None and t >= first and t <= s1 + 5
           and n > _count_at(replicas, t - 1e-6)]
    serving = ups[0][0] if ups else None
    back_under = (breach[-1] + BIN_S) if breach else None
    ends = [t for t, n in replicas if t >= s1 and n <= lo]
    at_end = _count_at(replicas, s1)
    back_to_min = 0.0 if at_end <= lo else ((ends[0] - s1) if ends else None)
    until = s1 + (back_to_min or 0.0)
    recs = by_phase.get("spike", [])
    return {
        "start": ph["start"], "end": ph["end"], "rate": ph.get("rate"), "clients": ph.get("clients"),
        "seconds": s1 - s0, "slo_p95_ms": slo, "breached": bool(breach),
        "first_breach_after_start_s": (first - s0) if first is not None else None,
        "replicas_at_breach": _count_at(replicas, first) if first is not None else None,
        "breach_to_replica_serving_s": (serving - first) if serving is not None and first is not None
        else None,
        "breach_to_p95_under_slo_s": (back_under - first) if back_under is not None and first is not None
        else None,
        "seconds_over_slo": len(breach) * BIN_S,
        "back_to_min_replicas_s": back_to_min,
        "max_replicas": max([at_end] + [n for t, n in replicas if s0 <= t <= until], default=None),
        "replica_seconds": _replica_seconds(replicas, s0, until),
        "replica_seconds_window": {"from_spike_start_s": 0.0, "to_s": until - s0},
        "failed_requests": sum(1 for r in served if r.status != 200 and ph["start_ts"] <= r.t
                               <= origin + until),
        "p95_ms_max": max((p for _, p in during), default=None),
        "client_p95_ms": float(np.percentile([r.latency_ms for r in recs], 95)) if recs else None,
        "requests": len(recs),
        "scaled": [{"t": t - s0, "replicas": n} for t, n in replicas if s0 - 1 <= t <= until + 1],
    }


def _count_at(replicas: list[tuple[float, int]], t: float) -> int:
    """Replicas serving at `t` (seconds since origin), from the deployed/scaled steps."""
    n = replicas[0][1] if replicas else 0
    for ts, k in replicas:
        if ts > t:
            break
        n = k
    return n


def _replica_seconds(replicas: list[tuple[float, int]], t0: float, t1: float) -> float:
    """The integral of the replica count over [t0, t1]."""
    cuts = sorted({t0, t1, *(t for t, _ in replicas if t0 < t < t1)})
    return float(sum(_count_at(replicas, a) * (b - a) for a, b in zip(cuts, cuts[1:], strict=False)))


def write_report(settings: Any, store: Any, served: list[Any], phases: list[dict[str, Any]],
                 t0: float, args: Any, policy: Any) -> dict[str, Any]:
    out_dir = settings.root / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    events = sorted(store.list_events(limit=100_000), key=lambda e: e.ts)
    origin = served[0].t if served else t0
    slo = float(policy.objectives.p95_latency_ms)
    log = store.prediction_window(SERVICE, since=t0, with_inputs=False)
    by_phase: dict[str, list[Any]] = {}
    for r in served:
        by_phase.setdefault(r.phase, []).append(r)
    acc_clean = _acc(by_phase.get("clean", []))

    windows = []
    for d in store.list_decisions("analyzer"):
        tests = {t["test"]: t for t in d.evidence.get("tests", [])}
        windows.append({"time": _iso(d.evidence.get("t1", d.ts)), "t1": d.evidence.get("t1", d.ts),
                        "decided": d.ts,
                        "first_id": d.evidence.get("first_id"), "last_id": d.evidence.get("last_id"),
                        "drift": bool(d.evidence.get("drift", d.fired)),
                        **{f"{k}_p": v.get("p_value") for k, v in tests.items()},
                        **{f"{k}_threshold": v.get("threshold") for k, v in tests.items()}})

    log_ids = dict(zip(log.request_ids, (int(i) for i in log.ids), strict=True))

    def id_range(recs: list[Any]) -> tuple[int | None, int | None]:
        ids = [log_ids[r.request_id] for r in recs if r.request_id in log_ids]
        return (min(ids), max(ids)) if ids else (None, None)

    def fired_inside(name: str) -> list[dict[str, Any]]:
        """Windows that fired and hold only requests of phase `name` (false alarms there)."""
        lo, hi = id_range(by_phase.get(name, []))
        if lo is None or hi is None:
            return []
        return [w for w in windows if w["drift"] and (w["first_id"] or 0) >= lo and (w["last_id"] or 0) <= hi]
    corruptions: dict[str, Any] = {}
    for label in ("A", "B"):
        ph = _phase(phases, f"drift_{label}")
        if ph is None:
            continue
        start, end = ph["start_ts"], ph["end_ts"]
        recs = by_phase.get(f"drift_{label}", [])
        promoted = _between(events, "promoted", start, end + 60)
        t_promo = promoted[0].ts if promoted else float("inf")
        # Detection = the first analyzer window that holds this phase's requests and fired
        # (an episode already open since the previous corruption raises no new event).
        first_id = id_range(recs)[0]
        fired = [w for w in windows if w["drift"] and first_id is not None
                 and (w["last_id"] or 0) >= first_id]
        t_det = fired[0]["decided"] if fired else None
        t_rs = next((e.ts for e in _between(events, "retrain_started", start, end)), None)
        t_rf = next((e.ts for e in _between(events, "retrain_finished", start, end + 60)), None)
        t_roll = next((e.ts for e in _between(events, "rollout_completed", start, end + 60)), None)
        # Labels the executor took for this corruption: every retrain until its rollout (a
        # rejected candidate's labels count too).
        labels = sum(int(e.payload.get("labelled") or 0) for e in
                     _between(events, "retrain_started", start, t_roll if t_roll else end))
        after = _acc(by_phase.get(f"after_{label}", []))
        delay_samples = sum(1 for r in recs if r.t < t_det) if t_det else None
        corruptions[label] = {
            "corruption": ph.get("corruption"), "severity": ph.get("severity"),
            "drift_start": _iso(start), "detected_at": _iso(t_det) if t_det else None,
            "delay_seconds": (t_det - start) if t_det else None, "delay_samples": delay_samples,
            "detected_within_one_window": delay_samples is not None and delay_samples <= 2 * WINDOW,
            "accuracy_before": _acc([r for r in recs if r.t < t_promo]), "accuracy_after": after,
            "after_within_3_points_of_clean": (after is not None and acc_clean is not None
                                               and after >= acc_clean - 0.03),
            "retrain_seconds": (t_rf - t_rs) if t_rf and t_rs else None,
            "drift_to_rollout_seconds": (t_roll - start) if t_roll else None,
            "labels": labels,
            "promoted_version": promoted[0].payload.get("version") if promoted else None,
        }

    clean = _phase(phases, "clean")
    stable = [p for p in phases if p["name"].startswith("after_") or p["name"] == "spike"]
    false_clean = fired_inside("clean") if clean else []
    false_stable = [w for p in stable for w in fired_inside(p["name"])]

    latency = _p95_series(log.ts, log.latency_ms, origin)
    replicas = [(ts - origin, n) for ts, n in _replicas(events)]
    spike = _spike(phases, served, events, latency, replicas, origin, slo, policy, by_phase)

    bad: dict[str, Any] = {}
    ph = _phase(phases, "bad_candidate")
    if ph is not None:
        version = str(ph["version"])
        by_bad = int(sum(1 for v in log.model_versions if str(v) == version))
        rb = [e for e in _between(events, "rolled_back", ph["start_ts"], ph["end_ts"] + 30)
              if str(e.payload.get("from_version")) == version]
        judged_on = int(rb[0].payload.get("promoted_n") or 0) if rb else None
        bad = {
            "version": version,
            # offered through the promotion gate first: rejected means it never served
            "gate_passed": ph.get("gate_passed"), "gate_reasons": ph.get("gate_reasons"),
            "served_after_offer": ph.get("served_after_offer"),
            # then forced past the gate by the person: the planner's probation must roll it back
            "rolled_back": bool(rb), "requests_answered": by_bad,
            "accuracy_while_serving": ph.get("accuracy"),
            "rollback_seconds": (rb[0].ts - ph["start_ts"]) if rb else None,
            "why": rb[0].payload.get("reason") if rb else None,
            "labelled_predictions_judged": judged_on,
            "rollback_window": int(policy.rollback.window),
            # one window = the policy's rollback window of labelled predictions of the new model
            "within_one_window": bool(rb) and judged_on is not None
            and judged_on <= int(policy.rollback.window),
            "accuracy_after_rollback": _acc(by_phase.get("after_rollback", [])),
        }

    acc = {"clean": acc_clean,
           **{f"{k}_before": v["accuracy_before"] for k, v in corruptions.items()},
           **{f"{k}_after": v["accuracy_after"] for k, v in corruptions.items()}}
    expected = 1 if getattr(args, "one_corruption", False) else 2
    every = len(corruptions) == expected
    targets: dict[str, bool] = {} if getattr(args, "spike_only", False) else {
        "every_corruption_detected_within_one_window": every and all(
            c["detected_within_one_window"] for c in corruptions.values()),
        "no_false_alarm_in_clean_phase": not false_clean,
        "every_corruption_promoted_and_rolled_out": every and all(
            c["drift_to_rollout_seconds"] is not None for c in corruptions.values()),
        "every_corruption_rolled_out_within_30s_of_onset": every and all(
            c["drift_to_rollout_seconds"] is not None and c["drift_to_rollout_seconds"] <= 30.0
            for c in corruptions.values()),
        "every_corruption_on_at_most_500_labels": every and all(
            0 < c["labels"] <= 500 for c in corruptions.values()),
        "accuracy_back_within_3_points_of_clean": every and all(
            c["after_within_3_points_of_clean"] for c in corruptions.values()),
    }
    if spike:
        def within(key: str, limit: float) -> bool:
            return spike[key] is not None and spike[key] <= limit

        targets.update({
            "spike_breached_one_replica": spike["breached"]
            and spike["replicas_at_breach"] == policy.limits.min_replicas,
            "spike_extra_replica_serving_within_5s_of_breach": within("breach_to_replica_serving_s", 5.0),
            "spike_p95_under_slo_within_15s_of_breach": within("breach_to_p95_under_slo_s", 15.0),
            "spike_back_to_min_replicas_within_60s": within("back_to_min_replicas_s", 60.0),
        })
    targets["no_failed_requests"] = not any(r.status != 200 for r in served)
    if getattr(args, "bad_candidate", False) and not getattr(args, "spike_only", False):
        targets["bad_candidate_rejected_by_the_gate"] = bool(bad) and bad["gate_passed"] is False
        targets["bad_candidate_rolled_back_within_one_window"] = bool(bad) and bad["within_one_window"]
    targets["all_met"] = all(targets.values())
    failed = [r for r in served if r.status != 200]

    promoted = [e for e in events if e.kind == "promoted"]
    summary = {
        "accuracy": acc,
        "corruptions": corruptions,
        "false_alarms": {"clean": len(false_clean), "stable_phases": len(false_stable),
                         "definition": "analyzer windows that fired and hold only requests of the phase"},
        "spike": spike,
        "failed_requests": {"total": len(failed), "by_phase": {
            name: sum(1 for r in failed if r.phase == name) for name in sorted({r.phase for r in failed})}},
        "bad_candidate": bad,
        "replicas_over_time": [{"t": t, "replicas": n} for t, n in replicas],
        "p95_latency_over_time": [{"t": t, "p95_ms": p, "requests": n} for t, p, n in latency],
        "phases": [{k: v for k, v in p.items() if not k.endswith("_ts")} for p in phases],
        "events": [{"time": _iso(e.ts), "kind": e.kind, "source": e.source, "service": e.service,
                    **{k: v for k, v in e.payload.items() if not isinstance(v, list | dict)}}
                   for e in events],
        "promotions": [{"time": _iso(e.ts), "version": e.payload.get("version"),
                        "previous_version": e.payload.get("previous_version"),
                        "approved_by": e.payload.get("approved_by")} for e in promoted],
        "windows": windows,
        "targets": targets,
        "config": {"corruption_a": args.corruption_a, "severity_a": args.severity_a,
                   "corruption_b": args.corruption_b, "severity_b": args.severity_b, "rate": args.rate,
                   "spike": args.spike, "spike_seconds": args.spike_seconds, "window": WINDOW,
                   "slo_p95_ms": slo, "replica_cpus": getattr(args, "replica_cpus", None)},
        "files": {"summary": str(out_dir / "summary.json"), "timeline": str(out_dir / "timeline.png")},
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    _plot(out_dir / "timeline.png", served, windows, events, origin, latency, replicas, slo, phases, spike)
    return summary


def _plot(path: Any, served: list[Any], windows: list[dict[str, Any]], events: list[Any],
          origin: float, latency: list[tuple[float, float, int]], replicas: list[tuple[float, int]],
          slo: float, phases: list[dict[str, Any]], spike: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(12, 8.5), sharex=True,
                                        gridspec_kw={"height_ratios": [3, 2, 2]})
    ok = [r for r in served if r.status == 200]
    if ok:
        t = np.array([r.t - origin for r in ok])
        hit = np.array([r.prediction == r.label for r in ok], dtype=float)
        w = min(200, len(hit))
        roll = np.convolve(hit, np.ones(w) / w, mode="valid")
        ax1.plot(t[w - 1:], roll, color="tab:blue", label=f"served accuracy (rolling {w})")
    colours = {"drift_A": "tab:red", "drift_B": "tab:purple", "spike": "tab:orange",
               "bad_candidate": "black"}
    for p in phases:
        if p["name"] in colours:
            for ax in (ax1, ax2, ax3):
                ax.axvspan(p["start_ts"] - origin, p["end_ts"] - origin, color=colours[p["name"]],
                           alpha=0.07)
            ax1.text(p["start_ts"] - origin, 1.0, p["name"], fontsize=7, va="top")
    ax1.set_ylabel("accuracy")
    ax1.set_ylim(0, 1.05)
    marks = {"drift_detected": "tab:red", "retrain_started": "tab:orange",
             "retrain_finished": "tab:purple", "promoted": "tab:green",
             "rollout_completed": "tab:olive", "promotion_rejected": "black", "rolled_back": "black",
             "planner_scaled": "tab:cyan"}
    for e in events:
        if e.kind in marks and e.ts >= origin:
            for ax in (ax1, ax2, ax3):
                ax.axvline(e.ts - origin, color=marks[e.kind], ls="--", lw=0.8)
            ax1.text(e.ts - origin, 0.03, e.kind, rotation=90, fontsize=6, color=marks[e.kind])
    ax1.legend(loc="lower left")
    for key, colour in (("ks_p", "tab:blue"), ("mmd_p", "tab:red")):
        pts = [(w["t1"] - origin, max(w[key], 1e-6)) for w in windows if w.get(key) is not None]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax2.semilogy(xs, ys, "o-", ms=3, color=colour, label=key.replace("_p", " p-value"))
    ax2.set_ylabel("drift p-value")
    ax2.legend(loc="lower left", fontsize=7)
    if latency:
        xs, ys, _ = zip(*latency, strict=True)
        ax3.plot(xs, ys, color="tab:orange", lw=1, label="p95 latency per second (server)")
        ax3.axhline(slo, color="tab:orange", ls=":", lw=1, label=f"SLO {slo:g} ms")
        ax3.set_yscale("log")
    ph = _phase(phases, "spike")
    if spike and ph is not None and spike.get("first_breach_after_start_s") is not None:
        b = ph["start_ts"] - origin + spike["first_breach_after_start_s"]
        ax3.axvline(b, color="tab:red", lw=0.8)
        for key, label in (("breach_to_replica_serving_s", "replica serving"),
                           ("breach_to_p95_under_slo_s", "p95 < SLO")):
            if spike.get(key) is not None:
                ax3.text(b + spike[key], slo * 3, f"{label} +{spike[key]:.1f}s", fontsize=6, rotation=90)
        ax3.text(b, slo * 6, "breach", fontsize=6, color="tab:red", rotation=90)
    ax3.set_ylabel("p95 latency (ms)")
    ax3.legend(loc="upper left", fontsize=7)
    if replicas:
        r = ax3.twinx()
        xs = [t for t, _ in replicas] + [max((s.t for s in served), default=origin) - origin]
        ys = [n for _, n in replicas] + [replicas[-1][1]]
        r.step(xs, ys, where="post", color="tab:green", label="replicas")
        r.set_ylabel("replicas")
        r.set_ylim(0, max(ys) + 1)
        r.legend(loc="upper right", fontsize=7)
    ax3.set_xlabel("seconds since traffic started")
    fig.suptitle("scanflow MNIST: served accuracy, drift tests, latency, replicas and agent actions")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
