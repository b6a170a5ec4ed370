"""Reconstruction-error outlier scores and the window test built on them.

Scanflow's original detector trained an autoencoder and flagged a batch by the reconstruction
errors of that batch, min-max scaled *within the batch*: a whole batch of noise looked as normal as
a clean one, and the threshold meant something different every time. Done right:

* the input scaling is learned on the reference and frozen (:class:`InputScaler`);
* scores are **cross-fitted** (:class:`~scanflow.monitor.embedding.CrossFitted`): each fifth of
  the reference is scored by a model fitted on the other four fifths, and a new sample by one of
  those five models, because a model scores the data it was trained on too well, and a threshold
  from those scores would flag clean new data;
* a sample is an outlier above the ``outlier_quantile`` of those reference scores;
* a window drifts when its scores are larger than the reference's: a one-sided two-sample KS test
  of window scores against reference scores (p-value valid per window), or calibrated on clean
  windows like every detector here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import stats

from scanflow.monitor._validate import check_alpha, check_int, check_window
from scanflow.monitor.base import DriftResult, WindowDetector
from scanflow.monitor.embedding import CrossFitted, Embedding, PCAEmbedding

__all__ = ["ReconstructionDrift"]


class ReconstructionDrift(WindowDetector):
    """Per-sample reconstruction error of an embedding fitted on the reference, and a window test.

    Args:
        alpha: target false-alarm rate per window (default 0.01).
        embedding: what reconstructs the inputs (default ``PCAEmbedding(32)``; an
            ``AutoencoderEmbedding`` is the non-linear alternative).
        folds: cross-fitting folds for the reference's out-of-fold scores (default 5).
        outlier_quantile: reference quantile above which one sample is an outlier (default 0.99).
        seed: seeds the fold split.
    """

    name = "ae"

    def __init__(self, alpha: float = 0.01, embedding: Embedding | None = None, folds: int = 5,
                 outlier_quantile: float = 0.99, two_sided: bool = True, seed: int = 0) -> None:
        super().__init__(alpha)
        self.two_sided = bool(two_sided)
        self.embedding: Embedding = embedding if embedding is not None else PCAEmbedding(32)
        self.folds = check_int(folds, "folds", 2)
        self.outlier_quantile = check_alpha(outlier_quantile, "outlier_quantile")
        self.seed = int(seed)
        self.reference_scores: np.ndarray | None = None  # out-of-fold, sorted
        self.outlier_threshold: float | None = None
        self._cross: CrossFitted | None = None

    def _fit(self, ref: np.ndarray) -> None:
        self._cross = CrossFitted(self.embedding, self.folds, self.seed)
        oof = self._cross.fit(ref)
        self.reference_scores = np.sort(oof)
        self.outlier_threshold = float(np.quantile(oof, self.outlier_quantile))

    def score(self, x: Any) -> np.ndarray:
        """Outlier score per sample: its reconstruction error (higher = less like the reference)."""
        arr = check_window(x, self._n_features, "ReconstructionDrift", 1, "input")
        assert self._cross is not None  # check_window refused an unfitted detector
        return self._cross.errors(arr)

    def is_outlier(self, x: Any) -> np.ndarray:
        """True for samples scoring above the reference's ``outlier_quantile``."""
        scores = self.score(x)  # refuses an unfitted detector
        assert self.outlier_threshold is not None
        return scores > self.outlier_threshold

    def _evaluate(self, win: np.ndarray) -> tuple[float, float, dict[str, Any]]:
        assert self.reference_scores is not None and self.outlier_threshold is not None
        assert self._cross is not None
        scores = self._cross.errors(win)
        # One-sided H1: window scores are larger, i.e. their CDF lies below the reference's.
        result = stats.ks_2samp(scores, self.reference_scores, method="asymp",
                                alternative="two-sided" if self.two_sided else "less")
        details = {
            "alpha": self.alpha,
            "test": "KS of reconstruction errors, " + (
                "two-sided" if self.two_sided else "one-sided (window > reference)"),
            "outlier_threshold": self.outlier_threshold,
            "outlier_quantile": self.outlier_quantile,
            "outlier_share": float(np.mean(scores > self.outlier_threshold)),
            "median_score": float(np.median(scores)),
            "reference_median_score": float(np.median(self.reference_scores)),
            "embedding": self._cross.models[0].describe(),
            "folds": self.folds,
        }
        return float(result.statistic), float(result.pvalue), details

    def _score(self, win: np.ndarray) -> tuple[float, float, dict[str, Any]]:
        statistic, p_value, details = self._evaluate(win)
        return -float(np.log(max(p_value, 1e-300))), statistic, {**details, "raw_p_value": p_value}

    def _nominal_flag(self, win: np.ndarray, score: float) -> bool:
        return score > -float(np.log(self.alpha))

    def _test(self, win: np.ndarray) -> DriftResult:
        statistic, p_value, details = self._evaluate(win)
        return DriftResult(
            test=self.name, statistic=statistic, p_value=p_value, threshold=self.alpha,
            drift=p_value < self.alpha, n_reference=self._n_reference, n_window=win.shape[0],
            details=details,
        )
