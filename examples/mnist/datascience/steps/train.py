"""Train one candidate on the published clean data (or a subset): the small CNN (`--arch cnn`,
`mnist_cnn.py`) or the scikit-learn MLP (`--arch mlp`). --dtype float32 and --threads 1 make the
fit cheap and steady on shared cores. The retrain after a drift is `retrain.py` (it continues
the champion)."""

import argparse
import pickle
import time
from pathlib import Path

import mlflow
import numpy as np
from mnist_common import accuracy, build_model, flat, load_npz

p = argparse.ArgumentParser()
p.add_argument("--dataset", required=True)
p.add_argument("--model", required=True)
p.add_argument("--arch", default="mlp", choices=["mlp", "cnn"])
p.add_argument("--hidden", type=int, default=128, help="the MLP's hidden units")
p.add_argument("--max_iter", type=int, default=5, help="epochs")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--clean_subset", type=int, default=0, help="0 = all clean training images")
p.add_argument("--dtype", default="float64", choices=["float64", "float32"], help="the MLP's fit")
p.add_argument("--threads", type=int, default=0, help="BLAS threads while fitting; 0 = default")
p.add_argument("--augment", type=float, default=0.0,
               help="share of the images shown as a fresh random view each epoch (0 = none)")
a = p.parse_args()

d = load_npz(Path(a.dataset))
x, y = flat(d["x_train"]), d["y_train"]
rng = np.random.default_rng(a.seed)
if a.clean_subset and a.clean_subset < len(y):
    idx = rng.choice(len(y), a.clean_subset, replace=False)
    x, y = x[idx], y[idx]
t0 = time.time()
if a.arch == "cnn":
    import mnist_cnn

    model = mnist_cnn.train(x, y, epochs=a.max_iter, seed=a.seed, augment=a.augment, threads=a.threads)
    what = "CNN"
else:
    model = build_model(x, y, a.hidden, a.max_iter, a.seed, dtype=a.dtype, threads=a.threads,
                        augment=a.augment)
    what = f"MLP({a.hidden})"
seconds = time.time() - t0
acc = accuracy(model, d["x_test"], d["y_test"])
with open(a.model, "wb") as f:
    pickle.dump(model, f)
with mlflow.start_run():
    mlflow.log_metrics({"train_seconds": seconds, "acc_clean": acc, "n_train": len(y)})
print(f"trained {what} from scratch, {a.max_iter} epochs on {len(y)} images"
      f"{f' ({a.augment:.0%} augmented views)' if a.augment else ''} in {seconds:.1f}s: "
      f"clean test accuracy {acc:.4f}")
