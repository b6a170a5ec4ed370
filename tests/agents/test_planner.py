"""The planner: arbitration (pure), leases on a real store, and the agent functions on a real
store and a real deployed service."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from scanflow.agents.planner import (
    DriftReport,
    Plan,
    PlannerState,
    ProbationSignal,
    Signals,
    plan,
    promotion_gate,
    record_outcome,
    rollback_judgement,
)
from scanflow.control import backends
from scanflow.control.evaluation import CandidateEvaluation
from scanflow.spec.policy import Policy
from scanflow.store import Store

T0 = 1_000_000.0


def pol(**parts: Any) -> Policy:
    return Policy.model_validate(parts)


class Sim:
    """Feeds windows to `plan` the way the agent does: state carried over, outcomes of the
    planned actions recorded as if they succeeded, the replica count following the plan."""

    def __init__(self, policy: Policy, replicas: int = 1, window_s: float = 10.0) -> None:
        self.policy = policy
        self.state = PlannerState()
        self.replicas = replicas
        self.window_s = window_s
        self.i = 0
        self.now = T0
        self.plans: list[Plan] = []
        self.version = "1"

    def step(self, *, p95: float | None = 50.0, rps: float = 5.0, drift: list[bool] | None = None,
             est: float | None = None, labelled: tuple[float, int] | None = None,
             done: bool = False, probation: ProbationSignal | None = None, apply: bool = True,
             first_id: int | None = None, in_flight: float | None = None,
             cpu: tuple[float, float] | None = None) -> Plan:
        self.i += 1
        self.now += self.window_s
        n = int(rps * self.window_s)
        sig = Signals(
            window=f"w{self.i}", now=self.now, window_s=self.window_s, replicas=self.replicas,
            model_version=self.version, n_requests=n if p95 is not None else 0, p95_latency_ms=p95,
            throughput_rps=rps, in_flight=in_flight,
            cpu_use=cpu[0] if cpu else None, cpu_limit=cpu[1] if cpu else None,
            drift_reports=[DriftReport(drift=d, first_id=(first_id or self.i * 100) + k,
                                       tests=["ks"] if d else []) for k, d in enumerate(drift or [])],
            accuracy_estimate=est, accuracy_estimate_n=n if est is not None else 0,
            labelled_accuracy=labelled[0] if labelled else None, labelled_n=labelled[1] if labelled else 0,
            retrains_done=[{"ts": self.now}] if done else [], probation=probation,
        )
        out, self.state = plan(sig, self.state, self.policy)
        self.plans.append(out)
        if apply:
            for a in out.actions:
                self.state = record_outcome(self.state, a.kind, True, self.now, a.params)
                if a.kind in ("scale_up", "scale_down"):
                    self.replicas = a.params["replicas"]
                if a.kind == "rollback":
                    self.version = a.params["to_version"]
        return out

    def kinds(self) -> list[list[str]]:
        return [[a.kind for a in p.actions] for p in self.plans]


def fast(**extra: Any) -> Policy:
    """Short cooldowns so a test needs few windows; everything else as documented."""
    base: dict[str, Any] = {
        "objectives": {"p95_latency_ms": 100, "accuracy_floor": 0.9},
        "limits": {"min_replicas": 1, "max_replicas": 4, "retrain_budget_per_day": 3},
        "cooldowns": {"scale_up": 20, "scale_down": 60, "retrain": 100, "rollback": 100},
        "hysteresis": {"scale_up_windows": 2, "scale_down_windows": 3, "drift_windows": 2},
    }
    for k, v in extra.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return pol(**base)


# -- arbitration ------------------------------------------------------------------------------
def test_latency_breach_without_drift_scales_up_after_the_hysteresis() -> None:
    sim = Sim(fast())
    first = sim.step(p95=180)
    assert not first.fired
    assert "load breach in 1 of 2 window(s)" in first.reason
    second = sim.step(p95=190)
    assert [a.kind for a in second.actions] == ["scale_up"]
    act = second.actions[0]
    assert act.params == {"replicas": 2}
    assert "p95 190.0 ms > 100.0 ms for 2 window(s)" in act.reason
    assert act.evidence["slo_p95_ms"] == 100 and act.evidence["p95_latency_ms"] == 190
    assert sim.replicas == 2


def test_drift_judged_against_another_versions_reference_is_ignored() -> None:
    """Windows a rolled-back model served were judged against *its* reference: after the
    rollback they say nothing about the served model, and must not start a retrain."""
    from scanflow.agents.planner import DriftReport, PlannerState, Signals, plan

    pol = fast()
    state = PlannerState()
    for i in range(3):
        sig = Signals(window=f"w{i}", now=1000.0 + 10 * i, model_version="3",
                      drift_reports=[DriftReport(drift=True, first_id=500 * i + 1, last_id=500 * i + 500,
                                                 tests=["ks"], reference_version="4")])
        out, state = plan(sig, state, pol)
        assert not out.actions
        assert "judged against version(s) 4, not the served 3: ignored" in " ".join(out.hold)
    assert state.drift_streak == 0
    # Reports about the served version count, and the episode starts with the first drifted window.
    for i in range(2):
        sig = Signals(window=f"v{i}", now=2000.0 + 10 * i, model_version="3",
                      drift_reports=[DriftReport(drift=True, first_id=5001 + 500 * i, last_id=5500 + 500 * i,
                                                 tests=["ks"], reference_version="3")])
        out, state = plan(sig, state, pol)
    assert [a.kind for a in out.actions] == ["retrain"]
    assert out.actions[0].params["since_id"] == 5001
    # ... and its labels are awaited from the window after it (the first may straddle the onset)
    assert out.actions[0].params["settled_id"] == 5501


def test_drift_without_latency_breach_retrains() -> None:
    sim = Sim(fast())
    assert not sim.step(drift=[True], first_id=500).fired
    out = sim.step(drift=[True])
    assert [a.kind for a in out.actions] == ["retrain"]
    act = out.actions[0]
    assert act.params["since_id"] == 500  # the episode starts at the first drifted window
    assert act.params["episode"] == 1
    assert "drift held" in act.reason and act.after is None
    assert act.evidence["drift_streak"] == 2 and act.evidence["drift_tests"] == ["ks"]


def test_latency_breach_and_drift_scale_now_retrain_after() -> None:
    sim = Sim(fast())
    sim.step(p95=300, drift=[True])
    out = sim.step(p95=300, drift=[True])
    assert [a.kind for a in out.actions] == ["scale_up", "retrain"]
    assert out.actions[1].after == "scale_up"
    assert "after scaling up" in out.actions[1].reason


def test_one_retrain_at_a_time_then_cooldown_then_again() -> None:
    sim = Sim(fast())
    sim.step(drift=[True])
    assert sim.kinds()[-1] == []
    assert sim.step(drift=[True]).actions[0].kind == "retrain"
    busy = sim.step(drift=[True, True])
    assert not busy.fired and "a retrain is in progress" in busy.reason
    # The executor reports back; drift needs to hold again, and the cooldown must pass.
    sim.step(done=True, drift=[True, True])
    cooling = sim.step(drift=[True])
    assert not cooling.fired and "retrain cooldown" in cooling.reason
    for _ in range(20):
        if sim.step(drift=[True]).fired:
            break
    assert sim.plans[-1].actions[0].kind == "retrain"
    assert sim.plans[-1].actions[0].params["episode"] == 2
    assert sim.now - sim.state.retrain_ended_at >= 100  # the retrain cooldown


def test_retrain_budget_per_day_caps_automatic_retrains() -> None:
    sim = Sim(fast(limits={"retrain_budget_per_day": 2}, cooldowns={"retrain": 0}))
    started = 0
    for _ in range(60):
        out = sim.step(drift=[True, True])
        if out.actions:
            started += 1
            sim.step(done=True)
    assert started == 2
    assert "retrain budget is spent: 2 of 2 in the last 24 h" in sim.plans[-1].reason
    # A day later the budget is back.
    sim.now += 86_400
    assert sim.step(drift=[True, True]).actions[0].kind == "retrain"


def test_budget_zero_disables_retraining() -> None:
    sim = Sim(fast(limits={"retrain_budget_per_day": 0}))
    for _ in range(3):
        out = sim.step(drift=[True, True])
    assert not out.fired and "budget is spent: 0 of 0" in out.reason


def test_scale_up_cooldown_and_max_replicas() -> None:
    sim = Sim(fast(limits={"max_replicas": 2}, cooldowns={"scale_up": 25}))
    sim.step(p95=500)
    assert sim.step(p95=500).actions[0].params == {"replicas": 2}
    sim.step(p95=500)
    capped = sim.step(p95=500)
    assert not capped.fired and "already at max_replicas 2" in capped.reason

    sim2 = Sim(fast(cooldowns={"scale_up": 25}))
    sim2.step(p95=500)
    sim2.step(p95=500)  # 1 -> 2
    sim2.step(p95=500)
    cool = sim2.step(p95=500)  # 20 s after the scale-up
    assert not cool.fired and "scale-up cooldown: 5s left" in cool.reason
    assert sim2.step(p95=500).actions[0].params == {"replicas": 3}


def test_limits_are_restored_before_anything_else() -> None:
    sim = Sim(fast(limits={"min_replicas": 2}), replicas=1)
    out = sim.step()
    assert out.actions[0].kind == "scale_up" and "below min_replicas 2" in out.actions[0].reason
    sim = Sim(fast(limits={"max_replicas": 2}), replicas=5)
    out = sim.step()
    assert out.actions[0].params == {"replicas": 2} and "above max_replicas" in out.actions[0].reason


def _p95(rps: float, replicas: int, capacity: float = 10.0, base: float = 20.0) -> float:
    """A queueing service: latency explodes as the load per replica nears its capacity."""
    u = rps / (replicas * capacity)
    return base / (1 - u) if u < 0.95 else 2000.0


def test_scales_down_when_load_falls_without_oscillating() -> None:
    policy = fast(objectives={"p95_latency_ms": 200}, cooldowns={"scale_up": 20, "scale_down": 60},
                  hysteresis={"scale_down_windows": 3})
    sim = Sim(policy, replicas=1)
    for _ in range(40):  # 15 req/s: one replica (capacity 10) cannot, two can
        sim.step(p95=_p95(15, sim.replicas), rps=15)
    ups = [k for k in sim.kinds() if k]
    assert ups == [["scale_up"]] and sim.replicas == 2
    # At 2 replicas the service is cold (p95 80 ms < 100 ms) for 38 windows, yet it never
    # scaled down: one replica would carry the 15 req/s that breached the SLO.
    assert "that breached the SLO last time" in sim.plans[-1].reason
    for _ in range(40):  # the load falls to 5 req/s: one replica is plenty
        sim.step(p95=_p95(5, sim.replicas), rps=5)
    assert sim.replicas == 1
    changes = [k for k in sim.kinds() if k]
    assert changes == [["scale_up"], ["scale_down"]]  # exactly one move each way


# -- the simulated queue: spike and sawtooth, scaled on in-flight load per replica ---------------
SERVICE_S, CLIENTS = 0.010, 8  # 10 ms of work per request (100 req/s per replica), 8 clients


def _closed_loop(rps: float, replicas: int) -> tuple[float, float, float]:
    """(p95 ms, served req/s, requests in flight) of `CLIENTS` clients that want `rps` in all
    from replicas of `SERVICE_S` each: queueing up to the clients' bound, as in the demo (a
    client waits for its answer before its next request)."""
    u = rps * SERVICE_S / replicas
    bound = CLIENTS * SERVICE_S / replicas
    latency = bound if u >= 1 else min(SERVICE_S / (1 - u), bound)
    served = min(rps, replicas / SERVICE_S)
    return 1.5 * latency * 1000, served, served * latency


def queue_policy(**extra: Any) -> Policy:
    """The demo's shape: 2 s windows, SLO 50 ms, 3 in flight per replica, 1-4 replicas."""
    base: dict[str, Any] = {
        "objectives": {"p95_latency_ms": 50, "in_flight_per_replica": 3},
        "limits": {"min_replicas": 1, "max_replicas": 4},
        "cooldowns": {"scale_up": 4, "scale_down": 20},
        "hysteresis": {"scale_up_windows": 1, "scale_down_windows": 5},
    }
    for k, v in extra.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return pol(**base)


