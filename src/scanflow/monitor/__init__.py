"""Detectors and estimators over windows of served data: pure functions of arrays."""

from scanflow.monitor.base import (
    Calibration,
    WindowDetector,
    draw_window_indices,
    draw_windows,
    min_calibration_windows,
    pac_exceedances,
    split_reference,
)
from scanflow.monitor.drift import (
    CheckCalibration,
    DriftCheck,
    DriftResult,
    DriftVerdict,
    KSDrift,
    MMDDrift,
    any_drift,
)
from scanflow.monitor.embedding import AutoencoderEmbedding, CrossFitted, InputEmbedding, PCAEmbedding
from scanflow.monitor.outlier import ReconstructionDrift
from scanflow.monitor.streaming import ADWIN, PageHinkley, StreamDetector

__all__ = [
    "ADWIN", "AutoencoderEmbedding", "Calibration", "CheckCalibration", "CrossFitted", "DriftCheck",
    "DriftResult", "DriftVerdict", "InputEmbedding", "KSDrift", "MMDDrift", "PCAEmbedding",
    "PageHinkley", "ReconstructionDrift", "StreamDetector", "WindowDetector", "any_drift",
    "draw_window_indices", "draw_windows", "min_calibration_windows", "pac_exceedances", "split_reference",
]
