"""The declarative model of an application: teams' workflows, services and agents."""

from scanflow.spec.errors import SpecError, SpecIssue
from scanflow.spec.loader import load_application, validate_application
from scanflow.spec.models import (
    AgentSpec,
    Application,
    CallSpec,
    ParamSpec,
    SensorSpec,
    Service,
    Step,
    Trigger,
    Workflow,
)

__all__ = [
    "AgentSpec",
    "Application",
    "CallSpec",
    "ParamSpec",
    "SensorSpec",
    "Service",
    "SpecError",
    "SpecIssue",
    "Step",
    "Trigger",
    "Workflow",
    "load_application",
    "validate_application",
]