def _offer(sim: Sim, rps: float) -> Plan:
    p95, served, in_flight = _closed_loop(rps, sim.replicas)
    return sim.step(p95=p95, rps=served, in_flight=in_flight)


def _direction_changes(sim: Sim) -> int:
    """How often the replica count turned around (up after down or down after up)."""
    moves = [a.kind for p in sim.plans for a in p.actions if a.kind in ("scale_up", "scale_down")]
    return sum(1 for a, b in zip(moves, moves[1:], strict=False) if a != b)


def test_spike_scales_up_in_one_step_to_the_needed_count_and_back_down() -> None:
    sim = Sim(queue_policy(), window_s=2.0)
    for _ in range(10):  # 50 req/s: one replica, p95 30 ms
        assert not _offer(sim, 50).fired
    up = _offer(sim, 200)  # 4x: 8 in flight on one replica, p95 120 ms
    assert [a.kind for a in up.actions] == ["scale_up"] and sim.replicas == 3
    act = up.actions[0]
    assert act.reason.startswith("p95 120.0 ms > 50.0 ms for 1 window(s) (>= 1); in flight 8.00 = "
                                 "8.00/replica vs target 3")
    assert "ceil(8.00 / 3) = 3" in act.reason and act.reason.endswith(": 1 -> 3")
    ev = act.evidence
    assert (ev["in_flight"], ev["in_flight_per_replica"], ev["target_in_flight_per_replica"]) == (8, 8, 3)
    assert (ev["replicas_from"], ev["replicas_to"], ev["desired_replicas_up"]) == (1, 3, 3)
    assert ev["p95_latency_ms"] == 120 and ev["slo_p95_ms"] == 50
    during = [_offer(sim, 200) for _ in range(14)]  # 30 s more of the spike on 3 replicas
    assert not any(p.fired for p in during)
    assert all(p.evidence["load"]["p95_latency_ms"] <= 50 for p in during)
    after = [_offer(sim, 50) for _ in range(30)]
    downs = [a for p in after for a in p.actions]
    assert [(a.kind, a.params["replicas"]) for a in downs] == [("scale_down", 1)]  # 3 -> 1 at once
    first_down = next(i for i, p in enumerate(after) if p.fired)
    assert first_down == 4  # after 5 cold windows (10 s): the stabilisation window
    assert "in flight 0.60" in downs[0].reason and downs[0].reason.endswith(": 3 -> 1")
    assert _direction_changes(sim) == 1 and sim.replicas == 1


def test_one_signal_waits_for_the_hysteresis_both_act_at_once() -> None:
    """A p95 blip without a queue (or a queue with p95 fine) needs `scale_up_windows` hot
    windows; p95 over the SLO *and* in flight over the target scales on the first."""
    policy = queue_policy(hysteresis={"scale_up_windows": 2})
    blip = Sim(policy, window_s=2.0)
    first = blip.step(p95=70, rps=50, in_flight=1.0)
    assert not first.fired and "load breach in 1 of 2 window(s)" in first.reason
    second = blip.step(p95=70, rps=50, in_flight=1.0)
    assert [a.kind for a in second.actions] == ["scale_up"]
    why = second.actions[0].reason
    assert "ceil(1.00 / 3) = 1 <= 1 serving: the latency breach alone, 1 more: 1 -> 2" in why
    both = Sim(policy, window_s=2.0)
    out = _offer(both, 200)
    assert out.actions[0].params == {"replicas": 3} and "for 1 window(s) (>= 2)" in out.actions[0].reason


