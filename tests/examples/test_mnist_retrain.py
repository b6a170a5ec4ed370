"""The case study's retrain recipe: shifted views of the new samples, fine-tuning the champion,
and the `retrain` step that uses them. Small tests on scikit-learn's 8x8 digits (no download);
one slow test on the real MNIST checks the recipe's accuracy claim in the README."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "mnist"
sys.path.insert(0, str(EXAMPLES))

import mnist_cnn  # noqa: E402
from mnist_common import (  # noqa: E402
    augmented_views,
    build_model,
    fine_tune,
    flat,
    mlp_hidden,
    shifted_copies,
)


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


def test_augmented_views_are_new_images_in_range_and_reproducible() -> None:
    img = np.zeros((200, 28 * 28))
    img[:, 28 * 14 + 10: 28 * 14 + 18] = 255.0  # a bar across the middle
    views = augmented_views(img, np.random.default_rng(0))
    assert views.shape == img.shape and views.min() >= 0 and views.max() <= 255
    assert np.mean(np.any(views != img, axis=1)) > 0.95  # (almost) every view moved
    assert np.array_equal(views, augmented_views(img, np.random.default_rng(0)))
    lifted = augmented_views(img, np.random.default_rng(1), photometric=1.0, rotate=0, shift=0,
                             scale=(1.0, 1.0), shear=0, blur=0)
    assert np.median(lifted[:, :28]) > 0  # an uneven or grey background where there was black


def test_an_augmented_champion_holds_up_better_under_a_drift_it_never_saw(digits) -> None:
    """Trained on random views (the same epochs, the same images), the champion loses less to
    a rotation than the plain one - on 8x8 digits in a second, like the MNIST figures."""
    from scipy import ndimage

    x_train, y_train, x_test, y_test = digits
    tilted = np.stack([ndimage.rotate(im, 20 * (1 if i % 2 else -1), reshape=False, order=1)
                       for i, im in enumerate(x_test.astype(np.float64))])
    plain = build_model(flat(x_train), y_train, 64, 40, 0, dtype="float32", threads=1)
    augmented = build_model(flat(x_train), y_train, 64, 40, 0, dtype="float32", threads=1, augment=0.5)
    acc = {name: float(np.mean(m.predict(flat(tilted)) == y_test))
           for name, m in (("plain", plain), ("augmented", augmented))}
    assert acc["augmented"] >= acc["plain"] + 0.05, acc
    assert float(np.mean(augmented.predict(flat(x_test)) == y_test)) >= 0.9
    assert mlp_hidden(augmented) == 64


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


def test_the_cnn_learns_the_drift_from_a_few_labels_and_leaves_the_champion_untouched(digits) -> None:
    """The case study's model: hurt by a brightness drift, back within a few points of clean
    after one epoch on the clean images plus shifted views of 200 drifted ones, and a copy."""
    x_train, y_train, x_test, y_test = digits
    champion = mnist_cnn.train(flat(x_train), y_train, epochs=10, augment=0.0)
    before = champion.predict(flat(x_test)).copy()
    clean_acc = float(np.mean(before == y_test))
    drift_acc = float(np.mean(champion.predict(flat(_lift(x_test))) == y_test))
    assert clean_acc >= 0.95 and drift_acc <= clean_acc - 0.2, (clean_acc, drift_acc)
    new = shifted_copies(flat(_lift(x_train[:200])), 5, 1, np.random.default_rng(0))
    x = np.concatenate([flat(x_train), new])
    y = np.concatenate([y_train, np.tile(y_train[:200], 5)])

    tuned = mnist_cnn.fine_tune(champion, x, y, epochs=2)

    tuned_drift = float(np.mean(tuned.predict(flat(_lift(x_test))) == y_test))
    tuned_clean = float(np.mean(tuned.predict(flat(x_test)) == y_test))
    assert tuned_drift >= clean_acc - 0.05, (clean_acc, drift_acc, tuned_drift)
    assert tuned_clean >= clean_acc - 0.02, (clean_acc, tuned_clean)
    assert np.array_equal(champion.predict(flat(x_test)), before)
    probs = tuned.predict_proba(flat(x_test[:3]))
    assert probs.shape == (3, 10) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="8x8"):  # another image size is refused, not reshaped
        mnist_cnn.fine_tune(champion, np.zeros((4, 28 * 28)), np.zeros(4, int))


def _publish(tmp: Path, dataset: Path, champion: object, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A tracking store as the case study leaves it before a retrain: the data team's published
    dataset and a registered champion. Returns the environment a step runs with (this process
    uses it too, for tracking and registry alike: nothing lands in the working directory)."""
    import mlflow

    from scanflow.tracking.base import TAG_STEP
    from scanflow.tracking.contracts import log_model_with_reference

    env = {"MLFLOW_TRACKING_URI": f"file://{tmp / 'mlruns'}", "MLFLOW_ALLOW_FILE_STORE": "true",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID", "MLFLOW_REGISTRY_URI"):  # left by an earlier test
        monkeypatch.delenv(k, raising=False)
    # An earlier test in this process may have called mlflow.set_tracking_uri, which wins over
    # the environment: this process must log where the step's subprocess will read (undone after).
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", env["MLFLOW_TRACKING_URI"])
    client = mlflow.MlflowClient()
    with mlflow.start_run(experiment_id=client.create_experiment("mnist/data"), tags={TAG_STEP: "publish"}):
        (tmp / "datasets").mkdir()
        shutil.copy(dataset, tmp / "datasets" / "mnist.npz")
        mlflow.log_artifact(str(tmp / "datasets" / "mnist.npz"), "datasets")
    with mlflow.start_run(experiment_id=client.create_experiment("mnist/datascience")):
        version = log_model_with_reference(champion, np.zeros((5, 64), np.uint8), "mnist-clf",
                                           x_example=np.zeros((5, 64)), **mnist_cnn.mlflow_extras(champion))
    client.set_registered_model_alias("mnist-clf", "champion", version)
    return {**os.environ, **env}


def _drift_files(tmp: Path, digits: tuple[np.ndarray, ...]) -> tuple[Path, Path]:
    """The published dataset and the executor's `new_data` file (250 brightened test digits to
    learn from, the rest held out), as the retrain step reads them."""
    x_train, y_train, x_test, y_test = digits
    dataset, new = tmp / "mnist.npz", tmp / "new.npz"
    np.savez(dataset, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    np.savez(new, x_new=flat(_lift(x_test[:250])), y_new=y_test[:250],
             x_holdout=flat(_lift(x_test[250:])), y_holdout=y_test[250:])
    return dataset, new


def _run_retrain(tmp: Path, env: dict[str, str], new: Path, hidden: int, arch: str = "mlp") -> str:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "datascience" / "steps" / "retrain.py"), "--new_data", str(new),
         "--report", str(tmp / f"report-{arch}{hidden}.json"), "--arch", arch, "--hidden", str(hidden),
         "--max_iter", "20" if arch == "mlp" else "2", "--clean_subset", "600", "--oversample", "3"],
        # the spec's code_paths (mnist_common), as the engine provides them to the step
        env={**env, "PYTHONPATH": os.pathsep.join([str(EXAMPLES), env.get("PYTHONPATH", "")])},
        capture_output=True, text=True, timeout=240, cwd=tmp,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_retrain_step_registers_a_challenger_better_on_the_drift_and_leaves_the_champion(
        digits, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    x_train, y_train, x_test, y_test = digits
    dataset, new = _drift_files(tmp_path, digits)
    champion = build_model(flat(x_train), y_train, 32, 60, 0)
    env = _publish(tmp_path, dataset, champion, monkeypatch)

    said = _run_retrain(tmp_path, env, new, 32)
    assert "continued from models:/mnist-clf/1" in said, said
    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias("mnist-clf", "champion").version) == "1"
    cand = client.get_model_version_by_alias("mnist-clf", "challenger")
    tags = cand.tags
    # What the promotion gate reads: the candidate is better on the held-out drifted rows.
    assert float(tags["eval.candidate_acc_new"]) >= float(tags["eval.champion_acc_new"]) + 0.2, tags
    assert float(tags["eval.candidate_acc_clean"]) >= float(tags["eval.champion_acc_clean"]) - 0.03, tags
    assert str(json.loads((tmp_path / "report-mlp32.json").read_text())["version"]) == str(cand.version)

    # A champion of another architecture (promoted by hand) is not continued: a fresh model.
    said = _run_retrain(tmp_path, env, new, 16)
    assert "training from scratch instead" in said, said
    assert str(client.get_model_version_by_alias("mnist-clf", "challenger").version) == "3"


