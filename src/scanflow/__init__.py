"""scanflow: agent-based autonomic management of ML workflows and services."""

__version__ = "0.1.0"
