"""Representations fitted on the reference: PCA and a small autoencoder.

Drift tests on 784 raw pixels waste power (a Bonferroni correction over 784 features, distances
dominated by noise); a low-dimensional representation learned on the clean reference concentrates
what the data looks like, and its **reconstruction error** measures what it does not look like
(noise, strokes, fog). Both embeddings here scale their input with constants learned on the
reference, the same at fit and at inference; Scanflow's original detector min-max scaled each
batch on its own, which hides a brightness shift and makes scores incomparable across batches.
"""

from __future__ import annotations

import hashlib
import warnings
from typing import Any, Literal, Protocol, Self

import numpy as np
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPRegressor

from scanflow.monitor._validate import as_matrix, check_int, check_window

__all__ = ["AutoencoderEmbedding", "CrossFitted", "Embedding", "InputEmbedding", "InputScaler",
           "PCAEmbedding"]

Scaling = Literal["range", "standard"]


class Embedding(Protocol):
    """What a detector needs from a representation (both classes here implement it)."""

    @property
    def n_features(self) -> int | None: ...

    def fit(self, reference: Any) -> Self: ...

    def transform(self, x: Any) -> np.ndarray: ...

    def reconstruction_error(self, x: Any) -> np.ndarray: ...

    def unfitted(self) -> Self: ...

    def describe(self) -> dict[str, Any]: ...


class InputScaler:
    """Input scaling learned once on the reference and then frozen.

    ``"range"`` maps the reference's global minimum and maximum to 0 and 1 (one pair for all
    features: pixels keep their relative scale, uint8 images become [0, 1]). ``"standard"``
    centres and divides each feature by its reference standard deviation (floored at 1e-3 of
    the average one, so a nearly constant feature cannot blow up); for tabular data in mixed
    units.
    """

    def __init__(self, scaling: Scaling = "range") -> None:
        if scaling not in ("range", "standard"):
            raise ValueError(f"scaling must be 'range' or 'standard', got {scaling!r}")
        self.scaling: Scaling = scaling
        self.offset_: np.ndarray | None = None
        self.scale_: np.ndarray | None = None

    def fit(self, reference: np.ndarray) -> InputScaler:
        if self.scaling == "range":
            lo, hi = float(reference.min()), float(reference.max())
            self.offset_ = np.full(reference.shape[1], lo)
            self.scale_ = np.full(reference.shape[1], hi - lo if hi > lo else 1.0)
        else:
            std = reference.std(axis=0)
            floor = max(float(std.mean()) * 1e-3, 1e-12)
            self.offset_ = reference.mean(axis=0)
            self.scale_ = np.maximum(std, floor)
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        assert self.offset_ is not None and self.scale_ is not None
        return (x - self.offset_) / self.scale_