def test_retrain_step_continues_a_cnn_champion_and_its_challenger_loads_where_the_example_is_not(
        digits, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    x_train, y_train, x_test, y_test = digits
    dataset, new = _drift_files(tmp_path, digits)
    champion = mnist_cnn.train(flat(x_train), y_train, epochs=10, augment=0.0)
    env = _publish(tmp_path, dataset, champion, monkeypatch)

    said = _run_retrain(tmp_path, env, new, 0, arch="cnn")
    assert "continued from models:/mnist-clf/1" in said, said
    tags = mlflow.MlflowClient().get_model_version_by_alias("mnist-clf", "challenger").tags
    assert float(tags["eval.candidate_acc_new"]) >= float(tags["eval.champion_acc_new"]) + 0.2, tags
    assert float(tags["eval.candidate_acc_clean"]) >= float(tags["eval.champion_acc_clean"]) - 0.03, tags

    # Loaded as the model server and the promotion gate load it (mlflow.pyfunc), by a process
    # that cannot import the example's modules: the logged model carries mnist_cnn.py.
    code = ("import sys, mlflow, numpy as np\n"
            "m = mlflow.pyfunc.load_model('models:/mnist-clf@challenger')\n"
            "z = np.load(sys.argv[1])\n"
            "print(float(np.mean(m.predict(z['x_holdout']) == z['y_holdout'])))")
    served = subprocess.run([sys.executable, "-c", code, str(new)], capture_output=True, text=True,
                            env={k: v for k, v in env.items() if k != "PYTHONPATH"}, cwd=tmp_path,
                            timeout=120)
    assert served.returncode == 0, served.stderr[-3000:]
    assert float(served.stdout.split()[-1]) == pytest.approx(float(tags["eval.candidate_acc_new"]), abs=1e-5)


@pytest.mark.slow
def test_the_cnn_on_350_labels_brings_brightness_then_impulse_noise_within_3_points(mnist) -> None:
    """The README's offline claim for the case study's model and its retrain, in the demo's
    order: the CNN champion (2 epochs on the 60k clean digits, half of each epoch as light
    geometric views) fine-tuned 1 epoch on 3,000 clean images + 5 shifted views of 350 labelled
    brightness-2 training digits, then the same on impulse noise-2: each corrupted stream within
    3 points of the champion's clean accuracy after its retrain, clean digits within a point."""
    from corruptions import corrupt

    x_train, y_train, x_test, y_test = mnist
    champion = mnist_cnn.train(flat(x_train), y_train)
    clean = float(np.mean(champion.predict(flat(x_test)) == y_test))
    pool = np.random.default_rng(3).permutation(len(y_train))
    rng = np.random.default_rng(0)
    results = {}
    model = champion
    for name, idx in (("brightness", pool[:350]), ("impulse_noise", pool[350:700])):
        stream = flat(corrupt(x_test, name, 2, seed=1))
        results[f"{name}_before"] = float(np.mean(model.predict(stream) == y_test))
        keep = rng.choice(len(y_train), 3_000, replace=False)
        new = shifted_copies(flat(corrupt(x_train[idx], name, 2, seed=2)), 5, 1, rng)
        x = np.concatenate([flat(x_train[keep]), new])
        y = np.concatenate([y_train[keep], np.tile(y_train[idx], 5)])
        model = mnist_cnn.fine_tune(model, x, y, epochs=1)
        results[name] = float(np.mean(model.predict(stream) == y_test))
        results[f"clean_after_{name}"] = float(np.mean(model.predict(flat(x_test)) == y_test))
    assert clean >= 0.975, clean
    for name in ("brightness", "impulse_noise"):  # hurt, then repaired
        assert results[f"{name}_before"] <= clean - 0.05, (clean, results)
        assert results[name] >= clean - 0.03, (clean, results)
        assert results[f"clean_after_{name}"] >= clean - 0.01, (clean, results)
