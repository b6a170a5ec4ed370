"""Label-free accuracy: confidence-based performance estimation (CBPE, after NannyML).

Labels arrive late (or never); the model's own confidence arrives with every prediction. If
the confidence is *calibrated* - among predictions made with confidence 0.8, 80 % are right -
then the expected accuracy of a window is simply the mean calibrated confidence of its
predictions, and it can be computed the moment the window is served.

The raw confidence of most classifiers is not calibrated (an MLP is over-confident), so
:class:`CBPE` first learns a monotone map from the top-class probability to "was it right"
on labelled reference data, with isotonic regression, as NannyML does. The estimate then holds
under *covariate* shift as long as the calibration does (the model gets less sure where it
gets less right). It cannot see *concept* shift - the same inputs meaning other labels - and
it is optimistic when the model stays confident on inputs it now gets wrong; that is why the
planner lets label-joined accuracy replace the estimate as soon as enough labels exist.

Pure numpy/scikit-learn over arrays, cheap enough to run on every window.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from sklearn.isotonic import IsotonicRegression

__all__ = ["CBPE", "CBPEEstimate", "top_confidence"]


@dataclass(frozen=True)
class CBPEEstimate:
    """The estimated accuracy of one window, and what it rests on."""

    accuracy: float
    n: int
    std_error: float
    ci_low: float
    ci_high: float
    mean_confidence: float
    n_reference: int
    reference_accuracy: float

    def to_dict(self) -> dict[str, Any]:
        """Plain floats and ints, for evidence and JSON."""
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def _array(name: str, value: ArrayLike, ndim: tuple[int, ...]) -> np.ndarray:
    try:
        a = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be numeric") from None
    if a.ndim not in ndim:
        want = " or ".join(f"{d}-D" for d in ndim)
        raise ValueError(f"{name} must be {want}, got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return a


def top_confidence(proba: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, predicted class index) from class probabilities of shape (n, k), or from
    a 1-D array that already holds the confidence of each prediction (index -1)."""
    p = _array("proba", proba, (1, 2))
    if np.any(p < -1e-9) or np.any(p > 1 + 1e-9):
        raise ValueError("probabilities must lie in [0, 1]")
    if p.ndim == 1:
        return np.clip(p, 0.0, 1.0), np.full(len(p), -1)
    if p.shape[1] < 2:
        raise ValueError(f"proba needs one column per class (at least 2), got {p.shape[1]}")
    return np.clip(p.max(axis=1), 0.0, 1.0), p.argmax(axis=1)


class CBPE:
    """Estimate accuracy without labels from calibrated top-class confidence.

    ``fit`` on labelled reference data the model did not train on (a validation split, or the
    first labelled predictions it served); ``estimate`` any later window of probabilities.

    Args:
        min_reference: labelled reference predictions needed to calibrate (fewer is an error:
            an isotonic fit on a handful of points is a guess).
        z: normal quantile of the reported interval (1.96 ~ 95 %).
    """

    def __init__(self, min_reference: int = 100, z: float = 1.96) -> None:
        if min_reference < 2:
            raise ValueError("min_reference must be at least 2")
        self.min_reference = min_reference
        self.z = z
        self._iso: IsotonicRegression | None = None
        self.n_reference = 0
        self.reference_accuracy = math.nan

    @property
    def fitted(self) -> bool:
        return self._iso is not None

    def fit(self, proba: ArrayLike, y_true: ArrayLike, y_pred: ArrayLike | None = None) -> CBPE:
        """Learn P(correct | confidence). ``y_pred`` defaults to the arg-max class index, so
        give it when labels are not 0..k-1 (or when ``proba`` is 1-D confidences)."""
        conf, arg = top_confidence(proba)
        y = np.asarray(y_true)
        if y.ndim != 1 or len(y) != len(conf):
            raise ValueError(f"y_true must be 1-D with {len(conf)} labels, got shape {y.shape}")
        if y_pred is None:
            if np.all(arg == -1):
                raise ValueError("y_pred is required when proba holds confidences only")
            pred = arg
        else:
            pred = np.asarray(y_pred)
            if pred.shape != y.shape:
                raise ValueError(f"y_pred must have the shape of y_true {y.shape}, got {pred.shape}")
        if len(conf) < self.min_reference:
            raise ValueError(
                f"CBPE needs at least {self.min_reference} labelled reference predictions, got {len(conf)}"
            )
        correct = (pred == y).astype(np.float64)
        self._iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(conf, correct)
        self.n_reference = len(conf)
        self.reference_accuracy = float(correct.mean())
        return self

    def calibrated(self, proba: ArrayLike) -> np.ndarray:
        """P(correct) of each prediction."""
        if self._iso is None:
            raise RuntimeError("CBPE is not fitted: call fit() on labelled reference data first")
        conf, _ = top_confidence(proba)
        return np.clip(self._iso.predict(conf), 0.0, 1.0)

    def estimate(self, proba: ArrayLike) -> CBPEEstimate:
        """Expected accuracy of a window = mean P(correct); the interval is the spread of the
        realised accuracy of n independent predictions with those probabilities."""
        conf, _ = top_confidence(proba)
        p = self.calibrated(conf)
        n = len(p)
        acc = float(p.mean())
        se = float(math.sqrt(float(np.sum(p * (1.0 - p)))) / n)
        return CBPEEstimate(
            accuracy=acc,
            n=n,
            std_error=se,
            ci_low=max(0.0, acc - self.z * se),
            ci_high=min(1.0, acc + self.z * se),
            mean_confidence=float(conf.mean()),
            n_reference=self.n_reference,
            reference_accuracy=self.reference_accuracy,
        )
