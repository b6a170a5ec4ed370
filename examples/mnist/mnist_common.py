"""What the three teams' steps share: how a dataset is found in MLflow and how a model is built.

The teams' specs list it in `code_paths`, so their steps import it by name wherever they run
(locally, or on a Ray cluster where it is shipped with the app).
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


def published_run_id() -> str:
    """The MLflow run of the newest dataset the `data` team published."""
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
    return str(runs[0].info.run_id)


def latest_dataset(dst: Path, run_id: str | None = None) -> Path:
    """Download the newest dataset the `data` team published (an MLflow artifact), or the one
    of its run `run_id`."""
    import mlflow

    dst.mkdir(parents=True, exist_ok=True)
    return Path(mlflow.artifacts.download_artifacts(
        run_id=run_id or published_run_id(), artifact_path="datasets/mnist.npz", dst_path=str(dst)))


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
                sample_weight: np.ndarray | None = None, *, dtype: str = "float64",
                threads: int = 0, augment: float = 0.0) -> Any:
    """An MLP on pixels scaled to [0, 1] inside the model, so the server takes raw pixels.

    The scaler is fitted on the constant range [0, 255] (not on the data): every pixel is
    scaled the same way, and out-of-range values from corrupted inputs are clipped.

    ``dtype="float32"`` fits on float32 pixels (about half the matmul time; the model still
    takes float64 inputs). ``threads`` > 0 caps the BLAS threads while fitting: on the 2 shared
    cores of the case study, a 2-thread OpenBLAS fit slows down 4-8x as soon as other
    processes compete for the cores (the service and agents during a retrain), one thread
    does not. 0 keeps the library default.

    ``augment`` > 0 trains epoch by epoch, each epoch on every image once, that share of them as
    a fresh random view (``augmented_views``): a champion that has seen digits tilted, shifted,
    shrunk, blurred, dimmed and on uneven backgrounds loses less to such a drift before any
    retrain, and its retrain starts closer (examples/mnist/MEASUREMENTS.md, "The retrain method").
    """
    import warnings
    from contextlib import nullcontext

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import MinMaxScaler
    from threadpoolctl import threadpool_limits

    d = x.shape[1]
    scaler = MinMaxScaler(clip=True).fit(np.array([[0.0] * d, [255.0] * d]))
    mlp = MLPClassifier(hidden_layer_sizes=(hidden,), max_iter=max_iter, random_state=seed)
    xs = scaler.transform(np.asarray(x, dtype=np.dtype(dtype)))
    limit = threadpool_limits(limits=threads, user_api="blas") if threads > 0 else nullcontext()
    with warnings.catch_warnings(), limit:
        warnings.simplefilter("ignore", ConvergenceWarning)
        if augment > 0:
            if sample_weight is not None:
                raise ValueError("augment and sample_weight do not combine")
            rng = np.random.default_rng(seed)
            classes = np.unique(y)
            for _ in range(max_iter):
                xe = xs.copy()
                pick = rng.random(len(y)) < augment
                xe[pick] = scaler.transform(augmented_views(x[pick], rng).astype(xs.dtype))
                order = rng.permutation(len(y))
                mlp.partial_fit(xe[order], y[order], classes=classes)
        elif sample_weight is not None:
            mlp.fit(xs, y, sample_weight=sample_weight)
        else:
            mlp.fit(xs, y)
    return Pipeline([("scale", scaler), ("mlp", mlp)])


def augmented_views(x: np.ndarray, rng: np.random.Generator, *, rotate: float = 25.0,
                    shift: float = 2.5, scale: tuple[float, float] = (0.75, 1.1), shear: float = 0.3,
                    blur: float = 0.3, photometric: float = 0.5) -> np.ndarray:
    """One random view of each flat square image (float32, 0-255): a random affine warp (a
    rotation up to ``rotate`` degrees, a shift up to ``shift`` pixels, a scale in ``scale``, a
    shear up to ``shear``), a Gaussian blur (sigma 0.7) on a ``blur`` share, and on a
    ``photometric`` share a lower contrast (x0.5-1) over a background lifted by up to half the
    range, flat or a smooth random field.

    Why: the usual robustness augmentations of a digit classifier, generic rather than fitted to
    one corruption; measured offline on the 14 corruptions (``explore_adaptation.py``).
    """
    from scipy import ndimage

    n = len(x)
    side = int(round(np.sqrt(np.asarray(x).reshape(n, -1).shape[1])))
    img = np.asarray(x, dtype=np.float32).reshape(n, side, side)
    theta = np.deg2rad(rng.uniform(-rotate, rotate, n))
    c, s = np.cos(theta), np.sin(theta)
    rot = np.stack([np.stack([c, s], -1), np.stack([-s, c], -1)], 1)
    sh = np.zeros((n, 2, 2))
    sh[:, 0, 0] = sh[:, 1, 1] = 1.0
    sh[:, 1, 0] = rng.uniform(-shear, shear, n)
    # output -> input coordinates about the centre (as ndimage.affine_transform takes them)
    a = (rot @ sh) / rng.uniform(scale[0], scale[1], n)[:, None, None]
    centre = np.array([(side - 1) / 2.0] * 2)
    rows, cols = np.meshgrid(np.arange(float(side)), np.arange(float(side)), indexing="ij")
    grid = np.stack([rows - centre[0], cols - centre[1]])
    unit = side / 28.0  # shift and blur are in pixels of a 28-pixel digit
    coords = (np.einsum("nij,jhw->inhw", a, grid)
              + (centre + unit * rng.uniform(-shift, shift, (n, 2))).T[:, :, None, None])
    index = np.broadcast_to(np.arange(n, dtype=np.float64)[:, None, None], coords.shape[1:])
    out = ndimage.map_coordinates(img, np.concatenate([index[None], coords]), order=1,
                                  mode="constant", cval=0.0)
    blurred = rng.random(n) < blur
    if blurred.any():
        out[blurred] = ndimage.gaussian_filter(out[blurred], sigma=(0, 0.7 * unit, 0.7 * unit))
    dim = rng.random(n) < photometric
    m = int(dim.sum())
    if m:
        field = ndimage.gaussian_filter(rng.standard_normal((m, side, side)).astype(np.float32),
                                        sigma=(0, side / 7, side / 7))
        lo, hi = field.min(axis=(1, 2), keepdims=True), field.max(axis=(1, 2), keepdims=True)
        field = (field - lo) / np.maximum(hi - lo, 1e-6)
        smooth = rng.uniform(0.0, 1.0, (m, 1, 1))
        level = rng.uniform(0.0, 0.5 * 255.0, (m, 1, 1))
        out[dim] = out[dim] * rng.uniform(0.5, 1.0, (m, 1, 1)) + level * (smooth * field + 1 - smooth)
    return np.clip(out, 0.0, 255.0).reshape(n, -1)


def fine_tune(model: Any, x: np.ndarray, y: np.ndarray, max_iter: int, seed: int, *,
              learning_rate: float, dtype: str = "float64", threads: int = 0) -> Any:
    """A copy of a ``build_model`` pipeline trained ``max_iter`` more epochs on (x, y).

    Why: a retrain that starts from the champion keeps what it already learnt (all the epochs
    of every earlier training) and only has to move towards the new samples; from scratch, the
    same epoch budget buys a weaker model. Adam starts afresh at ``learning_rate`` (below the
    default 1e-3, so the first steps do not wreck the champion's weights); the stopping
    counters of the earlier fit are reset so they cannot end this one early.
    """
    import copy
    import warnings
    from contextlib import nullcontext

    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits

    pipe = copy.deepcopy(model)
    scaler, mlp = pipe.named_steps["scale"], pipe.named_steps["mlp"]
    dt = np.dtype(dtype)
    mlp.coefs_ = [c.astype(dt) for c in mlp.coefs_]
    mlp.intercepts_ = [b.astype(dt) for b in mlp.intercepts_]
    mlp._no_improvement_count = 0
    mlp.best_loss_ = np.inf
    mlp.set_params(warm_start=True, max_iter=max_iter, learning_rate_init=learning_rate,
                   random_state=seed)
    xs = scaler.transform(np.asarray(x, dtype=dt))
    limit = threadpool_limits(limits=threads, user_api="blas") if threads > 0 else nullcontext()
    with warnings.catch_warnings(), limit:
        warnings.simplefilter("ignore", ConvergenceWarning)
        mlp.fit(xs, y)
    return pipe


def mlp_hidden(model: Any) -> int | None:
    """The hidden width of a ``build_model`` pipeline (None for anything else): a retrain only
    fine-tunes a champion of the architecture it was asked for."""
    steps = getattr(model, "named_steps", {})
    mlp = steps.get("mlp")
    if "scale" not in steps or not hasattr(mlp, "coefs_") or len(mlp.coefs_) != 2:
        return None
    return int(mlp.coefs_[0].shape[1])


def shifted_copies(x: np.ndarray, copies: int, max_shift: int, rng: np.random.Generator
                   ) -> np.ndarray:
    """``copies`` views of flat 28x28 images: the originals, then versions of them shifted by
    up to ``max_shift`` pixels (a random row and column offset per image and copy), the
    border repeating the edge pixels so a grey or cloudy background carries on.

    Why: a few labelled drifted digits repeated as exact copies are memorised, while shifted
    views teach the drift on more varied strokes; a digit keeps its label under a one-pixel
    shift whatever the corruption, so this assumes nothing about the drift. Measured on fog-2,
    from scratch, 15 epochs, 1,750 labelled digits: 0.949 with exact copies, 0.952 with shifted
    views (2-3 seeds each).
    """
    flat_x = np.asarray(x).reshape(len(x), -1)
    n, side = len(flat_x), int(round(np.sqrt(flat_x.shape[1])))
    if side * side != flat_x.shape[1]:
        raise ValueError(f"images must be square when flattened, got {flat_x.shape[1]} pixels")
    if copies < 1 or max_shift < 0:
        raise ValueError(f"need copies >= 1 and max_shift >= 0, got {copies}, {max_shift}")
    images = flat_x.reshape(n, side, side)
    p = max_shift
    padded = np.pad(images, ((0, 0), (p, p), (p, p)), mode="edge")
    grid = np.arange(side)
    out = [flat_x]
    for _ in range(copies - 1):
        dy = rng.integers(-p, p + 1, size=n)
        dx = rng.integers(-p, p + 1, size=n)
        rows = (grid[None, :] + p - dy[:, None])[:, :, None]
        cols = (grid[None, :] + p - dx[:, None])[:, None, :]
        out.append(padded[np.arange(n)[:, None, None], rows, cols].reshape(n, -1))
    return np.concatenate(out)


def accuracy(model: Any, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(model.predict(flat(x)) == y)) if len(y) else float("nan")