def test_in_flight_over_target_scales_before_p95_breaches() -> None:
    """The load per replica predicts the breach: 2 replicas at 3.5 in flight each, p95 still
    under the SLO, scale to 3."""
    sim = Sim(queue_policy(), replicas=2, window_s=2.0)
    out = sim.step(p95=45, rps=180, in_flight=7.0)
    assert out.actions[0].params == {"replicas": 3}
    assert out.actions[0].reason.startswith("in flight 3.50/replica > target 3 (p95 45.0 ms, SLO 50.0 ms)")
    assert out.actions[0].evidence["hot_load"] and not out.actions[0].evidence["hot_latency"]


def test_a_replica_count_that_breached_is_not_scaled_down_to_again() -> None:
    """After the spike the load falls back, 3 -> 1; but one replica now breaches the SLO at the
    base rate on its own (a busy machine: in flight under the target, p95 over the SLO): 1 -> 2,
    and the planner stays at 2 instead of flapping 2 -> 1 -> 2."""
    sim = Sim(queue_policy(hysteresis={"scale_up_windows": 2}), window_s=2.0)
    for _ in range(3):
        _offer(sim, 200)
    for _ in range(12):
        _offer(sim, 50)
    assert sim.replicas == 1
    for _ in range(40):  # one replica is slow at 50 req/s, two are fine
        if sim.replicas == 1:
            sim.step(p95=70, rps=50, in_flight=1.5)
        else:
            sim.step(p95=15, rps=50, in_flight=0.4)
    counts = [a.params["replicas"] for p in sim.plans for a in p.actions]
    assert counts == [3, 1, 2] and sim.replicas == 2
    assert "that breached the SLO last time" in sim.plans[-1].reason


def test_a_breach_at_the_cpu_quota_is_remembered_one_of_starved_replicas_is_forgotten() -> None:
    """One replica breaches at the base rate. Using its whole CPU quota (0.29 of 0.3), it lacks
    capacity: 1 -> 2 and no way back at that load. Using half of it (a retrain took the cores),
    the machine was short, not the replica: 1 -> 2, then back to 1 once the machine is free
    and `starved_breach_memory_s` (60 s) has passed - not pinned at 2 for good."""
    def run(cpu_when_slow: float) -> Sim:
        sim = Sim(queue_policy(hysteresis={"scale_up_windows": 2}), window_s=2.0)
        for _ in range(5):
            sim.step(p95=15, rps=50, in_flight=0.4, cpu=(0.16, 0.3))
        for _ in range(10):  # 20 s: one replica is slow (two are fine)
            if sim.replicas == 1:
                sim.step(p95=70, rps=50, in_flight=1.5, cpu=(cpu_when_slow, 0.3))
            else:
                sim.step(p95=15, rps=50, in_flight=0.4, cpu=(0.18, 0.6))
        for _ in range(60):  # 120 s: the cause is gone, one replica would hold the load again
            sim.step(p95=15, rps=50, in_flight=0.4, cpu=(0.17, 0.3 * sim.replicas))
        return sim

    quota = run(0.29)
    assert [a.params["replicas"] for p in quota.plans for a in p.actions] == [2] and quota.replicas == 2
    held = quota.plans[-1]
    assert "that breached the SLO last time" in held.reason and "quota unused" not in held.reason
    scaled_up = next(p for p in quota.plans if p.fired).actions[0]
    assert scaled_up.evidence["breach_cause"] == "quota" and scaled_up.evidence["cpu_use_of_quota"] == 0.967

    starved = run(0.15)
    moves = [(a.params["replicas"], p.evidence["load"]) for p in starved.plans for a in p.actions]
    assert [r for r, _ in moves] == [2, 1] and starved.replicas == 1
    up_at = next(i for i, p in enumerate(starved.plans) if p.fired)
    down_at = max(i for i, p in enumerate(starved.plans) if p.fired)
    assert moves[0][1]["breach_cause"] == "starved" and moves[0][1]["cpu_use_of_quota"] == 0.5
    assert (down_at - up_at) * 2.0 > 60  # not before the starved breach's memory ran out
    waiting = starved.plans[up_at + 20]
    assert "with CPU quota unused: remembered 60s" in waiting.reason
    assert _direction_changes(starved) == 1


def test_no_scale_down_while_the_replicas_cpu_needs_them_even_with_the_queue_drained() -> None:
    """Three replicas (0.3 CPU each) carry a spike with almost nothing in flight - the queue is
    gone, p95 is low - but they use 0.66 CPU: on two, 0.33 each would be over 80 % of the quota
    (measured: 3 -> 2 mid-spike, and p95 over the SLO again). It holds 3, then goes to 1 after."""
    sim = Sim(queue_policy(), replicas=3, window_s=2.0)
    during = [sim.step(p95=5, rps=400, in_flight=0.6, cpu=(0.66, 0.9)) for _ in range(20)]
    assert not any(p.fired for p in during) and sim.replicas == 3
    why = during[-1].reason
    assert ("the replicas use 0.66 CPU: 0.33 each on 2 (shared evenly) would be over 80% of the 0.30 "
            "CPU quota") in why
    assert during[-1].evidence["load"]["replicas_for_cpu"] == 3
    after = [sim.step(p95=5, rps=100, in_flight=0.2, cpu=(0.18, 0.9)) for _ in range(20)]
    downs = [a for p in after for a in p.actions]
    assert [(a.kind, a.params["replicas"]) for a in downs] == [("scale_down", 1)]
    assert "CPU 0.18 (0.18 each on 1, shared evenly, <= 80% of 0.30)" in downs[0].reason


def test_after_a_spike_it_scales_down_by_what_one_replica_was_seen_to_use_not_the_cpu_sum() -> None:
    """CPU is not additive (measured, MNIST CNN at 100 req/s: one 0.4-CPU replica 0.30, three
    0.45 together). Summed, 0.47 on one replica is over 80 % of its quota and the service stays
    at 2 after the spike; judged by what one replica used at 100 req/s before it, 3 -> 1."""
    def step(sim: Sim, rps: float, p95: float, in_flight: float) -> Plan:
        n = sim.replicas  # each replica's CPU grows less than its load, up to its 0.4 quota
        return sim.step(p95=p95, rps=rps, in_flight=in_flight,
                        cpu=(n * min(0.4, 0.3 * (rps / n / 100) ** 0.6), 0.4 * n))

    def run(before: int) -> Sim:
        sim = Sim(queue_policy(), window_s=2.0)
        for _ in range(before):  # the clean load on one replica: 0.30 of its 0.4 CPU
            assert not step(sim, 100, 20, 1.0).fired
        up = step(sim, 300, 120, 9.0)  # the spike, at its quota
        assert [(a.kind, a.params["replicas"]) for a in up.actions] == [("scale_up", 3)]
        for _ in range(10):  # the spike on three replicas: 0.36 each
            step(sim, 400, 30, 2.0)
        for _ in range(30):  # the clean load again, on three replicas: 0.15 each
            step(sim, 100, 10, 0.3)
        return sim

    learnt = run(before=10)
    downs = [a for p in learnt.plans for a in p.actions if a.kind == "scale_down"]
    assert [a.params["replicas"] for a in downs] == [1] and learnt.replicas == 1
    assert "CPU 0.47 (0.30 each on 1, seen at 100 req/s per replica, <= 80% of 0.40)" in downs[0].reason
    assert _direction_changes(learnt) == 1
    # a spike at 400 req/s on three replicas says nothing about one at 100: without the windows
    # before it, the CPU summed holds 2 (the old, safe rule)
    fresh = run(before=0)
    assert [a.params["replicas"] for p in fresh.plans for a in p.actions if a.kind == "scale_down"] == [2]
    held = fresh.plans[-1].reason
    assert "0.40 each on 1 (shared evenly) would be over 80% of the 0.40 CPU quota" in held, held
    # a window at the quota or over the SLO is no measure of what a replica needs
    sim = Sim(queue_policy(), window_s=2.0)
    sim.step(p95=20, rps=100, in_flight=1.0, cpu=(0.39, 0.4))
    sim.step(p95=80, rps=100, in_flight=1.0, cpu=(0.20, 0.4))
    assert sim.state.cpu_samples == []


