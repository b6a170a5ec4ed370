"""The agent runtime: sensors on triggers, rules, actuators, durable messages, decisions.

Custom parts are plain functions, registered by name with decorators::

    from scanflow.agents import actuator, rule, sensor

    @rule("big_window")
    def big(obs, ctx, min_n=100):
        return obs.evidence["n"] >= min_n, f"n={obs.evidence['n']}"

and named in a spec (`rule: big_window`, with the module in the agent's `imports:`) or used
directly in an agent declared in Python (`Agent.define(...)`).
"""

import scanflow.agents.builtin  # noqa: F401 - registers the built-in parts by name
from scanflow.agents.registry import actuator, registered, rule, sensor
from scanflow.agents.runtime import ActionCall, Agent, AgentContext, Observation
from scanflow.control.triggers import TriggerEvent
from scanflow.spec.models import AgentSpec, CallSpec, SensorSpec, Trigger

__all__ = [
    "ActionCall",
    "Agent",
    "AgentContext",
    "AgentSpec",
    "CallSpec",
    "Observation",
    "SensorSpec",
    "Trigger",
    "TriggerEvent",
    "actuator",
    "registered",
    "rule",
    "sensor",
]
