"""The planner's sensor: one observation per time window of a service's prediction log.

:func:`service_signals` measures p95 latency, throughput and the requests in flight (Little's
law), takes the analyzer's drift reports and retrain outcomes from the planner's inbox, estimates
accuracy without labels (CBPE) and with them (label-joined), and the probation figures of a
promoted model; the pure judgement is in :mod:`scanflow.agents.planner.policy`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any

import numpy as np

from scanflow.agents.gate import policy_for, predicted_class, rescored_accuracy
from scanflow.agents.planner.model import (
    DAY_S,
    STATE_KEY,
    DriftReport,
    PlannerState,
    ProbationSignal,
    Signals,
)
from scanflow.agents.runtime import AgentContext, Observation
from scanflow.spec.policy import Policy
from scanflow.store import Store

log = logging.getLogger("scanflow.agents.planner")


def _log_window(store: Store, service: str, *, since: float | None = None, until: float | None = None,
                labelled_only: bool = False, version: str | None = None,
                with_inputs: bool = False, limit: int | None = None) -> dict[str, Any]:
    """Columns of the prediction log, oldest first: ts, latency_ms, outputs, labels, versions
    (and inputs)."""
    if hasattr(store, "prediction_window"):  # the columnar read path
        w = store.prediction_window(service, model_version=version, since=since, until=until,
                                    labelled_only=labelled_only, with_inputs=with_inputs, limit=limit)
        return {"ids": list(w.ids), "ts": np.asarray(w.ts), "latency_ms": np.asarray(w.latency_ms),
                "outputs": list(w.outputs), "labels": list(w.labels), "versions": list(w.model_versions),
                "inputs": w.inputs}
    rows = store.predictions(service, since=since, until=until, labelled_only=labelled_only)
    if version is not None:
        rows = [r for r in rows if r["model_version"] == version]
    rows = rows[:limit] if limit is not None else rows
    return {"ids": [r["id"] for r in rows], "ts": np.asarray([r["ts"] for r in rows], dtype=float),
            "latency_ms": np.asarray([r["latency_ms"] for r in rows], dtype=float),
            "outputs": [r["outputs"] for r in rows], "labels": [r["label"] for r in rows],
            "versions": [r["model_version"] for r in rows],
            "inputs": [r["inputs"] for r in rows] if with_inputs else None}


def _confidences(ctx: AgentContext, service: str, version: str, win: dict[str, Any], proba_key: str
                 ) -> np.ndarray | None:
    """Top-class confidence of each prediction: from the logged outputs when the model returns
    probabilities (`proba_key`), else by asking the served model version (sklearn flavour)."""
    outs = win["outputs"]
    if outs and all(isinstance(o, dict) and proba_key in o for o in outs):
        return np.asarray([max(o[proba_key]) if isinstance(o[proba_key], list) else o[proba_key]
                           for o in outs], dtype=float)
    x = win.get("inputs")
    if x is None or len(outs) == 0:
        return None
    model = _model(ctx, service, version)
    if model is None or not hasattr(model, "predict_proba"):
        return None
    arr = np.asarray(x, dtype=np.float64).reshape(len(outs), -1)
    return np.asarray(model.predict_proba(arr), dtype=float).max(axis=1)


def _model(ctx: AgentContext, service: str, version: str, flavour: str = "sklearn") -> Any:
    """A registered version of the service's model, loaded once per agent process (None when
    it cannot be loaded with that flavour: the caller falls back and says so)."""
    cache: dict[tuple[str, str], Any] = ctx.__dict__.setdefault("_planner_models", {})
    if (flavour, version) not in cache:
        dep = ctx.store.get_deployment(service)
        from scanflow.tracking.models import load_version  # mlflow (heavy): only to score a version

        try:
            cache[(flavour, version)] = (load_version(ctx.settings, dep.model_name, version, flavour)
                                         if dep else None)
        except Exception as exc:  # noqa: BLE001 - e.g. not an sklearn model: no CBPE
            log.warning("cannot load %s v%s as %s: %s", service, version, flavour, exc)
            cache[(flavour, version)] = None
    return cache[(flavour, version)]


def _cbpe_estimate(ctx: AgentContext, service: str, version: str, win: dict[str, Any], notes: list[str],
                   calibration_size: int, min_calibration: int, proba_key: str) -> tuple[float | None, int]:
    from scanflow.monitor.cbpe import CBPE  # sklearn (heavy): only when CBPE is on

    cache: dict[str, Any] = ctx.__dict__.setdefault("_planner_cbpe", {})
    cbpe = cache.get(version)
    if cbpe is None:
        # Calibrate on the first labelled predictions this version served (its reference).
        lab = _log_window(ctx.store, service, labelled_only=True, version=version, with_inputs=True,
                          limit=calibration_size)
        k = min(len(lab["outputs"]), calibration_size)
        if k < min_calibration:
            notes.append(f"CBPE: {k} labelled predictions of version {version}, "
                         f"need {min_calibration} to calibrate")
            return None, 0
        ref = {key: (v[:k] if v is not None else None) for key, v in lab.items()}
        conf = _confidences(ctx, service, version, ref, proba_key)
        if conf is None:
            notes.append("CBPE: no class probabilities (neither logged nor from the model)")
            return None, 0
        y_pred = [predicted_class(o) for o in ref["outputs"] or []]
        cbpe = CBPE(min_reference=min_calibration).fit(conf, np.asarray(ref["labels"], dtype=object),
                                                       y_pred=np.asarray(y_pred, dtype=object))
        cache[version] = cbpe
    mine = [i for i, v in enumerate(win["versions"]) if v == version]
    if not mine:
        return None, 0
    sub = {"outputs": [win["outputs"][i] for i in mine],
           "inputs": None if win.get("inputs") is None else np.asarray(win["inputs"])[mine]}
    conf = _confidences(ctx, service, version, sub, proba_key)
    if conf is None:
        return None, 0
    est = cbpe.estimate(conf)
    return est.accuracy, est.n


def _labelled_accuracy(win: dict[str, Any], last: int) -> tuple[float | None, int]:
    pairs = [(o, lab) for o, lab in zip(win["outputs"], win["labels"], strict=True) if lab is not None]
    pairs = pairs[-last:] if last else pairs
    if not pairs:
        return None, 0
    return float(np.mean([predicted_class(o) == lab for o, lab in pairs])), len(pairs)


def _probation(ctx: AgentContext, service: str, version: str | None, policy: Policy,
               state: PlannerState) -> ProbationSignal | None:
    """Figures of the model now served if it arrived by a forward rollout (not a rollback)."""
    if version is None or version in state.judged_versions:
        return None
    last = next(iter(ctx.store.latest_events(service, ["rollout_completed", "rollback_completed"])), None)
    if last is None or last.kind != "rollout_completed" or str(last.payload.get("to_version")) != version:
        return None
    prev = last.payload.get("from_version")
    if prev is None:
        return None
    prev = str(prev)
    r = policy.rollback
    new = _log_window(ctx.store, service, since=last.ts, labelled_only=True, version=version,
                      limit=r.window, with_inputs=True)
    acc_new, n_new = _first_accuracy(new, r.window)
    # The fair comparison: the old champion on the very requests the new model answered (the
    # traffic may have changed since the old one served: its own history is another distribution).
    acc_old, n_old = _replayed_accuracy(ctx, service, prev, new, r.window)
    basis = "same_requests"
    if acc_old is None:
        old = _log_window(ctx.store, service, since=last.ts - DAY_S, until=last.ts, labelled_only=True,
                          version=prev)
        acc_old, n_old = _labelled_accuracy(old, r.window)
        basis = "own_history"
    return ProbationSignal(promoted_version=version, previous_version=prev, promoted_at=last.ts,
                           promoted_accuracy=acc_new, promoted_n=n_new,
                           previous_accuracy=acc_old, previous_n=n_old, previous_basis=basis)


def _replayed_accuracy(ctx: AgentContext, service: str, version: str, win: dict[str, Any], first: int
                       ) -> tuple[float | None, int]:
    """Accuracy of `version` re-scoring the first `first` labelled requests of `win` (None when
    the inputs or the model are not available)."""
    inputs = win.get("inputs")
    if not isinstance(inputs, np.ndarray) or not len(inputs):
        return None, 0
    labels = win["labels"][:first]
    model = _model(ctx, service, version, flavour="pyfunc")
    if model is None:
        return None, 0
    try:
        return rescored_accuracy(model, inputs[: len(labels)], labels), len(labels)
    except Exception as exc:  # noqa: BLE001 - fall back to the model's own history
        log.warning("probation: version %s cannot re-score the window: %s", version, exc)
        return None, 0


def _first_accuracy(win: dict[str, Any], first: int) -> tuple[float | None, int]:
    pairs = [(o, lab) for o, lab in zip(win["outputs"], win["labels"], strict=True) if lab is not None]
    pairs = pairs[:first]
    if not pairs:
        return None, 0
    return float(np.mean([predicted_class(o) == lab for o, lab in pairs])), len(pairs)


def load_state(ctx: AgentContext) -> PlannerState:
    raw = ctx.get(STATE_KEY)
    return PlannerState.model_validate(raw) if raw else PlannerState()


def save_state(ctx: AgentContext, state: PlannerState) -> None:
    ctx.set(STATE_KEY, state.model_dump(mode="json"))


def _open_window(ctx: AgentContext, now: float, window_s: float, settle_s: float, kinds: list[str]
                 ) -> tuple[int, list[int], int] | None:
    """The window to judge (index, its inbox messages, windows skipped): the one in flight
    when the planner stopped, else the last complete one; None when it was judged already."""
    last_complete = math.floor((now - settle_s) / window_s) - 1
    mark = ctx.get("planner.watermark")
    open_w = ctx.get("planner.open")
    if open_w and (mark is None or open_w["index"] > mark):
        return int(open_w["index"]), list(open_w["message_ids"]), int(open_w["skipped"])
    if mark is not None and last_complete <= int(mark):
        return None
    idx = last_complete
    skipped = 0 if mark is None else max(0, idx - int(mark) - 1)
    message_ids = [m.id for m in ctx.store.inbox(ctx.name, kinds, limit=1000)]
    ctx.set("planner.open", {"index": idx, "message_ids": message_ids, "skipped": skipped})
    return idx, message_ids, skipped


def _read_messages(ctx: AgentContext, message_ids: list[int], drift_kinds: set[str], done_kinds: set[str]
                   ) -> tuple[list[DriftReport], list[dict[str, Any]]]:
    """The drift reports and retrain outcomes among the window's messages, oldest first."""
    msgs = ctx.store.messages_by_ids(message_ids)
    reports = [DriftReport(drift=bool(m.payload.get("drift")), first_id=m.payload.get("first_id"),
                           last_id=m.payload.get("last_id"), key=m.key,
                           reference_version=(None if m.payload.get("reference_version") is None
                                              else str(m.payload["reference_version"])),
                           tests=[t.get("test", "?") for t in m.payload.get("tests", []) if t.get("drift")])
               for m in msgs if m.kind in drift_kinds]
    done = [{**plain(m.payload), "ts": m.ts, "key": m.key} for m in msgs if m.kind in done_kinds]
    return reports, done


