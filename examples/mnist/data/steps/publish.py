"""Publish the dataset and a clean reference sample for the other teams (MLflow artifacts)."""

import argparse
import shutil
import tempfile
from pathlib import Path

import mlflow
import numpy as np
from mnist_common import load_npz, reference_sample

p = argparse.ArgumentParser()
p.add_argument("--dataset", required=True)
p.add_argument("--reference_size", type=int, default=1000)
a = p.parse_args()

d = load_npz(Path(a.dataset))
with tempfile.TemporaryDirectory() as tmp, mlflow.start_run():
    shutil.copy(a.dataset, Path(tmp) / "mnist.npz")
    np.save(Path(tmp) / "reference.npy", reference_sample(d, a.reference_size))
    mlflow.log_artifact(str(Path(tmp) / "mnist.npz"), "datasets")
    mlflow.log_artifact(str(Path(tmp) / "reference.npy"), "reference")
    mlflow.set_tags({"dataset": "mnist", "reference_size": a.reference_size})
print("published datasets/mnist.npz and reference/reference.npy")
