"""Two-sample drift tests over windows of served inputs.

Each detector is fitted once on a reference sample (what the model was trained or validated on)
and then asked, window after window, "does this window come from the same distribution?"
(``check(window)``; ``test`` is the same). They complement each other: the feature-wise KS test
sees shifts of single features or embedding coordinates (brightness, translation); the kernel MMD
test sees changes of the joint distribution; the reconstruction test
(:class:`~scanflow.monitor.outlier.ReconstructionDrift`) sees inputs that do not look like the
reference at all (noise, strokes). :class:`DriftCheck` runs them together.

Defaults keep the false-alarm rate per window at most ``alpha`` = 1 %: the p-values are valid
(asymptotic KS with Bonferroni, a permutation test for MMD), and ``calibrate`` on clean windows
makes it a guarantee per calibration: with probability ``confidence`` (0.9) over the calibration
draw, the rate of the threshold it sets is at most ``alpha`` (see :mod:`scanflow.monitor.base`).
:meth:`DriftCheck.calibrate` does the same for the OR of its detectors, so ``verdict`` holds
``alpha`` in total rather than the sum of the detectors' alphas.

Only numpy, scipy and scikit-learn are used, so an agent can call these every few seconds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from scanflow.jsonsafe import json_safe
from scanflow.monitor._validate import check_alpha, check_int
from scanflow.monitor.base import (
    DEFAULT_CONFIDENCE,
    DEFAULT_N_WINDOWS,
    Calibration,
    DriftResult,
    WindowDetector,
    pac_exceedances,
)
from scanflow.monitor.ks import KSDrift
from scanflow.monitor.mmd import MMDDrift
from scanflow.monitor.outlier import ReconstructionDrift

__all__ = ["CheckCalibration", "DriftCheck", "DriftResult", "DriftVerdict", "KSDrift", "MMDDrift",
           "any_drift"]


def _tail_p_values(sorted_scores: np.ndarray, s: np.ndarray, tail: int) -> np.ndarray:
    """Rank p-values of ``s`` among clean scores, made continuous in the upper tail.

    Up to the ``(tail + 1)``-th largest clean score this is the conformal p-value
    ``(1 + #{clean >= s}) / (n + 1)``; above it, the tail's exponential fit (peaks over a
    threshold, scale = mean excess of the ``tail`` largest), which joins it and keeps falling past
    the largest clean score. Rank p-values alone tie at ``1/(n + 1)`` for every window beyond a
    detector's largest clean score, which leaves an OR rule nothing to order its extremes by.
    """
    n = len(sorted_scores)
    counts = n - np.searchsorted(sorted_scores, s, side="left")
    p = (1.0 + counts) / (n + 1.0)
    tail = min(tail, n - 1)
    if tail < 1:  # too few clean scores to fit a tail: plain ranks
        return p
    u = float(sorted_scores[n - tail - 1])
    scale = max(float(np.mean(sorted_scores[n - tail:] - u)), 1e-300)
    above = s > u
    p[above] = (tail + 1.0) / (n + 1.0) * np.exp(-(s[above] - u) / scale)
    return p


def _tail_size(n: int) -> int:
    return int(min(n - 2, max(10, round(0.1 * n))))


@dataclass(frozen=True)
class CheckCalibration:
    """The calibration of a whole :class:`DriftCheck`: one PAC threshold for the OR of its tests.

    ``combined`` holds the clean windows' combined scores (``-log`` of the smallest per-detector
    tail p-value, each computed leave-one-out against the other clean windows) and the PAC
    threshold on them; ``detectors`` each detector's own calibration on the same windows.
    """

    combined: Calibration
    detectors: dict[str, Calibration]
    tail: int  # clean scores per detector in the exponential tail fit

    @property
    def alpha(self) -> float:
        return self.combined.alpha

    @property
    def confidence(self) -> float:
        return self.combined.confidence

    def p_values(self, scores: dict[str, float]) -> dict[str, float]:
        """Per-detector tail p-values of one window's scores (the combined rule's inputs)."""
        return {name: float(_tail_p_values(np.asarray(cal.scores), np.asarray([scores[name]]),
                                           self.tail)[0])
                for name, cal in self.detectors.items()}

    def to_dict(self) -> dict[str, Any]:
        return {**self.combined.to_dict(), "combination": "min tail p-value (leave-one-out)",
                "tail": self.tail,
                "detectors": {name: cal.to_dict() for name, cal in self.detectors.items()}}


@dataclass(frozen=True)
class DriftVerdict:
    """One decision for a window from all of a DriftCheck's detectors, with their evidence.

    ``drift`` is the combined rule (calibrated: false-alarm rate <= ``alpha`` for the OR of the
    detectors with probability ``confidence``; uncalibrated: any detector flagged). ``fired``
    names the detectors whose own evidence crossed the combined threshold; ``results`` are the
    detectors' own results (each calibrated at its own alpha, as :meth:`DriftCheck.check`
    returns them).
    """

    drift: bool
    score: float
    p_value: float
    threshold: float
    fired: tuple[str, ...]
    results: list[DriftResult]
    calibrated: bool
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"drift": bool(self.drift), "score": json_safe(self.score),
                "p_value": json_safe(self.p_value), "threshold": json_safe(self.threshold),
                "fired": list(self.fired), "calibrated": self.calibrated,
                "details": json_safe(self.details), "tests": [r.to_dict() for r in self.results]}


@dataclass
class DriftCheck:
    """Runs KS, MMD and (optionally) the reconstruction test together; ``None`` switches one off.

    Measured on MNIST: raw-pixel KS misses impulse noise and MMD on PCA misses shot noise, so
    more than one runs by default. Uncalibrated, or through :meth:`check` and :func:`any_drift`,
    each detector keeps its own false-alarm rate and a window flagged by *any* of them is a false
    alarm with probability up to the sum of their alphas. :meth:`calibrate` gives the OR one rule:
    every detector scores the same clean windows, each window's combined score is its most
    extreme per-detector p-value, and the PAC threshold on those scores holds the false-alarm
    rate of :meth:`verdict` at ``alpha`` (default: the smallest detector alpha) with
    probability ``confidence``.
    """

    ks: KSDrift | None = field(default_factory=KSDrift)
    mmd: MMDDrift | None = field(default_factory=MMDDrift)
    ae: ReconstructionDrift | None = None
    alpha: float | None = None
    calibration: CheckCalibration | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.ks is None and self.mmd is None and self.ae is None:
            raise ValueError("DriftCheck needs at least one detector (ks, mmd or ae)")
        if self.alpha is not None:
            self.alpha = check_alpha(self.alpha)

    @property
    def detectors(self) -> list[WindowDetector]:
        return [d for d in (self.ks, self.mmd, self.ae) if d is not None]

    @property
    def combined_alpha(self) -> float:
        """Target false-alarm rate of the combined rule."""
        return self.alpha if self.alpha is not None else min(d.alpha for d in self.detectors)

    def fit(self, reference: Any) -> DriftCheck:
        """Fit every detector on the same reference (forgets the calibration)."""
        for detector in self.detectors:
            detector.fit(reference)
        self.calibration = None
        return self

    def calibrate(self, clean: Any, window_size: int, n_windows: int = DEFAULT_N_WINDOWS,
                  seed: int = 0, confidence: float = DEFAULT_CONFIDENCE,
                  sampling: str | None = None) -> CheckCalibration:
        """Score every detector on the same clean windows; calibrate each and the combined rule.

        Refuses (before any scoring) too few windows for the combined ``alpha`` or for any
        detector's own alpha at ``confidence``; see ``WindowDetector.calibrate`` for the rest.
        """
        detectors = self.detectors
        alpha = self.combined_alpha
        pac_exceedances(check_int(n_windows, "n_windows", 1), alpha, confidence)  # or raise
        pool, windows, how = detectors[0].calibration_indices(clean, window_size, n_windows, seed,
                                                              sampling, confidence=confidence)
        for det in detectors[1:]:  # the same checks against each detector's own reference
            det.validate_calibration(clean, window_size, n_windows, sampling, confidence=confidence)
        self.calibration = None
        size = len(windows[0])
        per: dict[str, Calibration] = {}
        raw: dict[str, np.ndarray] = {}
        for det in detectors:
            scores = det.pool_scores(pool, windows)
            flags = det.pool_flags(pool, windows, scores)
            per[det.name] = det.set_calibration(scores, size, how, confidence, flags)
            raw[det.name] = np.asarray(scores, dtype=np.float64)
        n = len(windows)
        tail = _tail_size(n)
        smallest = np.ones(n)
        for det_scores in raw.values():  # each clean window against the *other* clean windows
            order = np.argsort(det_scores, kind="stable")
            ranked = det_scores[order]
            for pos, i in enumerate(order):
                others = np.delete(ranked, pos)
                p = _tail_p_values(others, det_scores[i:i + 1], tail)[0]
                smallest[i] = min(smallest[i], p)
        combined_scores = -np.log(np.maximum(smallest, 1e-300))
        j = pac_exceedances(n, alpha, confidence)
        ordered = np.sort(combined_scores)
        combined = Calibration(
            n_windows=n, window_size=size, alpha=alpha, score_threshold=float(ordered[n - 1 - j]),
            scores=tuple(ordered.tolist()), nominal_false_alarm_rate=None, sampling=how,
            confidence=check_alpha(confidence, "confidence"), exceedances=j)
        self.calibration = CheckCalibration(combined=combined, detectors=per, tail=tail)
        return self.calibration

    def check(self, window: Any) -> list[DriftResult]:
        """One result per detector, in the order ks, mmd, ae (each at its own alpha)."""
        return [detector.check(window) for detector in self.detectors]

    def test(self, window: Any) -> list[DriftResult]:
        """Alias of :meth:`check`."""
        return self.check(window)

    def verdict(self, window: Any) -> DriftVerdict:
        """The combined decision for one window, with every detector's evidence.

        Calibrated (:meth:`calibrate`), the false-alarm rate of ``drift`` is at most ``alpha``
        for the OR of the detectors; otherwise ``drift`` is :func:`any_drift` of the results.
        """
        return self.combine(self.check(window))

    def combine(self, results: list[DriftResult]) -> DriftVerdict:
        """The verdict from results :meth:`check` already returned (only their scores count)."""
        cal = self.calibration
        if cal is None or any(not r.details.get("calibrated") for r in results):
            fired = tuple(r.test for r in results if r.drift)
            return DriftVerdict(drift=bool(fired), score=float("nan"),
                                p_value=min(r.p_value for r in results), threshold=float("nan"),
                                fired=fired, results=results, calibrated=False,
                                details={"rule": "any detector (uncalibrated: false-alarm rate up "
                                                 "to the sum of the detectors' alphas)"})
        scores = {r.test: float(r.details["score"]) for r in results}
        if set(scores) != set(cal.detectors):
            raise ValueError(f"results of {sorted(scores)} do not match the calibrated detectors "
                             f"{sorted(cal.detectors)}")
        p = cal.p_values(scores)
        per_score = {name: -math.log(max(v, 1e-300)) for name, v in p.items()}
        score = max(per_score.values())
        combined = cal.combined
        fired = tuple(name for name, s in per_score.items() if combined.is_drift(s))
        return DriftVerdict(
            drift=combined.is_drift(score), score=score, p_value=combined.p_value(score),
            threshold=combined.p_threshold, fired=fired, results=results, calibrated=True,
            details={"rule": "PAC threshold on the smallest per-detector tail p-value",
                     "score_threshold": combined.score_threshold, "tail_p_values": p,
                     "calibration": cal.to_dict()})


def any_drift(results: Iterable[DriftResult]) -> bool:
    """True when at least one test flagged drift."""
    return any(r.drift for r in results)
