"""Evaluate the candidates on the clean test set; register the best as `champion`, with the
reference sample of its training distribution that the monitor compares served inputs with."""

import argparse
import json
import pickle
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient
from mnist_common import MODEL_NAME, accuracy, flat, load_npz, reference_sample

from scanflow.tracking import log_sklearn_model

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
ref = reference_sample(d, a.reference_size)
with mlflow.start_run(), tempfile.TemporaryDirectory() as tmp:
    mlflow.log_metrics({f"acc_clean_{k}": v for k, v in scores.items()})
    np.save(Path(tmp) / "reference.npy", ref.astype(np.uint8))
    mlflow.log_artifact(str(Path(tmp) / "reference.npy"), "reference")
    _, version = log_sklearn_model(models[best], flat(d["x_test"][:5]), MODEL_NAME)
client = MlflowClient()
client.set_registered_model_alias(MODEL_NAME, "champion", version)
client.set_model_version_tag(MODEL_NAME, version, "eval.acc_clean", f"{scores[best]:.6f}")
Path(a.report).write_text(json.dumps({"scores": scores, "best": best, "version": version}))
print(f"candidates {scores}: registered {MODEL_NAME} v{version} ({best}) as champion")
