"""What the three teams' steps share: how a dataset is found in MLflow and how a model is built.

Step scripts run with the team's folder as working directory; they import this module by
putting `examples/mnist` on `sys.path` (see each script's first lines).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

DATA_EXPERIMENT = "mnist/data"
MODEL_NAME = "mnist-clf"


def workspace() -> Path:
    return Path(os.environ.get("SCANFLOW_WORKSPACE", ".scanflow")).resolve()


def latest_dataset(dst: Path) -> Path:
    """Download the newest dataset the `data` team published (an MLflow artifact)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    exp = client.get_experiment_by_name(DATA_EXPERIMENT)
    if exp is None:
        raise SystemExit("no dataset published yet: run the data team's `publish` workflow first")
    runs = client.search_runs(
        [exp.experiment_id], "tags.`scanflow.step` = 'publish' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=1,
    )
    if not runs:
        raise SystemExit("no finished `publish` run in mnist/data")
    dst.mkdir(parents=True, exist_ok=True)
    return Path(mlflow.artifacts.download_artifacts(
        run_id=runs[0].info.run_id, artifact_path="datasets/mnist.npz", dst_path=str(dst)))


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


REFERENCE_SIZE = 1000
SPLIT_SEED = 0


def test_split(n_test: int, reference_size: int = REFERENCE_SIZE, seed: int = SPLIT_SEED
               ) -> tuple[np.ndarray, np.ndarray]:
    """(reference indices, served indices) of the test set, disjoint and shuffled.

    The reference the monitor compares with is a held-out clean sample of the *test*
    distribution: MNIST's train and test sets come from different writers, and a
    test-vs-train MMD on windows of 500 is borderline significant, which would make the
    clean phase raise false alarms that have nothing to do with the corruption under study.
    """
    perm = np.random.default_rng(seed).permutation(n_test)
    return perm[:reference_size], perm[reference_size:]


def reference_sample(d: dict[str, np.ndarray], reference_size: int = REFERENCE_SIZE) -> np.ndarray:
    ref_idx, _ = test_split(len(d["y_test"]), reference_size)
    return flat(d["x_test"][ref_idx]).astype(np.uint8)


def flat(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64).reshape(len(x), -1)


def build_model(x: np.ndarray, y: np.ndarray, hidden: int, max_iter: int, seed: int,
                sample_weight: np.ndarray | None = None) -> Any:
    """An MLP on pixels scaled to [0, 1] inside the model, so the server takes raw pixels.

    The scaler is fitted on the constant range [0, 255] (not on the data): every pixel is
    scaled the same way, and out-of-range values from corrupted inputs are clipped.
    """
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import MinMaxScaler

    d = x.shape[1]
    scaler = MinMaxScaler(clip=True).fit(np.array([[0.0] * d, [255.0] * d]))
    mlp = MLPClassifier(hidden_layer_sizes=(hidden,), max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if sample_weight is not None:
            mlp.fit(scaler.transform(x), y, sample_weight=sample_weight)
        else:
            mlp.fit(scaler.transform(x), y)
    return Pipeline([("scale", scaler), ("mlp", mlp)])


def accuracy(model: Any, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(model.predict(flat(x)) == y)) if len(y) else float("nan")
