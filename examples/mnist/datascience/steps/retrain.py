"""Retrain for a drift in one step: fine-tune the champion on a clean subset plus shifted views of
the newly labelled samples, score the candidate *and* the champion on the same held-out rows of
the new distribution and on the clean test set, register it as `challenger` with the figures as
version tags. Promotion is the executor agent's decision (its gate), not this step's.

Why one step (it was fetch -> train -> evaluate): the fit itself takes 1-2 s; three processes
each importing MLflow and loading the data and the champion took 12-20 s more on the 2 shared
cores, and onset -> new model on every replica must stay under 30 s. Why in-process (`call:
steps.retrain:retrain`): the executor agent that runs it has MLflow imported already (and torch
after its first retrain) and keeps the published dataset between retrains; as a subprocess,
starting Python and importing MLflow and torch took 5-9 s of a 20 s retrain on the busy cores.
Heavy imports stay inside the function, so loading the spec (`scanflow validate`) imports
nothing heavy. Also a script (`python steps/retrain.py --new_data ... --report ...`).

Uses the contracts of `scanflow.tracking.contracts`: `read_new_data`, `evaluate_candidate`,
`log_model_with_reference`, `publish_evaluation`.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

# the published dataset by its MLflow run: an in-process retrain downloads it once
_DATASETS: dict[str, dict[str, Any]] = {}


def _dataset() -> dict[str, Any]:
    import tempfile

    from mnist_common import latest_dataset, load_npz, published_run_id

    run_id = published_run_id()
    if run_id not in _DATASETS:
        with tempfile.TemporaryDirectory() as tmp:
            _DATASETS.clear()
            _DATASETS[run_id] = load_npz(latest_dataset(Path(tmp), run_id))
    return _DATASETS[run_id]


def retrain(new_data: str | Path, report: str | Path, arch: str = "cnn", hidden: int = 128,
            max_iter: int = 1, seed: int = 0, clean_subset: int = 3000, oversample: int = 5,
            shift: int = 1, learning_rate: float = 1e-3, threads: int = 1, augment: float = 0.0,
            reference_size: int = 1000, ctx: Any = None) -> dict[str, float]:
    """The retrain (module doc); `ctx` is scanflow's step context when the engine calls it.
    Returns the evaluation figures (logged as the step's metrics)."""
    import mlflow
    import mlflow.pyfunc
    import mnist_cnn
    import numpy as np
    from mlflow.tracking import MlflowClient
    from mnist_common import (
        MODEL_NAME,
        augmented_views,
        build_model,
        fine_tune,
        flat,
        mlp_hidden,
        shifted_copies,
    )

    from scanflow.tracking.contracts import (
        evaluate_candidate,
        log_model_with_reference,
        publish_evaluation,
        read_new_data,
    )

    if arch not in ("cnn", "mlp"):
        raise ValueError(f"arch must be cnn or mlp, got {arch!r}")
    if max_iter < 1 or oversample < 1 or shift < 0 or clean_subset < 0:
        raise ValueError("need max_iter >= 1, oversample >= 1, shift >= 0, clean_subset >= 0")
    say = ctx.log if ctx is not None else print
    t0 = time.time()
    new = read_new_data(new_data)
    d = _dataset()
    t_data = time.time()
    version = MlflowClient().get_model_version_by_alias(MODEL_NAME, "champion").version
    loaded = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}/{version}", suppress_warnings=True)
    # the object itself (a CNN PythonModel or a scikit-learn pipeline), to fine-tune a copy of it
    champion = (loaded.unwrap_python_model() if loaded.metadata.flavors.get("python_function", {})
                .get("loader_module") == "mlflow.pyfunc.model" else loaded.get_raw_model())
    t_champion = time.time()

    rng = np.random.default_rng(seed)
    x, y = d["x_train"], d["y_train"]
    if clean_subset and clean_subset < len(y):
        idx = rng.choice(len(y), clean_subset, replace=False)
        x, y = x[idx], y[idx]
    x = flat(x)  # after the subset: 60k images as float64 are 376 MB and a second of copying
    if augment > 0:  # keep what an augmented champion learnt: the clean part is not all plain
        pick = rng.random(len(y)) < augment
        x[pick] = augmented_views(x[pick], rng)
    xn, yn = flat(new.x_new), new.y_new.astype(y.dtype)
    views = shifted_copies(xn, oversample, shift, rng) if shift else np.concatenate([xn] * oversample)
    x = np.concatenate([x, views])
    y = np.concatenate([y, np.tile(yn, oversample)])
    t_fit = time.time()
    origin = f"models:/{MODEL_NAME}/{version}"
    if arch == "cnn" and mnist_cnn.is_cnn(champion):
        candidate = mnist_cnn.fine_tune(champion, x, y, epochs=max_iter, seed=seed,
                                        learning_rate=learning_rate, threads=threads)
    elif arch == "mlp" and mlp_hidden(champion) == hidden:
        candidate = fine_tune(champion, x, y, max_iter, seed, learning_rate=learning_rate,
                              dtype="float32", threads=threads)
    else:  # a champion of another architecture (e.g. promoted by hand): start afresh, longer
        origin = "scratch"
        what = "a CNN" if arch == "cnn" else f"an MLP({hidden}) pipeline"
        say(f"champion v{version} is not {what}: training from scratch instead")
        if arch == "cnn":
            candidate = mnist_cnn.train(x, y, epochs=max(max_iter, mnist_cnn.EPOCHS), seed=seed,
                                        learning_rate=learning_rate, threads=threads)
        else:
            candidate = build_model(x, y, hidden, max(max_iter, 10), seed, dtype="float32",
                                    threads=threads, augment=augment)
    fit_seconds = time.time() - t_fit

    t_eval = time.time()
    ev = evaluate_candidate(candidate, champion, (flat(new.x_holdout), new.y_holdout),
                            (flat(d["x_test"]), d["y_test"]))
    # The candidate is adapted to the new distribution: that is the reference it is judged against.
    ref = np.clip(xn[:reference_size], 0, 255).astype(np.uint8)
    with ctx.mlflow_run() if ctx is not None else (mlflow.start_run() if mlflow.active_run() is None
                                                      else nullcontext()):
        mlflow.set_tag("mnist.init_from", origin)
        mlflow.log_metrics({"train_seconds": fit_seconds, "n_train": len(y), "n_new": len(yn)})
        cand_version = log_model_with_reference(candidate, ref, MODEL_NAME, x_example=flat(d["x_test"][:5]),
                                                **mnist_cnn.mlflow_extras(candidate))
    publish_evaluation(MODEL_NAME, cand_version, ev)  # eval.* tags and the `challenger` alias
    Path(report).write_text(json.dumps({"version": cand_version, "fit_seconds": fit_seconds, **ev}))
    say(f"candidate v{cand_version} ({'continued from ' + origin if origin != 'scratch' else 'from scratch'}"
        f", {max_iter} epochs on {len(y)} images, {len(yn)} new, fit {fit_seconds:.1f}s, step "
        f"{time.time() - t0:.1f}s: data {t_data - t0:.1f}s, champion {t_champion - t_data:.1f}s, "
        f"evaluate + register {time.time() - t_eval:.1f}s): "
        + ", ".join(f"{k}={v:.4f}" for k, v in ev.items()))
    return ev


def main() -> None:
    p = argparse.ArgumentParser(description="the retrain step as a script")
    p.add_argument("--new_data", required=True)
    p.add_argument("--report", required=True)
    p.add_argument("--arch", default="cnn", choices=["cnn", "mlp"],
                   help="the champion's architecture to continue (another one is trained afresh)")
    p.add_argument("--hidden", type=int, default=128, help="the MLP's hidden units")
    p.add_argument("--max_iter", type=int, default=1, help="epochs on top of the champion's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clean_subset", type=int, default=3000, help="clean training images kept; 0 = all")
    p.add_argument("--oversample", type=int, default=5, help="views of each new sample")
    p.add_argument("--shift", type=int, default=1, help="max pixel shift of the views (0 = exact copies)")
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--augment", type=float, default=0.0,
                   help="share of the clean images shown as a random view (as the champion was trained)")
    p.add_argument("--reference_size", type=int, default=1000)
    a = p.parse_args()
    try:
        retrain(**vars(a))
    except ValueError as exc:
        p.error(str(exc))


if __name__ == "__main__":
    main()
