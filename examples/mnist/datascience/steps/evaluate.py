"""Evaluate a retrained candidate against the champion on held-out data of the new
distribution and on the clean test set; register it as `challenger` with the figures as
version tags. Promotion is the executor agent's decision (its gate), not this step's."""

import argparse
import json
import pickle
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import mlflow
import mlflow.sklearn
import numpy as np
from mlflow.tracking import MlflowClient
from mnist_common import MODEL_NAME, accuracy, flat, load_npz

from scanflow.tracking import log_sklearn_model

p = argparse.ArgumentParser()
p.add_argument("--dataset", required=True)
p.add_argument("--model", required=True)
p.add_argument("--new_data", required=True)
p.add_argument("--report", required=True)
p.add_argument("--reference_size", type=int, default=1000)
a = p.parse_args()

d = load_npz(Path(a.dataset))
new = load_npz(Path(a.new_data))
with open(a.model, "rb") as f:
    candidate = pickle.load(f)
champion = mlflow.sklearn.load_model(f"models:/{MODEL_NAME}@champion")
ev = {
    "candidate_acc_new": accuracy(candidate, new["x_holdout"], new["y_holdout"]),
    "champion_acc_new": accuracy(champion, new["x_holdout"], new["y_holdout"]),
    "candidate_acc_clean": accuracy(candidate, d["x_test"], d["y_test"]),
    "champion_acc_clean": accuracy(champion, d["x_test"], d["y_test"]),
    "n_holdout": float(len(new["y_holdout"])),
}
# The candidate is adapted to the new distribution: that is the reference it is judged against.
ref = flat(new["x_new"])[: a.reference_size]
with mlflow.start_run(), tempfile.TemporaryDirectory() as tmp:
    mlflow.log_metrics(ev)
    np.save(Path(tmp) / "reference.npy", np.clip(ref, 0, 255).astype(np.uint8))
    mlflow.log_artifact(str(Path(tmp) / "reference.npy"), "reference")
    _, version = log_sklearn_model(candidate, flat(d["x_test"][:5]), MODEL_NAME)
client = MlflowClient()
client.set_registered_model_alias(MODEL_NAME, "challenger", version)
for k, v in ev.items():
    client.set_model_version_tag(MODEL_NAME, version, f"eval.{k}", f"{v:.6f}")
Path(a.report).write_text(json.dumps({"version": version, **ev}))
print(f"candidate v{version}: " + ", ".join(f"{k}={v:.4f}" for k, v in ev.items()))
