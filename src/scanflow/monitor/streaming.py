"""Streaming change detectors for scalar signals: latency, confidence, error rate.

Thin wrappers over river's ADWIN and Page-Hinkley with one interface: ``update(x)`` returns True
when a change is detected at that value; ``drift_detected``, ``n_seen`` and ``detections``
(the indices of the values at which changes were detected) tell the rest. After a detection the
detector starts afresh on the new regime (as river does).

Which one:

* :class:`ADWIN` keeps an adaptive window and cuts it where two sub-windows' means differ more
  than chance allows (``delta`` bounds the false-cut probability). Scale-free; good for rates and
  bounded signals (error rate as 0/1 per request, confidence in [0, 1]).
* :class:`PageHinkley` is a CUSUM test for a shift of the mean. river's thresholds are in the
  signal's units (its defaults suit values of order 1-100); this wrapper first measures the
  signal's spread on ``warmup`` values (or takes ``scale``) and works in standard deviations,
  so one default fits a latency in seconds and a count alike.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
from river import drift as river_drift

from scanflow.monitor._validate import check_int

__all__ = ["ADWIN", "PageHinkley", "StreamDetector"]


def _value(x: Any) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)):
        raise ValueError(f"a streaming detector takes one number per update, got {x!r}")
    value = float(x)
    if not math.isfinite(value):
        raise ValueError(f"a streaming detector needs finite values, got {value}")
    return value


class StreamDetector:
    """The shared interface; subclasses set ``name`` and implement ``_update``."""

    name = "stream"

    def __init__(self) -> None:
        self.n_seen = 0
        self.detections: list[int] = []
        self.drift_detected = False

    def _update(self, value: float) -> bool:
        raise NotImplementedError

    def update(self, x: float) -> bool:
        """Feed one value; True when a change is detected at it."""
        value = _value(x)
        self.drift_detected = self._update(value)
        if self.drift_detected:
            self.detections.append(self.n_seen)
        self.n_seen += 1
        return self.drift_detected

    def update_many(self, values: Any) -> list[int]:
        """Feed values in order; the indices (into ``values``) where changes were detected."""
        start, hits = self.n_seen, []
        for v in np.asarray(values, dtype=object).ravel():
            if self.update(v):
                hits.append(self.n_seen - 1 - start)
        return hits

    def to_dict(self) -> dict[str, Any]:
        """State as plain JSON, for an event's evidence."""
        return {"detector": self.name, "n_seen": self.n_seen, "drift_detected": self.drift_detected,
                "detections": list(self.detections)}


class ADWIN(StreamDetector):
    """ADaptive WINdowing (Bifet & Gavaldà, 2007) via ``river.drift.ADWIN``.

    Args:
        delta: confidence of a cut; smaller means fewer false alarms and slower detection
            (default 0.002, river's).
        clock: how often (in values) it checks for a cut (default 32).
        grace_period: values before the first check (default 10).
        min_window_length: smallest sub-window compared (default 5).
    """

    name = "adwin"

    def __init__(self, delta: float = 0.002, clock: int = 32, grace_period: int = 10,
                 min_window_length: int = 5) -> None:
        super().__init__()
        if not 0.0 < delta < 1.0:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        self._adwin = river_drift.ADWIN(
            delta=delta, clock=check_int(clock, "clock", 1),
            grace_period=check_int(grace_period, "grace_period", 1),
            min_window_length=check_int(min_window_length, "min_window_length", 1))

    def _update(self, value: float) -> bool:
        self._adwin.update(value)
        return bool(self._adwin.drift_detected)

    @property
    def estimation(self) -> float:
        """Mean of the current window (the signal's level now)."""
        return float(self._adwin.estimation)

    @property
    def width(self) -> int:
        """Values in the current window (since the last change, at most)."""
        return int(self._adwin.width)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "estimation": self.estimation, "width": self.width}


class PageHinkley(StreamDetector):
    """Page-Hinkley (CUSUM) test for a shift of the mean, in units of the signal's spread.

    Values are divided by ``scale`` (default: the standard deviation of the first ``warmup``
    values, re-measured after each detection) before ``river.drift.PageHinkley`` sees them, so
    ``delta`` and ``threshold`` are in standard deviations: shifts smaller than ``delta`` are
    ignored, and a shift of ``s`` deviations is found after about ``threshold / (s - delta)``
    values. With the defaults (0.5 and 25), measured on Gaussian noise: a one-deviation shift is
    found after 25-70 values, and false alarms come about once per 25,000 values.

    Args:
        threshold: alarm level of the cumulative deviation, in standard deviations (default 25).
        delta: tolerated drift of the mean, in standard deviations (default 0.5).
        mode: ``"up"`` (only increases: latency), ``"down"`` or ``"both"`` (default).
        warmup: values used to measure the spread (default 30); none are alarmed on.
        scale: a known spread of the signal; skips the measurement.
        alpha: river's forgetting factor of the cumulative sums (default 0.9999).
    """

    name = "page_hinkley"

    def __init__(self, threshold: float = 25.0, delta: float = 0.5,
                 mode: Literal["up", "down", "both"] = "both", warmup: int = 30,
                 scale: float | None = None, alpha: float = 0.9999) -> None:
        super().__init__()
        if not threshold > 0 or not delta >= 0:
            raise ValueError(f"threshold must be > 0 and delta >= 0, got {threshold} and {delta}")
        if mode not in ("up", "down", "both"):
            raise ValueError(f"mode must be 'up', 'down' or 'both', got {mode!r}")
        if scale is not None and not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a positive number, got {scale}")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.threshold, self.delta, self.mode, self.alpha = float(threshold), float(delta), mode, alpha
        self.warmup = check_int(warmup, "warmup", 2)
        self.fixed_scale = scale
        self.scale: float | None = scale
        self._buffer: list[float] = []
        self._ph = self._new()

    def _new(self) -> river_drift.PageHinkley:
        return river_drift.PageHinkley(min_instances=self.warmup, delta=self.delta,
                                       threshold=self.threshold, alpha=self.alpha, mode=self.mode)

    def _update(self, value: float) -> bool:
        if self.scale is None:
            self._buffer.append(value)
            if len(self._buffer) < self.warmup:
                return False
            spread = float(np.std(self._buffer, ddof=1))
            self.scale = spread if spread > 0 else max(abs(float(np.mean(self._buffer))), 1.0) * 1e-3
            for v in self._buffer:  # replay the warm-up so the detector's mean starts right
                self._ph.update(v / self.scale)
            self._buffer = []
            return False
        self._ph.update(value / self.scale)
        if not self._ph.drift_detected:
            return False
        self._ph = self._new()  # the new regime is the new normal
        self.scale = self.fixed_scale
        return True

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "scale": self.scale, "threshold": self.threshold,
                "delta": self.delta, "mode": self.mode}
