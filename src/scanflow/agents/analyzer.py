"""The analyzer's judgement of one monitor window (the `drift_check` sensor's work): the reference
sample of the version that served the window, a drift check fitted and calibrated on it once per
window size, and one verdict with a line a person can read.

Calibration splits the reference into a part the detectors are fitted on and a held-out clean
pool, so thresholds come from clean windows the detectors never saw (see
:mod:`scanflow.monitor.base`) instead of nominal alphas whose false-alarm rate depends on the
data (6-21 % of clean windows on a small tabular stream at alpha 0.05).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from scanflow.agents.runtime import AgentContext, Observation
from scanflow.tracking.contracts import REFERENCE_ARTIFACT

log = logging.getLogger("scanflow.agents.analyzer")


def _reference_for(ctx: AgentContext, service: str, artifact: str, version: str | None = None
                   ) -> tuple[str, dict[str, Any]]:
    """The reference sample logged with a model version of the service (default: the version it
    serves now), and a cache entry for what is fitted on it (per window size). The last few
    versions stay cached: windows that straddle a rollout alternate between two."""
    dep = ctx.store.get_deployment(service)
    if dep is None or dep.model_version is None:
        raise ValueError(f"service {service!r} is not deployed")
    cache: dict[tuple[str, str], dict[str, Any]] = ctx.__dict__.setdefault("_ref_cache", {})
    version = str(version or dep.model_version)
    if (service, version) not in cache:
        mv = ctx.tracker.model_version(dep.model_name, version)
        dst = ctx.settings.agents_dir / ctx.name / f"reference-v{version}"
        dst.mkdir(parents=True, exist_ok=True)
        try:
            data = np.load(ctx.tracker.download(mv.run_id, artifact, str(dst)))
        except Exception as exc:  # noqa: BLE001 - MLflow raises several kinds for a missing artifact
            raise ValueError(
                f"models:/{dep.model_name}/{version} (run {mv.run_id}) has no reference sample at "
                f"{artifact!r} ({type(exc).__name__}): log the model with "
                f"scanflow.tracking.contracts.log_model_with_reference, which writes "
                f"scanflow.tracking.contracts.REFERENCE_ARTIFACT ({REFERENCE_ARTIFACT!r})") from exc
        while len(cache) >= 3:
            cache.pop(next(iter(cache)))
        cache[(service, version)] = {"data": data.reshape(-1, _width(data)), "checks": {}}
    return version, cache[(service, version)]


def _width(a: np.ndarray) -> int:
    return int(np.prod(a.shape[1:])) if a.ndim > 1 else 1


MIN_CALIBRATION_ROWS = 20  # rows each half of a split reference needs at least


@dataclass(frozen=True)
class CheckParams:
    """How `drift_check` builds and judges (its params, checked once per tick; the defaults are
    the sensor's, so `bench/drift_tabular.py` measures exactly what an agent runs)."""

    calibrate: bool = True
    false_alarm_rate: float = 0.01
    confidence: float = 0.9
    calibration_windows: int = 300
    calibration_share: float = 0.5
    ks_alpha: float = 0.05
    mmd_alpha: float = 0.05
    n_components: int = 32
    n_permutations: int = 100
    standardize: bool = True


def _split_rows(ref: np.ndarray, n_pool: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(fit part, held-out pool) of a reference, identical rows always on the same side.

    Why not a plain shuffle (`split_reference`): a reference cut from a stream that repeats
    inputs (a retrain's labelled requests, integer-coded tabular rows) holds duplicates, and a
    pool sharing rows with the fitted part looks closer to it than fresh data does: the
    threshold comes out too low and clean windows fire. Groups of identical rows are shuffled
    and go to the pool until it holds `n_pool` rows."""
    rows = np.ascontiguousarray(ref)
    _, group = np.unique(rows.view(f"V{rows.shape[1] * rows.itemsize}"), return_inverse=True)
    group = group.ravel()
    sizes = np.bincount(group)
    order = np.random.default_rng(seed).permutation(len(sizes))
    k = int(np.searchsorted(np.cumsum(sizes[order]), n_pool)) + 1
    in_pool = np.isin(group, order[:k])
    return ref[~in_pool], ref[in_pool]


def fitted_check(ref: np.ndarray, size: int, p: CheckParams, where: str) -> dict[str, Any]:
    """A DriftCheck fitted (and calibrated, unless told not to or the reference is too small)
    for windows of `size` rows, with what to say about its calibration."""
    from scanflow.monitor.drift import DriftCheck, KSDrift, MMDDrift  # lazy: sklearn (~1.5 s)

    def build(alpha_ks: float, alpha_mmd: float, rows: int) -> DriftCheck:
        k = max(1, min(p.n_components, ref.shape[1], rows - 1))
        return DriftCheck(KSDrift(alpha=alpha_ks),
                          MMDDrift(alpha=alpha_mmd, n_components=k, n_permutations=p.n_permutations,
                                   standardize=p.standardize))

    if not p.calibrate:
        return {"check": build(p.ks_alpha, p.mmd_alpha, len(ref)).fit(ref), "calibrated": False,
                "note": "fixed alphas (calibrate: false)"}
    t = time.perf_counter()
    fit, pool = _split_rows(ref, int(round(len(ref) * p.calibration_share)))
    why = (f"the reference has {len(ref)} rows, split {len(fit)} to fit and {len(pool)} held out "
           f"(identical rows on one side); calibration needs {MIN_CALIBRATION_ROWS} on each")
    if min(len(fit), len(pool)) >= MIN_CALIBRATION_ROWS:
        check = build(p.false_alarm_rate, p.false_alarm_rate, len(fit))
        check.alpha = p.false_alarm_rate
        try:
            check.fit(fit).calibrate(pool, window_size=size, n_windows=p.calibration_windows,
                                     confidence=p.confidence)
            return {"check": check, "calibrated": True, "calibration": {
                "false_alarm_rate": p.false_alarm_rate, "confidence": p.confidence,
                "n_windows": p.calibration_windows, "window_size": size, "reference_rows": len(fit),
                "pool_rows": len(pool), "seconds": round(time.perf_counter() - t, 3)}}
        except ValueError as exc:
            why = str(exc)
    half = p.false_alarm_rate / 2
    log.warning("%s: cannot calibrate the drift check (%s); using fixed alphas of %g per test", where,
                why, half)
    return {"check": build(half, half, len(ref)).fit(ref), "calibrated": False,
            "note": f"not calibrated: {why}; fixed alphas {half:g} per test"}


def _checked(svc: str, version: str, cache: dict[str, Any], size: int, p: CheckParams) -> dict[str, Any]:
    """The check for windows of `size` rows: fitted (and calibrated) once per version and size."""
    key = (size, p)
    if key not in cache["checks"]:
        cache["checks"][key] = fitted_check(cache["data"], size, p, f"{svc} v{version}")
    return dict(cache["checks"][key])


def warm_up(ctx: AgentContext, reference_artifact: str, p: CheckParams, sizes: list[int]) -> None:
    """Fit and calibrate the check of the version the agent's service serves now, for the
    monitor's window sizes, before its windows arrive: a calibration takes seconds (~10 s for
    MNIST, more on busy cores), and a window waiting for it is drift seen late. A failure here
    is left to the windows' judgement, which reports it (tried once per version)."""
    svc = ctx.service
    dep = ctx.store.get_deployment(svc) if svc else None
    if svc is None or dep is None or dep.model_version is None or not sizes:
        return
    tried: set[tuple[str, str]] = ctx.__dict__.setdefault("_warm_tried", set())
    if (svc, str(dep.model_version)) in tried:
        return
    tried.add((svc, str(dep.model_version)))
    try:
        version, cache = _reference_for(ctx, svc, reference_artifact)
        for size in sizes:
            _checked(svc, version, cache, size, p)
    except Exception as exc:  # noqa: BLE001 - the window that needs it raises it again, with context
        log.info("%s: no drift check fitted ahead of its windows: %s", svc, exc)


def monitor_window_sizes(ctx: AgentContext, default: int) -> list[int]:
    """The window sizes of the app's `prediction_window` sensors watching the agent's service."""
    sizes = set()
    for agent in ctx.app.agents.values():
        for sensor in agent.sensors:
            name = sensor.func if isinstance(sensor.func, str) else getattr(sensor.func, "__name__", "")
            if str(name).rsplit(":", 1)[-1].rsplit(".", 1)[-1] != "prediction_window":
                continue
            if (sensor.params.get("service") or agent.service) == ctx.service:
                sizes.add(int(sensor.params.get("window_size", default)))
    return sorted(sizes)


def judge_window(ctx: AgentContext, m: Any, reference_artifact: str, p: CheckParams) -> Observation:
    """One monitor window judged against the reference of the version that served it."""
    w = m.payload
    svc = w["service"]
    win = ctx.store.prediction_window(svc, after_id=w["first_id"] - 1, upto_id=w["last_id"])
    # Judge the window against the reference of the version that served it (most of it):
    # inputs a previous model served say nothing about the current model's reference.
    served = Counter(str(v) for v in win.model_versions if v is not None)
    by = served.most_common(1)[0][0] if served else None
    version, cache = _reference_for(ctx, svc, reference_artifact, by)
    x = np.asarray(win.inputs, dtype=np.float64).reshape(len(win.ids), -1)
    fitted = _checked(svc, version, cache, len(x), p)
    t = time.perf_counter()
    verdict = fitted["check"].verdict(x)
    seconds = time.perf_counter() - t
    summary = _summary(verdict, fitted, p)
    tests = [r.to_dict() for r in verdict.results]
    judged = {"drift": verdict.drift, "reference_version": version, "calibrated": fitted["calibrated"],
              "p_value": _finite(verdict.p_value), "threshold": _finite(verdict.threshold),
              "fired": list(verdict.fired), "summary": summary, "tests": tests}
    evidence = {**w, **judged, "reason": summary, "check_seconds": seconds,
                "calibration": fitted.get("calibration") or {"note": fitted["note"]}}
    return Observation(key=m.key, evidence=evidence, data={**w, **judged}, message_id=m.id)


def _finite(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None


def _summary(verdict: Any, fitted: dict[str, Any], p: CheckParams) -> str:
    """One line a person reads in `scanflow decisions`: the verdict and the numbers behind it."""
    if fitted["calibrated"]:
        names = ", ".join(verdict.fired) or "combined"
        rel = "<=" if verdict.drift else ">"
        return (f"{'drift' if verdict.drift else 'no drift'}: {names} p={verdict.p_value:.2g} {rel} "
                f"{verdict.threshold:.2g} (calibrated to {p.false_alarm_rate:g} false alarms per window)")
    parts = [f"{r.test} p={r.p_value:.2g} {'<=' if r.drift else '>'} {r.threshold:.2g}"
             for r in verdict.results]
    how = "fixed alphas" if not p.calibrate else "not calibrated"
    return f"{'drift' if verdict.drift else 'no drift'}: {', '.join(parts)} ({how})"


__all__ = ["MIN_CALIBRATION_ROWS", "CheckParams", "fitted_check", "judge_window", "monitor_window_sizes",
           "warm_up"]
