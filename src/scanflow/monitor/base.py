"""What every window detector shares: the result record and calibration on clean windows.

A window detector is fitted once on a clean reference and then asked, window after window, "does
this window come from the same distribution?". Out of the box it answers with its own p-value
(asymptotic, or a permutation test). Those p-values assume the window and the reference are
exchangeable, which a representation *fitted on the reference* breaks a little (the reference
reconstructs better than new data), and Bonferroni is conservative. ``calibrate`` removes the
guesswork: it scores windows of clean data that are **not** in the reference, and from then on a
window's p-value is its rank among those clean scores (a conformal p-value,
``(1 + #{clean scores >= score}) / (n_windows + 1)``). Drift is ``p <= alpha``; if new clean
windows are exchangeable with the calibration windows, the false-alarm rate per window is at
most ``alpha`` — 1 % by default. At least ``1/alpha - 1`` calibration windows are needed to fire at all
(99 for 1 %); 200 is the default.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Self

import numpy as np

from scanflow.monitor._validate import as_matrix, check_alpha, check_int, check_window, json_safe

__all__ = ["Calibration", "DriftResult", "WindowDetector", "draw_windows", "split_reference"]


@dataclass(frozen=True)
class DriftResult:
    """The evidence of one test: enough to explain a decision later without the data."""

    test: str
    statistic: float
    p_value: float
    threshold: float
    drift: bool
    n_reference: int
    n_window: int
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python dict (no numpy types, NaN/inf as None) for event logs and JSON."""
        return {
            "test": self.test,
            "statistic": json_safe(self.statistic),
            "p_value": json_safe(self.p_value),
            "threshold": json_safe(self.threshold),
            "drift": bool(self.drift),
            "n_reference": int(self.n_reference),
            "n_window": int(self.n_window),
            "details": json_safe(self.details),
        }


@dataclass(frozen=True)
class Calibration:
    """What ``calibrate`` measured on clean windows; kept on the detector and in every result."""

    n_windows: int
    window_size: int
    alpha: float
    score_threshold: float  # a window scoring above this is drift
    scores: tuple[float, ...]  # the clean windows' scores, sorted
    nominal_false_alarm_rate: float | None  # share of them the uncalibrated test flagged
    bootstrap: bool = False  # windows were bootstrap samples of the clean pool

    def p_value(self, score: float) -> float:
        """Conformal p-value: the window's rank among the clean windows' scores."""
        exceed = len(self.scores) - int(np.searchsorted(self.scores, score, side="left"))
        return (1 + exceed) / (1 + len(self.scores))

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_windows": self.n_windows,
            "window_size": self.window_size,
            "alpha": self.alpha,
            "score_threshold": json_safe(self.score_threshold),
            "nominal_false_alarm_rate": self.nominal_false_alarm_rate,
            "bootstrap": self.bootstrap,
        }


def draw_windows(pool: Any, window_size: int, n_windows: int, seed: int = 0,
                 replace: bool = False) -> list[np.ndarray]:
    """``n_windows`` windows of ``window_size`` rows of ``pool``.

    Without ``replace`` no row appears twice in one window (windows overlap each other); with it
    each window is a bootstrap sample of the pool.
    """
    arr = np.asarray(pool)
    size = check_int(window_size, "window_size", 2)
    count = check_int(n_windows, "n_windows", 1)
    if arr.ndim < 1 or len(arr) == 0 or (not replace and len(arr) < size):
        raise ValueError(f"window_size {size} is larger than the clean pool ({len(arr)} samples)")
    rng = np.random.default_rng(seed)
    return [arr[rng.choice(len(arr), size, replace=replace)] for _ in range(count)]


