"""One declarative policy per service: what the planner aims for, what it may do, how carefully.

```yaml
services:
  mnist:
    model: mnist-clf
    policy:
      objectives: {accuracy_floor: 0.9, p95_latency_ms: 250, min_throughput_rps: 0,
                   in_flight_per_replica: 0}
      limits: {min_replicas: 1, max_replicas: 4, retrain_budget_per_day: 6}
      cooldowns: {scale_up: 30s, scale_down: 5m, retrain: 10m, rollback: 10m}
      hysteresis: {scale_up_windows: 2, scale_down_windows: 6, drift_windows: 2}
      promotion: {alpha: 0.05, max_loss_on_clean: 0.02, min_labelled: 30}
      rollback: {window: 500, min_labelled: 200, margin: 0.02, within: 1h}
      scaling: planner        # or `serve`: Ray Serve's autoscaler decides replicas (ray backend)
```

Every knob has a default, so `policy:` may be left out or given in part. The planner
(`scanflow.agents.planner`) reads it; its decisions quote the knobs they applied.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from scanflow.spec.durations import parse_duration


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _seconds_or_zero(v: Any) -> Any:
    """Durations as in the rest of the spec ('30s', '5m', 2.5), and 0 to switch one off."""
    if v is None or isinstance(v, bool):
        return v
    if isinstance(v, int | float) and v == 0:
        return 0.0
    if isinstance(v, str) and v.strip() in {"0", "0s", "0ms", "0m", "0h"}:
        return 0.0
    return parse_duration(v)


class Objectives(_Strict):
    """What the service must achieve; a breach is what makes the planner act."""

    accuracy_floor: float = Field(
        default=0.9, ge=0, le=1,
        description="accuracy below this (label-joined, or estimated by CBPE before labels) is a breach",
    )
    p95_latency_ms: float = Field(
        default=250.0, gt=0, description="SLO: the 95th percentile of request latency in a window, in ms"
    )
    min_throughput_rps: float = Field(
        default=0.0, ge=0,
        description="requests/s the service must sustain; below it while busy (p95 above the "
        "scale-down band) is a load breach; 0 turns the objective off",
    )
    in_flight_per_replica: float = Field(
        default=0.0, ge=0,
        description="target average requests in flight per replica (Little's law on the prediction "
        "log: the window's summed latency / its length); above it a window is hot before p95 breaches, "
        "and a scale-up is sized to it (desired = ceil(in flight / target)); 0: latency alone",
    )
    accuracy_min_labels: int = Field(
        default=100, ge=1,
        description="labelled predictions needed before label-joined accuracy replaces the estimate",
    )


class Limits(_Strict):
    """What the planner may do at most."""

    min_replicas: int = Field(default=1, ge=1, le=64, description="never scale below this")
    max_replicas: int = Field(default=4, ge=1, le=64, description="never scale above this")
    scale_step: int = Field(default=1, ge=1, le=64, description="replicas added or removed per action (at "
                            "least, when in_flight_per_replica sizes the step)")
    retrain_budget_per_day: int = Field(
        default=6, ge=0, description="automatic retrains started in any 24 h; 0 disables retraining"
    )
    retrain_timeout: float = Field(
        default=7200.0, ge=0, description="a retrain not reported done after this long is given up on"
    )

    _dur = field_validator("retrain_timeout", mode="before")(lambda v: _seconds_or_zero(v))

    @model_validator(mode="after")
    def _order(self) -> Limits:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must not exceed max_replicas ({self.max_replicas})"
            )
        return self


class Cooldowns(_Strict):
    """Quiet time after an action of each kind before the next one of that kind (seconds, or
    '30s', '5m'; 0 for none). Scale-down also waits this long after any scale-up."""

    scale_up: float = Field(default=30.0, ge=0, description="after a scale-up, before another")
    scale_down: float = Field(default=300.0, ge=0, description="after any scaling, before a scale-down")
    retrain: float = Field(default=600.0, ge=0, description="after a retrain finished, before the next")
    rollback: float = Field(default=600.0, ge=0, description="after a rollback, before another")

    _dur = field_validator("*", mode="before")(lambda v: _seconds_or_zero(v))


class Hysteresis(_Strict):
    """How long a signal must hold before it counts: different thresholds and window counts up
    and down, so a service at the edge does not flap."""

    scale_up_latency_ratio: float = Field(
        default=1.0, gt=0, description="a window is hot when p95 > ratio x SLO"
    )
    scale_up_windows: int = Field(default=2, ge=1, description="hot windows in a row before scaling up")
    scale_down_latency_ratio: float = Field(
        default=0.5, gt=0, description="a window is cold when p95 < ratio x SLO (must be below the up ratio)"
    )
    scale_down_windows: int = Field(default=6, ge=1, description="cold windows in a row before scaling down")
    scale_down_load_ratio: float = Field(
        default=0.6, gt=0, lt=1,
        description="scale down only to a count that carries the window's in-flight load at or under "
        "this fraction of `in_flight_per_replica` (the band between this and 1 absorbs noise)",
    )
    scale_down_headroom: float = Field(
        default=0.8, gt=0, le=1,
        description="scale down only if the load per replica afterwards stays below this fraction "
        "of the load per replica at the last latency breach",
    )
    quota_bound_ratio: float = Field(
        default=0.8, gt=0, le=1,
        description="a latency breach is the replicas' own (more of them add capacity; the load per "
        "replica that breached is remembered, see scale_down_headroom) when they used at least this "
        "fraction of their CPU quota in the window; under it, a busy machine starved them",
    )
    starved_breach_memory_s: float = Field(
        default=60.0, ge=0,
        description="how long scale_down_headroom holds after a breach of starved replicas (seconds, or "
        "'1m'); a breach at the quota holds until a cold window at that load per replica",
    )
    min_requests: int = Field(
        default=20, ge=1, description="a window with fewer requests is judged idle (cold), not hot"
    )
    drift_windows: int = Field(
        default=2, ge=1, description="analyzer windows with drift in a row before it counts"
    )
    accuracy_windows: int = Field(
        default=2, ge=1, description="windows with accuracy under the floor in a row before it counts"
    )

    _dur = field_validator("starved_breach_memory_s", mode="before")(lambda v: _seconds_or_zero(v))

    @model_validator(mode="after")
    def _band(self) -> Hysteresis:
        if self.scale_down_latency_ratio >= self.scale_up_latency_ratio:
            raise ValueError(
                f"scale_down_latency_ratio ({self.scale_down_latency_ratio}) must be below "
                f"scale_up_latency_ratio ({self.scale_up_latency_ratio}), or the service flaps"
            )
        return self


class PromotionGate(_Strict):
    """A candidate replaces the champion only if it is shown better where it matters now and not
    shown meaningfully worse where it used to matter, by tests on the same rows (paired), so the
    sample size is accounted for by the test instead of by a fixed margin.

    Why these defaults: `alpha` 0.05 - one candidate in twenty that is not really better may pass
    (the planner's probation rolls back one that then loses on live traffic); a smaller alpha needs
    larger holdouts. `max_loss_on_clean` 0.02 - two points on the original distribution is a
    price most users accept for a significant gain on what is served now, and it is refused only
    when the data *show* a loss beyond it (a small clean set cannot, so the gate does not fail on
    one extra error as a fixed margin did). `min_labelled` 30 - a floor below which no test of
    a proportion is trusted at all; the test itself needs more when the gain is small.
    `max_loss_on_holdout` (the old name) is read as `max_loss_on_clean`.
    """

    alpha: float = Field(
        default=0.05, gt=0, lt=1,
        description="significance of both tests: the candidate must be better on the new holdout with "
        "a one-sided exact McNemar p-value <= alpha; it is refused on the clean set only when a loss "
        "beyond max_loss_on_clean is significant at alpha",
    )
    max_loss_on_clean: float = Field(
        default=0.02, ge=0, le=1,
        description="tolerated accuracy loss on the clean test set: refused only when the data show "
        "(at alpha) that the candidate loses more than this",
    )
    min_gain_on_new: float = Field(
        default=0.0, ge=0, le=1,
        description="besides the test, the observed accuracy gain on the new holdout must exceed this "
        "(0: the test alone decides)",
    )
    min_labelled: int = Field(
        default=30, ge=1, description="fewest held-out labelled rows of the new distribution to test on"
    )

    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, data: Any) -> Any:
        """`max_loss_on_holdout` (before the paired gate) is the clean-set tolerance."""
        if isinstance(data, dict) and "max_loss_on_holdout" in data:
            data = dict(data)
            if "max_loss_on_clean" in data:
                raise ValueError("give max_loss_on_clean only (max_loss_on_holdout is its old name)")
            data["max_loss_on_clean"] = data.pop("max_loss_on_holdout")
        return data

    @property
    def max_loss_on_holdout(self) -> float:
        """The old name of :attr:`max_loss_on_clean`."""
        return self.max_loss_on_clean


class RollbackPolicy(_Strict):
    """After a promotion, the new model is on probation: worse than the old champion on labelled
    traffic within the window, and it is rolled back."""

    window: int = Field(
        default=500, ge=1,
        description="labelled predictions compared: the promoted model's first, the old champion's last",
    )
    min_labelled: int = Field(
        default=200, ge=1, description="labelled predictions of the promoted model needed to judge it"
    )
    margin: float = Field(
        default=0.02, ge=0, le=1,
        description="roll back when the promoted accuracy is below the old champion's by more than this",
    )
    within: float = Field(default=3600.0, ge=0, description="probation after a promotion (seconds or '1h')")

    _dur = field_validator("within", mode="before")(lambda v: _seconds_or_zero(v))

    @model_validator(mode="after")
    def _sizes(self) -> RollbackPolicy:
        if self.min_labelled > self.window:
            raise ValueError(f"min_labelled ({self.min_labelled}) must not exceed window ({self.window})")
        return self


class Policy(_Strict):
    """The planner's policy for one service (see the module docstring for a YAML example)."""

    objectives: Objectives = Field(default_factory=Objectives)
    limits: Limits = Field(default_factory=Limits)
    cooldowns: Cooldowns = Field(default_factory=Cooldowns)
    hysteresis: Hysteresis = Field(default_factory=Hysteresis)
    promotion: PromotionGate = Field(default_factory=PromotionGate)
    rollback: RollbackPolicy = Field(default_factory=RollbackPolicy)
    scaling: Literal["planner", "serve"] = Field(
        default="planner",
        description="who decides replicas: `planner` (on this policy's signals, each decision recorded "
        "with its evidence; both backends) or `serve` (ray backend only: Ray Serve's autoscaler, between "
        "limits.min_replicas and max_replicas, aiming at objectives.in_flight_per_replica requests in "
        "flight per replica (Serve's 2 when 0), acting after cooldowns.scale_up / scale_down of a "
        "sustained signal); with `serve` the planner leaves replicas alone",
    )
    serve_autoscaling: dict[str, Any] = Field(
        default_factory=dict,
        description="with scaling: serve, more of Ray Serve's `autoscaling_config` over what the policy "
        "translates (e.g. look_back_period_s, metrics_interval_s, upscaling_factor); checked by Serve "
        "at deploy",
    )
    retrain_requires_accuracy_drop: bool = Field(
        default=False,
        description="retrain on drift only while accuracy is under the floor (saves budget on harmless "
        "drift); false: drift that holds is enough",
    )


__all__ = ["Cooldowns", "Hysteresis", "Limits", "Objectives", "Policy", "PromotionGate", "RollbackPolicy"]
