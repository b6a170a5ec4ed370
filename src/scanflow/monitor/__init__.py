"""Detectors and estimators over windows of served data: pure functions of arrays."""

from scanflow.monitor.drift import DriftCheck, DriftResult, KSDrift, MMDDrift, any_drift

__all__ = ["DriftCheck", "DriftResult", "KSDrift", "MMDDrift", "any_drift"]
