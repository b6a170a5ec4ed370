"""alibi-detect's KSDrift and MMDDrift (PyTorch backend) on the windows bench/detectors.py wrote.

Runs inside bench/.venvs/alibi (alibi-detect pins numpy<2, so it cannot share the project's
venv). Reads ``DIR/reference.npy`` (float32, n x d, already scaled to [0, 1]) and
``DIR/windows.npy`` (uint8, N x m x d, divided by 255 here like the reference), and prints one
marked JSON line: per detector and window the p-value alibi computed and the seconds its
``predict`` took. Standard library plus what alibi brings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

MARKER = "BENCH_RESULT "


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--detectors", default="ks,mmd")
    ap.add_argument("--p-val", type=float, default=0.05)
    ap.add_argument("--n-permutations", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    import alibi_detect
    from alibi_detect.cd import KSDrift, MMDDrift

    ref = np.load(args.data / "reference.npy").astype(np.float32)
    windows = np.load(args.data / "windows.npy", mmap_mode="r")
    out: dict = {"version": alibi_detect.__version__, "torch": torch.__version__,
                 "numpy": np.__version__, "threads": args.threads, "detectors": {}}
    for name in args.detectors.split(","):
        t0 = time.perf_counter()
        if name == "ks":
            det = KSDrift(ref, p_val=args.p_val, correction="bonferroni")
        elif name == "mmd":
            det = MMDDrift(ref, backend="pytorch", p_val=args.p_val,
                           n_permutations=args.n_permutations, device="cpu")
        else:
            raise SystemExit(f"unknown detector {name!r}")
        fit_s = time.perf_counter() - t0
        p_values, seconds, drift = [], [], []
        for i in range(len(windows)):
            x = np.asarray(windows[i], dtype=np.float32).reshape(len(windows[i]), -1) / 255.0
            t = time.perf_counter()
            pred = det.predict(x)["data"]
            seconds.append(time.perf_counter() - t)
            p = np.asarray(pred["p_val"], dtype=np.float64)
            p_values.append(float(p.min()))  # KS: per-feature p-values; MMD: one
            drift.append(bool(pred["is_drift"]))
            if i % 100 == 0:
                print(f"{name}: {i}/{len(windows)} windows", file=sys.stderr, flush=True)
        out["detectors"][name] = {
            "fit_seconds": fit_s, "p_values": p_values, "seconds": seconds, "drift": drift,
            "n_features": int(ref.shape[1]), "p_val": args.p_val,
            "n_permutations": args.n_permutations if name == "mmd" else None,
        }
    print(MARKER + json.dumps(out), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    main()