def _measure(ctx: AgentContext, svc: str, version: str | None, t0: float, t1: float, notes: list[str],
             cbpe: bool, labelled: tuple[int, float], calibration: tuple[int, int, str],
             quality_every_s: float = 0.0) -> dict[str, Any]:
    """Latency, throughput and in flight of one window; accuracy (CBPE estimate over the last
    `quality_every_s`, label-joined) when due, else the last figures of the same version: on
    short windows for scaling, reading the labelled log and scoring the window every second
    cost the planner the seconds a scale-up needs (measured: windows skipped at a spike)."""
    last: dict[str, Any] | None = ctx.__dict__.get("_planner_quality")
    due = last is None or last["version"] != version or t1 - last["t1"] >= quality_every_s
    q0 = min(t0, t1 - quality_every_s)
    same = q0 >= t0  # the quality span is this window: one read
    win = _log_window(ctx.store, svc, since=t0, until=t1, with_inputs=cbpe and due and same)
    lat = win["latency_ms"]
    n = len(lat)
    if due:
        qwin = win if same else _log_window(ctx.store, svc, since=q0, until=t1, with_inputs=cbpe)
        est, est_n = None, 0
        if cbpe and version is not None and len(qwin["latency_ms"]):
            try:
                est, est_n = _cbpe_estimate(ctx, svc, version, qwin, notes, *calibration)
            except Exception as exc:  # noqa: BLE001 - an estimate that fails is a note, not a crash
                notes.append(f"CBPE failed: {type(exc).__name__}: {exc}")
        lab_acc, lab_n = (None, 0)
        if version is not None:
            window, lookback = labelled
            lab = _log_window(ctx.store, svc, since=t1 - lookback, until=t1, labelled_only=True,
                              version=version)
            lab_acc, lab_n = _labelled_accuracy(lab, window)
        last = {"version": version, "t1": t1, "accuracy_estimate": est, "accuracy_estimate_n": est_n,
                "labelled_accuracy": lab_acc, "labelled_n": lab_n}
        ctx.__dict__["_planner_quality"] = last
    assert last is not None  # measured now, or carried over
    # Little's law: the requests in flight on average over the window = time spent in requests
    # (summed latency) / the window's length - the load per replica that predicts a breach.
    t_span = t1 - t0
    return {"n_requests": n, "p95_latency_ms": float(np.percentile(lat, 95)) if n else None,
            "in_flight": float(np.sum(lat)) / 1000.0 / t_span if t_span > 0 else None,
            **{k: v for k, v in last.items() if k not in ("version", "t1")}}


