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
from scipy import stats

from scanflow.monitor._validate import check_alpha, check_int, check_window, json_safe
from scanflow.monitor.base import (
    DEFAULT_CONFIDENCE,
    DEFAULT_N_WINDOWS,
    Calibration,
    DriftResult,
    WindowDetector,
    pac_exceedances,
)
from scanflow.monitor.embedding import CrossFitted, Embedding, PCAEmbedding
from scanflow.monitor.outlier import ReconstructionDrift

__all__ = ["CheckCalibration", "DriftCheck", "DriftResult", "DriftVerdict", "KSDrift", "MMDDrift",
           "any_drift"]

_TINY = 1e-300  # p-values below this are "zero" (they underflow) and score the same


class KSDrift(WindowDetector):
    """Feature-wise two-sample Kolmogorov-Smirnov test with a Bonferroni correction.

    Drift when the smallest per-feature p-value is below ``alpha / n_features``, so the chance of
    a false alarm on a clean window stays at most ``alpha`` however many features there are. With
    an ``embedding`` fitted on the reference (e.g. ``PCAEmbedding(32)``) the features tested are
    the input's own (``include_input``), the embedding's coordinates, and the reconstruction
    error (``include_error``; cross-fitted, see
    :class:`~scanflow.monitor.embedding.CrossFitted`): pixels see local shifts (a stroke
    moved, brightness), the coordinates see shape, the error sees noise that no single pixel's
    distribution shows. The statistic reported is the largest KS distance, the p-value the
    smallest raw (uncorrected) one. P-values are the asymptotic ones (scipy's
    ``method="asymp"``), computed for all features at once: ~10x faster than looping
    ``scipy.stats.ks_2samp`` over columns. Calibrated, the window score is ``-log`` of that
    smallest p-value.

    Args:
        alpha: family-wise significance level, i.e. target false-alarm rate (default 0.01).
        embedding: representation fitted on the reference (default None: the input features only).
        include_input: with an embedding, test the input features too (default True).
        include_error: with an embedding, test its reconstruction error too (default True).
        folds: folds for the reference's out-of-fold reconstruction errors (default 5).
        seed: seeds the fold split.
    """

    name = "ks"
    min_window = 1

    def __init__(self, alpha: float = 0.01, embedding: Embedding | None = None,
                 include_input: bool = True, include_error: bool = True, folds: int = 5,
                 seed: int = 0) -> None:
        super().__init__(alpha)
        self.embedding = embedding
        self.include_input = bool(include_input) or embedding is None
        self.include_error = bool(include_error) and embedding is not None
        self.folds = check_int(folds, "folds", 2)
        self.seed = int(seed)
        self._cross: CrossFitted | None = None
        self._ref_t: _KSReference | None = None
        self._critical: dict[int, float] = {}  # KS distance at p = alpha / d, per effective n

    def _features(self, x: np.ndarray, error: np.ndarray | None = None) -> np.ndarray:
        if self.embedding is None:
            return x
        parts = [x] if self.include_input else []
        parts.append(self.embedding.transform(x))
        if self.include_error:
            assert self._cross is not None
            parts.append((self._cross.errors(x) if error is None else error)[:, None])
        return np.concatenate(parts, axis=1)

    def _fit(self, ref: np.ndarray) -> None:
        error = None
        if self.embedding is not None and self.include_error:
            self._cross = CrossFitted(self.embedding, self.folds, self.seed)
            error = self._cross.fit(ref)
        if self.embedding is not None:
            self.embedding.fit(ref)
        self._ref_t = _KSReference(self._features(ref, error))
        self._critical = {}

    def feature_tests(self, window: Any) -> tuple[np.ndarray, np.ndarray]:
        """Per-feature KS statistics and raw p-values; for a "which features moved?" view."""
        win = check_window(window, self._n_features, "KSDrift", min_rows=1)
        assert self._ref_t is not None
        return self._ref_t.columns(self._features(win))

    def _evaluate(self, win: np.ndarray) -> tuple[np.ndarray, float, float, dict[str, Any]]:
        """Distances, max distance, its p-value and the details. Only the largest distance needs
        a p-value (the smallest), and "which features are below alpha/d" is "which distances
        exceed the critical one", computed once per window size."""
        assert self._ref_t is not None
        statistic = self._ref_t.distances(self._features(win))
        n_eff = self._ref_t.effective_n(win.shape[0])
        d = len(statistic)
        if n_eff not in self._critical:
            self._critical[n_eff] = float(stats.kstwo.isf(self.alpha / d, n_eff))
        worst = int(np.argmax(statistic))
        d_max = float(statistic[worst])
        min_p = float(np.nan_to_num(np.clip(stats.kstwo.sf(d_max, n_eff), 0.0, 1.0), nan=1.0))
        details: dict[str, Any] = {
            "alpha": self.alpha,
            "correction": "bonferroni",
            "n_features": d,
            "n_features_drifted": int(np.count_nonzero(statistic > self._critical[n_eff])),
            "worst_feature": worst,
            "min_p_value": min_p,
        }
        if self.embedding is not None:
            details["embedding"] = self.embedding.describe()
            details["include_input"] = self.include_input
            details["include_error"] = self.include_error
        return statistic, d_max, min_p, details

    def _score(self, win: np.ndarray) -> tuple[float, float, dict[str, Any]]:
        _, d_max, min_p, details = self._evaluate(win)
        return -math.log(max(min_p, _TINY)), d_max, details

    def _nominal_flag(self, win: np.ndarray, score: float) -> bool:
        assert self._ref_t is not None
        return score > -math.log(self.alpha / self._ref_t.d)

    def _test(self, win: np.ndarray) -> DriftResult:
        assert self._ref_t is not None
        _, d_max, min_p, details = self._evaluate(win)
        return DriftResult(
            test=self.name,
            statistic=d_max,
            p_value=min_p,
            threshold=self.alpha / self._ref_t.d,
            drift=details["n_features_drifted"] > 0,
            n_reference=self._ref_t.n,
            n_window=win.shape[0],
            details=details,
        )


