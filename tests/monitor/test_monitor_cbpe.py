"""CBPE: a label-free accuracy estimate that tracks the true accuracy under covariate shift.

The fast tests use sklearn's bundled digits and a real LogisticRegression; the MNIST test
(slow) trains the case study's MLP on 10k digits and runs the generated corruptions.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from scanflow.monitor.cbpe import CBPE, CBPEEstimate, top_confidence


@pytest.fixture(scope="module")
def setup() -> dict[str, np.ndarray | object]:
    """Noisy digits (so the classifier makes mistakes worth estimating), four disjoint splits:
    train the model, calibrate CBPE, train an independent 'difficulty' model, and a pool."""
    x, y = load_digits(return_X_y=True)
    x = x + np.random.default_rng(5).normal(0, 3, x.shape)
    o = np.random.default_rng(0).permutation(len(x))
    tr, ref, aux, pool = o[:600], o[600:1000], o[1000:1200], o[1200:]
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=0.02)).fit(x[tr], y[tr])
    knn = KNeighborsClassifier(15).fit(x[aux], y[aux])
    return {
        "cbpe": CBPE().fit(clf.predict_proba(x[ref]), y[ref]),
        "proba": clf.predict_proba(x[pool]),
        "correct": clf.predict(x[pool]) == y[pool],
        # How hard an input looks to another model: a function of x only, so selecting on it
        # shifts P(x) and leaves P(y | x) alone - covariate shift, not concept shift.
        "hardness": 1.0 - knn.predict_proba(x[pool]).max(axis=1),
    }


def test_estimate_tracks_true_accuracy_under_covariate_shift(setup: dict) -> None:
    cbpe, proba, correct, hard = setup["cbpe"], setup["proba"], setup["correct"], setup["hardness"]
    rng = np.random.default_rng(1)
    truths, errors = [], []
    for tilt in (0, 3, 6, 10, 15):  # windows of 150 drawn more and more from the hard inputs
        w = np.exp(tilt * hard)
        idx = rng.choice(len(proba), 150, replace=False, p=w / w.sum())
        est = cbpe.estimate(proba[idx])
        truth = float(correct[idx].mean())
        truths.append(truth)
        errors.append(est.accuracy - truth)
        assert est.n == 150 and est.ci_low <= est.accuracy <= est.ci_high
    assert truths[0] - truths[-1] > 0.1, truths  # the shift really hurt the model
    # Within 5 points on every window (a window of 150 alone has a sampling spread of ~3).
    assert max(abs(e) for e in errors) <= 0.05, list(zip(truths, errors, strict=True))
    assert float(np.mean(np.abs(errors))) <= 0.03
    # The estimate moves with the truth, window after window.
    assert np.corrcoef(truths, np.array(truths) + np.array(errors))[0, 1] > 0.9


def test_estimate_on_clean_data_matches_the_reference(setup: dict) -> None:
    cbpe, proba, correct = setup["cbpe"], setup["proba"], setup["correct"]
    est = cbpe.estimate(proba)
    assert abs(est.accuracy - float(correct.mean())) <= 0.03
    assert est.n_reference == 400 and 0.8 < est.reference_accuracy < 1.0
    d = est.to_dict()
    assert set(d) >= {"accuracy", "n", "ci_low", "ci_high", "mean_confidence"}
    assert all(isinstance(v, int | float) for v in d.values())


def test_calibration_fixes_an_overconfident_model() -> None:
    """A model that says 0.99 and is right 70 % of the time: CBPE learns the 70 %."""
    rng = np.random.default_rng(0)
    n = 2000
    conf = rng.uniform(0.95, 1.0, n)
    y_pred = rng.integers(0, 3, n)
    right = rng.random(n) < 0.7
    y_true = np.where(right, y_pred, (y_pred + 1) % 3)
    cbpe = CBPE().fit(conf, y_true, y_pred=y_pred)
    est = cbpe.estimate(rng.uniform(0.95, 1.0, 500))
    assert abs(est.accuracy - 0.7) < 0.05
    assert est.mean_confidence > 0.95


def test_top_confidence_accepts_probabilities_or_confidences() -> None:
    conf, arg = top_confidence([[0.1, 0.9], [0.6, 0.4]])
    assert conf.tolist() == [0.9, 0.6] and arg.tolist() == [1, 0]
    conf, arg = top_confidence([0.5, 0.7])
    assert conf.tolist() == [0.5, 0.7] and arg.tolist() == [-1, -1]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda c: c.estimate([[0.5, 0.5]]), "not fitted"),
        (lambda c: c.fit([[0.5, 0.5]] * 10, [0] * 10), "at least 100"),
        (lambda c: c.fit([[0.5, 0.5]] * 200, [0] * 199), "y_true must be 1-D with 200"),
        (lambda c: c.fit([0.5] * 200, [0] * 200), "y_pred is required"),
        (lambda c: c.fit([[0.5, float("nan")]] * 200, [0] * 200), "NaN"),
        (lambda c: c.fit([[1.5, -0.5]] * 200, [0] * 200), "[0, 1]"),
        (lambda c: c.fit([[[0.5]]], [0]), "1-D or 2-D"),
        (lambda c: c.fit([], []), "empty"),
        (lambda c: c.fit([["a", "b"]], [0]), "numeric"),
        (lambda c: c.fit([[1.0]] * 200, [0] * 200), "one column per class"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(call, message: str) -> None:
    with pytest.raises((ValueError, RuntimeError), match=message.replace("[", r"\[").replace("]", r"\]")):
        call(CBPE())


def test_estimate_type_is_frozen(setup: dict) -> None:
    est = setup["cbpe"].estimate(setup["proba"][:50])
    assert isinstance(est, CBPEEstimate)
    with pytest.raises(AttributeError):
        est.accuracy = 1.0  # type: ignore[misc]


# --- real MNIST (slow) ---------------------------------------------------------------------


@pytest.mark.slow
def test_mnist_mlp_estimate_tracks_mild_shift_and_falls_under_strong(mnist) -> None:
    """The case study's MLP: within 3 points on mild corruptions; optimistic on strong ones
    (the model stays confident on fog), but still far below the clean estimate - which is
    what a planner's accuracy floor needs."""
    import corruptions
    from mnist_common import build_model, flat

    x_train, y_train, x_test, y_test = mnist
    idx = np.random.default_rng(0).permutation(len(x_train))[:10_000]
    model = build_model(flat(x_train[idx]), y_train[idx], hidden=64, max_iter=30, seed=0)
    cbpe = CBPE().fit(model.predict_proba(flat(x_test[:2000])), y_test[:2000])
    xs, ys = x_test[2000:3000], y_test[2000:3000]

    def est_and_truth(x: np.ndarray) -> tuple[float, float]:
        p = model.predict_proba(flat(x))
        return cbpe.estimate(p).accuracy, float((p.argmax(axis=1) == ys).mean())

    clean_est, clean_true = est_and_truth(xs)
    assert abs(clean_est - clean_true) <= 0.02
    for name, sev in [("glass_blur", 3), ("motion_blur", 3), ("impulse_noise", 2), ("shear", 2),
                      ("translate", 1), ("scale", 1), ("shot_noise", 3)]:
        est, truth = est_and_truth(corruptions.corrupt(xs, name, sev, seed=1))
        assert abs(est - truth) <= 0.03, (name, sev, est, truth)
    est, truth = est_and_truth(corruptions.corrupt(xs, "fog", 2, seed=1))
    assert truth < est < clean_est - 0.1