CPU_SAMPLES_KEPT_S = 30.0


def _sample_cpu(ctx: AgentContext, svc: str, now: float) -> None:
    """Read the replicas' CPU counters on every tick (a few small files): a window's CPU use
    is the difference between the samples nearest its ends. Kept in memory: after a restart
    the first window has none, and is judged on latency and in flight alone."""
    samples: list[tuple[float, dict[int, dict[str, Any]]]] = ctx.__dict__.setdefault("_cpu_samples", [])
    try:
        counters = ctx.deployer.cpu_counters(svc)
    except Exception as exc:  # noqa: BLE001 - CPU use is an extra signal; its failure is not the planner's
        log.debug("no CPU counters for %s: %s", svc, exc)
        return
    counters = {pid: c for pid, c in counters.items() if c.get("cpu_seconds") is not None}
    if not counters:
        return
    samples.append((now, counters))
    while samples and samples[0][0] < now - CPU_SAMPLES_KEPT_S:
        samples.pop(0)


def cpu_over(samples: list[tuple[float, dict[int, dict[str, Any]]]], t0: float, t1: float,
             tolerance_s: float = 0.5) -> dict[str, float | None]:
    """CPU use (CPU-s/s, all replicas), quota (CPUs, summed) and the share of throttled periods
    between the samples nearest `t0` and `t1` (each within `tolerance_s`), over the replicas
    present in both. All None when the samples do not cover the window."""
    none: dict[str, float | None] = {"cpu_use": None, "cpu_limit": None, "cpu_throttled": None}
    if not samples:
        return none
    a = min(samples, key=lambda x: abs(x[0] - t0))
    b = min(samples, key=lambda x: abs(x[0] - t1))
    if abs(a[0] - t0) > tolerance_s or abs(b[0] - t1) > tolerance_s or b[0] - a[0] < 0.5 * (t1 - t0):
        return none
    both = [pid for pid in b[1] if pid in a[1]]
    if not both:
        return none
    span = b[0] - a[0]

    def delta(key: str) -> float:
        return float(sum((b[1][p].get(key) or 0) - (a[1][p].get(key) or 0) for p in both))

    periods = delta("cpu_periods")
    limits = [b[1][p].get("cpus") for p in b[1]]
    return {"cpu_use": round(max(delta("cpu_seconds"), 0.0) / span, 4),
            "cpu_limit": float(sum(x for x in limits if x)) if all(limits) else None,
            "cpu_throttled": round(delta("cpu_throttled_periods") / periods, 4) if periods > 0 else None}


