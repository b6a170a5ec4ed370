"""The planner: one declarative policy per service, and arbitration between its actions.

The judgement is a pure function, :func:`plan` (signals + state + policy -> a plan and the next
state), built from small per-concern steps in :mod:`.policy` (signals -> guardrails ->
arbitration -> action), so every rule is tested without a service, a clock or a database:

- latency breach without drift -> scale up; drift without latency breach -> retrain; both ->
  scale now, retrain after (one plan, executed in that order);
- a promoted model that does worse than the champion it replaced -> roll back (first);
- load gone -> scale down, only after `scale_down_windows` cold windows, a cooldown, and only if
  the load per replica afterwards stays below the level that breached the SLO last time, so a
  service does not scale down into the breach it just scaled out of;
- cooldowns per action kind, a retrain budget per 24 h, and at most one retrain at a time.

Around it, thin functions for specs (`func: scanflow.agents.planner:<name>`):

- sensor :func:`service_signals` (:mod:`.signals`) - one observation per time window of the
  prediction log (p95 latency, throughput), with the analyzer's drift reports, a CBPE accuracy
  estimate, label-joined accuracy, retrain outcomes and the probation figures of a promoted model;
- rule :func:`decide` (:mod:`.actuators`) - runs :func:`plan`, keeps the planner state in the store;
- actuator :func:`execute` - carries the plan out through :mod:`scanflow.control.operations`
  (scale and roll back under the service's lease, recorded), retrain by a durable message to the
  executor agent;
- actuator :func:`rollback` - the guarded rollback (also the builtin `rollback`): judges the
  probation and rolls back only a model that lost, recording why with the numbers.

The promotion gate (:func:`promotion_gate`) lives in :mod:`scanflow.agents.gate` and the lease
in :mod:`scanflow.control.leases`; both are re-exported here.
"""

from scanflow.agents.gate import GateResult, policy_for, predicted_class, promotion_gate, rescored_accuracy
from scanflow.agents.planner.actuators import decide, execute, lease_holder, rollback
from scanflow.agents.planner.model import (
    DAY_S,
    STATE_KEY,
    ActionKind,
    DriftReport,
    Plan,
    PlannedAction,
    PlannerState,
    ProbationSignal,
    RollbackVerdict,
    Signals,
)
from scanflow.agents.planner.policy import plan, record_outcome, rollback_judgement
from scanflow.agents.planner.signals import load_state, save_state, service_signals
from scanflow.control.leases import LeaseBusy, service_lease

__all__ = [
    "DAY_S", "STATE_KEY", "ActionKind", "DriftReport", "GateResult", "LeaseBusy", "Plan", "PlannedAction",
    "PlannerState", "ProbationSignal", "RollbackVerdict", "Signals", "decide", "execute", "lease_holder",
    "load_state", "plan", "policy_for", "predicted_class", "promotion_gate", "record_outcome",
    "rescored_accuracy", "rollback", "rollback_judgement", "save_state", "service_lease", "service_signals",
]
