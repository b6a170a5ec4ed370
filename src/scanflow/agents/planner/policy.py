"""The planner's judgement: :func:`plan`, a pure function of signals, state and policy.

It runs as a sequence of small steps, each a pure function tested on its own:

1. signals   - :func:`absorb` (a new model, retrains that ended or got lost), :func:`assess_load`
   (latency and load streaks), :func:`assess_quality` (drift and accuracy streaks);
2. guardrails - :func:`judge_probation`: a promoted model that lost to the champion it replaced
   is rolled back first, and nothing else happens in that window;
3. arbitration - :func:`plan_replicas` (limits, scale up on a breach, scale down only after
   cold windows, a cooldown, and below the load that breached last time - for a while only when
   the replicas had CPU quota to spare then), :func:`plan_retrain`
   (drift or low accuracy, one retrain at a time, a daily budget, a cooldown);
4. action - the plan: actions in order, or why to hold (:func:`watching` says what a streak
   waits for).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from scanflow.agents.planner.model import (
    DAY_S,
    ActionKind,
    Plan,
    PlannedAction,
    PlannerState,
    ProbationSignal,
    RollbackVerdict,
    Signals,
)
from scanflow.spec.policy import Policy


def rollback_judgement(signal: ProbationSignal, policy: Policy, now: float) -> RollbackVerdict:
    """Roll back a promoted model whose label-joined accuracy, over its first `window` labelled
    predictions, is below the old champion's over its last `window` by more than `margin`.
    'wait' until `min_labelled` labels exist; 'keep' once a full window passed or probation
    (`within`) ended."""
    r = policy.rollback
    age = now - signal.promoted_at
    ev: dict[str, Any] = {
        **signal.model_dump(), "margin": r.margin, "window": r.window, "min_labelled": r.min_labelled,
        "probation_s": r.within, "age_s": round(age, 3),
    }
    new, old = signal.promoted_accuracy, signal.previous_accuracy
    if old is None or signal.previous_n == 0:
        why = f"no labelled accuracy of version {signal.previous_version} to compare with"
        return RollbackVerdict(decision="keep", evidence=ev, reason=why)
    if new is not None and signal.promoted_n >= r.min_labelled:
        ev["difference"] = new - old
        if new < old - r.margin:
            return RollbackVerdict(
                decision="rollback", evidence=ev,
                reason=(f"version {signal.promoted_version} accuracy {new:.4f} on {signal.promoted_n} "
                        f"labelled predictions is below version {signal.previous_version}'s {old:.4f} "
                        f"({'on the same requests' if signal.previous_basis == 'same_requests' else 'on'}"
                        f" {signal.previous_n}) by {old - new:.4f} > margin {r.margin:.4f}"),
            )
        if signal.promoted_n >= r.window:
            return RollbackVerdict(
                decision="keep", evidence=ev,
                reason=(f"version {signal.promoted_version} accuracy {new:.4f} vs {old:.4f} over a full "
                        f"window of {signal.promoted_n}: kept"),
            )
    if age > r.within:
        why = f"probation of {r.within:.0f}s ended with {signal.promoted_n} labels: kept"
        return RollbackVerdict(decision="keep", evidence=ev, reason=why)
    return RollbackVerdict(
        decision="wait", evidence=ev,
        reason=(f"version {signal.promoted_version}: {signal.promoted_n} of {r.min_labelled} labelled "
                f"predictions to judge it" if signal.promoted_n < r.min_labelled else
                f"version {signal.promoted_version} accuracy {new:.4f} vs {old:.4f}: within margin so far"),
    )


def _accuracy(s: Signals, p: Policy) -> tuple[float | None, str]:
    """Label-joined accuracy when enough labels exist, else the CBPE estimate."""
    if s.labelled_accuracy is not None and s.labelled_n >= p.objectives.accuracy_min_labels:
        return s.labelled_accuracy, "labels"
    if s.accuracy_estimate is not None:
        return s.accuracy_estimate, "cbpe"
    return None, "none"


def _since(state: PlannerState, kind: str, now: float) -> float:
    t = state.last_action_at.get(kind)
    return math.inf if t is None else now - t


@dataclass
class Load:
    """What one window says about latency and load (after the streaks were counted)."""

    hot: bool
    cold: bool
    idle: bool
    hot_latency: bool
    p95: float | None
    rps: float
    evidence: dict[str, Any] = field(default_factory=dict)
    hot_load: bool = False
    in_flight: float | None = None
    desired_up: int | None = None
    cpu_need: int | None = None


@dataclass
class Quality:
    """What one window says about drift and accuracy (after the streaks were counted)."""

    drift_holds: bool
    accuracy_low: bool
    accuracy: float | None
    source: str
    evidence: dict[str, Any] = field(default_factory=dict)


# -- 1. signals ---------------------------------------------------------------------------------
def absorb(s: Signals, st: PlannerState, p: Policy) -> list[str]:
    """Bookkeeping on `st` (changed in place): a new model needs its own evidence, a retrain
    that reported done or timed out ends; retrains older than a day leave the budget."""
    hold: list[str] = []
    now = s.now
    if s.model_version is not None and s.model_version != st.model_version:
        if st.model_version is not None:
            st.drift_streak = st.low_accuracy_streak = 0  # the new model needs its own evidence
            st.episode_start_id = st.episode_settled_id = None
        st.model_version = s.model_version
        st.cpu_samples = []  # another model costs what it costs: measured afresh
    for done in s.retrains_done:
        st.retraining = False
        st.retrain_ended_at = float(done.get("ts", now))
        st.drift_streak = st.low_accuracy_streak = 0
        st.episode_start_id = st.episode_settled_id = None
    started, timeout = st.retrain_started_at, p.limits.retrain_timeout
    if st.retraining and started is not None and now - started > timeout:
        st.retraining = False
        hold.append(f"retrain started {now - started:.0f}s ago never reported done "
                    f"(timeout {timeout:.0f}s): given up")
    st.retrains = [t for t in st.retrains if now - t < DAY_S]
    return hold


def _desired(in_flight: float | None, target: float, ratio: float, p: Policy
             ) -> tuple[int | None, int | None]:
    """Replicas the window's in-flight load asks for: to scale up (at `target` per replica) and
    to scale down to (at `ratio` x target, the hysteresis band), within the limits; None when
    there is no target or no measure."""
    if target <= 0 or in_flight is None:
        return None, None
    lim = p.limits

    def clamp(x: float) -> int:
        return max(lim.min_replicas, min(lim.max_replicas, math.ceil(round(x, 6))))

    return clamp(in_flight / target), clamp(in_flight / (ratio * target))


def _breach_cause(s: Signals, p: Policy) -> str:
    """'quota' when the replicas used at least `quota_bound_ratio` of their CPU quota in the
    window (they are the bottleneck: more of them add capacity), 'starved' when they left quota
    unused (the machine was short), 'unknown' without CPU figures (no limit set)."""
    if s.cpu_use is None or not s.cpu_limit:
        return "unknown"
    return "quota" if s.cpu_use >= p.hysteresis.quota_bound_ratio * s.cpu_limit else "starved"


def _breach_ceiling(s: Signals, st: PlannerState, p: Policy) -> float | None:
    """The load per replica a scale-down must stay under, or None: none recorded, or a breach of
    starved replicas older than `starved_breach_memory_s`."""
    breach = st.breach_rps_per_replica
    if breach is None:
        return None
    hy = p.hysteresis
    if st.breach_starved and st.breach_at is not None and s.now - st.breach_at > hy.starved_breach_memory_s:
        return None
    return hy.scale_down_headroom * breach


CPU_SAMPLES = 120  # steady windows remembered: what one replica uses at a load
CPU_RATE_BAND = (0.95, 1.5)  # samples at 0.95x-1.5x a load per replica bound the CPU at that load


def _remember_cpu(s: Signals, st: PlannerState, p: Policy, usable: bool) -> None:
    """Keep (req/s, CPU) per replica of a window that says what a replica uses at its load:
    `usable` (replicas steady all window, p95 under the SLO, not idle) and CPU under
    `quota_bound_ratio` of the quota (a replica held at its quota uses what it may, not what its
    load needs)."""
    if not usable or s.cpu_use is None or not s.cpu_limit or s.replicas <= 0 or not s.throughput_rps:
        return
    if s.cpu_use >= p.hysteresis.quota_bound_ratio * s.cpu_limit:
        return
    n = s.replicas
    st.cpu_samples = [*st.cpu_samples, (round(s.throughput_rps / n, 3), round(s.cpu_use / n, 4))
                      ][-CPU_SAMPLES:]


def cpu_per_replica(s: Signals, st: PlannerState, k: int) -> tuple[float, str]:
    """(CPU, how it was judged) each of `k` replicas would use at the window's load. CPU is not
    additive: a replica's fixed costs per wake-up are shared by more requests when it carries
    more (measured, MNIST CNN: two replicas at 50 req/s each used 0.40-0.46 CPU, one at 100 req/s
    0.30). So for fewer replicas than now, the most a replica was seen to use at (a little
    above) the load each would carry; without such a sample, the window's CPU shared evenly -
    an upper bound for fewer replicas, the estimate for more."""
    cpu = s.cpu_use or 0.0
    even = cpu / k
    if k < s.replicas and s.throughput_rps:
        rate = s.throughput_rps / k
        lo, hi = CPU_RATE_BAND
        seen = [c for r, c in st.cpu_samples if lo * rate <= r <= hi * rate]
        if seen and max(seen) < even:
            return max(seen), f"seen at {rate:.0f} req/s per replica"
    return even, "shared evenly"


def _cpu_need(s: Signals, st: PlannerState, p: Policy) -> int | None:
    """The fewest replicas each of which would use under `quota_bound_ratio` of its quota at the
    window's load (where a breach would be theirs; `cpu_per_replica`); None without CPU figures.
    In-flight load alone under-counts a service whose queue the replicas have just drained:
    measured, 3 -> 2 in the middle of a spike that two replicas had breached on a minute before."""
    if s.cpu_use is None or not s.cpu_limit or s.replicas <= 0:
        return None
    cap = p.hysteresis.quota_bound_ratio * s.cpu_limit / s.replicas
    for k in range(1, s.replicas + 1):
        if round(cpu_per_replica(s, st, k)[0], 6) <= cap:
            return k
    return max(1, math.ceil(round(s.cpu_use / cap, 6)))


def assess_load(s: Signals, st: PlannerState, p: Policy) -> Load:
    """Hot (latency, throughput or in-flight load per replica over its target), cold (idle, or
    fast and under the load target) or neither; counts the streaks on `st`, remembers the
    replicas the load asked for (stabilisation) and the load per replica that breached the SLO."""
    obj, hy = p.objectives, p.hysteresis
    slo, target = obj.p95_latency_ms, obj.in_flight_per_replica
    idle = s.n_requests < hy.min_requests or s.p95_latency_ms is None
    p95 = s.p95_latency_ms
    rps = s.throughput_rps or 0.0
    n = max(s.replicas, 1)
    per_replica = rps / n
    in_flight = 0.0 if idle and s.in_flight is None else s.in_flight
    load = None if in_flight is None else in_flight / n
    hot_latency = not idle and p95 is not None and p95 > hy.scale_up_latency_ratio * slo
    hot_load = target > 0 and not idle and load is not None and load > target
    busy = not idle and p95 is not None and p95 >= hy.scale_down_latency_ratio * slo
    throughput_breach = obj.min_throughput_rps > 0 and busy and rps < obj.min_throughput_rps
    hot = hot_latency or throughput_breach or hot_load
    cold = not hot and (idle or (p95 is not None and p95 < hy.scale_down_latency_ratio * slo))
    up, down = _desired(in_flight, target, hy.scale_down_load_ratio, p)
    cause = _breach_cause(s, p)
    # the replica count held all window: what it measured is that count's
    steady = _since(st, "scale_up", s.now) > s.window_s and _since(st, "scale_down", s.now) > s.window_s
    if hot:
        st.hot_streak, st.cold_streak = st.hot_streak + 1, 0
        # Only a window served by one replica count all along says what one replica carries.
        # Any latency breach counts, even with the replicas under their in-flight target (a busy
        # machine): a scale-down into it would flap (measured: 3 -> 1 -> 2 -> 1 -> 2 at 100 req/s).
        # But a breach of replicas that left CPU quota unused (a retrain took the cores) says
        # nothing lasting about what a replica carries: it is forgotten after a while, or the
        # service would stay scaled up at the clean load for good (measured: held at 2 all demo).
        if hot_latency and steady:
            st.breach_rps_per_replica, st.breach_at = per_replica, s.now
            st.breach_starved = cause == "starved"
    elif cold:
        st.hot_streak, st.cold_streak = 0, st.cold_streak + 1
        if st.breach_rps_per_replica is not None and not idle and per_replica >= st.breach_rps_per_replica:
            st.breach_rps_per_replica = None  # cold at that load: the old breach level is stale
    else:
        st.hot_streak = st.cold_streak = 0
    # What the load asked for, newest last; a hot window asks for at least what serves now, a
    # cold one for at least what its CPU use needs.
    need = _cpu_need(s, st, p)
    _remember_cpu(s, st, p, usable=steady and not hot and not idle)
    asked = max(s.replicas, up or 0) if hot else (down if down is not None else s.replicas)
    if not hot and need is not None:
        asked = max(asked, min(need, p.limits.max_replicas))
    st.desired = [*st.desired, asked][-max(hy.scale_down_windows, 1):]
    ev = {
        "p95_latency_ms": p95, "slo_p95_ms": slo, "throughput_rps": s.throughput_rps,
        "min_throughput_rps": obj.min_throughput_rps, "n_requests": s.n_requests, "window_s": s.window_s,
        "replicas": s.replicas, "hot": hot, "cold": cold, "idle": idle,
        "in_flight": in_flight, "in_flight_per_replica": load, "target_in_flight_per_replica": target or None,
        "hot_latency": hot_latency, "hot_load": hot_load,
        "desired_replicas_up": up, "desired_replicas_down": down, "desired_recent": list(st.desired),
        "hot_streak": st.hot_streak, "cold_streak": st.cold_streak,
        "scale_up_above_ms": hy.scale_up_latency_ratio * slo,
        "scale_down_below_ms": hy.scale_down_latency_ratio * slo,
        "scale_up_windows": hy.scale_up_windows, "scale_down_windows": hy.scale_down_windows,
        "breach_rps_per_replica": st.breach_rps_per_replica, "breach_starved": st.breach_starved,
        "cpu_use": s.cpu_use, "cpu_limit": s.cpu_limit, "cpu_throttled": s.cpu_throttled,
        "cpu_use_of_quota": (round(s.cpu_use / s.cpu_limit, 3) if s.cpu_use is not None and s.cpu_limit
                             else None),
        "quota_bound_ratio": hy.quota_bound_ratio, "breach_cause": cause if hot_latency else None,
        "replicas_for_cpu": need, "cpu_samples": len(st.cpu_samples),
    }
    return Load(hot=hot, cold=cold, idle=idle, hot_latency=hot_latency, p95=p95, rps=rps, evidence=ev,
                hot_load=hot_load, in_flight=in_flight, desired_up=up, cpu_need=need)


def assess_quality(s: Signals, st: PlannerState, p: Policy, hold: list[str]) -> Quality:
    """Drift and accuracy streaks on `st`; drift reports judged against another model version
    than the one served are ignored (said in `hold`)."""
    obj, hy = p.objectives, p.hysteresis
    ignored = [r for r in s.drift_reports
               if r.reference_version is not None and s.model_version is not None
               and str(r.reference_version) != str(s.model_version)]
    if ignored:
        hold.append(f"{len(ignored)} drift report(s) judged against version(s) "
                    f"{', '.join(sorted({str(r.reference_version) for r in ignored}))}, not the "
                    f"served {s.model_version}: ignored")
    for r in s.drift_reports:
        if r in ignored:
            continue
        if r.drift:
            if st.drift_streak == 0:
                # The episode starts with the first drifted window. That window may straddle
                # the onset (rows of the distribution before it: measured, 55 of 350 labels
                # once), so the executor waits for its labels from the window after it
                # (`settled_id`), and falls back to the whole episode only if those are late.
                st.episode_start_id = r.first_id if r.first_id is not None else (
                    None if r.last_id is None else r.last_id + 1)
                st.episode_settled_id = None if r.last_id is None else r.last_id + 1
            st.drift_streak += 1
        else:
            st.drift_streak = 0
    acc, acc_source = _accuracy(s, p)
    if acc is not None:
        st.low_accuracy_streak = st.low_accuracy_streak + 1 if acc < obj.accuracy_floor else 0
    ev = {
        "drift_reports": len(s.drift_reports), "drift_in_reports": sum(r.drift for r in s.drift_reports),
        "drift_tests": sorted({t for r in s.drift_reports for t in r.tests}),
        "drift_streak": st.drift_streak, "drift_windows": hy.drift_windows,
        "accuracy": acc, "accuracy_source": acc_source, "accuracy_floor": obj.accuracy_floor,
        "accuracy_estimate": s.accuracy_estimate, "accuracy_estimate_n": s.accuracy_estimate_n,
        "labelled_accuracy": s.labelled_accuracy, "labelled_n": s.labelled_n,
        "low_accuracy_streak": st.low_accuracy_streak, "accuracy_windows": hy.accuracy_windows,
    }
    return Quality(drift_holds=st.drift_streak >= hy.drift_windows,
                   accuracy_low=st.low_accuracy_streak >= hy.accuracy_windows,
                   accuracy=acc, source=acc_source, evidence=ev)


# -- 2. guardrails ------------------------------------------------------------------------------
def judge_probation(s: Signals, st: PlannerState, p: Policy, evidence: dict[str, Any],
                    hold: list[str]) -> PlannedAction | None:
    """The rollback of a promoted model that lost to the champion it replaced (out of its
    cooldown), or None; a model kept is remembered in `st` and not judged again."""
    pr = s.probation
    if pr is None or pr.promoted_version != s.model_version or pr.promoted_version in st.judged_versions:
        return None
    verdict = rollback_judgement(pr, p, s.now)
    evidence["probation"] = {"decision": verdict.decision, "reason": verdict.reason}
    if verdict.decision == "keep":
        st.judged_versions[pr.promoted_version] = "kept"
    if verdict.decision != "rollback":
        return None
    wait = p.cooldowns.rollback - _since(st, "rollback", s.now)
    if wait > 0:
        hold.append(f"rollback wanted but in cooldown ({wait:.0f}s left): {verdict.reason}")
        return None
    return PlannedAction(kind="rollback", reason=verdict.reason, evidence=verdict.evidence,
                         params={"from_version": pr.promoted_version, "to_version": pr.previous_version})


# -- 3. arbitration -----------------------------------------------------------------------------
def plan_replicas(s: Signals, st: PlannerState, p: Policy, load: Load, hold: list[str]
                  ) -> PlannedAction | None:
    """Replicas back within the limits, more on a load breach held `scale_up_windows`, fewer
    after `scale_down_windows` cold ones - each out of its cooldown (why not: in `hold`)."""
    n, lim, hy = s.replicas, p.limits, p.hysteresis
    if n < lim.min_replicas:
        return PlannedAction(kind="scale_up", reason=f"{n} replica(s) is below min_replicas "
                             f"{lim.min_replicas}", params={"replicas": lim.min_replicas},
                             evidence=load.evidence)
    if n > lim.max_replicas:
        return PlannedAction(kind="scale_down", reason=f"{n} replica(s) is above max_replicas "
                             f"{lim.max_replicas}", params={"replicas": lim.max_replicas},
                             evidence=load.evidence)
    # Latency and the queue agree (p95 over the SLO and in flight per replica over its target):
    # no noise does both, act on this window (KPA's panic mode); one signal alone waits for
    # `scale_up_windows`.
    if st.hot_streak >= hy.scale_up_windows or (load.hot_latency and load.hot_load):
        return _scale_up(s, st, p, load, hold)
    if st.cold_streak >= hy.scale_down_windows and n > lim.min_replicas:
        return _scale_down(s, st, p, load, hold)
    return None


def _scale_down(s: Signals, st: PlannerState, p: Policy, load: Load, hold: list[str]) -> PlannedAction | None:
    """To the most replicas the load asked for over the cold windows (stabilisation), sized so
    each carries at most `scale_down_load_ratio` x the in-flight target; without a target, one
    `scale_step` down. Never into the load per replica that breached the SLO last time (a
    breach of starved replicas only for `starved_breach_memory_s`)."""
    n, lim, hy, slo = s.replicas, p.limits, p.hysteresis, p.objectives.p95_latency_ms
    target_load = p.objectives.in_flight_per_replica
    sized = target_load > 0 and load.in_flight is not None
    target = max(lim.min_replicas, max(st.desired) if sized and st.desired else n - lim.scale_step)
    need = load.cpu_need
    if need is not None and need > target:
        target = need
    if target >= n:
        if need is not None and need >= n:
            per, how = cpu_per_replica(s, st, max(n - 1, 1))
            hold.append(f"load low for {st.cold_streak} windows, but the replicas use {s.cpu_use:.2f} CPU: "
                        f"{per:.2f} each on {n - 1} ({how}) would be over {hy.quota_bound_ratio:.0%} of "
                        f"the {(s.cpu_limit or 0.0) / n:.2f} CPU quota")
        else:
            hold.append(f"load low for {st.cold_streak} windows, but the load asked for {target} "
                        f"replica(s) in the last {len(st.desired)} window(s) (<= "
                        f"{hy.scale_down_load_ratio:g} x {target_load:g} in flight per replica, CPU under "
                        f"{hy.quota_bound_ratio:.0%} of the quota)")
        return None
    projected = load.rps / target
    wait = p.cooldowns.scale_down - min(_since(st, "scale_down", s.now), _since(st, "scale_up", s.now))
    ceiling = _breach_ceiling(s, st, p)
    if wait > 0:
        hold.append(f"load low for {st.cold_streak} windows but scale-down cooldown: {wait:.0f}s left")
        return None
    if ceiling is not None and not load.idle and projected >= ceiling:
        hold.append(
            f"load low, but {target} replica(s) would carry {projected:.2f} req/s each, >= "
            f"{hy.scale_down_headroom:.0%} of the {st.breach_rps_per_replica:.2f} req/s per replica "
            "that breached the SLO last time"
            + (f" (with CPU quota unused: remembered {hy.starved_breach_memory_s:.0f}s)"
               if st.breach_starved else "")
        )
        return None
    why = ("no traffic" if load.idle else
           f"p95 {load.p95:.1f} ms < {hy.scale_down_latency_ratio * slo:.1f} ms")
    if sized and not load.idle and load.in_flight is not None:
        f = load.in_flight
        why += (f", in flight {f:.2f} ({f / n:.2f}/replica; {f / target:.2f} on {target}, <= "
                f"{hy.scale_down_load_ratio:g} x target {target_load:g})")
    if need is not None and not load.idle and s.cpu_use is not None and s.cpu_limit:
        per, how = cpu_per_replica(s, st, target)
        why += (f", CPU {s.cpu_use:.2f} ({per:.2f} each on {target}, {how}, <= "
                f"{hy.quota_bound_ratio:.0%} of {s.cpu_limit / n:.2f})")
    return PlannedAction(
        kind="scale_down", params={"replicas": target},
        evidence={**load.evidence, "projected_rps_per_replica": projected, "ceiling_rps_per_replica": ceiling,
                  "replicas_from": n, "replicas_to": target},
        reason=f"{why} for {st.cold_streak} window(s) (>= {hy.scale_down_windows}): {n} -> {target}",
    )


def _scale_up(s: Signals, st: PlannerState, p: Policy, load: Load, hold: list[str]) -> PlannedAction | None:
    n, lim, hy, obj = s.replicas, p.limits, p.hysteresis, p.objectives
    above = hy.scale_up_latency_ratio * obj.p95_latency_ms
    if load.hot_latency:
        what = f"p95 {load.p95:.1f} ms > {above:.1f} ms"
    elif load.hot_load:
        what = (f"in flight {(load.in_flight or 0) / max(n, 1):.2f}/replica > target "
                f"{obj.in_flight_per_replica:g} (p95 {load.p95:.1f} ms, SLO {above:.1f} ms)")
    else:
        what = f"throughput {load.rps:.2f} req/s < {obj.min_throughput_rps:.2f} req/s while busy"
    wait = p.cooldowns.scale_up - _since(st, "scale_up", s.now)
    if n >= lim.max_replicas:
        hold.append(f"load breach ({what}) but already at max_replicas {lim.max_replicas}")
        return None
    if wait > 0:
        hold.append(f"load breach ({what}) but scale-up cooldown: {wait:.0f}s left")
        return None
    target = min(lim.max_replicas, max(n + lim.scale_step, load.desired_up or 0))
    sized = ""
    if load.in_flight is not None and obj.in_flight_per_replica > 0:
        sized = (f"; in flight {load.in_flight:.2f} = {load.in_flight / max(n, 1):.2f}/replica vs target "
                 f"{obj.in_flight_per_replica:g}: ceil({load.in_flight:.2f} / {obj.in_flight_per_replica:g})"
                 f" = {math.ceil(round(load.in_flight / obj.in_flight_per_replica, 6))}")
        if target == lim.max_replicas and (load.desired_up or 0) >= lim.max_replicas:
            sized += f", max_replicas {lim.max_replicas}"
        elif (load.desired_up or 0) <= n:
            sized += f" <= {n} serving: the latency breach alone, {lim.scale_step} more"
    return PlannedAction(
        kind="scale_up", params={"replicas": target},
        evidence={**load.evidence, "replicas_from": n, "replicas_to": target},
        reason=f"{what} for {st.hot_streak} window(s) (>= {hy.scale_up_windows}){sized}: {n} -> {target}",
    )


def watching(s: Signals, st: PlannerState, p: Policy, load: Load) -> list[str]:
    """Signals on their way to a breach: said, so a hold explains what it waits for."""
    hy, n = p.hysteresis, s.replicas
    watch: list[str] = []
    if load.hot and st.hot_streak < hy.scale_up_windows and not (load.hot_latency and load.hot_load):
        watch.append(f"load breach in {st.hot_streak} of {hy.scale_up_windows} window(s) to scale up")
    if 0 < st.cold_streak < hy.scale_down_windows and n > p.limits.min_replicas:
        watch.append(f"load low in {st.cold_streak} of {hy.scale_down_windows} window(s) to scale down")
    if 0 < st.drift_streak < hy.drift_windows:
        watch.append(f"drift in {st.drift_streak} of {hy.drift_windows} analyzer window(s) needed")
    if 0 < st.low_accuracy_streak < hy.accuracy_windows:
        watch.append(f"accuracy under the floor in {st.low_accuracy_streak} of {hy.accuracy_windows} "
                     "window(s) needed")
    return watch


def plan_retrain(s: Signals, st: PlannerState, p: Policy, q: Quality, scaling: ActionKind | None,
                 hold: list[str]) -> PlannedAction | None:
    """A retrain when drift held or accuracy stayed low (per the policy), if none runs, the
    daily budget is not spent and the cooldown passed; after `scaling` when it scales up too."""
    obj, hy, lim, now = p.objectives, p.hysteresis, p.limits, s.now
    acc, src = q.accuracy, q.source
    if p.retrain_requires_accuracy_drop:
        want, why = q.accuracy_low, "accuracy under the floor"
        if q.drift_holds and not q.accuracy_low:
            hold.append(f"drift for {st.drift_streak} windows, but accuracy {acc} ({src}) is not "
                        f"under the floor {obj.accuracy_floor}: no retrain (policy)")
    else:
        want = q.drift_holds or q.accuracy_low
        causes = (("drift held", q.drift_holds), ("accuracy under the floor", q.accuracy_low))
        why = " and ".join(x for x, on in causes if on)
    if not want:
        return None
    detail = (f"{why}: drift in {st.drift_streak} window(s) (>= {hy.drift_windows}), accuracy "
              + (f"{acc:.4f}" if acc is not None else "unknown") + f" ({src}, floor "
              f"{obj.accuracy_floor}, {st.low_accuracy_streak} low window(s))")
    wait = p.cooldowns.retrain - min(_since(st, "retrain", now),
                                     math.inf if st.retrain_ended_at is None else now - st.retrain_ended_at)
    if st.retraining:
        hold.append(f"{why}, but a retrain is in progress (since {st.retrain_started_at or 0:.0f})")
    elif len(st.retrains) >= lim.retrain_budget_per_day:
        nxt = (min(st.retrains) + DAY_S - now) if st.retrains else 0.0
        hold.append(f"{why}, but the retrain budget is spent: {len(st.retrains)} of "
                    f"{lim.retrain_budget_per_day} in the last 24 h (next in {nxt:.0f}s)")
    elif wait > 0:
        hold.append(f"{why}, but retrain cooldown: {wait:.0f}s left")
    else:
        params: dict[str, Any] = {"since_id": st.episode_start_id, "episode": st.episode + 1}
        if st.episode_settled_id is not None:
            params["settled_id"] = st.episode_settled_id
        if st.episode_start_id is None and q.accuracy_low:
            # Asked by the accuracy rule before any drifted window: the episode starts with the
            # window before the first one under the floor (the accuracy spans more than one
            # window), not when the champion began serving (those labels are of data it served
            # well).
            params["since_ts"] = now - (st.low_accuracy_streak + 1) * s.window_s
        return PlannedAction(
            kind="retrain", reason=detail + (" - after scaling up" if scaling else ""),
            params=params,
            evidence={**q.evidence, "retrains_last_24h": len(st.retrains),
                      "retrain_budget_per_day": lim.retrain_budget_per_day},
            after=scaling,
        )
    return None


# -- 4. the plan --------------------------------------------------------------------------------
def plan(signals: Signals, state: PlannerState, policy: Policy) -> tuple[Plan, PlannerState]:
    """Arbitrate one window: the actions to take (with reasons and evidence) or why to hold,
    and the state for the next window. Pure; a window seen before returns its plan again."""
    if state.window == signals.window and state.plan is not None:
        return state.plan, state
    s, p = signals, policy
    st = state.model_copy(deep=True)
    hold = absorb(s, st, p)
    load = assess_load(s, st, p)
    quality = assess_quality(s, st, p, hold)
    evidence = {"load": load.evidence, "quality": quality.evidence, "model_version": s.model_version,
                "notes": s.notes}
    back = judge_probation(s, st, p, evidence, hold)
    if back is not None:
        hold.append("scaling and retraining wait for the rollback")
        return _settle(s, st, [back], hold, evidence)
    # `scaling: serve`: Ray Serve's autoscaler owns the replica count, the planner keeps out.
    replicas = plan_replicas(s, st, p, load, hold) if p.scaling == "planner" else None
    actions = [replicas] if replicas is not None else []
    watch = watching(s, st, p, load)
    scaling = next((a.kind for a in actions if a.kind == "scale_up"), None)
    retrain = plan_retrain(s, st, p, quality, scaling, hold)
    actions += [retrain] if retrain is not None else []
    hold += watch
    if not actions and not hold:
        hold.append(_all_well(s, p, quality.accuracy, quality.source, st))
    return _settle(s, st, actions, hold, evidence)


def _settle(s: Signals, st: PlannerState, actions: list[PlannedAction], hold: list[str],
            evidence: dict[str, Any]) -> tuple[Plan, PlannerState]:
    out = Plan(window=s.window, actions=actions, hold=hold, evidence=evidence)
    st.window, st.plan = s.window, out
    return out, st


def _all_well(s: Signals, p: Policy, acc: float | None, source: str, st: PlannerState) -> str:
    lat = ("idle" if s.p95_latency_ms is None or s.n_requests < p.hysteresis.min_requests
           else f"p95 {s.p95_latency_ms:.1f} ms (SLO {p.objectives.p95_latency_ms:.0f})")
    floor = p.objectives.accuracy_floor
    a = "accuracy unknown" if acc is None else f"accuracy {acc:.4f} ({source}, floor {floor})"
    return (f"{lat}, {s.replicas} replica(s); drift in {st.drift_streak} of {p.hysteresis.drift_windows} "
            f"windows; {a}")


def record_outcome(state: PlannerState, kind: ActionKind, ok: bool, now: float,
                   params: dict[str, Any] | None = None) -> PlannerState:
    """The state after an action of the plan was carried out (`ok`) or not. Cooldowns and
    budgets start only for actions that happened; failed ones are simply planned again."""
    st = state.model_copy(deep=True)
    if not ok:
        return st
    st.last_action_at[kind] = now
    if kind in ("scale_up", "scale_down"):
        st.hot_streak = st.cold_streak = 0
    elif kind == "retrain":
        st.retraining = True
        st.retrain_started_at = now
        st.retrains.append(now)
        st.episode += 1
    elif kind == "rollback":
        if params and params.get("from_version"):
            st.judged_versions[str(params["from_version"])] = "rolled_back"
        st.low_accuracy_streak = 0
    return st


__all__ = ["Load", "Quality", "absorb", "assess_load", "assess_quality", "judge_probation", "plan",
           "plan_replicas", "plan_retrain", "record_outcome", "rollback_judgement", "watching"]
