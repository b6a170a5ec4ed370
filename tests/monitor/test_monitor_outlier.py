"""Reconstruction-error outlier scores done right, and the embeddings behind them."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits

from scanflow.monitor import AutoencoderEmbedding, InputEmbedding, PCAEmbedding, ReconstructionDrift
from scanflow.monitor.embedding import CrossFitted


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    x = load_digits().data  # 8x8 digits, pixels 0..16
    order = np.random.default_rng(0).permutation(len(x))
    return x[order[:900]], x[order[900:]]


@pytest.fixture(scope="module")
def detector(digits) -> ReconstructionDrift:
    return ReconstructionDrift(embedding=PCAEmbedding(12)).fit(digits[0])


def test_clean_digits_are_rarely_outliers_and_noisy_ones_mostly(detector, digits):
    _, pool = digits
    assert detector.is_outlier(pool).mean() < 0.03  # the threshold is the 99th percentile
    noisy = np.clip(pool + np.random.default_rng(1).normal(0, 4, pool.shape), 0, 16)
    assert detector.is_outlier(noisy).mean() > 0.4
    assert np.median(detector.score(noisy)) > 2 * np.median(detector.score(pool))


def test_scores_are_cross_fitted(digits):
    """In-sample errors are too small: a threshold from them flags clean new digits.

    A small reference and many components (200 digits, 30 of 64 directions) make the effect
    plain: the in-sample 99th percentile flags ~10 % of new clean digits.
    """
    ref, pool = digits[0][:200], digits[1]
    naive = PCAEmbedding(30).fit(ref)
    naive_threshold = np.quantile(naive.reconstruction_error(ref), 0.99)
    assert (naive.reconstruction_error(pool) > naive_threshold).mean() > 0.05
    det = ReconstructionDrift(embedding=PCAEmbedding(30)).fit(ref)
    assert det.outlier_threshold > naive_threshold
    assert det.is_outlier(pool).mean() < 0.03  # about the 1 % it promises
    assert not det.check(pool[:300]).drift
    cross = CrossFitted(PCAEmbedding(30), folds=5)
    oof = cross.fit(ref)
    assert np.median(oof) > 1.2 * np.median(naive.reconstruction_error(ref))
    np.testing.assert_allclose(cross.errors(pool[:5]), cross.errors(pool[:5]))  # one input, one score


def test_scaling_is_learned_on_the_reference_not_per_batch(detector, digits):
    """Min-max scaling each batch on its own would make a brightened batch look normal."""
    _, pool = digits
    bright = np.clip(pool[:300] + 4.0, 0, 16)
    result = detector.check(bright)
    assert result.drift and result.details["outlier_share"] > 0.5
    assert not detector.check(pool[:300]).drift
    # The same image scores the same whatever else is in its batch.
    alone = detector.score(pool[:1])
    assert detector.score(np.concatenate([pool[:1], bright]))[0] == pytest.approx(alone[0])


def test_blur_lowers_errors_and_the_two_sided_window_test_sees_it(digits):
    from scipy import ndimage

    ref, pool = digits
    blurred = ndimage.gaussian_filter(pool[:300].reshape(-1, 8, 8), sigma=(0, 1.0, 1.0)).reshape(-1, 64)
    two_sided = ReconstructionDrift(embedding=PCAEmbedding(12)).fit(ref)
    one_sided = ReconstructionDrift(embedding=PCAEmbedding(12), two_sided=False).fit(ref)
    result = two_sided.check(blurred)
    assert result.drift and result.details["median_score"] < result.details["reference_median_score"]
    assert not one_sided.check(blurred).drift


def test_autoencoder_embedding_reconstructs_and_embeds(digits):
    ref, pool = digits
    ae = AutoencoderEmbedding(hidden=16, max_iter=60, seed=0).fit(ref)
    assert ae.transform(pool).shape == (len(pool), 16)
    clean = ae.reconstruction_error(pool)
    noisy = ae.reconstruction_error(np.clip(pool + np.random.default_rng(2).normal(0, 4, pool.shape), 0, 16))
    assert np.median(noisy) > 1.5 * np.median(clean)
    again = AutoencoderEmbedding(hidden=16, max_iter=60, seed=0).fit(ref)
    np.testing.assert_allclose(again.reconstruction_error(pool[:20]), clean[:20])
    assert ae.describe()["embedding"] == "autoencoder" and ae.describe()["epochs"] >= 1


def test_detector_with_an_autoencoder(digits):
    ref, pool = digits
    det = ReconstructionDrift(embedding=AutoencoderEmbedding(hidden=16, max_iter=40), folds=3).fit(ref)
    assert not det.check(pool[:300]).drift
    assert det.check(np.clip(pool[:300] + 4.0, 0, 16)).drift


def test_input_embedding_is_the_scaled_input(digits):
    ref, _ = digits
    emb = InputEmbedding().fit(ref)
    np.testing.assert_allclose(emb.transform(ref[:3]), ref[:3] / 16.0)
    assert (emb.reconstruction_error(ref[:3]) == 0).all()


def test_bad_input_is_refused(digits):
    ref, _ = digits
    with pytest.raises(ValueError, match="not fitted"):
        ReconstructionDrift().score(ref)
    with pytest.raises(ValueError, match="input has 63 features but the reference has 64"):
        ReconstructionDrift(embedding=PCAEmbedding(8)).fit(ref).score(ref[:, 1:])
    with pytest.raises(ValueError, match="at least 10 samples for 5 folds"):
        ReconstructionDrift().fit(ref[:6])
    with pytest.raises(ValueError, match="outlier_quantile"):
        ReconstructionDrift(outlier_quantile=1.0)
    with pytest.raises(ValueError, match="scaling"):
        PCAEmbedding(scaling="minmax-per-batch")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_components"):
        PCAEmbedding(0)
