"""The case study's retrain recipe: shifted views of the new samples, fine-tuning the champion,
and the `train` step that uses them. Small tests on scikit-learn's 8x8 digits (no download);
one slow test on the real MNIST checks the recipe's accuracy claim in the README."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "mnist"
sys.path.insert(0, str(EXAMPLES))

from mnist_common import build_model, fine_tune, flat, mlp_hidden, shifted_copies  # noqa: E402


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits as uint8 0..255 images: (x_train, y_train, x_test, y_test)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.clip(d.images * 16, 0, 255).astype(np.uint8)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], d.target[order]
    return x[:1200], y[:1200], x[1200:], y[1200:]


def _lift(x: np.ndarray) -> np.ndarray:
    """A brightness drift: the background turns grey."""
    return np.clip(x.astype(np.int64) + 110, 0, 255).astype(np.uint8)


def test_shifted_copies_keep_the_originals_and_move_each_view_by_at_most_the_shift() -> None:
    img = np.zeros((1, 28, 28))
    img[0, 10, 12] = 255
    views = shifted_copies(img.reshape(1, -1), 40, 1, np.random.default_rng(0)).reshape(-1, 28, 28)
    assert views.shape == (40, 28, 28)
    assert np.array_equal(views[0], img[0])  # the labelled sample itself comes first
    spots = {tuple(np.argwhere(v == 255)[0]) for v in views}
    assert all(abs(r - 10) <= 1 and abs(c - 12) <= 1 for r, c in spots)
    assert len(spots) > 4  # the views really are shifted, not copies


def test_shifted_copies_carry_a_grey_background_to_the_border() -> None:
    # A brightness-drifted image must not gain a black border: that is not the drift.
    grey = np.full((3, 8 * 8), 51.0)
    views = shifted_copies(grey, 5, 2, np.random.default_rng(1))
    assert np.all(views == 51.0)


def test_shifted_copies_refuse_non_square_images_and_bad_counts() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="square"):
        shifted_copies(np.zeros((2, 30)), 2, 1, rng)
    with pytest.raises(ValueError, match="copies"):
        shifted_copies(np.zeros((2, 64)), 0, 1, rng)


def test_fine_tune_adapts_the_champion_to_the_drift_and_leaves_it_untouched(digits) -> None:
    x_train, y_train, x_test, y_test = digits
    champion = build_model(flat(x_train), y_train, 32, 60, 0)
    before = champion.predict(flat(x_test)).copy()
    clean_acc = float(np.mean(before == y_test))
    drift_acc = float(np.mean(champion.predict(flat(_lift(x_test))) == y_test))
    new = shifted_copies(flat(_lift(x_train[:200])), 5, 1, np.random.default_rng(0))
    x = np.concatenate([flat(x_train), new])
    y = np.concatenate([y_train, np.tile(y_train[:200], 5)])

    tuned = fine_tune(champion, x, y, 30, 0, learning_rate=1e-3, dtype="float32", threads=1)

    tuned_drift = float(np.mean(tuned.predict(flat(_lift(x_test))) == y_test))
    tuned_clean = float(np.mean(tuned.predict(flat(x_test)) == y_test))
    assert tuned_drift >= drift_acc + 0.2, (drift_acc, tuned_drift)
    assert tuned_clean >= clean_acc - 0.03, (clean_acc, tuned_clean)
    assert np.array_equal(champion.predict(flat(x_test)), before)  # the champion is a copy's origin
    assert mlp_hidden(tuned) == 32


def _run_train(tmp: Path, dataset: Path, new: Path, hidden: int, init: Path) -> tuple[str, Path]:
    out = tmp / f"model-{hidden}.pkl"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"file://{tmp / 'mlruns'}",
           "MLFLOW_ALLOW_FILE_STORE": "true", "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "datascience" / "steps" / "train.py"), "--dataset", str(dataset),
         "--model", str(out), "--hidden", str(hidden), "--max_iter", "3", "--oversample", "3",
         "--shift", "1", "--init_from", str(init), "--learning_rate", "0.0003",
         "--dtype", "float32", "--threads", "1", "--new_data", str(new)],
        env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, out


def test_train_step_continues_from_a_champion_of_its_architecture_else_starts_afresh(
        digits, tmp_path: Path) -> None:
    x_train, y_train, x_test, y_test = digits
    dataset = tmp_path / "mnist.npz"
    np.savez(dataset, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    new = tmp_path / "new.npz"
    np.savez(new, x_new=flat(_lift(x_test[:150])), y_new=y_test[:150],
             x_holdout=flat(_lift(x_test[150:])), y_holdout=y_test[150:])
    champion = build_model(flat(x_train), y_train, 32, 60, 0)
    init = tmp_path / "champion.pkl"
    init.write_bytes(pickle.dumps(champion))

    said, path = _run_train(tmp_path, dataset, new, 32, init)
    assert "continued from" in said, said
    tuned = pickle.loads(path.read_bytes())
    w0, w1 = champion.named_steps["mlp"].coefs_[0], tuned.named_steps["mlp"].coefs_[0]
    # Continued, not re-initialised: the first layer still looks like the champion's.
    assert np.corrcoef(w0.ravel(), w1.ravel())[0, 1] > 0.9

    said, path = _run_train(tmp_path, dataset, new, 16, init)
    assert "training from scratch instead" in said, said
    assert mlp_hidden(pickle.loads(path.read_bytes())) == 16


@pytest.mark.slow
def test_recipe_brings_brightness_then_fog_within_three_points_of_clean(mnist) -> None:
    """The README's claim, in the case study's order: the clean champion is fine-tuned on
    1,050 labelled brightness-2 training digits, then that champion on 1,050 fog-2 ones;
    both are judged on corrupted *test* digits they never saw."""
    from corruptions import corrupt
    from mnist_common import accuracy

    x_train, y_train, x_test, y_test = mnist
    champion = build_model(flat(x_train), y_train, 128, 5, 0, dtype="float32", threads=1)
    clean = accuracy(champion, x_test, y_test)
    pool = np.random.default_rng(3).permutation(len(y_train))
    rng = np.random.default_rng(0)
    results = {}
    for name, idx in (("brightness", pool[:1050]), ("fog", pool[1050:2100])):
        new = shifted_copies(flat(corrupt(x_train[idx], name, 2, seed=2)), 5, 1, rng)
        x = np.concatenate([flat(x_train), new])
        y = np.concatenate([y_train, np.tile(y_train[idx], 5)])
        champion = fine_tune(champion, x, y, 10, 0, learning_rate=3e-4, dtype="float32", threads=1)
        results[name] = accuracy(champion, corrupt(x_test, name, 2, seed=1), y_test)
        results[f"clean_after_{name}"] = accuracy(champion, x_test, y_test)
    assert results["brightness"] >= clean - 0.03, (clean, results)
    assert results["fog"] >= clean - 0.03, (clean, results)
    assert min(results["clean_after_brightness"], results["clean_after_fog"]) >= clean - 0.01, results
