"""Evaluate a retrained candidate against the champion on held-out data of the new
distribution and on the clean test set (the same rows for both, so the promotion gate gets
paired counts); register it as `challenger` with the figures as version tags. Promotion is the
executor agent's decision (its gate), not this step's. Uses the contracts of
`scanflow.tracking.contracts`: `read_new_data`, `evaluate_candidate`, `log_model_with_reference`,
`publish_evaluation`."""

import argparse
import json
import pickle
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import mlflow
import mlflow.sklearn
import numpy as np
from mnist_common import MODEL_NAME, flat, load_npz

from scanflow.tracking.contracts import (
    evaluate_candidate,
    log_model_with_reference,
    publish_evaluation,
    read_new_data,
)

p = argparse.ArgumentParser()
p.add_argument("--dataset", required=True)
p.add_argument("--model", required=True)
p.add_argument("--new_data", required=True)
p.add_argument("--report", required=True)
p.add_argument("--reference_size", type=int, default=1000)
a = p.parse_args()

d = load_npz(Path(a.dataset))
new = read_new_data(a.new_data)
with open(a.model, "rb") as f:
    candidate = pickle.load(f)
champion = mlflow.sklearn.load_model(f"models:/{MODEL_NAME}@champion")
ev = evaluate_candidate(candidate, champion, (flat(new.x_holdout), new.y_holdout),
                        (flat(d["x_test"]), d["y_test"]))
# The candidate is adapted to the new distribution: that is the reference it is judged against.
ref = np.clip(flat(new.x_new)[: a.reference_size], 0, 255).astype(np.uint8)
with mlflow.start_run():
    mlflow.log_metrics(ev)
    version = log_model_with_reference(candidate, ref, MODEL_NAME, x_example=flat(d["x_test"][:5]))
publish_evaluation(MODEL_NAME, version, ev)  # eval.* tags and the `challenger` alias
Path(a.report).write_text(json.dumps({"version": version, **ev}))
print(f"candidate v{version}: " + ", ".join(f"{k}={v:.4f}" for k, v in ev.items()))