def test_fast_sawtooth_holds_the_peak_count_without_oscillating() -> None:
    """Load that swings faster than the stabilisation window: up once, hold, down once after."""
    sim = Sim(queue_policy(), window_s=2.0)
    for _ in range(8):  # 8 periods of 4 s at 200 req/s, 4 s at 50 req/s
        for rps in (200, 200, 50, 50):
            _offer(sim, rps)
    assert sim.replicas == 3 and _direction_changes(sim) == 0
    assert max(p.evidence["load"]["p95_latency_ms"] for p in sim.plans[2:]) <= 50
    for _ in range(20):
        _offer(sim, 50)
    assert sim.replicas == 1 and _direction_changes(sim) == 1
    counts = [a.params["replicas"] for p in sim.plans for a in p.actions]
    assert counts == [3, 1]


def test_slow_sawtooth_follows_the_load_in_whole_steps() -> None:
    """Load that swings slower than the stabilisation window: each peak is met 1 -> 3 in one
    step and each trough 3 -> 1 in one step, never a step back in between."""
    sim = Sim(queue_policy(), window_s=2.0)
    for _ in range(3):
        for _ in range(10):
            _offer(sim, 200)
        for _ in range(20):
            _offer(sim, 50)
    counts = [a.params["replicas"] for p in sim.plans for a in p.actions]
    assert counts == [3, 1, 3, 1, 3, 1]
    assert _direction_changes(sim) == 5  # 2 per cycle: following the load, not flapping


def test_scaling_respects_the_bounds() -> None:
    sim = Sim(queue_policy(limits={"max_replicas": 2}), window_s=2.0)
    up = _offer(sim, 300)
    assert up.actions[0].params == {"replicas": 2} and "max_replicas 2" in up.actions[0].reason
    for _ in range(10):
        _offer(sim, 300)
    assert sim.replicas == 2 and "already at max_replicas 2" in sim.plans[-1].reason
    low = Sim(queue_policy(limits={"min_replicas": 2}), replicas=4, window_s=2.0)
    for _ in range(30):
        _offer(low, 10)
    assert low.replicas == 2 and [a.params["replicas"] for p in low.plans for a in p.actions] == [2]


def test_scale_down_waits_for_cold_windows_and_cooldown() -> None:
    sim = Sim(fast(cooldowns={"scale_down": 60}, hysteresis={"scale_down_windows": 3}), replicas=3)
    sim.state.last_action_at["scale_up"] = T0  # scaled up just before
    sim.step(p95=10)
    assert "load low in 1 of 3 window(s)" in sim.plans[-1].reason
    sim.step(p95=10)
    third = sim.step(p95=10)  # 30 s after the scale-up
    assert not third.fired and "scale-down cooldown: 30s left" in third.reason
    for _ in range(3):
        sim.step(p95=10)
    assert [k for k in sim.kinds() if k] == [["scale_down"]]
    assert sim.replicas == 2


def test_in_between_band_holds_steady() -> None:
    """p95 between the down (50 ms) and up (100 ms) thresholds: neither streak grows."""
    sim = Sim(fast(), replicas=2)
    for _ in range(30):
        out = sim.step(p95=75)
    assert not any(sim.kinds()) and sim.state.hot_streak == sim.state.cold_streak == 0
    assert out.hold == [out.hold[0]] and "p95 75.0 ms (SLO 100)" in out.hold[0]


def test_idle_service_scales_down_to_min() -> None:
    sim = Sim(fast(cooldowns={"scale_down": 0}), replicas=3)
    for _ in range(10):
        sim.step(p95=None, rps=0)
    assert sim.replicas == 1
    assert "no traffic" in [p for p in sim.plans if p.fired][0].actions[0].reason


def test_throughput_under_objective_while_busy_is_a_load_breach() -> None:
    policy = fast(objectives={"min_throughput_rps": 20})
    sim = Sim(policy)
    sim.step(p95=70, rps=12)  # busy (>= 50 ms) and under 20 req/s
    out = sim.step(p95=70, rps=12)
    assert out.actions[0].kind == "scale_up" and "throughput 12.00 req/s < 20.00" in out.actions[0].reason
    quiet = Sim(policy)
    for _ in range(3):
        quiet.step(p95=10, rps=3)  # little traffic and fast: not behind, just quiet
    assert not any(quiet.kinds())


def test_label_free_estimate_acts_before_labels_and_labels_override_it() -> None:
    sim = Sim(fast())
    sim.step(est=0.8)
    out = sim.step(est=0.8)
    assert out.actions[0].kind == "retrain"
    assert out.actions[0].evidence["accuracy_source"] == "cbpe"
    assert "accuracy under the floor" in out.actions[0].reason
    # No drifted window yet: the episode starts with the first window under the floor (two
    # windows of 10 s back from the end of this one), not when the champion began serving.
    assert out.actions[0].params["since_id"] is None
    assert out.actions[0].params["since_ts"] == sim.now - 3 * sim.window_s
    # With enough labels, the label-joined figure wins over an (optimistic) estimate.
    sim2 = Sim(fast())
    for _ in range(2):
        out = sim2.step(est=0.95, labelled=(0.7, 150))
    assert out.actions[0].evidence["accuracy_source"] == "labels"
    sim3 = Sim(fast())
    for _ in range(2):
        out = sim3.step(est=0.95, labelled=(0.7, 20))  # too few labels: the estimate stands
    assert not out.fired and out.evidence["quality"]["accuracy_source"] == "cbpe"


def test_policy_can_ignore_harmless_drift() -> None:
    sim = Sim(fast(retrain_requires_accuracy_drop=True))
    for _ in range(3):
        out = sim.step(drift=[True], est=0.97)
    assert not out.fired and "is not under the floor" in out.reason
    for _ in range(2):
        out = sim.step(drift=[True], est=0.6)
    assert out.actions[0].kind == "retrain"


def test_a_new_model_needs_its_own_drift_evidence() -> None:
    sim = Sim(fast())
    sim.step(drift=[True])
    sim.version = "2"  # promoted in between
    out = sim.step(drift=[True])
    assert not out.fired and sim.state.drift_streak == 1


def test_a_lost_retrain_times_out() -> None:
    sim = Sim(fast(limits={"retrain_timeout": "1m"}, cooldowns={"retrain": 0}))
    sim.step(drift=[True])
    assert sim.step(drift=[True]).fired
    for _ in range(6):
        sim.step()
    out = sim.step(drift=[True, True])
    assert "never reported done" in out.reason
    assert out.actions[0].kind == "retrain"


def test_the_same_window_twice_is_planned_once() -> None:
    policy = fast()
    st = PlannerState()
    sig = Signals(window="w1", now=T0, replicas=1, n_requests=100, p95_latency_ms=500, throughput_rps=10,
                  drift_reports=[DriftReport(drift=True, first_id=1)])
    p1, st1 = plan(sig, st, policy)
    p2, st2 = plan(sig, st1, policy)  # replayed after a crash
    assert p1 == p2 and st2.hot_streak == 1 and st2.drift_streak == 1


def test_a_failed_action_starts_no_cooldown() -> None:
    st = record_outcome(PlannerState(), "scale_up", False, T0)
    assert st.last_action_at == {}
    st = record_outcome(PlannerState(hot_streak=3), "scale_up", True, T0)
    assert st.last_action_at == {"scale_up": T0} and st.hot_streak == 0


