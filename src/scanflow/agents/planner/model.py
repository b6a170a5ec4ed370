"""What the planner reads and remembers: signals of one window, its plan, its state."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

DAY_S = 86_400.0
STATE_KEY = "planner.state"
ActionKind = Literal["scale_up", "scale_down", "retrain", "rollback"]


class DriftReport(BaseModel):
    """One analyzer window, as the analyzer reported it."""

    drift: bool
    first_id: int | None = None
    last_id: int | None = None
    tests: list[str] = Field(default_factory=list, description="tests that flagged drift")
    key: str = ""
    reference_version: str | None = Field(
        default=None, description="the model version whose reference the window was judged against")


class ProbationSignal(BaseModel):
    """How a promoted model does against the champion it replaced, on labelled traffic."""

    promoted_version: str
    previous_version: str
    promoted_at: float
    promoted_accuracy: float | None = None
    promoted_n: int = 0
    previous_accuracy: float | None = None
    previous_n: int = 0
    previous_basis: str = Field(default="own_history",
                                description="same_requests: the old champion re-scored the promoted "
                                            "model's labelled requests; own_history: its own last window")


class Signals(BaseModel):
    """Everything the planner knows about one service for one window."""

    window: str = Field(description="unique key of the window (idempotency of the decision)")
    now: float = Field(description="end of the window, UNIX seconds")
    window_s: float = 10.0
    replicas: int = 1
    model_version: str | None = None
    n_requests: int = 0
    p95_latency_ms: float | None = None
    throughput_rps: float | None = None
    in_flight: float | None = Field(
        default=None, description="average requests in flight in the window, all replicas (Little's law: "
                                  "summed latency / window length)")
    cpu_use: float | None = Field(
        default=None, description="CPU-seconds per second the replicas used in the window, all replicas "
                                  "(None: not measured, e.g. no CPU limit)")
    cpu_limit: float | None = Field(default=None, description="the replicas' CPU quotas, summed")
    cpu_throttled: float | None = Field(
        default=None, description="share of the replicas' scheduler periods in which the quota ran out")
    drift_reports: list[DriftReport] = Field(default_factory=list)
    accuracy_estimate: float | None = Field(default=None, description="CBPE, label-free")
    accuracy_estimate_n: int = 0
    labelled_accuracy: float | None = None
    labelled_n: int = 0
    retrains_done: list[dict[str, Any]] = Field(default_factory=list)
    probation: ProbationSignal | None = None
    notes: list[str] = Field(default_factory=list, description="what the sensor could not measure")


class PlannedAction(BaseModel):
    kind: ActionKind
    reason: str
    params: dict[str, Any] = Field(default_factory=dict)
    evidence: dict[str, Any] = Field(default_factory=dict)
    after: ActionKind | None = Field(default=None, description="run once this action of the plan is done")


class Plan(BaseModel):
    """What to do for one window, or why nothing."""

    window: str
    actions: list[PlannedAction] = Field(default_factory=list)
    hold: list[str] = Field(default_factory=list, description="why nothing (else) was done")
    evidence: dict[str, Any] = Field(default_factory=dict)

    @property
    def fired(self) -> bool:
        return bool(self.actions)

    @property
    def reason(self) -> str:
        acts = "; ".join(f"{a.kind}: {a.reason}" for a in self.actions)
        hold = "; ".join(self.hold)
        if acts and hold:
            return f"{acts} (held: {hold})"
        return acts or f"hold: {hold}"


class PlannerState(BaseModel):
    """What the planner remembers between windows (kept in the store: survives restarts)."""

    window: str | None = Field(default=None, description="the last window absorbed")
    plan: Plan | None = Field(default=None, description="the plan made for it (replayed, never re-made)")
    model_version: str | None = None
    hot_streak: int = 0
    cold_streak: int = 0
    drift_streak: int = 0
    low_accuracy_streak: int = 0
    episode: int = 0
    episode_start_id: int | None = None
    episode_settled_id: int | None = Field(
        default=None, description="the first id after the episode's first drifted window (which "
                                  "may straddle the onset): the labels the retrain waits for")
    retraining: bool = False
    retrain_started_at: float | None = None
    retrain_ended_at: float | None = None
    retrains: list[float] = Field(default_factory=list, description="start times, last 24 h")
    last_action_at: dict[str, float] = Field(default_factory=dict)
    breach_rps_per_replica: float | None = None
    breach_at: float | None = Field(default=None, description="when breach_rps_per_replica was recorded")
    breach_starved: bool = Field(default=False, description="that breach came with CPU quota unused: "
                                                            "the machine, not the replicas, was short")
    desired: list[int] = Field(default_factory=list,
                               description="replicas the load asked for in the last windows (newest "
                                           "last): a scale-down goes to the highest (stabilisation)")
    judged_versions: dict[str, str] = Field(default_factory=dict, description="version -> kept|rolled_back")
    cpu_samples: list[tuple[float, float]] = Field(
        default_factory=list,
        description="(req/s, CPU) per replica of recent steady windows under the SLO and the quota, "
                    "newest last, for the model served: what one replica uses at a load")


class RollbackVerdict(BaseModel):
    decision: Literal["rollback", "keep", "wait"]
    reason: str
    evidence: dict[str, Any]


__all__ = ["DAY_S", "STATE_KEY", "ActionKind", "DriftReport", "Plan", "PlannedAction", "PlannerState",
           "ProbationSignal", "RollbackVerdict", "Signals"]
