"""False-alarm and detection rates of the analyzer's default drift check on two tabular datasets.

Not a test: a benchmark you run by hand (tests/agents/test_analyzer.py checks the same at small
scale)::

    .venv/bin/python bench/drift_tabular.py            # ~2-4 min on 2 busy cores
    .venv/bin/python bench/drift_tabular.py --quick    # fewer references and windows

The check is what the built-in `drift_check` sensor runs with its defaults
(`scanflow.agents.analyzer.fitted_check` with `CheckParams()`): the reference sample is split
into a fitted half and a held-out clean half, and KS + MMD get one threshold calibrated on 300
clean windows to a false-alarm rate of 1 % per window (PAC, confidence 0.9).

Protocol, per dataset (generated here, no download): a population of ``--rows`` rows; for each of
``--references`` draws, ``--reference-rows`` random rows are the reference logged with a model,
the check is fitted and calibrated on them, and windows of ``--window`` rows are drawn from the
*other* rows: ``--clean-windows`` clean ones (false-alarm rate) and ``--shift-windows`` per shift
(detection rate). Shifts (on one window's rows, in units of the feature's own std):

- ``mean_shift_*``: one feature moved by ``--mean-shift`` standard deviations, and by twice that;
- ``scale_x*``: one feature's spread around its mean multiplied by ``--scale``, and by twice that;
- ``correlation``: one feature shuffled within the window (its marginal kept, its correlation
  with the others broken: only a joint test can see it);
- ``covariate_subset``: rows sampled with weight ``exp(w * z)`` on a standardized informative
  feature ``z`` (a subpopulation becomes more frequent: several features move a little).

The old fixed-alpha mode (`calibrate: false`, KS and MMD at 0.05) runs on the same clean windows
for comparison. Results: bench/results/drift_tabular.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

Shift = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def mixed_scale_classification(rows: int, seed: int) -> np.ndarray:
    """`make_classification` with 12 features on scales from 1e-3 to 1e4 and offsets, like raw
    tabular columns (amounts, ratios, counts)."""
    from sklearn.datasets import make_classification

    x, _ = make_classification(n_samples=rows, n_features=12, n_informative=6, n_redundant=3,
                               random_state=seed)
    scales = np.logspace(-3, 4, x.shape[1])
    return x * scales + np.linspace(0, 50, x.shape[1]) * scales


def correlated_with_categories(rows: int, seed: int) -> np.ndarray:
    """8 correlated Gaussian columns (corr 0.7^|i-j|) and 4 integer-coded categorical columns
    (3 to 12 levels) that depend on them, covertype-like."""
    rng = np.random.default_rng(seed)
    d = 8
    cov = 0.7 ** np.abs(np.subtract.outer(np.arange(d), np.arange(d)))
    z = rng.multivariate_normal(np.zeros(d), cov, size=rows)
    cats = []
    for j, levels in enumerate((3, 5, 7, 12)):
        latent = z[:, j] + rng.normal(scale=1.0, size=rows)
        edges = np.quantile(latent, np.linspace(0, 1, levels + 1)[1:-1])
        cats.append(np.searchsorted(edges, latent).astype(np.float64))
    return np.column_stack([z * [1, 10, 100, 0.5, 3, 1, 20, 7], *cats])


def shifts(feature: int, mean_shift: float, scale: float) -> dict[str, Shift]:
    """The shifts, each at the given magnitude and at twice it."""
    def mean(k: float) -> Shift:
        def fn(w: np.ndarray, rng: np.random.Generator) -> np.ndarray:
            out = w.copy()
            out[:, feature] += k * SD[feature]
            return out
        return fn

    def spread(k: float) -> Shift:
        def fn(w: np.ndarray, rng: np.random.Generator) -> np.ndarray:
            out = w.copy()
            out[:, feature] = MU[feature] + (out[:, feature] - MU[feature]) * k
            return out
        return fn

    def corr(w: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        out = w.copy()
        out[:, feature] = rng.permutation(out[:, feature])
        return out

    return {f"mean_shift_{mean_shift:g}sd": mean(mean_shift),
            f"mean_shift_{2 * mean_shift:g}sd": mean(2 * mean_shift),
            f"scale_x{scale:g}": spread(scale), f"scale_x{2 * scale:g}": spread(2 * scale),
            "correlation": corr, "covariate_subset": lambda w, rng: w}  # drawn by weight (see draw)


MU = np.zeros(0)
SD = np.ones(0)


def draw(pool: np.ndarray, size: int, rng: np.random.Generator, weight: float, feature: int
         ) -> np.ndarray:
    if weight == 0.0:
        return pool[rng.choice(len(pool), size, replace=False)]
    z = (pool[:, feature] - MU[feature]) / SD[feature]
    p = np.exp(weight * z)
    return pool[rng.choice(len(pool), size, replace=False, p=p / p.sum())]


def measure(name: str, data: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    from scanflow.agents.analyzer import CheckParams, fitted_check

    global MU, SD
    MU, SD = data.mean(axis=0), data.std(axis=0)
    # The feature that moves: the first one (the largest-variance informative ones differ per
    # dataset; the first is informative in both).
    kinds = shifts(0, args.mean_shift, args.scale)
    rng = np.random.default_rng(args.seed)
    flagged = {"clean": 0, "clean_fixed_alpha": 0, **{k: 0 for k in kinds}}
    total = {"clean": 0, **{k: 0 for k in kinds}}
    seconds: list[float] = []
    for r in range(args.references):
        order = rng.permutation(len(data))
        ref, rest = data[order[:args.reference_rows]], data[order[args.reference_rows:]]
        t = time.perf_counter()
        default = fitted_check(ref, args.window, CheckParams(), f"{name} #{r}")
        seconds.append(time.perf_counter() - t)
        fixed = fitted_check(ref, args.window, CheckParams(calibrate=False), f"{name} #{r} fixed")
        assert default["calibrated"], default.get("note")
        for _ in range(args.clean_windows):
            w = draw(rest, args.window, rng, 0.0, 0)
            flagged["clean"] += default["check"].verdict(w).drift
            flagged["clean_fixed_alpha"] += fixed["check"].verdict(w).drift
            total["clean"] += 1
        for kind, fn in kinds.items():
            for _ in range(args.shift_windows):
                weight = args.weight if kind == "covariate_subset" else 0.0
                w = fn(draw(rest, args.window, rng, weight, 0), rng)
                flagged[kind] += default["check"].verdict(w).drift
                total[kind] += 1
    return {
        "name": name, "rows": int(len(data)), "features": int(data.shape[1]),
        "reference_rows": args.reference_rows, "window": args.window, "references": args.references,
        "clean_windows": total["clean"], "false_alarm_rate": flagged["clean"] / total["clean"],
        "false_alarm_rate_fixed_alpha_0.05": flagged["clean_fixed_alpha"] / total["clean"],
        "detection_rate": {k: flagged[k] / total[k] for k in kinds},
        "windows_per_shift": args.references * args.shift_windows,
        "calibration_seconds_median": float(np.median(seconds)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument("--reference-rows", type=int, default=1000)
    p.add_argument("--window", type=int, default=200)
    p.add_argument("--references", type=int, default=10, help="reference draws (different rows)")
    p.add_argument("--clean-windows", type=int, default=100, help="per reference")
    p.add_argument("--shift-windows", type=int, default=20, help="per reference and shift")
    p.add_argument("--mean-shift", type=float, default=0.5, help="in standard deviations")
    p.add_argument("--scale", type=float, default=1.5)
    p.add_argument("--weight", type=float, default=1.0, help="covariate subset: exp(weight * z)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "drift_tabular.json")
    args = p.parse_args(argv)
    if args.quick:
        args.references, args.clean_windows, args.shift_windows = 3, 50, 10
    t0 = time.time()
    results = [measure("mixed-scale classification (make_classification)",
                       mixed_scale_classification(args.rows, args.seed), args),
               measure("correlated Gaussian + categorical ints", correlated_with_categories(args.rows,
                                                                                         args.seed), args)]
    kinds = list(results[0]["detection_rate"])
    print(f"{'dataset':48} {'rows':>6} {'feat':>4} {'false alarms':>12} {'fixed 0.05':>10} "
          + " ".join(f"{k:>16}" for k in kinds))
    rows = [f"| {r['name']} | {r['rows']:,} x {r['features']} | {r['false_alarm_rate']:.3f} | "
            f"{r['false_alarm_rate_fixed_alpha_0.05']:.3f} | "
            + " | ".join(f"{r['detection_rate'][k]:.2f}" for k in kinds) + " |" for r in results]
    for r in results:
        print(f"{r['name']:48} {r['rows']:>6} {r['features']:>4} {r['false_alarm_rate']:>12.3f} "
              f"{r['false_alarm_rate_fixed_alpha_0.05']:>10.3f} "
              + " ".join(f"{r['detection_rate'][k]:>16.2f}" for k in kinds))
    command = " ".join([".venv/bin/python bench/drift_tabular.py", *(sys.argv[1:] if argv is None else argv)])
    out = {"datasets": results, "command": command,
           "shifts": {"mean_shift_sd": args.mean_shift, "scale": args.scale, "covariate_weight": args.weight,
                      "feature": 0},
           "seconds": round(time.time() - t0, 1)}
    print("\n".join([f"| dataset | rows x features | false alarms | fixed 0.05 | {' | '.join(kinds)} |",
                      "|---|---|---:|---:|" + "---:|" * len(kinds), *rows]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out} ({out['seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
