"""The step-side contracts of the built-in agents: what a retrain step reads and publishes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from scanflow.tracking.contracts import (
    ContractError,
    NewData,
    evaluate_candidate,
    read_new_data,
    write_new_data,
)


class Threshold:
    """A one-feature classifier: class 1 above `k`."""

    def __init__(self, k: float) -> None:
        self.k = k

    def predict(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x)[:, 0] > self.k).astype(int)


def test_new_data_round_trips_and_names_what_is_missing(tmp_path: Path) -> None:
    data = NewData(np.ones((4, 2)), np.arange(4), np.zeros((2, 2)), np.arange(2))
    got = read_new_data(write_new_data(tmp_path / "d.npz", data))
    assert got.x_new.shape == (4, 2) and list(got.y_holdout) == [0, 1]
    np.savez(tmp_path / "bad.npz", x_new=np.ones(3), y_new=np.ones(3))
    with pytest.raises(ContractError, match="lacks array\\(s\\) x_holdout, y_holdout"):
        read_new_data(tmp_path / "bad.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ContractError, match="not a readable .npz"):
        read_new_data(tmp_path / "junk.npz")
    with pytest.raises(ContractError, match="is not a file"):
        read_new_data(tmp_path / "missing.npz")


def test_evaluation_counts_the_rows_only_one_model_gets_right() -> None:
    x = np.arange(10).reshape(-1, 1)
    y = (x[:, 0] > 4).astype(int)
    ev = evaluate_candidate(Threshold(4), Threshold(6), (x, y), (x[:5], y[:5]))
    assert ev["candidate_acc_new"] == 1.0 and ev["champion_acc_new"] == 0.8
    assert ev["new_candidate_only"] == 2 and ev["new_champion_only"] == 0
    assert ev["n_holdout"] == 10 and ev["n_clean"] == 5
    with pytest.raises(ContractError, match="empty"):
        evaluate_candidate(Threshold(4), Threshold(6), (x[:0], y[:0]), (x, y))