# -- promotion gate and rollback judgement ----------------------------------------------------
def test_promotion_gate() -> None:
    """The planner's gate is the paired one (its cases are in tests/agents/test_promotion.py)."""
    p = pol(promotion={"min_gain_on_new": 0.02, "max_loss_on_holdout": 0.01, "min_labelled": 300})
    ev = CandidateEvaluation(version="2", candidate_acc_new=0.93, champion_acc_new=0.57, n_holdout=1000,
                             new_candidate_only=380, new_champion_only=20, candidate_acc_clean=0.965,
                             champion_acc_clean=0.969, n_clean=9000, clean_candidate_only=60,
                             clean_champion_only=96)
    ok = promotion_gate(ev, p)
    assert ok.passed and ok.evidence["gain_on_new"] == pytest.approx(0.36)
    thin = promotion_gate(replace(ev, n_holdout=100), p)
    assert not thin.passed and "only 100 labelled rows" in thin.reasons[0]
    assert not promotion_gate(replace(ev, candidate_acc_new=math.nan), p).passed


def _probation(new: float | None, n_new: int, old: float | None = 0.95, n_old: int = 500,
               at: float = T0) -> ProbationSignal:
    return ProbationSignal(promoted_version="2", previous_version="1", promoted_at=at,
                           promoted_accuracy=new, promoted_n=n_new, previous_accuracy=old, previous_n=n_old)


def test_rollback_judgement() -> None:
    p = pol(rollback={"window": 500, "min_labelled": 200, "margin": 0.02, "within": "1h"})
    assert rollback_judgement(_probation(0.5, 50), p, T0 + 60).decision == "wait"
    bad = rollback_judgement(_probation(0.90, 250), p, T0 + 60)
    assert bad.decision == "rollback"
    assert "accuracy 0.9000 on 250 labelled predictions is below version 1's 0.9500" in bad.reason
    assert bad.evidence["margin"] == 0.02 and bad.evidence["difference"] == pytest.approx(-0.05)
    close = rollback_judgement(_probation(0.94, 250), p, T0 + 60)
    assert close.decision == "wait" and "within margin so far" in close.reason
    assert rollback_judgement(_probation(0.94, 500), p, T0 + 60).decision == "keep"
    assert rollback_judgement(_probation(0.5, 10), p, T0 + 7200).decision == "keep"  # probation over
    assert rollback_judgement(_probation(0.5, 300, old=None, n_old=0), p, T0).decision == "keep"


def test_rollback_comes_first_and_once() -> None:
    sim = Sim(fast(rollback={"min_labelled": 100, "window": 300}))
    sim.version = "2"
    out = sim.step(p95=900, drift=[True, True], probation=_probation(0.6, 150))
    assert [a.kind for a in out.actions] == ["rollback"]
    assert out.actions[0].params == {"from_version": "2", "to_version": "1"}
    assert "scaling and retraining wait for the rollback" in out.hold
    assert sim.version == "1" and sim.state.judged_versions == {"2": "rolled_back"}
    # Version 2 is never judged again, even if the sensor still reported its figures.
    sim.version = "2"
    again = sim.step(probation=_probation(0.6, 150))
    assert all(a.kind != "rollback" for a in again.actions)


def test_a_good_promotion_is_kept_after_a_full_window() -> None:
    sim = Sim(fast(rollback={"min_labelled": 100, "window": 300}))
    sim.version = "2"
    assert not sim.step(probation=_probation(0.96, 120)).fired
    sim.step(probation=_probation(0.96, 300))
    assert sim.state.judged_versions == {"2": "kept"}


# -- leases on the real store (SQLite and PostgreSQL) -----------------------------------------
def test_lease_acquire_renew_release_expire(store: Store) -> None:
    assert store.acquire_lease("service:a", "p1", 30, purpose="scale", now=T0)
    assert not store.acquire_lease("service:a", "p2", 30, now=T0 + 1)  # taken
    assert store.acquire_lease("service:a", "p1", 30, now=T0 + 2)  # the holder extends it
    lease = store.get_lease("service:a", now=T0 + 3)
    assert lease is not None and lease.holder == "p1" and lease.generation == 1
    assert store.renew_lease("service:a", "p1", 30, now=T0 + 20)
    assert not store.renew_lease("service:a", "p2", 30, now=T0 + 20)
    assert not store.acquire_lease("service:a", "p2", 30, now=T0 + 40)  # renewed until T0 + 50
    # The holder dies without releasing: the lease expires and p2 takes over.
    assert store.acquire_lease("service:a", "p2", 30, now=T0 + 51)
    lease = store.get_lease("service:a", now=T0 + 52)
    assert lease.holder == "p2" and lease.generation == 2
    assert not store.renew_lease("service:a", "p1", 30, now=T0 + 52)  # p1 lost it for good
    assert not store.release_lease("service:a", "p1", now=T0 + 52)
    assert store.release_lease("service:a", "p2", now=T0 + 53)
    assert store.get_lease("service:a", now=T0 + 54) is None
    assert store.acquire_lease("service:a", "p3", 30, now=T0 + 54)
    assert store.get_lease("service:a", now=T0 + 55).generation == 3
    assert store.acquire_lease("service:b", "p2", 30, now=T0)  # leases are per service
    with pytest.raises(ValueError, match="positive ttl"):
        store.acquire_lease("service:a", "p1", 0)


def test_lease_race_has_exactly_one_winner(store: Store) -> None:
    wins: list[str] = []
    barrier = threading.Barrier(6)

    def claim(i: int) -> None:
        barrier.wait()
        if store.acquire_lease("service:race", f"h{i}", 30):
            wins.append(f"h{i}")

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    assert store.get_lease("service:race").holder == wins[0]


HOLDER = """
import sys, time
from scanflow.store import Store
s = Store(sys.argv[1])
assert s.acquire_lease("service:svc", "planner:child", float(sys.argv[2]), purpose="scale")
print("held", flush=True)
time.sleep(600)
"""


def test_lease_of_a_holder_killed_with_sigkill_expires(store: Store, store_url: str) -> None:
    ttl = 2.0
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, store_url, str(ttl)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert not store.acquire_lease("service:svc", "planner:restarted", ttl)  # not yet expired
        deadline = time.monotonic() + 60
        while not store.acquire_lease("service:svc", "planner:restarted", ttl):
            assert time.monotonic() < deadline, "the lease of the killed holder never expired"
            time.sleep(0.2)
        lease = store.get_lease("service:svc")
        assert lease.holder == "planner:restarted" and lease.generation == 2
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_service_lease_renews_while_held_and_refuses_others(store: Store) -> None:
    from scanflow.agents.planner import LeaseBusy, service_lease

    with service_lease(store, "svc", "a:1", ttl_s=0.6, purpose="scale_up (w1)"):
        time.sleep(1.5)  # longer than the ttl: renewed in the background
        assert store.get_lease("service:svc").holder == "a:1"
        with pytest.raises(LeaseBusy, match=r"leased by a:1 until .* \(scale_up \(w1\)\)"):
            with service_lease(store, "svc", "b:2", ttl_s=0.6, wait_s=0.3):
                pass
    assert store.get_lease("service:svc") is None  # released on exit
    with service_lease(store, "svc", "b:2", ttl_s=5):
        assert store.get_lease("service:svc").holder == "b:2"


# -- the agent functions on a real store ------------------------------------------------------
SPEC = """
app: demo
team: ops
services:
  svc:
    model: m
    policy:
      objectives: {p95_latency_ms: 100}
      hysteresis: {drift_windows: 2, scale_up_windows: 1}
      cooldowns: {retrain: 0}
agents:
  planner:
    role: planner
    service: svc
    sensors:
      - name: plan
        func: scanflow.agents.planner:service_signals
        params: {window_s: 3600, settle_s: 0, cbpe: false}
        trigger: {interval: 1s}
        rule: scanflow.agents.planner:decide
        actuators:
          - {func: scanflow.agents.planner:execute, params: {executor: executor}}
"""


def _hour_window() -> tuple[float, float]:
    t1 = math.floor(time.time() / 3600) * 3600
    return t1 - 3600, t1


def _put_deployment(store: Store, version: str = "1", replicas: int = 1) -> None:
    store.put_deployment(service="svc", app="demo", team="ops", model_name="m", alias="champion",
                         model_version=version, host="127.0.0.1", port=1, pid=None, replicas=replicas,
                         status="running", workdir="/nonexistent")