class _KSReference:
    """The reference side of the feature-wise KS test, prepared once at fit.

    Integer-valued features in a small range (pixels) are compared through counts per level,
    O(window) per feature; the others (embedding coordinates) through the sorted reference.
    """

    max_levels = 4096

    def __init__(self, ref: np.ndarray) -> None:
        self.n, self.d = ref.shape
        self.sorted = np.sort(ref.T, axis=1)
        integral = np.all(ref == np.round(ref), axis=0)
        self.discrete = np.flatnonzero(integral)
        self.continuous = np.flatnonzero(~integral)
        self.lo, self.levels = 0.0, 0
        self.ref_cdf: np.ndarray | None = None
        if self.discrete.size:
            block = ref[:, self.discrete]
            lo, hi = float(block.min()), float(block.max())
            if hi - lo + 1 <= self.max_levels:
                self.lo, self.levels = lo, int(hi - lo) + 1
                self.ref_cdf = self._cdf(block)
        if self.ref_cdf is None:
            self.discrete, self.continuous = self.discrete[:0], np.arange(self.d)

    def _cdf(self, block: np.ndarray) -> np.ndarray:
        k, L = block.shape[1], self.levels
        codes = (block.T - self.lo).astype(np.int64) + (np.arange(k) * L)[:, None]
        counts = np.bincount(codes.ravel(), minlength=k * L).reshape(k, L)
        return np.cumsum(counts, axis=1) / block.shape[0]

    def distances(self, win: np.ndarray) -> np.ndarray:
        """KS distance of every feature, window against reference."""
        statistic = np.empty(self.d)
        continuous = self.continuous
        if self.ref_cdf is not None:
            block = win[:, self.discrete]
            if (np.all(block == np.round(block)) and block.min() >= self.lo
                    and block.max() <= self.lo + self.levels - 1):
                statistic[self.discrete] = np.abs(self.ref_cdf - self._cdf(block)).max(axis=1)
            else:  # this window leaves the reference's levels: compare the usual way
                continuous = np.arange(self.d)
        if continuous.size:
            statistic[continuous] = _ks_sorted(self.sorted[continuous], win[:, continuous])
        return statistic

    def effective_n(self, m: int) -> int:
        return max(1, round(self.n * m / (self.n + m)))

    def columns(self, win: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """KS distance and asymptotic p-value (scipy's ``method="asymp"``) of every feature."""
        statistic = self.distances(win)
        return statistic, _ks_p(statistic, self.effective_n(win.shape[0]))


def _ks_p(statistic: np.ndarray, effective_n: int) -> np.ndarray:
    """Asymptotic two-sample p-values (``kstwo.sf`` is slow: once per distinct distance)."""
    unique, inverse = np.unique(statistic, return_inverse=True)
    p = np.clip(stats.kstwo.sf(unique, effective_n), 0.0, 1.0)[inverse]
    return np.where(np.isnan(p), 1.0, p)  # a constant feature carries no evidence of drift


def _ks_sorted(ref_sorted: np.ndarray, win: np.ndarray) -> np.ndarray:
    """Two-sided two-sample KS distance of every feature (ties handled like scipy).

    ``ref_sorted`` holds each reference feature sorted (d, n). Every feature is shifted into its
    own disjoint interval of one long sorted line, so four ``searchsorted`` calls give both ECDFs
    at every pooled point of every feature: about twice as fast as sorting the pooled sample.
    """
    d, n = ref_sorted.shape
    m = win.shape[0]
    w = np.sort(win.T, axis=1)
    lo = min(float(ref_sorted[:, 0].min()), float(w[:, 0].min()))
    span = 2.0 * (max(float(ref_sorted[:, -1].max()), float(w[:, -1].max())) - lo) + 1.0
    offsets = (np.arange(d) * span)[:, None] - lo
    r_line = (ref_sorted + offsets).ravel()
    w_line = (w + offsets).ravel()
    rows = np.arange(d)[:, None]

    def gap(points: np.ndarray, size: int) -> np.ndarray:
        """|ECDF_ref - ECDF_win| at ``points`` (d x size, on the line), within their own feature."""
        f_ref = np.searchsorted(r_line, points.ravel(), side="right").reshape(d, size) - rows * n
        f_win = np.searchsorted(w_line, points.ravel(), side="right").reshape(d, size) - rows * m
        return np.abs(f_ref / n - f_win / m).max(axis=1)

    return np.maximum(gap(r_line.reshape(d, n), n), gap(w_line.reshape(d, m), m))


class MMDDrift(WindowDetector):
    """Kernel two-sample test (RBF maximum mean discrepancy) on an embedding of the inputs.

    ``fit`` learns the embedding on the reference (by default a PCA with ``n_components``
    directions), keeps the embedded reference and fixes the RBF bandwidth by the median heuristic:
    the median pairwise distance within the embedded reference (fixed, so scores of different
    windows are comparable). ``check`` embeds the window the same way and computes the unbiased
    MMD² between reference and window; uncalibrated, its p-value comes from ``n_permutations``
    random relabellings of the pooled sample (one kernel matrix, all permutations in one matrix
    product). Calibrated, no permutation is needed: the MMD² itself is ranked among clean windows',
    which makes a check several times faster (pairs of identical rows are then left out of the
    window's own kernel term, so bootstrap calibration windows are scored fairly: measured on
    MNIST, bootstrap and duplicate-free windows of one pool score the same on average). Of the
    three detectors, MMD² is the one whose clean scores move most with the calibration pool's
    own deviation from the population (the cross term between the reference's and the pool's
    deviations), which is why calibration windows are pool bootstraps (see
    :mod:`scanflow.monitor.base`). Cost is O((n_ref + n_window)²): keep the reference to a few
    thousand rows.

    Args:
        alpha: significance level, i.e. target false-alarm rate (default 0.01); drift when p < alpha.
        n_components: PCA dimensions of the default embedding (default 32).
        n_permutations: relabellings for the uncalibrated p-value (default 200; smallest p 1/201).
        seed: seeds PCA and the permutations, so the same window always gives the same result.
        standardize: scale each feature by its reference std first (for tabular inputs with mixed
            units). Off by default: for images it would blow up nearly-constant pixels.
        embedding: any other representation fitted on the reference (overrides the PCA).
        include_error: add the reconstruction residual's norm as one more coordinate (cross-fitted,
            see ``CrossFitted``), so that distances keep what the embedding drops: with a PCA,
            ``|z_x - z_y|² + (r_x - r_y)²`` approximates the raw distance, noise included
            (default True).
        folds: folds for the reference's out-of-fold residuals (default 5).
    """

    name = "mmd"

    def __init__(
        self,
        alpha: float = 0.01,
        n_components: int = 32,
        n_permutations: int = 200,
        seed: int = 0,
        standardize: bool = False,
        embedding: Embedding | None = None,
        include_error: bool = True,
        folds: int = 5,
    ) -> None:
        super().__init__(alpha)
        self.include_error = bool(include_error)
        self.folds = check_int(folds, "folds", 2)
        self._cross: CrossFitted | None = None
        self.n_components = check_int(n_components, "n_components", 1)
        self.n_permutations = check_int(n_permutations, "n_permutations", 1)
        self.seed = int(seed)
        self.standardize = bool(standardize)
        self.embedding: Embedding = embedding if embedding is not None else PCAEmbedding(
            self.n_components, scaling="standard" if self.standardize else "range", seed=self.seed)
        self._ref: np.ndarray | None = None  # embedded reference (n, k)
        self._ref_sq: np.ndarray | None = None
        self._k_xx_sum = 0.0  # sum of the reference kernel off the diagonal
        self.bandwidth: float = 1.0

    def _embed(self, x: np.ndarray, error: np.ndarray | None = None) -> np.ndarray:
        z = self.embedding.transform(x)
        if not self.include_error:
            return z
        if error is None:
            cross = self._cross
            error = cross.errors(x) if cross is not None else self.embedding.reconstruction_error(x)
        return np.column_stack([z, np.sqrt(error * x.shape[1])])

    def _fit(self, ref: np.ndarray) -> None:
        error = None
        if self.include_error:
            # A tiny reference cannot be split: its in-sample residuals will have to do.
            self._cross = None
            if len(ref) >= 2 * self.folds:
                self._cross = CrossFitted(self.embedding, self.folds, self.seed)
                error = self._cross.fit(ref)
        self.embedding.fit(ref)
        z = self._embed(ref, error)
        self._ref = z
        self._ref_sq = np.einsum("ij,ij->i", z, z)
        d2 = _sq_dist(z, self._ref_sq, z, self._ref_sq)
        upper = d2[np.triu_indices(len(z), k=1)]
        positive = upper[upper > 0]
        # Median heuristic; if every point coincides, any bandwidth gives MMD 0.
        self.bandwidth = float(np.sqrt(np.median(positive))) if positive.size else 1.0
        k_xx = np.exp(d2 * (-0.5 / self.bandwidth**2))
        self._k_xx_sum = float(k_xx.sum() - np.trace(k_xx))

    def _kernel(self, a: np.ndarray, a_sq: np.ndarray, b: np.ndarray, b_sq: np.ndarray) -> np.ndarray:
        return np.exp(_sq_dist(a, a_sq, b, b_sq) * (-0.5 / self.bandwidth**2))

    def _details(self) -> dict[str, Any]:
        embedding = self.embedding.describe()
        return {
            "alpha": self.alpha,
            "kernel": "rbf",
            "bandwidth": self.bandwidth,
            "n_components": embedding.get("n_components"),
            "explained_variance": embedding.get("explained_variance"),
            "n_permutations": self.n_permutations,
            "standardize": self.standardize,
            "include_error": self.include_error,
            "embedding": embedding,
        }

    def _score(self, win: np.ndarray) -> tuple[float, float, dict[str, Any]]:
        assert self._ref is not None and self._ref_sq is not None
        z = self._embed(win)
        z_sq = np.einsum("ij,ij->i", z, z)
        n, m = len(self._ref), len(z)
        k_yy = self._kernel(z, z_sq, z, z_sq)
        k_xy = self._kernel(self._ref, self._ref_sq, z, z_sq)
        # Pairs of identical rows are left out of the window's own term, like the diagonal: a
        # repeated row says nothing about the spread of the distribution, and bootstrap
        # calibration windows repeat rows by construction.
        _, group = np.unique(np.ascontiguousarray(win).view(f"V{win.shape[1] * win.itemsize}"),
                             return_inverse=True)
        distinct = group.ravel()[:, None] != group.ravel()[None, :]
        pairs = int(np.count_nonzero(distinct))
        k_yy_mean = float(k_yy[distinct].sum()) / pairs if pairs else 1.0
        mmd2 = self._k_xx_sum / (n * (n - 1)) + k_yy_mean - 2.0 * k_xy.sum() / (n * m)
        return float(mmd2), float(mmd2), self._details()

    def _nominal_flag(self, win: np.ndarray, score: float) -> None:
        return None  # a permutation test per calibration window is not worth its time

    def _test(self, win: np.ndarray) -> DriftResult:
        assert self._ref is not None and self._ref_sq is not None
        zw = self._embed(win)
        z = np.concatenate([self._ref, zw], axis=0)
        sq = np.einsum("ij,ij->i", z, z)
        n, m = self._ref.shape[0], zw.shape[0]
        kernel = self._kernel(z, sq, z, sq)
        rng = np.random.default_rng(self.seed)
        labels = np.zeros((n + m, self.n_permutations + 1))
        labels[:n, 0] = 1.0
        for j in range(1, self.n_permutations + 1):
            labels[rng.permutation(n + m)[:n], j] = 1.0
        mmd2 = _unbiased_mmd2(kernel, labels, n, m)
        observed, permuted = float(mmd2[0]), mmd2[1:]
        p_value = float((1 + np.count_nonzero(permuted >= observed)) / (1 + self.n_permutations))
        return DriftResult(
            test=self.name,
            statistic=observed,
            p_value=p_value,
            threshold=self.alpha,
            drift=p_value < self.alpha,
            n_reference=n,
            n_window=m,
            details=self._details(),
        )


def _sq_dist(a: np.ndarray, a_sq: np.ndarray, b: np.ndarray, b_sq: np.ndarray) -> np.ndarray:
    return np.maximum(a_sq[:, None] + b_sq[None, :] - 2.0 * (a @ b.T), 0.0)


def _unbiased_mmd2(kernel: np.ndarray, labels: np.ndarray, n: int, m: int) -> np.ndarray:
    """Unbiased MMD² for every labelling column (1 = reference) with one matrix product."""
    k_labels = kernel @ labels
    total = kernel.sum()
    trace = float(np.trace(kernel))
    xx = np.einsum("ij,ij->j", labels, k_labels)  # sum over reference pairs (incl. diagonal)
    xy = k_labels.sum(axis=0) - xx  # sum over reference x window pairs
    yy = total - xx - 2.0 * xy
    diag_x = labels.T @ np.diag(kernel)
    diag_y = trace - diag_x
    return (
        (xx - diag_x) / (n * (n - 1))
        + (yy - diag_y) / (m * (m - 1))
        - 2.0 * xy / (n * m)
    )


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
        windows, how = detectors[0].calibration_windows(clean, window_size, n_windows, seed,
                                                        sampling, confidence=confidence)
        for det in detectors[1:]:  # the same checks against each detector's own reference
            det.validate_calibration(clean, window_size, n_windows, sampling, confidence=confidence)
        self.calibration = None
        size = windows[0].shape[0]
        per: dict[str, Calibration] = {}
        raw: dict[str, np.ndarray] = {}
        for det in detectors:
            scores = [det._score(win)[0] for win in windows]
            flags = [det._nominal_flag(win, s) for win, s in zip(windows, scores, strict=True)]
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
