"""The agent runtime: sensors on triggers, rules, actuators, durable messages, decisions."""

from scanflow.agents.runtime import Agent, AgentContext, Observation

__all__ = ["Agent", "AgentContext", "Observation"]