def service_signals(
    ctx: AgentContext,
    window_s: float = 10.0,
    settle_s: float = 1.0,
    service: str | None = None,
    drift_kinds: list[str] | None = None,
    done_kinds: list[str] | None = None,
    labelled_window: int = 500,
    labelled_lookback_s: float = 600.0,
    cbpe: bool = True,
    calibration_size: int = 1000,
    min_calibration: int = 200,
    proba_key: str = "probabilities",
    quality_every_s: float = 0.0,
) -> Observation | None:
    """One observation per complete time window of `window_s` seconds (aligned to the clock,
    so a replay after a crash names the same window); accuracy every `quality_every_s` (0:
    every window) over that span, the figures carried over in between. The window in flight
    and the messages it consumes are written down before it is judged: a restarted planner
    judges exactly that window again, and skips windows that went by while it was down (stale
    for scaling)."""
    svc = service or ctx.service
    if svc is None:
        raise ValueError("service_signals needs a service (agent `service:` or param)")
    if window_s <= 0:
        raise ValueError(f"window_s must be positive, got {window_s}")
    if cbpe and not ctx.__dict__.get("_planner_warm"):
        _warm_up(ctx)
    now = time.time()
    drift_set, done_set = set(drift_kinds or ["drift_report"]), set(done_kinds or ["retrain_done"])
    _sample_cpu(ctx, svc, now)
    opened = _open_window(ctx, now, window_s, settle_s, list(drift_kinds or ["drift_report"])
                          + list(done_kinds or ["retrain_done"]))
    if opened is None:
        return None
    idx, message_ids, skipped = opened
    t0, t1 = idx * window_s, (idx + 1) * window_s
    key = f"{svc}:{window_s:g}s:{idx}"
    reports, done = _read_messages(ctx, message_ids, drift_set, done_set)
    dep = ctx.store.get_deployment(svc)
    version = dep.model_version if dep else None
    notes: list[str] = []
    if dep is None:
        notes.append(f"service {svc!r} is not deployed")
    if skipped:
        notes.append(f"{skipped} window(s) went by unjudged while the planner was down")
    m = _measure(ctx, svc, version, t0, t1, notes, cbpe, (labelled_window, labelled_lookback_s),
                 (calibration_size, min_calibration, proba_key), quality_every_s)
    m.update(cpu_over(ctx.__dict__.get("_cpu_samples", []), t0, t1))
    probation = _probation(ctx, svc, version, policy_for(ctx, svc), load_state(ctx))
    sig = Signals(window=key, now=now, window_s=window_s, replicas=dep.replicas if dep else 0,
                  model_version=version, throughput_rps=m["n_requests"] / window_s, drift_reports=reports,
                  retrains_done=done, probation=probation, notes=notes, **m)

    def commit() -> None:
        for mid in message_ids:
            ctx.store.ack_message(mid)
        ctx.set("planner.watermark", idx)

    evidence = {"service": svc, "window": {"start": t0, "end": t1, "index": idx},
                "signals": sig.model_dump(mode="json", exclude={"drift_reports", "retrains_done"}),
                "drift_report_keys": [r.key for r in reports], "retrains_done": len(done)}
    data = {"service": svc, "signals": sig.model_dump(mode="json")}
    return Observation(key=key, evidence=evidence, data=data, commit=commit)


def _warm_up(ctx: AgentContext) -> None:
    """Import what CBPE needs (sklearn, MLflow) on the first tick, while the service is
    likely idle: imported lazily inside the first busy window, on 2 loaded cores, they held
    that window's judgement - and a scale-up - back by up to 25 s."""
    import scanflow.monitor.cbpe  # noqa: F401
    import scanflow.tracking.models  # noqa: F401

    ctx.__dict__["_planner_warm"] = True


def plain(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


__all__ = ["load_state", "plain", "save_state", "service_signals"]
