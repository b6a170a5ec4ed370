"""Calibrated detectors: the false-alarm rate per window is a measured number, and shifts still fire.

The synthetic data are low-rank (like images: a few latent factors plus noise), so a PCA fitted
on the reference means something. Every clean window in the false-alarm tests is a *fresh* draw,
never a row of the reference or of the calibration pool.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from scanflow.monitor import (
    DriftCheck,
    KSDrift,
    MMDDrift,
    PCAEmbedding,
    ReconstructionDrift,
    draw_windows,
    split_reference,
)

D, RANK, WINDOW = 30, 4, 100
_MIX = np.random.default_rng(42).normal(size=(RANK, D))


def sample(n: int, rng: np.random.Generator, shift: float = 0.0, noise: float = 0.5) -> np.ndarray:
    """n rows of the clean distribution; ``shift`` moves the first latent factor."""
    z = rng.normal(size=(n, RANK))
    z[:, 0] += shift
    return z @ _MIX + noise * rng.normal(size=(n, D))


def detectors() -> dict[str, object]:
    return {
        "ks": KSDrift(embedding=PCAEmbedding(8)),
        "mmd": MMDDrift(n_components=8),
        "ae": ReconstructionDrift(embedding=PCAEmbedding(RANK)),
    }


@pytest.fixture(scope="module")
def calibrated() -> dict[str, object]:
    rng = np.random.default_rng(0)
    reference, pool = sample(600, rng), sample(1500, rng)
    out = detectors()
    for det in out.values():
        det.fit(reference)
        cal = det.calibrate(pool, window_size=WINDOW, n_windows=200, seed=1)
        assert cal.alpha == 0.01 and cal.n_windows == 200
    return out


@pytest.mark.parametrize("name", ["ks", "mmd", "ae"])
def test_false_alarm_rate_on_fresh_clean_windows_is_at_most_one_percent(calibrated, name: str):
    det = calibrated[name]
    rng = np.random.default_rng(100)
    n = 150
    alarms = sum(det.check(sample(WINDOW, rng)).drift for _ in range(n))
    # Target 1 %; with 150 windows, 4 or more alarms at a true rate of 1 % has probability < 7 %,
    # 6 or more < 0.5 %: allow up to 5 (3.3 %).
    assert alarms <= 5, f"{name}: {alarms}/{n} false alarms"
    assert stats.binomtest(alarms, n, 0.01, alternative="greater").pvalue > 0.005


@pytest.mark.parametrize("name", ["ks", "mmd", "ae"])
def test_calibrated_detectors_still_see_real_shifts(calibrated, name: str):
    det = calibrated[name]
    rng = np.random.default_rng(200)
    noisy = [det.check(sample(WINDOW, rng, noise=1.0)) for _ in range(10)]
    assert all(r.drift for r in noisy), name
    if name != "ae":  # a shift inside the latent space reconstructs fine: the AE is not for that
        moved = [det.check(sample(WINDOW, rng, shift=1.0)) for _ in range(10)]
        assert all(r.drift for r in moved), name


def test_calibrated_result_carries_its_evidence(calibrated):
    rng = np.random.default_rng(3)
    result = calibrated["mmd"].check(sample(WINDOW, rng, noise=1.0))
    assert result.drift and result.p_value == pytest.approx(1 / 201)
    assert result.details["calibrated"] is True
    cal = result.details["calibration"]
    assert cal["n_windows"] == 200 and cal["window_size"] == WINDOW and cal["alpha"] == 0.01
    assert result.details["score"] > cal["score_threshold"]
    assert result.to_dict()["details"]["calibration"] == cal


def test_conformal_p_value_is_the_rank_among_clean_scores(calibrated):
    cal = calibrated["ks"].calibration
    scores = cal.scores
    assert cal.p_value(max(scores) + 1.0) == pytest.approx(1 / 201)
    assert cal.p_value(min(scores) - 1.0) == 1.0
    # Alpha 1 % with 200 windows: drift only above the second-largest clean score.
    assert cal.score_threshold == sorted(scores)[-2]


def test_uncalibrated_false_alarms_are_rare_too():
    """The default p-values are valid on their own (KS: conservative; MMD: permutations)."""
    rng = np.random.default_rng(5)
    reference = sample(400, rng)
    ks, mmd = KSDrift().fit(reference), MMDDrift(n_components=8, n_permutations=100).fit(reference)
    alarms = {"ks": 0, "mmd": 0}
    for _ in range(40):
        window = sample(WINDOW, rng)
        alarms["ks"] += ks.check(window).drift
        alarms["mmd"] += mmd.check(window).drift
    assert alarms["ks"] <= 2 and alarms["mmd"] <= 2, alarms


def test_drift_check_calibrates_every_detector():
    rng = np.random.default_rng(6)
    reference, pool = split_reference(sample(1600, rng), 600, seed=0)
    check = DriftCheck(KSDrift(), MMDDrift(n_components=8), ReconstructionDrift(
        embedding=PCAEmbedding(RANK))).fit(reference)
    calibrations = check.calibrate(pool, window_size=WINDOW, n_windows=120, seed=0)
    assert set(calibrations) == {"ks", "mmd", "ae"}
    assert all(c.bootstrap for c in calibrations.values())
    results = check.check(sample(WINDOW, rng, shift=1.5, noise=1.0))
    assert [r.test for r in results] == ["ks", "mmd", "ae"]
    assert all(r.drift and r.details["calibrated"] for r in results)


def test_split_reference_and_draw_windows_are_disjoint_where_promised():
    pool = np.arange(1000, dtype=float).reshape(500, 2)
    ref, rest = split_reference(pool, 200, seed=3)
    assert len(ref) == 200 and len(rest) == 300
    assert not set(ref[:, 0]) & set(rest[:, 0])
    for window in draw_windows(rest, 50, 5, seed=1):
        assert len(set(window[:, 0])) == 50  # no row twice inside one window
    assert len(draw_windows(rest, 400, 2, seed=1, replace=True)[0]) == 400
    with pytest.raises(ValueError, match="larger than the clean pool"):
        draw_windows(rest, 400, 2)
    with pytest.raises(ValueError, match="needs more than n_reference"):
        split_reference(pool, 500)


def test_calibration_refuses_what_would_make_its_number_a_lie():
    rng = np.random.default_rng(7)
    reference = sample(300, rng)
    ks = KSDrift().fit(reference)
    with pytest.raises(ValueError, match="at least 99 clean windows"):
        ks.calibrate(sample(500, rng), window_size=WINDOW, n_windows=50)
    with pytest.raises(ValueError, match="in the reference"):
        ks.calibrate(reference, window_size=WINDOW, n_windows=100)
    with pytest.raises(ValueError, match="calibration pool has 29 features"):
        ks.calibrate(sample(500, rng)[:, 1:], window_size=WINDOW, n_windows=100)
    with pytest.raises(ValueError, match="not fitted"):
        KSDrift().calibrate(sample(500, rng), window_size=WINDOW)
    ks.calibrate(sample(500, rng), window_size=WINDOW, n_windows=100)
    with pytest.raises(ValueError, match="calibrated on windows of 100"):
        ks.check(sample(60, rng))
    ks.fit(reference)  # refitting forgets the calibration
    assert ks.calibration is None and not ks.check(sample(60, rng)).details.get("calibrated")


def test_a_coarser_alpha_needs_fewer_windows():
    rng = np.random.default_rng(8)
    det = KSDrift(alpha=0.05).fit(sample(300, rng))
    cal = det.calibrate(sample(800, rng), window_size=WINDOW, n_windows=19)
    assert cal.score_threshold == max(cal.scores)  # 5 % of 20: only above every clean window