def _log(store: Store, t0: float, n: int, latency: float, start: int = 0, version: str = "1",
         labels: dict[str, int] | None = None, outputs: Any = 0) -> None:
    store.add_predictions(
        {"request_id": f"r{i}", "service": "svc", "model_version": version, "ts": t0 + 1 + i * 0.01,
         "inputs": [float(i)], "outputs": outputs, "latency_ms": latency} for i in range(start, start + n)
    )
    if labels:
        store.add_labels(labels)


@pytest.fixture
def planner_app(tmp_path: Path) -> Any:
    from scanflow.spec import load_application

    d = tmp_path / "app"
    d.mkdir()
    (d / "scanflow.yaml").write_text(textwrap.dedent(SPEC))
    return load_application(d)


def test_agent_retrains_on_drift_once_across_a_restart(planner_app: Any, settings: Any, store: Store) -> None:
    from scanflow.agents import Agent

    t0, _ = _hour_window()
    _put_deployment(store)
    _log(store, t0, 200, latency=20.0)
    for k, first in enumerate((1000, 1500)):
        store.send_message("analyzer", "planner", "drift_report",
                           {"drift": True, "first_id": first, "last_id": first + 499,
                            "tests": [{"test": "mmd", "drift": True}]}, key=f"a:{k}")
    agent = Agent(settings, store, planner_app, "planner")
    assert agent.tick("plan") == 1
    assert agent.tick("plan") == 0  # that window is judged; the next one is not complete yet
    # A restarted planner (a new process: same store) judges nothing twice.
    assert Agent(settings, store, planner_app, "planner").tick("plan") == 0
    decisions = store.list_decisions("planner")
    assert len(decisions) == 1 and decisions[0].fired
    ev = decisions[0].evidence
    assert ev["plan"]["actions"][0]["kind"] == "retrain"
    assert ev["plan"]["actions"][0]["params"]["since_id"] == 1000  # the first drifted window
    assert ev["signals"]["n_requests"] == 200 and ev["signals"]["p95_latency_ms"] == 20.0
    assert ev["policy"]["objectives"]["p95_latency_ms"] == 100
    sent = store.list_messages("executor")
    assert len(sent) == 1 and sent[0].kind == "retrain" and sent[0].payload["since_id"] == 1000
    assert not store.inbox("planner")  # the drift reports were consumed
    kinds = [e.kind for e in store.list_events("svc")]
    assert kinds == ["retrain_requested"]


def test_agent_replays_an_interrupted_window_with_the_same_plan(planner_app: Any, settings: Any,
                                                                 store: Store) -> None:
    """Killed after the rule wrote its state but before the decision was stored: the window,
    its messages and its plan are the same on restart; the streaks are not counted twice."""
    from scanflow.agents import Agent
    from scanflow.agents.planner import decide, load_state, service_signals

    t0, _ = _hour_window()
    _put_deployment(store)
    _log(store, t0, 50, latency=20.0)
    store.send_message("analyzer", "planner", "drift_report", {"drift": True, "first_id": 7}, key="a:0")
    agent = Agent(settings, store, planner_app, "planner")
    obs = service_signals(agent.ctx, window_s=3600, settle_s=0, cbpe=False)
    decide(obs, agent.ctx)  # ... and the process dies here
    assert load_state(agent.ctx).drift_streak == 1
    store.send_message("analyzer", "planner", "drift_report", {"drift": True, "first_id": 8}, key="a:1")
    restarted = Agent(settings, store, planner_app, "planner")
    assert restarted.tick("plan") == 1
    state = load_state(restarted.ctx)
    assert state.drift_streak == 1  # not 2: the replay re-used the plan, not the new report
    assert [m.key for m in store.inbox("planner")] == ["a:1"]  # left for the next window
    (d,) = store.list_decisions("planner")
    assert not d.fired and "drift in 1 of 2 analyzer window(s)" in d.evidence["reason"]


def test_agent_scaling_waits_for_the_lease(planner_app: Any, settings: Any, store: Store) -> None:
    """Another holder acts on the service: the planner's scale-up is not carried out, the
    failure is recorded, and no cooldown starts (so the next window plans it again)."""
    from scanflow.agents import Agent
    from scanflow.agents.planner import load_state

    t0, _ = _hour_window()
    _put_deployment(store)
    _log(store, t0, 100, latency=500.0)
    assert store.acquire_lease("service:svc", "someone-else:1", 600, purpose="maintenance")
    planner_app.agents["planner"].sensors[0].actuators[0].params["lease_wait_s"] = 0.2
    agent = Agent(settings, store, planner_app, "planner")
    assert agent.tick("plan") == 1
    (d,) = store.list_decisions("planner")
    assert d.fired and d.actions[0]["status"] == "failed"
    assert "leased by someone-else:1" in d.actions[0]["error"]
    assert load_state(agent.ctx).last_action_at == {}
    (ev,) = store.list_events("svc", ["plan_action_failed"])
    assert ev.payload["action"] == "scale_up" and "leased by" in ev.payload["error"]