def split_reference(pool: Any, n_reference: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Shuffle a clean pool into (reference, calibration pool): disjoint by construction."""
    arr = np.asarray(pool)
    n = check_int(n_reference, "n_reference", 2)
    if arr.ndim < 2 or len(arr) <= n:
        raise ValueError(f"the clean pool has {len(arr)} samples; it needs more than "
                         f"n_reference={n} to leave some for calibration")
    order = np.random.default_rng(seed).permutation(len(arr))
    return arr[order[:n]], arr[order[n:]]


def _row_hashes(x: np.ndarray) -> set[bytes]:
    return {hashlib.blake2b(row.tobytes(), digest_size=12).digest() for row in x}


class WindowDetector:
    """Base class: ``fit`` on a reference, optionally ``calibrate``, then ``check`` windows.

    Subclasses implement ``_fit(ref)``, ``_score(win)`` (one number, higher = more drift, cheap)
    and ``_test(win)`` (the uncalibrated test: statistic, p-value, threshold, drift, details).
    """

    name = "window"
    min_window = 2
    # Calibration windows are bootstrap samples of the clean pool: windows drawn without
    # replacement from a pool a few times their size vary less than fresh windows do (they share
    # most rows), which would set the threshold too low. Bootstrap windows vary at least as much
    # (the pool's own deviation adds to theirs), so the false-alarm rate errs below alpha.
    bootstrap_calibration = True

    def __init__(self, alpha: float) -> None:
        self.alpha = check_alpha(alpha)
        self.calibration: Calibration | None = None
        self._n_features: int | None = None
        self._n_reference = 0
        self._reference_hashes: set[bytes] = set()

    # -- hooks -------------------------------------------------------------------------------
    def _fit(self, ref: np.ndarray) -> None:
        raise NotImplementedError

    def _score(self, win: np.ndarray) -> tuple[float, float, dict[str, Any]]:
        """(score, statistic, details) without any permutation work."""
        raise NotImplementedError

    def _test(self, win: np.ndarray) -> DriftResult:
        raise NotImplementedError

    # -- public API --------------------------------------------------------------------------
    @property
    def n_features(self) -> int | None:
        return self._n_features

    def fit(self, reference: Any) -> Self:
        """Learn the representation and keep the reference; forgets an earlier calibration."""
        ref = as_matrix(reference, "reference", min_rows=2)
        self._fit(ref)
        self._n_features = ref.shape[1]
        self._n_reference = ref.shape[0]
        self._reference_hashes = _row_hashes(ref)
        self.calibration = None
        return self

    def calibrate(self, clean: Any, window_size: int, n_windows: int = 200, seed: int = 0,
                  replace: bool | None = None) -> Calibration:
        """Score ``n_windows`` clean windows drawn from ``clean`` and set the threshold from them.

        ``clean`` must be clean data that is not in the reference (e.g. the rest of the pool the
        reference came from, see :func:`split_reference`); windows must have the size that
        production windows will have. ``replace`` (default: the detector's
        ``bootstrap_calibration``) draws bootstrap windows.
        """
        pool = check_window(clean, self._n_features, type(self).__name__, self.min_window,
                            "calibration pool")
        size = check_int(window_size, "window_size", self.min_window)
        count = check_int(n_windows, "n_windows", 1)
        needed = math.ceil(1.0 / self.alpha - 1.0 - 1e-9)
        if count < needed:
            raise ValueError(f"n_windows={count} is too few to reach a false-alarm rate of "
                             f"{self.alpha}: at least {needed} clean windows are needed")
        shared = sum(h in self._reference_hashes for h in _row_hashes(pool))
        if shared * 2 > len(pool):
            raise ValueError(f"{shared} of the {len(pool)} calibration samples are in the reference: "
                             "calibrate on clean data that is not in the reference "
                             "(see split_reference)")
        self.calibration = None
        scores: list[float] = []
        flags: list[bool | None] = []
        bootstrap = self.bootstrap_calibration if replace is None else bool(replace)
        for win in draw_windows(pool, size, count, seed, replace=bootstrap):
            scores.append(self._score(win)[0])
            flags.append(self._nominal_flag(win, scores[-1]))
        known = [f for f in flags if f is not None]
        ordered = np.sort(np.asarray(scores, dtype=np.float64))
        k_max = math.floor(self.alpha * (count + 1) + 1e-9) - 1  # exceedances still flagged
        self.calibration = Calibration(
            n_windows=count, window_size=size, alpha=self.alpha,
            score_threshold=float(ordered[::-1][k_max]), scores=tuple(ordered.tolist()),
            nominal_false_alarm_rate=sum(known) / count if len(known) == count else None,
            bootstrap=bootstrap,
        )
        return self.calibration

    def _nominal_flag(self, win: np.ndarray, score: float) -> bool | None:
        """Would the uncalibrated test flag this window? (Recorded, not used for the threshold;
        None where finding out would cost a permutation test per window.)"""
        return bool(self._test(win).drift)

    def check(self, window: Any) -> DriftResult:
        """Test one window against the reference (calibrated if ``calibrate`` was called)."""
        win = check_window(window, self._n_features, type(self).__name__, self.min_window)
        cal = self.calibration
        if cal is None:
            return self._test(win)
        if win.shape[0] != cal.window_size:
            raise ValueError(f"window has {win.shape[0]} samples but {type(self).__name__} was "
                             f"calibrated on windows of {cal.window_size}: calibrate again for "
                             "this size")
        score, statistic, details = self._score(win)
        p_value = cal.p_value(score)
        return DriftResult(
            test=self.name, statistic=float(statistic), p_value=p_value, threshold=self.alpha,
            drift=p_value <= self.alpha, n_reference=self._n_reference, n_window=win.shape[0],
            details={**details, "score": score, "calibrated": True, "calibration": cal.to_dict()},
        )

    def test(self, window: Any) -> DriftResult:
        """Alias of :meth:`check` (the name earlier versions used)."""
        return self.check(window)