class PCAEmbedding:
    """The top principal components of the (scaled) reference; a linear autoencoder.

    ``transform`` gives the coordinates on the ``n_components`` directions,
    ``reconstruction_error`` the mean squared distance to that subspace per sample.

    Args:
        n_components: directions kept (default 32; capped by the reference's size).
        scaling: input scaling learned on the reference (see :class:`InputScaler`).
        seed: seeds sklearn's randomized SVD.
    """

    def __init__(self, n_components: int = 32, scaling: Scaling = "range", seed: int = 0) -> None:
        self.n_components = check_int(n_components, "n_components", 1)
        self.scaler = InputScaler(scaling)
        self.seed = int(seed)
        self._pca: PCA | None = None
        self._n_features: int | None = None

    @property
    def n_features(self) -> int | None:
        return self._n_features

    def unfitted(self) -> PCAEmbedding:
        """A fresh copy with the same settings (for cross-fitting)."""
        return PCAEmbedding(self.n_components, self.scaler.scaling, self.seed)

    def fit(self, reference: Any) -> PCAEmbedding:
        ref = as_matrix(reference, "reference", min_rows=2)
        scaled = self.scaler.fit(ref).transform(ref)
        k = min(self.n_components, ref.shape[0], ref.shape[1])
        with np.errstate(invalid="ignore", divide="ignore"):  # a constant reference is legal
            self._pca = PCA(n_components=k, random_state=self.seed).fit(scaled)
        self._n_features = ref.shape[1]
        return self

    def _scaled(self, x: Any) -> np.ndarray:
        return self.scaler.transform(check_window(x, self._n_features, "PCAEmbedding", 1, "input"))

    def _parts(self, x: Any) -> tuple[np.ndarray, np.ndarray]:
        assert self._pca is not None
        centred = self._scaled(x) - self._pca.mean_
        z = centred @ self._pca.components_.T
        err = np.maximum(np.einsum("ij,ij->i", centred, centred) - np.einsum("ij,ij->i", z, z), 0.0)
        return z, err / centred.shape[1]

    def transform(self, x: Any) -> np.ndarray:
        return self._parts(x)[0]

    def reconstruction_error(self, x: Any) -> np.ndarray:
        return self._parts(x)[1]

    def describe(self) -> dict[str, Any]:
        explained = None
        if self._pca is not None:
            explained = float(np.nan_to_num(self._pca.explained_variance_ratio_.sum(), nan=1.0))
        return {
            "embedding": "pca",
            "n_components": int(self._pca.n_components_) if self._pca is not None else self.n_components,
            "explained_variance": explained,
            "scaling": self.scaler.scaling,
        }


