"""Train one candidate. With --new_data, add the labelled drifted samples (oversampled: with
--shift, as copies shifted by up to that many pixels rather than exact repeats) to the original
training data (or a subset), so the model learns the new distribution without forgetting the
old one. With --init_from (a `models:/name@alias` URI or a pickle), continue training that model
instead of starting from scratch (when it has the requested architecture). --dtype float32 and
--threads 1 make the fit cheap and steady on shared cores."""

import argparse
import pickle
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import mlflow
import numpy as np
from mnist_common import accuracy, build_model, fine_tune, flat, load_npz, mlp_hidden, shifted_copies

p = argparse.ArgumentParser()
p.add_argument("--dataset", required=True)
p.add_argument("--model", required=True)
p.add_argument("--hidden", type=int, default=128)
p.add_argument("--max_iter", type=int, default=5)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--clean_subset", type=int, default=0, help="0 = all clean training images")
p.add_argument("--oversample", type=int, default=1)
p.add_argument("--shift", type=int, default=0, help="max pixel shift of the oversampled copies")
p.add_argument("--dtype", default="float64", choices=["float64", "float32"])
p.add_argument("--threads", type=int, default=0, help="BLAS threads while fitting; 0 = default")
p.add_argument("--init_from", default="", help="models:/name@alias or a pickle; '' = from scratch")
p.add_argument("--learning_rate", type=float, default=1e-3,
               help="Adam's initial learning rate when continuing --init_from (from scratch: 1e-3)")
p.add_argument("--new_data", default="")
a = p.parse_args()


def load_init(ref: str) -> tuple[object, str]:
    """The model to continue from and where it came from (a registry version, for lineage)."""
    if not ref.startswith("models:/"):
        with open(ref, "rb") as f:
            return pickle.load(f), str(Path(ref).resolve())
    import mlflow.sklearn
    from mlflow.tracking import MlflowClient

    origin = ref
    name, _, alias = ref.removeprefix("models:/").partition("@")
    if alias:
        origin = f"models:/{name}/{MlflowClient().get_model_version_by_alias(name, alias).version}"
    return mlflow.sklearn.load_model(origin), origin


d = load_npz(Path(a.dataset))
x, y = flat(d["x_train"]), d["y_train"]
rng = np.random.default_rng(a.seed)
if a.clean_subset and a.clean_subset < len(y):
    idx = rng.choice(len(y), a.clean_subset, replace=False)
    x, y = x[idx], y[idx]
n_new = 0
if a.new_data:
    new = load_npz(Path(a.new_data))
    xn, yn = flat(new["x_new"]), new["y_new"].astype(y.dtype)
    n_new = len(yn)
    copies = max(1, a.oversample)
    views = shifted_copies(xn, copies, a.shift, rng) if a.shift else np.concatenate([xn] * copies)
    x = np.concatenate([x, views])
    y = np.concatenate([y, np.tile(yn, copies)])
init, origin = (None, "")
if a.init_from:
    try:
        init, origin = load_init(a.init_from)
    except Exception as e:  # noqa: BLE001 - a missing champion or file: say which, exit 1
        raise SystemExit(f"cannot load --init_from {a.init_from}: {e}") from None
    if mlp_hidden(init) != a.hidden:
        print(f"{origin} is not an MLP({a.hidden}) pipeline: training from scratch instead")
        init, origin = None, ""
t0 = time.time()
if init is not None:
    model = fine_tune(init, x, y, a.max_iter, a.seed, learning_rate=a.learning_rate,
                      dtype=a.dtype, threads=a.threads)
else:
    model = build_model(x, y, a.hidden, a.max_iter, a.seed, dtype=a.dtype, threads=a.threads)
seconds = time.time() - t0
acc = accuracy(model, d["x_test"], d["y_test"])
with open(a.model, "wb") as f:
    pickle.dump(model, f)
with mlflow.start_run():
    mlflow.log_metrics({"train_seconds": seconds, "acc_clean": acc, "n_train": len(y), "n_new": n_new})
    mlflow.set_tag("mnist.init_from", origin or "scratch")
start = f"continued from {origin}" if origin else "from scratch"
print(f"trained MLP({a.hidden}) {start}, {a.max_iter} epochs on {len(y)} images ({n_new} new) "
      f"in {seconds:.1f}s: clean test accuracy {acc:.4f}")
