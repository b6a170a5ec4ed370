"""Streaming detectors for scalar signals: quiet on a steady signal, quick on a change."""

from __future__ import annotations

import json

import numpy as np
import pytest

from scanflow.monitor import ADWIN, PageHinkley


def test_adwin_finds_a_rise_of_the_error_rate():
    rng = np.random.default_rng(0)
    errors = np.concatenate([rng.binomial(1, 0.03, 3000), rng.binomial(1, 0.12, 2000)])
    detector = ADWIN()
    hits = detector.update_many(errors)
    assert hits and all(h >= 3000 for h in hits)
    assert hits[0] < 3600  # within 600 requests of the change
    assert detector.estimation == pytest.approx(0.12, abs=0.04)


def test_adwin_is_quiet_on_a_steady_confidence():
    rng = np.random.default_rng(1)
    detector = ADWIN()
    assert detector.update_many(rng.beta(20, 2, size=10_000)) == []
    assert detector.n_seen == 10_000 and not detector.drift_detected


def test_page_hinkley_works_in_units_of_the_signal_spread():
    """Latency in seconds: river's raw thresholds (50 units) would never fire on it."""
    rng = np.random.default_rng(2)
    latency = np.concatenate([rng.normal(0.050, 0.010, 1000), rng.normal(0.060, 0.010, 1000)])
    detector = PageHinkley(mode="up")
    hits = detector.update_many(latency)
    assert hits and hits[0] >= 1000 and hits[0] < 1150
    assert detector.scale == pytest.approx(0.010, rel=0.3)
    state = detector.to_dict()
    assert json.loads(json.dumps(state)) == state and state["detections"] == hits


def test_page_hinkley_false_alarms_are_rare_on_steady_noise():
    rng = np.random.default_rng(3)
    detector = PageHinkley()
    hits = detector.update_many(rng.normal(10.0, 2.0, 20_000))
    assert len(hits) <= 2, hits  # measured: about 1 per 25,000 values


def test_page_hinkley_with_a_known_scale_skips_the_warmup():
    detector = PageHinkley(scale=1.0, warmup=10)
    values = [0.0] * 30 + [3.0] * 30
    hits = detector.update_many(values)
    assert hits and 30 <= hits[0] < 45


def test_after_a_change_the_new_level_is_the_new_normal():
    rng = np.random.default_rng(4)
    detector = PageHinkley()
    hits = detector.update_many(np.concatenate([rng.normal(0, 1, 500), rng.normal(3, 1, 3000)]))
    assert len(hits) == 1 and 500 <= hits[0] < 540
    assert detector.detections == hits and detector.n_seen == 3500


@pytest.mark.parametrize("detector", [ADWIN, PageHinkley])
def test_bad_values_and_settings_are_refused(detector: type):
    d = detector()
    for bad in (float("nan"), float("inf"), "0.3", None, True, [1.0]):
        with pytest.raises(ValueError, match="number|finite"):
            d.update(bad)
    assert d.n_seen == 0
    d.update(np.float32(0.5))
    assert d.n_seen == 1


def test_settings_are_checked():
    with pytest.raises(ValueError, match="delta"):
        ADWIN(delta=0)
    with pytest.raises(ValueError, match="mode"):
        PageHinkley(mode="sideways")
    with pytest.raises(ValueError, match="scale"):
        PageHinkley(scale=-1.0)
    with pytest.raises(ValueError, match="warmup"):
        PageHinkley(warmup=1)