class AutoencoderEmbedding:
    """A small one-hidden-layer autoencoder (sklearn's ``MLPRegressor``, d → hidden → d).

    Trained to reproduce the scaled reference; ``transform`` gives the hidden-layer activations
    (the embedding), ``reconstruction_error`` the mean squared error per sample. No torch: it
    trains on 1,000 MNIST images in a few seconds on one core.

    Args:
        hidden: width of the bottleneck (default 32).
        max_iter: training epochs (default 200; a ConvergenceWarning at the end is silenced,
            the loss has flattened long before).
        scaling: input scaling learned on the reference (see :class:`InputScaler`).
        seed: seeds the weights and the batch order, so a fit is reproducible.
    """

    def __init__(self, hidden: int = 32, max_iter: int = 200, scaling: Scaling = "range",
                 seed: int = 0) -> None:
        self.hidden = check_int(hidden, "hidden", 1)
        self.max_iter = check_int(max_iter, "max_iter", 1)
        self.scaler = InputScaler(scaling)
        self.seed = int(seed)
        self._mlp: MLPRegressor | None = None
        self._n_features: int | None = None

    @property
    def n_features(self) -> int | None:
        return self._n_features

    def unfitted(self) -> AutoencoderEmbedding:
        return AutoencoderEmbedding(self.hidden, self.max_iter, self.scaler.scaling, self.seed)

    def fit(self, reference: Any) -> AutoencoderEmbedding:
        ref = as_matrix(reference, "reference", min_rows=2)
        scaled = self.scaler.fit(ref).transform(ref)
        mlp = MLPRegressor(hidden_layer_sizes=(self.hidden,), activation="relu",
                           max_iter=self.max_iter, random_state=self.seed,
                           batch_size=min(200, len(ref)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            self._mlp = mlp.fit(scaled, scaled)
        self._n_features = ref.shape[1]
        return self

    def _scaled(self, x: Any) -> np.ndarray:
        return self.scaler.transform(
            check_window(x, self._n_features, "AutoencoderEmbedding", 1, "input"))

    def _hidden(self, scaled: np.ndarray) -> np.ndarray:
        assert self._mlp is not None
        return np.maximum(scaled @ self._mlp.coefs_[0] + self._mlp.intercepts_[0], 0.0)

    def _error(self, scaled: np.ndarray, hidden: np.ndarray) -> np.ndarray:
        assert self._mlp is not None
        recon = hidden @ self._mlp.coefs_[1] + self._mlp.intercepts_[1]
        return np.mean((scaled - recon) ** 2, axis=1)

    def transform(self, x: Any) -> np.ndarray:
        return self._hidden(self._scaled(x))

    def reconstruction_error(self, x: Any) -> np.ndarray:
        scaled = self._scaled(x)
        return self._error(scaled, self._hidden(scaled))

    def describe(self) -> dict[str, Any]:
        return {
            "embedding": "autoencoder",
            "hidden": self.hidden,
            "epochs": int(self._mlp.n_iter_) if self._mlp is not None else None,
            "final_loss": float(self._mlp.loss_) if self._mlp is not None else None,
            "scaling": self.scaler.scaling,
        }


class InputEmbedding:
    """The scaled input itself (no learning beyond the scaling); for MMD on raw features."""

    def __init__(self, scaling: Scaling = "range") -> None:
        self.scaler = InputScaler(scaling)
        self._n_features: int | None = None

    @property
    def n_features(self) -> int | None:
        return self._n_features

    def unfitted(self) -> InputEmbedding:
        return InputEmbedding(self.scaler.scaling)

    def fit(self, reference: Any) -> InputEmbedding:
        ref = as_matrix(reference, "reference", min_rows=1)
        self.scaler.fit(ref)
        self._n_features = ref.shape[1]
        return self

    def transform(self, x: Any) -> np.ndarray:
        return self.scaler.transform(check_window(x, self._n_features, "InputEmbedding", 1, "input"))

    def reconstruction_error(self, x: Any) -> np.ndarray:
        return np.zeros(len(self.transform(x)))

    def describe(self) -> dict[str, Any]:
        return {"embedding": "input", "scaling": self.scaler.scaling}


class CrossFitted:
    """Reconstruction errors that never come from a model that saw the sample.

    A model reconstructs its own training data too well, so errors of the reference by a model
    fitted on it are smaller than errors of new clean data. Here ``folds`` copies of the
    embedding are each fitted on all folds of the reference but one; a reference sample is
    scored by the copy that left its fold out, and a new sample by the copy its content hashes
    to (so the same input always gets the same score, whatever batch it comes in). Reference and
    new clean scores are then exchangeable: thresholds taken from the reference's scores mean
    what they say on new data.
    """

    def __init__(self, embedding: Embedding, folds: int = 5, seed: int = 0) -> None:
        self.embedding = embedding
        self.folds = check_int(folds, "folds", 2)
        self.seed = int(seed)
        self.models: list[Embedding] = []

    def fit(self, reference: np.ndarray) -> np.ndarray:
        """Fit the fold models; return the reference's out-of-fold errors."""
        if len(reference) < 2 * self.folds:
            raise ValueError(f"reference needs at least {2 * self.folds} samples for {self.folds} "
                             f"folds, got {len(reference)}")
        order = np.random.default_rng(self.seed).permutation(len(reference))
        errors = np.empty(len(reference))
        self.models = []
        for part in np.array_split(order, self.folds):
            rest = np.setdiff1d(order, part, assume_unique=True)
            model = self.embedding.unfitted().fit(reference[rest])
            errors[part] = model.reconstruction_error(reference[part])
            self.models.append(model)
        return errors

    def errors(self, x: np.ndarray) -> np.ndarray:
        """Each row's error under the fold model its content hashes to."""
        if not self.models:
            raise ValueError("CrossFitted is not fitted: call fit(reference) first")
        fold = np.frombuffer(b"".join(
            hashlib.blake2b(row.tobytes(), digest_size=4, key=b"scanflow").digest()
            for row in np.ascontiguousarray(x, dtype=np.float64)), dtype="<u4") % self.folds
        out = np.empty(len(x))
        for j in np.unique(fold):
            rows = fold == j
            out[rows] = self.models[j].reconstruction_error(x[rows])
        return out
