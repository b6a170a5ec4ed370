"""Detectors and estimators over windows of served data: pure functions of arrays."""

from scanflow.monitor.base import Calibration, WindowDetector, draw_windows, split_reference
from scanflow.monitor.drift import DriftCheck, DriftResult, KSDrift, MMDDrift, any_drift
from scanflow.monitor.embedding import AutoencoderEmbedding, CrossFitted, InputEmbedding, PCAEmbedding
from scanflow.monitor.outlier import ReconstructionDrift
from scanflow.monitor.streaming import ADWIN, PageHinkley, StreamDetector

__all__ = [
    "ADWIN", "AutoencoderEmbedding", "Calibration", "CrossFitted", "DriftCheck", "DriftResult",
    "InputEmbedding", "KSDrift", "MMDDrift", "PCAEmbedding", "PageHinkley", "ReconstructionDrift",
    "StreamDetector", "WindowDetector", "any_drift", "draw_windows", "split_reference",
]
