"""What every window detector shares: the result record and calibration on clean windows.

A window detector is fitted once on a clean reference and then asked, window after window, "does
this window come from the same distribution?". Out of the box it answers with its own p-value
(asymptotic, or a permutation test). Those p-values assume the window and the reference are
exchangeable, which a representation *fitted on the reference* breaks a little (the reference
reconstructs better than new data), and Bonferroni is conservative. ``calibrate`` removes the
guesswork: it scores ``n_windows`` windows of clean data that are **not** in the reference and
sets the threshold from those scores.

**The guarantee is per calibration, not on average.** The classic conformal rule (drift when a
window's rank p-value ``(1 + #{clean scores >= score}) / (n_windows + 1)`` is ``<= alpha``) holds
the false-alarm rate at ``alpha`` only *marginally*: averaged over calibration draws. One
calibration can land a threshold that fires on 2-3 % of clean windows, and a user lives with one
calibration. Here the threshold is the order statistic that is *training-conditional* (PAC): with
probability at least ``confidence`` (default 0.9) over the calibration draw, the false-alarm rate
of *this* threshold is at most ``alpha`` (default 1 %). The law is exact: if the threshold is the
``(j + 1)``-th largest of ``n`` i.i.d. clean scores, the share of clean windows scoring above it
follows ``Beta(j + 1, n - j)`` (ties only lower it), so we take the largest ``j`` with
``Beta(j + 1, n - j).cdf(alpha) >= confidence`` (:func:`pac_exceedances`). That needs at least
``log(1 - confidence) / log(1 - alpha)`` windows (230 for 1 % at 0.9; 300 is the default) and
costs little power: with 300 windows the threshold is the largest clean score. The conformal
p-value is still reported with each result (evidence: "this window scored above all but k clean
windows"); drift is ``p_value <= threshold``, the threshold being ``(j + 1) / (n + 1)``.

**Calibration windows are pool bootstraps.** The i.i.d. assumption is about windows *of the
population*, while the calibration pool is finite (MNIST benchmark: 2,000 images for windows of
500). Windows drawn from the pool vary around the *pool's* mean, which sits off the population's
by about as much as the reference's own deviation does (pool of 2,000, reference of 1,000), and
a two-sample score such as MMD² is dominated by the reference-vs-window difference: the whole
calibration distribution moves by a random amount per pool (MMD on five MNIST splits: -0.4 to
+1.0 standard deviations of the clean window score), and with plain bootstrap windows and the
marginal rule the false-alarm rate swung from 0 to 3 % across splits (17 % at alpha 5 %).
Duplicated rows are not the cause: bootstrap and duplicate-free windows of one pool score the
same on average. Each window here is a bootstrap sample of a fresh bootstrap of the pool
(``sampling="pool_bootstrap"``): its mean then varies by the window's own sampling noise *plus*
the pool's, the spread a fresh window has around what the pool tells us about the population.
For KS and the reconstruction test, whose scores a pool deviation can only push up, this errs
further on the safe side. The plain bootstrap and windows without replacement remain available.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Self

import numpy as np
from scipy import stats

from scanflow.jsonsafe import json_safe
from scanflow.monitor._validate import as_matrix, check_alpha, check_int, check_window

__all__ = ["Calibration", "DriftResult", "Sampling", "WindowDetector", "draw_window_indices", "draw_windows",
           "min_calibration_windows", "pac_exceedances", "split_reference"]

Sampling = Literal["pool_bootstrap", "bootstrap", "subsample"]
SAMPLINGS: tuple[str, ...] = ("pool_bootstrap", "bootstrap", "subsample")
DEFAULT_CONFIDENCE = 0.9
DEFAULT_N_WINDOWS = 300


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


def check_confidence(confidence: float) -> float:
    """The probability over calibration draws that the guarantee holds: strictly in (0, 1)."""
    return check_alpha(confidence, "confidence")


def pac_exceedances(n_windows: int, alpha: float, confidence: float = DEFAULT_CONFIDENCE) -> int:
    """How many of ``n_windows`` clean calibration scores may lie above the threshold.

    The threshold is then the ``(j + 1)``-th largest clean score (``j`` the value returned) and,
    for i.i.d. scores, its false-alarm rate is ``Beta(j + 1, n - j)``-distributed; ``j`` is the
    largest with ``P(rate <= alpha) >= confidence``. Raises ``ValueError`` (saying how many
    windows are needed) when even the largest clean score is not enough.
    """
    n = check_int(n_windows, "n_windows", 1)
    a, c = check_alpha(alpha), check_confidence(confidence)
    if stats.beta.cdf(a, 1, n) < c:
        raise ValueError(
            f"n_windows={n} is too few for a false-alarm rate <= {a} with confidence {c}: "
            f"at least {min_calibration_windows(a, c)} clean windows are needed")
    # P(rate <= alpha) = P(Binomial(n, alpha) >= j + 1) falls with j: the last j that keeps it.
    j = np.arange(n)
    ok = stats.binom.sf(j, n, a) >= c
    return int(j[ok][-1])


def min_calibration_windows(alpha: float, confidence: float = DEFAULT_CONFIDENCE) -> int:
    """The fewest calibration windows for which :func:`pac_exceedances` has a threshold."""
    a, c = check_alpha(alpha), check_confidence(confidence)
    n = max(1, math.ceil(math.log1p(-c) / math.log1p(-a)))
    while n > 1 and stats.beta.cdf(a, 1, n - 1) >= c:  # guard the float rounding both ways
        n -= 1
    while stats.beta.cdf(a, 1, n) < c:
        n += 1
    return n


@dataclass(frozen=True)
class Calibration:
    """What ``calibrate`` measured on clean windows; kept on the detector and in every result.

    ``score_threshold`` is the PAC one: the ``order_statistic``-th smallest clean score (i.e.
    ``exceedances`` clean scores lie above it). A window scoring above it is drift; equivalently,
    its conformal p-value is ``<= p_threshold``.
    """

    n_windows: int
    window_size: int
    alpha: float
    score_threshold: float  # a window scoring above this is drift
    scores: tuple[float, ...]  # the clean windows' scores, sorted
    nominal_false_alarm_rate: float | None  # share of them the uncalibrated test flagged
    sampling: str = "pool_bootstrap"
    confidence: float = DEFAULT_CONFIDENCE
    exceedances: int = 0  # clean scores above the threshold

    @property
    def order_statistic(self) -> int:
        """1-based rank of the threshold among the sorted clean scores (smallest = 1)."""
        return self.n_windows - self.exceedances

    @property
    def p_threshold(self) -> float:
        """Drift when the conformal p-value is at most this: ``(exceedances + 1) / (n + 1)``."""
        return (self.exceedances + 1) / (self.n_windows + 1)

    @property
    def bootstrap(self) -> bool:
        """Windows had repeated rows (a bootstrap of the pool, plain or double)."""
        return self.sampling != "subsample"

    def p_value(self, score: float) -> float:
        """Conformal p-value: the window's rank among the clean windows' scores."""
        exceed = len(self.scores) - int(np.searchsorted(self.scores, score, side="left"))
        return (1 + exceed) / (1 + len(self.scores))

    def is_drift(self, score: float) -> bool:
        """The PAC decision (same as ``p_value(score) <= p_threshold``)."""
        return bool(score > self.score_threshold)

    def threshold_at(self, alpha: float) -> float:
        """The PAC score threshold these clean scores give at another ``alpha`` (same confidence)."""
        j = pac_exceedances(self.n_windows, alpha, self.confidence)
        return float(self.scores[self.n_windows - 1 - j])

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_windows": self.n_windows,
            "window_size": self.window_size,
            "alpha": self.alpha,
            "confidence": self.confidence,
            "rule": "pac",
            "order_statistic": self.order_statistic,
            "exceedances": self.exceedances,
            "score_threshold": json_safe(self.score_threshold),
            "p_threshold": self.p_threshold,
            "expected_false_alarm_rate": self.p_threshold,
            "nominal_false_alarm_rate": self.nominal_false_alarm_rate,
            "sampling": self.sampling,
            "bootstrap": self.bootstrap,
        }


def check_sampling(sampling: str) -> str:
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {', '.join(SAMPLINGS)}; got {sampling!r}")
    return sampling


def draw_windows(pool: Any, window_size: int, n_windows: int, seed: int = 0,
                 replace: bool = False, sampling: str | None = None) -> list[np.ndarray]:
    """``n_windows`` windows of ``window_size`` rows of ``pool``.

    ``sampling`` (default from ``replace``): ``"subsample"`` (no row twice in one window; windows
    overlap each other), ``"bootstrap"`` (each window a bootstrap sample of the pool) or
    ``"pool_bootstrap"`` (each window a bootstrap sample of a fresh bootstrap of the pool).
    """
    arr = np.asarray(pool)
    return [arr[idx] for idx in draw_window_indices(arr, window_size, n_windows, seed, replace, sampling)]


def draw_window_indices(pool: Any, window_size: int, n_windows: int, seed: int = 0,
                        replace: bool = False, sampling: str | None = None) -> list[np.ndarray]:
    """The row indices of :func:`draw_windows`' windows (same seed, same windows): a detector
    can then score windows from what it computed once on the whole pool."""
    arr = np.asarray(pool)
    size = check_int(window_size, "window_size", 2)
    count = check_int(n_windows, "n_windows", 1)
    how = check_sampling(sampling) if sampling is not None else (
        "bootstrap" if replace else "subsample")
    if arr.ndim < 1 or len(arr) == 0 or (how == "subsample" and len(arr) < size):
        raise ValueError(f"window_size {size} is larger than the clean pool ({len(arr)} samples)")
    rng = np.random.default_rng(seed)
    n = len(arr)
    if how == "subsample":
        return [rng.choice(n, size, replace=False) for _ in range(count)]
    if how == "bootstrap":
        return [rng.integers(0, n, size) for _ in range(count)]
    return [rng.integers(0, n, n)[rng.integers(0, n, size)] for _ in range(count)]


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
    # How calibration windows are drawn from the clean pool (see the module docstring): a
    # bootstrap of a bootstrap of the pool, so the pool's own deviation from the population is
    # part of the calibration windows' spread instead of a shift they all share.
    calibration_sampling: str = "pool_bootstrap"

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

    def validate_calibration(self, clean: Any, window_size: int, n_windows: int,
                             sampling: str | None = None, alpha: float | None = None,
                             confidence: float = DEFAULT_CONFIDENCE) -> tuple[np.ndarray, int, int, str]:
        """Refuse, before any scoring, what would make the calibrated number a lie.

        Too few windows for (``alpha``, ``confidence``), a pool mostly made of reference rows,
        windows smaller than the detector takes. Returns (pool, window size, count, sampling).
        """
        pool = check_window(clean, self._n_features, type(self).__name__, self.min_window,
                            "calibration pool")
        size = check_int(window_size, "window_size", self.min_window)
        count = check_int(n_windows, "n_windows", 1)
        pac_exceedances(count, self.alpha if alpha is None else alpha, confidence)  # or raise
        how = check_sampling(self.calibration_sampling if sampling is None else sampling)
        shared = sum(h in self._reference_hashes for h in _row_hashes(pool))
        if shared * 2 > len(pool):
            raise ValueError(f"{shared} of the {len(pool)} calibration samples are in the reference: "
                             "calibrate on clean data that is not in the reference "
                             "(see split_reference)")
        return pool, size, count, how

    def calibration_windows(self, clean: Any, window_size: int, n_windows: int = DEFAULT_N_WINDOWS,
                            seed: int = 0, sampling: str | None = None, alpha: float | None = None,
                            confidence: float = DEFAULT_CONFIDENCE) -> tuple[list[np.ndarray], str]:
        """Validate a calibration request and draw its windows (``DriftCheck`` shares them)."""
        pool, idx, how = self.calibration_indices(clean, window_size, n_windows, seed, sampling, alpha,
                                                  confidence)
        return [pool[i] for i in idx], how

    def calibration_indices(self, clean: Any, window_size: int, n_windows: int = DEFAULT_N_WINDOWS,
                            seed: int = 0, sampling: str | None = None, alpha: float | None = None,
                            confidence: float = DEFAULT_CONFIDENCE
                            ) -> tuple[np.ndarray, list[np.ndarray], str]:
        """Validate a calibration request; the checked pool and its windows as row indices."""
        pool, size, count, how = self.validate_calibration(clean, window_size, n_windows, sampling,
                                                           alpha, confidence)
        return pool, draw_window_indices(pool, size, count, seed, sampling=how), how

    def pool_scores(self, pool: np.ndarray, windows: list[np.ndarray]) -> list[float]:
        """``_score`` of each window ``pool[idx]`` (a detector may override it to embed the pool
        once instead of every window: calibration scores hundreds of windows of one pool)."""
        return [self._score(pool[idx])[0] for idx in windows]

    def pool_flags(self, pool: np.ndarray, windows: list[np.ndarray], scores: list[float]
                   ) -> list[bool | None]:
        """``_nominal_flag`` of each window (recorded with the calibration)."""
        return [self._nominal_flag(pool[idx], s) for idx, s in zip(windows, scores, strict=True)]

    def calibrate(self, clean: Any, window_size: int, n_windows: int = DEFAULT_N_WINDOWS,
                  seed: int = 0, sampling: str | None = None,
                  confidence: float = DEFAULT_CONFIDENCE) -> Calibration:
        """Score ``n_windows`` clean windows drawn from ``clean`` and set the PAC threshold.

        ``clean`` must be clean data that is not in the reference (e.g. the rest of the pool the
        reference came from, see :func:`split_reference`); windows must have the size that
        production windows will have. With probability ``confidence`` over this calibration,
        the false-alarm rate per window is at most ``alpha`` (see the module docstring);
        ``sampling`` (default the detector's ``calibration_sampling``) says how windows are
        drawn from the pool.
        """
        pool, windows, how = self.calibration_indices(clean, window_size, n_windows, seed, sampling,
                                                      confidence=confidence)
        self.calibration = None
        scores = self.pool_scores(pool, windows)
        return self.set_calibration(scores, len(windows[0]), how, confidence,
                                    self.pool_flags(pool, windows, scores))

    def set_calibration(self, scores: list[float], window_size: int, sampling: str,
                        confidence: float = DEFAULT_CONFIDENCE,
                        flags: list[bool | None] | None = None) -> Calibration:
        """Set the PAC threshold from clean windows' scores (``_score``) already computed."""
        count = len(scores)
        conf = check_confidence(confidence)
        j = pac_exceedances(count, self.alpha, conf)
        ordered = np.sort(np.asarray(scores, dtype=np.float64))
        known = [f for f in (flags or []) if f is not None]
        self.calibration = Calibration(
            n_windows=count, window_size=int(window_size), alpha=self.alpha,
            score_threshold=float(ordered[count - 1 - j]), scores=tuple(ordered.tolist()),
            nominal_false_alarm_rate=sum(known) / count if len(known) == count else None,
            sampling=sampling, confidence=conf, exceedances=j,
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
        return DriftResult(
            test=self.name, statistic=float(statistic), p_value=cal.p_value(score),
            threshold=cal.p_threshold, drift=cal.is_drift(score), n_reference=self._n_reference,
            n_window=win.shape[0],
            details={**details, "score": score, "calibrated": True, "calibration": cal.to_dict()},
        )

    def test(self, window: Any) -> DriftResult:
        """Alias of :meth:`check` (the name earlier versions used)."""
        return self.check(window)
