"""Input checks shared by the detectors: refuse what would give silent nonsense, name the problem."""

from __future__ import annotations

from typing import Any

import numpy as np


def as_matrix(x: Any, what: str, min_rows: int = 1) -> np.ndarray:
    """Validate and flatten to float64 (n, d); higher dimensions (images) are flattened."""
    try:
        arr = np.asarray(x)
    except Exception as exc:  # ragged lists and the like
        raise ValueError(f"{what} is not an array: {exc}") from exc
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.bool_)
    ):
        raise ValueError(f"{what} must be numeric, got dtype {arr.dtype}")
    if arr.ndim < 2:
        raise ValueError(
            f"{what} must be 2-D (n_samples, n_features) or more, got shape {arr.shape}"
        )
    if arr.shape[0] < min_rows:
        if arr.shape[0] == 0:
            raise ValueError(f"{what} is empty (0 samples)")
        raise ValueError(f"{what} needs at least {min_rows} samples, got {arr.shape[0]}")
    arr = arr.reshape(arr.shape[0], -1)
    if arr.shape[1] == 0:
        raise ValueError(f"{what} has 0 features")
    if np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"{what} must be real-valued, got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    bad = ~np.isfinite(arr)
    if bad.any():
        rows = np.unique(np.nonzero(bad)[0])
        raise ValueError(
            f"{what} has {int(bad.sum())} non-finite values (NaN or inf) in {rows.size} samples, "
            f"first at sample {int(rows[0])}"
        )
    return arr


def check_window(window: Any, n_features: int | None, name: str, min_rows: int,
                 what: str = "window") -> np.ndarray:
    """The window must match the fitted reference's features."""
    if n_features is None:
        raise ValueError(f"{name} is not fitted: call fit(reference) before checking a {what}")
    arr = as_matrix(window, what, min_rows=min_rows)
    if arr.shape[1] != n_features:
        raise ValueError(
            f"{what} has {arr.shape[1]} features but the reference has {n_features}"
        )
    return arr


def check_alpha(alpha: float, name: str = "alpha") -> float:
    """A significance level / target false-alarm rate strictly between 0 and 1."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating)):
        raise ValueError(f"{name} must be a number in (0, 1), got {alpha!r}")
    if not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {alpha}")
    return float(alpha)


def check_int(value: Any, name: str, minimum: int) -> int:
    """A whole number >= minimum (bools refused: `True` is not a count)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)
