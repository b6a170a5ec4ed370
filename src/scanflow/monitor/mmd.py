"""The kernel MMD drift test with a permutation p-value (see :mod:`scanflow.monitor.drift`): sees
changes of the joint distribution of the inputs (or of their embedding)."""

from __future__ import annotations

from typing import Any

import numpy as np

from scanflow.monitor._validate import check_int
from scanflow.monitor.base import DriftResult, WindowDetector
from scanflow.monitor.embedding import CrossFitted, Embedding, PCAEmbedding


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

    def pool_scores(self, pool: np.ndarray, windows: list[np.ndarray]) -> list[float]:
        """``_score`` of windows of one pool from the pool's embedding and kernels, computed once
        (the same numbers: the embedding and the kernel are row-wise). Calibration scores 300
        windows; embedding each (cross-fitted residuals included) took ~0.1-0.3 s per window on
        MNIST, the lookups take milliseconds. Pools above 4,000 rows score window by window."""
        if len(pool) > 4000:
            return super().pool_scores(pool, windows)
        assert self._ref is not None and self._ref_sq is not None
        z = self._embed(pool)
        z_sq = np.einsum("ij,ij->i", z, z)
        k_pp = self._kernel(z, z_sq, z, z_sq)
        k_ref = self._kernel(self._ref, self._ref_sq, z, z_sq).sum(axis=0)  # per pool row
        _, group = np.unique(np.ascontiguousarray(pool).view(f"V{pool.shape[1] * pool.itemsize}"),
                             return_inverse=True)
        group = group.ravel()
        n = len(self._ref)
        out = []
        for idx in windows:
            g = group[idx]
            distinct = g[:, None] != g[None, :]
            pairs = int(np.count_nonzero(distinct))
            k_yy_mean = float(k_pp[np.ix_(idx, idx)][distinct].sum()) / pairs if pairs else 1.0
            k_xy_mean = float(k_ref[idx].sum()) / (n * len(idx))
            out.append(self._k_xx_sum / (n * (n - 1)) + k_yy_mean - 2.0 * k_xy_mean)
        return out

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