@pytest.mark.parametrize("point", ["before_decision", "after_decision", "after_action", "before_commit"])
def test_planner_killed_at_each_point_retrains_once(point: str, tmp_path: Path, settings: Any,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """`kill -9` of the planner process anywhere between sensing and committing a window:
    after the restart, one decision for the window, one retrain request, the drift reports
    consumed once, and the planner state counts them once."""
    from scanflow.agents.process import AgentSupervisor
    from scanflow.agents.runtime import FAILPOINT_ENV

    d = tmp_path / "app"
    d.mkdir()
    (d / "scanflow.yaml").write_text(textwrap.dedent(SPEC).replace("interval: 1s", "interval: 0.2s"))
    store = backends.store(settings)
    t0, _ = _hour_window()
    _put_deployment(store)
    _log(store, t0, 100, latency=20.0)
    for k in range(2):
        store.send_message("analyzer", "planner", "drift_report", {"drift": True, "first_id": 100 + k},
                           key=f"a:{k}")
    sup = AgentSupervisor(settings, store)
    monkeypatch.setenv(FAILPOINT_ENV, point)
    pid = sup.start(d, ["planner"])["planner"]
    monkeypatch.delenv(FAILPOINT_ENV)
    try:
        deadline = time.monotonic() + 60
        while _alive(pid):
            assert time.monotonic() < deadline, f"the planner did not die at {point}"
            time.sleep(0.05)
        sup.start(d, ["planner"])  # restarted without the failpoint
        deadline = time.monotonic() + 60
        while not (store.list_decisions("planner") and store.get_state("planner", "planner.watermark")
                   is not None and not store.state_items("planner", "_pending:")):
            assert time.monotonic() < deadline, f"no recovery from a kill at {point}"
            time.sleep(0.1)
    finally:
        sup.stop()
    (dec,) = store.list_decisions("planner")
    assert dec.fired and [a["status"] for a in dec.actions] == ["succeeded"]
    (msg,) = store.list_messages("executor")
    assert msg.kind == "retrain" and msg.payload["since_id"] == 100
    assert [e.kind for e in store.list_events("svc")] == ["retrain_requested"]
    assert all(m.status == "done" for m in store.list_messages("planner"))
    state = PlannerState.model_validate(store.get_state("planner", "planner.state"))
    assert state.drift_streak == 2 and state.retraining and len(state.retrains) == 1
    assert len(store.list_actions("planner")) == 1
    store.close()


def _alive(pid: int) -> bool:
    from scanflow.procs import pid_alive

    return pid_alive(pid)


# -- against a real service: scale up and roll back through the deployer ---------------------
@pytest.mark.slow
def test_planner_scales_and_rolls_back_a_real_service(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import httpx
    from typer.testing import CliRunner

    from scanflow.agents import Agent
    from scanflow.cli.main import app as cli
    from scanflow.control.audit import why
    from scanflow.serving import LocalDeployer
    from scanflow.settings import Settings, get_settings
    from scanflow.spec import load_application
    from support.serving import MODEL, _train_and_register

    ws_root = tmp_path / "ws"
    monkeypatch.setenv("SCANFLOW_WORKSPACE", str(ws_root))
    get_settings.cache_clear()
    settings = Settings(workspace=ws_root).ensure()
    ws = _train_and_register(settings)
    store = ws.store
    spec = textwrap.dedent(f"""
        app: demo
        team: ops
        services:
          digits:
            model: {MODEL}
            policy:
              objectives: {{p95_latency_ms: 0.001}}     # every window breaches: scale up
              limits: {{max_replicas: 2}}
              hysteresis: {{scale_up_windows: 1, min_requests: 5}}
              rollback: {{window: 200, min_labelled: 100, margin: 0.02}}
        agents:
          planner:
            role: planner
            service: digits
            sensors:
              - name: plan
                func: scanflow.agents.planner:service_signals
                params: {{window_s: 2, settle_s: 0.5, cbpe: false}}
                trigger: {{interval: 1s}}
                rule: scanflow.agents.planner:decide
                actuators: [scanflow.agents.planner:execute]
    """)
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "scanflow.yaml").write_text(spec)
    app = load_application(tmp_path / "app")
    human = LocalDeployer(settings, store, actor="alice")
    try:
        dep = human.deploy("digits", app="demo", team="ops", model=MODEL, alias="champion", replicas=1)
        url = f"http://{dep.host}:{dep.port}"
        X, y = ws.X, ws.y

        def traffic(n: int, offset: int) -> None:
            with httpx.Client(base_url=url, timeout=30) as c:
                for i in range(offset, offset + n):
                    r = c.post("/predict", json={"instances": [X[i % len(X)].tolist()]})
                    assert r.status_code == 200
                    c.post("/labels", json={"labels": {r.json()["ids"][0]: int(y[i % len(y)])}})

        traffic(300, 0)  # version 1 (trained on all digits) on labelled traffic
        human.rollout("digits", "2")  # alice promotes version 2 (trained on 300 digits only)
        traffic(300, 300)
        agent = Agent(settings, store, app, "planner")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            agent.tick("plan")
            st = human.status("digits")
            if st["model_version"] == "1" and st["replicas"] == 2:
                break
            traffic(20, 600)
            time.sleep(0.5)
        st = human.status("digits")
        assert st["model_version"] == "1", st
        assert st["replicas"] == 2, st
        # A rollback event that says why, with the numbers.
        (rb,) = store.list_events("digits", ["rolled_back"])
        assert rb.payload["from_version"] == "2" and rb.payload["to_version"] == "1"
        assert rb.payload["promoted_accuracy"] < rb.payload["previous_accuracy"] - 0.02
        assert "below version 1's" in rb.payload["reason"]
        deployer_events = {e.kind: e for e in store.list_events("digits") if e.source == "deployer"}
        assert deployer_events["rollback_completed"].payload["actor"] == "planner"
        assert deployer_events["scaled"].payload["actor"] == "planner"
        # The audit chain behind the current model and replica count.
        chain = why(store, "digits")
        assert chain["current"]["model_version"] == "1" and chain["current"]["replicas"] == 2
        model_link, replica_link = chain["model_change"], chain["replica_change"]
        assert model_link["event"]["kind"] == "rollback_completed"
        assert model_link["approved_by"] == "policy:planner"
        assert model_link["decision"]["evidence"]["plan"]["actions"][0]["kind"] == "rollback"
        assert replica_link["event"]["kind"] == "scaled" and replica_link["approved_by"] == "policy:planner"
        assert "p95" in replica_link["decision"]["reason"]
        assert model_link["action"]["status"] == "succeeded"
        steps = [(s["what"], s["step"]) for s in chain["chain"]]
        assert steps == [("model", "decision"), ("model", "action"), ("model", "event"),
                         ("replicas", "decision"), ("replicas", "action"), ("replicas", "event")]
        assert [h["approved_by"] for h in chain["history"]] == [
            "person:alice", "person:alice", "policy:planner", "policy:planner"]
        # The CLI prints the same chain.
        res = CliRunner().invoke(cli, ["why", "digits", "--json"])
        assert res.exit_code == 0, res.output
        assert json.loads(res.output)["current"]["model_version"] == "1"
        res = CliRunner().invoke(cli, ["why", "digits", "--history"])
        assert res.exit_code == 0 and "policy:planner" in res.output and "person:alice" in res.output
    finally:
        human.stop("digits")
        store.close()


# -- the label-free estimate inside the sensor, on a registered sklearn model -----------------
@pytest.mark.slow
def test_sensor_estimates_accuracy_without_labels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The planner loads the served version from the registry, calibrates CBPE on the first
    labelled predictions it served, and estimates a later window before any label arrives."""
    import numpy as np

    from scanflow.agents import Agent
    from scanflow.agents.planner import decide, service_signals
    from scanflow.settings import Settings, get_settings
    from scanflow.spec import load_application
    from support.serving import MODEL, _train_and_register

    ws_root = tmp_path / "ws"
    monkeypatch.setenv("SCANFLOW_WORKSPACE", str(ws_root))
    get_settings.cache_clear()
    settings = Settings(workspace=ws_root).ensure()
    ws = _train_and_register(settings)  # v2: logistic regression on 300 digits
    store, model = ws.store, ws.models["2"]
    X, y = ws.X, ws.y
    rng = np.random.default_rng(0)
    store.put_deployment(service="svc", app="demo", team="ops", model_name=MODEL, alias="champion",
                         model_version="2", host="127.0.0.1", port=1, pid=None, replicas=1,
                         status="running", workdir="/nonexistent")
    t0, _ = _hour_window()

    def log(x: np.ndarray, ys: np.ndarray | None, start: int, ts: float) -> None:
        pred = model.predict(x)
        store.add_predictions(
            {"request_id": f"r{start + i}", "service": "svc", "model_version": "2", "ts": ts + i * 1e-3,
             "inputs": [float(v) for v in x[i]], "outputs": int(pred[i]), "latency_ms": 5.0}
            for i in range(len(x)))
        if ys is not None:
            store.add_labels({f"r{start + i}": int(ys[i]) for i in range(len(x))})

    ref = np.arange(300, 1000)  # digits v2 did not train on, labelled: the calibration
    log(X[ref], y[ref], 0, t0 - 7200)
    window = np.arange(1000, 1500)
    noisy = np.clip(X[window] + rng.normal(0, 2.5, (len(window), 64)), 0, 16)
    log(noisy, None, 10_000, t0 + 1)  # the window judged: no labels yet
    truth = float(np.mean(model.predict(noisy) == y[window]))

    spec = textwrap.dedent(SPEC).replace("model: m", f"model: {MODEL}").replace("cbpe: false", "cbpe: true")
    spec = spec.replace("cooldowns: {retrain: 0}", "cooldowns: {retrain: 0}\n      objectives: "
                        "{accuracy_floor: 0.95}\n      hysteresis: {accuracy_windows: 1}")
    spec = spec.replace("      objectives: {p95_latency_ms: 100}\n", "")
    spec = spec.replace("      hysteresis: {drift_windows: 2, scale_up_windows: 1}\n", "")
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "scanflow.yaml").write_text(spec)
    app = load_application(tmp_path / "app")
    agent = Agent(settings, store, app, "planner")
    obs = service_signals(agent.ctx, window_s=3600, settle_s=0, cbpe=True)
    sig = obs.data["signals"]
    assert sig["labelled_n"] == 0 and sig["accuracy_estimate_n"] == 500
    assert abs(sig["accuracy_estimate"] - truth) <= 0.06, (sig["accuracy_estimate"], truth)
    fired, reason = decide(obs, agent.ctx)
    assert fired and "accuracy under the floor" in reason and "(cbpe" in reason
    store.close()


def test_rollback_actuator_leaves_a_model_alone_unless_it_lost(planner_app: Any, settings: Any,
                                                               store: Store) -> None:
    """The stand-alone rollback actuator judges from the store: a model that was deployed (not
    promoted) is not on probation; a promoted one within the margin is kept serving."""
    from scanflow.agents import Agent, Observation
    from scanflow.agents.planner import rollback

    ctx = Agent(settings, store, planner_app, "planner").ctx
    _put_deployment(store, version="1")
    store.add_event("deployer", "deployed", "svc", actor="alice", model_version="1", replicas=1)
    assert rollback(Observation(key="k1"), ctx) == {
        "service": "svc", "rolled_back": False, "why": "the served model is not on probation"}
    t = time.time()
    _log(store, t - 100, 300, latency=5.0, version="1", outputs=1,
         labels={f"r{i}": 1 if i % 10 else 0 for i in range(300)})  # v1: 90 % right
    store.add_event("deployer", "rollout_completed", "svc", actor="alice", from_version="1", to_version="2")
    store.update_deployment("svc", model_version="2")
    _log(store, time.time(), 250, latency=5.0, start=300, version="2", outputs=1,
         labels={f"r{i}": 1 if i % 12 else 0 for i in range(300, 550)})  # v2: 91.6 % right
    out = rollback(Observation(key="k2"), ctx)
    assert out["rolled_back"] is False and "within margin so far" in out["why"]
    assert store.get_deployment("svc").model_version == "2"
    assert not store.list_events("svc", ["rolled_back"])


# -- the steps of `plan`, one at a time --------------------------------------------------------
def _sig(**kw: Any) -> Signals:
    base: dict[str, Any] = {"window": "w", "now": T0, "replicas": 1, "model_version": "1", "n_requests": 50,
                            "p95_latency_ms": 50.0, "throughput_rps": 5.0}
    return Signals(**{**base, **kw})


def test_step_absorb_ends_a_lost_retrain_and_resets_streaks_for_a_new_model() -> None:
    from scanflow.agents.planner.policy import absorb

    st = PlannerState(model_version="1", drift_streak=3, episode_start_id=7, retraining=True,
                      retrain_started_at=T0 - 10_000, retrains=[T0 - 90_000, T0 - 100])
    hold = absorb(_sig(model_version="2"), st, fast(limits={"retrain_timeout": 3600}))
    assert st.model_version == "2" and st.drift_streak == 0 and st.episode_start_id is None
    assert not st.retraining and st.retrains == [T0 - 100]  # a day old: out of the budget
    assert len(hold) == 1 and "never reported done (timeout 3600s): given up" in hold[0]


def test_step_assess_load_counts_streaks_and_remembers_the_breach_level() -> None:
    from scanflow.agents.planner.policy import assess_load

    st = PlannerState(cold_streak=2)
    load = assess_load(_sig(p95_latency_ms=250.0, throughput_rps=8.0, replicas=2), st, fast())
    assert load.hot and not load.cold and st.hot_streak == 1 and st.cold_streak == 0
    assert st.breach_rps_per_replica == 4.0 and load.evidence["scale_up_above_ms"] == 100
    idle = assess_load(_sig(n_requests=0, p95_latency_ms=None), st, fast())
    assert idle.idle and idle.cold and st.cold_streak == 1 and st.breach_rps_per_replica == 4.0


def test_step_judge_probation_rolls_back_a_loser_unless_in_cooldown() -> None:
    from scanflow.agents.planner.policy import judge_probation

    pr = ProbationSignal(promoted_version="2", previous_version="1", promoted_at=T0 - 60,
                         promoted_accuracy=0.70, promoted_n=300, previous_accuracy=0.90, previous_n=300)
    p = fast(rollback={"window": 300, "min_labelled": 100, "margin": 0.02})
    evidence: dict[str, Any] = {}
    hold: list[str] = []
    act = judge_probation(_sig(model_version="2", probation=pr), PlannerState(), p, evidence, hold)
    assert act is not None and act.kind == "rollback"
    assert act.params == {"from_version": "2", "to_version": "1"}
    assert evidence["probation"]["decision"] == "rollback" and not hold
    busy = PlannerState(last_action_at={"rollback": T0 - 10})
    assert judge_probation(_sig(model_version="2", probation=pr), busy, p, {}, hold) is None
    assert "rollback wanted but in cooldown (90s left)" in hold[0]
    kept = pr.model_copy(update={"promoted_accuracy": 0.91})
    st = PlannerState()
    assert judge_probation(_sig(model_version="2", probation=kept), st, p, {}, []) is None
    assert st.judged_versions == {"2": "kept"}


def test_step_plan_replicas_and_plan_retrain_respect_limits_budget_and_cooldown() -> None:
    from scanflow.agents.planner.policy import Load, Quality, plan_replicas, plan_retrain

    p = fast()
    hot = Load(hot=True, cold=False, idle=False, hot_latency=True, p95=250.0, rps=10.0)
    hold: list[str] = []
    at_max = plan_replicas(_sig(replicas=4), PlannerState(hot_streak=2), p, hot, hold)
    assert at_max is None and "already at max_replicas 4" in hold[0]
    up = plan_replicas(_sig(replicas=1), PlannerState(hot_streak=2), p, hot, [])
    assert up is not None and up.kind == "scale_up" and up.params == {"replicas": 2}
    drifted = Quality(drift_holds=True, accuracy_low=False, accuracy=None, source="none")
    hold = []
    spent = PlannerState(drift_streak=2, retrains=[T0 - 500, T0 - 400, T0 - 300])
    assert plan_retrain(_sig(), spent, p, drifted, None, hold) is None
    assert "the retrain budget is spent: 3 of 3" in hold[0]
    st = PlannerState(drift_streak=2, episode_start_id=42)
    after = plan_retrain(_sig(), st, p, drifted, "scale_up", [])
    assert after is not None and after.after == "scale_up" and after.params == {"since_id": 42, "episode": 1}
    assert after.reason.endswith(" - after scaling up")


def test_cpu_over_a_window_uses_the_samples_nearest_its_ends_and_the_replicas_in_both() -> None:
    from scanflow.agents.planner.signals import cpu_over

    def c(cpu_s: float, periods: int, throttled: int) -> dict[str, Any]:
        return {"cpu_seconds": cpu_s, "cpus": 0.3, "cpu_periods": periods, "cpu_throttled_periods": throttled}

    samples = [
        (99.9, {1: c(5.0, 100, 0), 2: c(1.0, 50, 0)}),
        (101.1, {1: c(5.3, 110, 10), 2: c(1.1, 60, 0), 3: c(0.0, 0, 0)}),  # 3: a new replica
    ]
    over = cpu_over(samples, 100.0, 101.0)
    assert over["cpu_use"] == pytest.approx((0.3 + 0.1) / 1.2, abs=1e-3)
    assert over["cpu_limit"] == pytest.approx(0.9) and over["cpu_throttled"] == 0.5
    none = {"cpu_use": None, "cpu_limit": None, "cpu_throttled": None}
    assert cpu_over([], 100.0, 101.0) == none
    assert cpu_over(samples, 110.0, 111.0) == none  # no sample near the window
    assert cpu_over(samples[:1], 100.0, 101.0) == none  # one sample covers no span


def test_with_scaling_serve_the_planner_leaves_replicas_to_serve_and_still_retrains() -> None:
    """`policy.scaling: serve` (Ray Serve's autoscaler decides replicas): a spike that the
    planner would answer 1 -> 3 plans no scaling, and drift still plans a retrain."""
    sim = Sim(queue_policy(scaling="serve"), window_s=2.0)
    spiked = [_offer(sim, 200) for _ in range(5)]
    assert not any(a.kind.startswith("scale") for p in spiked for a in p.actions)
    assert sim.replicas == 1
    drifted = [sim.step(drift=[True, True]) for _ in range(3)]
    assert any(a.kind == "retrain" for p in drifted for a in p.actions)
    same = Sim(queue_policy(), window_s=2.0)
    assert [a.kind for a in _offer(same, 200).actions] == ["scale_up"]  # the planner's own
