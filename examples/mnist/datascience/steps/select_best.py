"""Evaluate the candidates on the clean test set; register the best as `champion`, with the
reference sample of its training distribution that the analyzer compares served inputs with
(`log_model_with_reference`: the contract the built-in analyzer reads)."""

import argparse
import json
import pickle
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient
from mnist_cnn import mlflow_extras
from mnist_common import MODEL_NAME, accuracy, flat, load_npz, reference_sample

from scanflow.tracking.contracts import log_model_with_reference

p = argparse.ArgumentParser()
p.add_argument("--dataset", required=True)
p.add_argument("--model_a", required=True)
p.add_argument("--model_b", required=True)
p.add_argument("--report", required=True)
p.add_argument("--reference_size", type=int, default=1000)
a = p.parse_args()

d = load_npz(Path(a.dataset))
scores = {}
models = {}
for name, path in (("a", a.model_a), ("b", a.model_b)):
    with open(path, "rb") as f:
        models[name] = pickle.load(f)
    scores[name] = accuracy(models[name], d["x_test"], d["y_test"])
best = max(scores, key=scores.__getitem__)
with mlflow.start_run():
    mlflow.log_metrics({f"acc_clean_{k}": v for k, v in scores.items()})
    version = log_model_with_reference(models[best], reference_sample(d, a.reference_size), MODEL_NAME,
                                       x_example=flat(d["x_test"][:5]), alias="champion",
                                       **mlflow_extras(models[best]))
MlflowClient().set_model_version_tag(MODEL_NAME, version, "eval.acc_clean", f"{scores[best]:.6f}")
Path(a.report).write_text(json.dumps({"scores": scores, "best": best, "version": version}))
print(f"candidates {scores}: registered {MODEL_NAME} v{version} ({best}) as champion")
