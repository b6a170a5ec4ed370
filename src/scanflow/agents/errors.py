"""What the agent runtime refuses, in a leaf module: the runtime raises these and the agent's
HTTP API maps them to status codes, and neither imports the other for it."""

from __future__ import annotations


class UnknownSensor(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


class UnknownTrigger(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


class DuplicateTrigger(ValueError):
    """The sensor already has a trigger with this id."""


class UnknownMessage(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])
