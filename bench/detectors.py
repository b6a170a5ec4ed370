"""Drift detectors on MNIST: scanflow's against alibi-detect's, on the same windows.

Not a test: a benchmark you run by hand (see bench/README.md)::

    .venv/bin/python bench/detectors.py                # full run, ~45 min on 2 busy cores
    .venv/bin/python bench/detectors.py --reuse-alibi  # same windows, alibi's results kept: ~12 min
    .venv/bin/python bench/detectors.py --quick        # 2 corruptions, few windows (~5 min + install)

Protocol (MNIST test set, shuffled once with seed 0): 1,000 images are the reference; the next
2,000 are the calibration pool (scanflow's detectors calibrate on 300 pool-bootstrap windows
drawn from it, PAC threshold at confidence 0.9; alibi's need no calibration); the other 7,000
are the evaluation pool. The false-alarm rate is
measured on ``--clean-windows`` (200) windows of 500 drawn from the evaluation pool, the detection
rate on ``--windows`` windows of 500 per corruption and severity, drawn from the evaluation pool
corrupted by examples/mnist/corruptions.py. Reference, calibration and evaluation images are
disjoint. Every detector sees exactly the same windows; each records one p-value per window, so
the figures at alpha 0.01 and 0.05 come from the same run (for scanflow, the PAC threshold at
each alpha from the same calibration). ``scanflow_check`` is ``DriftCheck`` of the three scanflow
detectors with its one calibrated rule for their OR (``DriftCheck.verdict``).

alibi-detect (KSDrift, MMDDrift with the PyTorch backend, its defaults otherwise, on raw pixels
scaled to [0, 1]) runs in bench/.venvs/alibi, created here on first use (it pins numpy<2).
Results: bench/results/detectors.json (+ detectors.meta.json).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
VENVS = BENCH / ".venvs"
LOGS = BENCH / ".logs"
RESULTS = BENCH / "results"
sys.path.insert(0, str(ROOT / "examples" / "mnist"))

from corruptions import CORRUPTIONS, corrupt  # noqa: E402
from mnist_data import load_mnist  # noqa: E402

from scanflow.monitor import (  # noqa: E402
    DriftCheck,
    KSDrift,
    MMDDrift,
    PCAEmbedding,
    ReconstructionDrift,
    pac_exceedances,
)
from scanflow.monitor.base import DEFAULT_CONFIDENCE, WindowDetector, draw_windows  # noqa: E402

MARKER = "BENCH_RESULT "
WINDOW = 500
N_REFERENCE, N_CALIBRATION = 1000, 2000
ALPHAS = (0.01, 0.05)
CAL_WINDOWS, CAL_SEED = 300, 7
SCANFLOW = {
    "scanflow_ks": ("KSDrift(embedding=PCAEmbedding(32)): pixels + 32 PCA coordinates + "
                    "out-of-fold reconstruction error, Bonferroni, calibrated"),
    "scanflow_mmd": "MMDDrift(): RBF MMD² on 32 PCA coordinates + residual norm, calibrated",
    "scanflow_ae": "ReconstructionDrift(): PCA-32 reconstruction error, two-sided KS, calibrated",
    "scanflow_check": ("DriftCheck(the three above): one PAC threshold on the smallest "
                       "per-detector tail p-value, i.e. for the OR of the three"),
}
ALIBI = {
    "alibi_ks": "alibi_detect.cd.KSDrift(x_ref, p_val, correction='bonferroni') on raw pixels",
    "alibi_mmd": "alibi_detect.cd.MMDDrift(x_ref, backend='pytorch', p_val, n_permutations=100)",
}
DEFAULT_ALPHA = {"scanflow": 0.01, "alibi": 0.05}  # each library's default


def make_detector(name: str) -> WindowDetector:
    if name == "scanflow_ks":
        return KSDrift(alpha=0.01, embedding=PCAEmbedding(32))
    if name == "scanflow_mmd":
        return MMDDrift(alpha=0.01)
    if name == "scanflow_ae":
        return ReconstructionDrift(alpha=0.01)
    raise ValueError(name)


def make_check() -> DriftCheck:
    return DriftCheck(make_detector("scanflow_ks"), make_detector("scanflow_mmd"),
                      make_detector("scanflow_ae"))


def p_thresholds(n_windows: int) -> dict[str, float]:
    """Conformal p-value thresholds of the PAC rule at each alpha (drift when p <= it)."""
    return {str(a): (pac_exceedances(n_windows, a, DEFAULT_CONFIDENCE) + 1) / (n_windows + 1)
            for a in ALPHAS}


# --------------------------------------------------------------------------------------------
def build_windows(args: argparse.Namespace, log: Any) -> tuple[dict[str, np.ndarray], list[str], np.ndarray]:
    """Reference, calibration pool and the labelled windows (uint8, N x 500 x 784)."""
    _, _, x_test, _ = load_mnist(args.workspace)
    flat = x_test.reshape(len(x_test), -1)
    order = np.random.default_rng(0).permutation(len(x_test))
    ref_idx = order[:N_REFERENCE]
    cal_idx = order[N_REFERENCE:N_REFERENCE + N_CALIBRATION]
    eval_idx = order[N_REFERENCE + N_CALIBRATION:]
    assert not (set(ref_idx) & set(cal_idx)) and not (set(ref_idx) | set(cal_idx)) & set(eval_idx)
    labels: list[str] = []
    windows: list[np.ndarray] = []
    for w in draw_windows(flat[eval_idx], WINDOW, args.clean_windows, seed=10):
        labels.append("clean")
        windows.append(w)
    for c, name in enumerate(args.corruptions):
        for severity in args.severities:
            images = corrupt(x_test[eval_idx], name, severity, seed=100 + 10 * c + severity)
            for w in draw_windows(images.reshape(len(images), -1), WINDOW, args.windows,
                                  seed=1000 + 10 * c + severity):
                labels.append(f"{name}@{severity}")
                windows.append(w)
    log(f"{len(windows)} windows of {WINDOW}: {args.clean_windows} clean, "
        f"{len(windows) - args.clean_windows} corrupted")
    data = {"reference": flat[ref_idx], "calibration": flat[cal_idx]}
    return data, labels, np.stack(windows)


def run_scanflow(name: str, data: dict[str, np.ndarray], windows: np.ndarray, log: Any) -> dict[str, Any]:
    if name == "scanflow_check":
        return run_check(data, windows, log)
    det = make_detector(name)
    t0 = time.perf_counter()
    det.fit(data["reference"])
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    cal = det.calibrate(data["calibration"], window_size=WINDOW, n_windows=CAL_WINDOWS, seed=CAL_SEED)
    cal_s = time.perf_counter() - t0
    log(f"{name}: fit {fit_s:.1f} s, calibrated on {CAL_WINDOWS} windows in {cal_s:.1f} s "
        f"(uncalibrated test flagged {cal.nominal_false_alarm_rate} of them)")
    p_values, seconds = [], []
    for i, w in enumerate(windows):
        t = time.perf_counter()
        result = det.check(w)
        seconds.append(time.perf_counter() - t)
        p_values.append(result.p_value)
        if i % 200 == 0:
            log(f"{name}: {i}/{len(windows)} windows")
    return {"p_values": p_values, "seconds": seconds, "fit_seconds": fit_s,
            "calibration_seconds": cal_s, "nominal_false_alarm_rate": cal.nominal_false_alarm_rate,
            "p_thresholds": p_thresholds(cal.n_windows), "calibration": cal.to_dict(),
            "rule": (f"PAC: drift when the conformal p-value <= (j + 1) / ({cal.n_windows} + 1), j the "
                     f"largest with Beta(j + 1, n - j).cdf(alpha) >= {cal.confidence}")}


def run_check(data: dict[str, np.ndarray], windows: np.ndarray, log: Any) -> dict[str, Any]:
    """DriftCheck of the three detectors, timed on its combined verdict."""
    check = make_check()
    t0 = time.perf_counter()
    check.fit(data["reference"])
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    cal = check.calibrate(data["calibration"], window_size=WINDOW, n_windows=CAL_WINDOWS,
                          seed=CAL_SEED)
    cal_s = time.perf_counter() - t0
    log(f"scanflow_check: fit {fit_s:.1f} s, calibrated on {CAL_WINDOWS} windows in {cal_s:.1f} s")
    p_values, seconds, fired = [], [], []
    for i, w in enumerate(windows):
        t = time.perf_counter()
        verdict = check.verdict(w)
        seconds.append(time.perf_counter() - t)
        p_values.append(verdict.p_value)
        fired.append(list(verdict.fired))
        if i % 200 == 0:
            log(f"scanflow_check: {i}/{len(windows)} windows")
    doc = cal.to_dict()
    doc.pop("detectors")
    return {"p_values": p_values, "seconds": seconds, "fit_seconds": fit_s,
            "calibration_seconds": cal_s, "p_thresholds": p_thresholds(cal.combined.n_windows),
            "calibration": doc, "fired_at_0.01": fired,
            "rule": "PAC threshold (confidence 0.9) on the smallest per-detector tail p-value"}


def far_over_splits(names: list[str], splits: int, log: Any, workspace: Path) -> dict[str, Any]:
    """False-alarm rates of the calibrated detectors on other shuffles of the test set.

    One split's rate depends on that split's calibration and evaluation pools (every window of
    one pool shares its deviation from the population); this shows the spread over splits.
    Only clean windows: no detection rate is computed here. The three detectors are fitted once
    per split inside one DriftCheck, whose calibration gives each detector the calibration its
    own ``calibrate`` would (the same windows) plus the combined rule.
    """
    _, _, x_test, _ = load_mnist(workspace)
    flat = x_test.reshape(len(x_test), -1)
    out: dict[str, Any] = {n: {str(a): [] for a in ALPHAS} for n in names}
    for split in range(1, splits + 1):
        order = np.random.default_rng(split).permutation(len(flat))
        ref = flat[order[:N_REFERENCE]]
        cal = flat[order[N_REFERENCE:N_REFERENCE + N_CALIBRATION]]
        clean = draw_windows(flat[order[N_REFERENCE + N_CALIBRATION:]], WINDOW, 200, seed=10 + split)
        check = make_check().fit(ref)
        check.calibrate(cal, window_size=WINDOW, n_windows=CAL_WINDOWS, seed=CAL_SEED)
        p: dict[str, list[float]] = {n: [] for n in names}
        for w in clean:
            results = check.check(w)
            for r in results:
                if f"scanflow_{r.test}" in p:
                    p[f"scanflow_{r.test}"].append(r.p_value)
            if "scanflow_check" in p:
                p["scanflow_check"].append(check.combine(results).p_value)
        thresholds = p_thresholds(CAL_WINDOWS)
        for name in names:
            for a in ALPHAS:
                arr = np.asarray(p[name])
                out[name][str(a)].append(float((arr <= thresholds[str(a)] + 1e-12).mean()))
        log(f"split {split}: " + ", ".join(f"{n} {out[n]['0.01'][-1]:.3f}/{out[n]['0.05'][-1]:.3f}"
                                            for n in names) + " (false alarms at 0.01/0.05)")
    return out


# --------------------------------------------------------------------------------------------
def venv_python() -> Path:
    return VENVS / "alibi" / "bin" / "python"


def ensure_alibi_venv(log: Any) -> dict[str, Any]:
    """Create bench/.venvs/alibi on first use (system python3 -m venv + pip); report the install."""
    marker = VENVS / "alibi" / ".bench-install.json"
    if venv_python().exists() and marker.exists():
        return {**json.loads(marker.read_text()), "reused": True}
    if (VENVS / "alibi").exists():
        shutil.rmtree(VENVS / "alibi")  # a half-made venv from an interrupted install
    LOGS.mkdir(parents=True, exist_ok=True)
    req = BENCH / "requirements-alibi.txt"
    python3 = shutil.which("python3") or sys.executable
    log(f"creating bench/.venvs/alibi and installing {' '.join(req.read_text().split())} ...")
    t0 = time.perf_counter()
    with open(LOGS / "install-alibi.log", "w") as f:
        subprocess.run([python3, "-m", "venv", str(VENVS / "alibi")], check=True, stdout=f,
                       stderr=subprocess.STDOUT)
        subprocess.run([str(venv_python()), "-m", "pip", "install", "-r", str(req)], check=True,
                       stdout=f, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    code = ("import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
            "['alibi-detect', 'torch', 'numpy']}))")
    versions = json.loads(subprocess.run([str(venv_python()), "-c", code], check=True,
                                         capture_output=True, text=True).stdout)
    size = sum(p.stat().st_size for p in (VENVS / "alibi").rglob("*") if p.is_file())
    info = {"install_seconds": round(seconds, 1), "size_mb": round(size / 1e6), "versions": versions,
            "installed_at": dt.datetime.now().isoformat(timespec="seconds")}
    marker.write_text(json.dumps(info, indent=1))
    return {**info, "reused": False}


def fingerprint(data: dict[str, np.ndarray], labels: list[str], windows: np.ndarray) -> str:
    """Identifies the exact reference and windows (to reuse alibi's results on the same ones)."""
    h = hashlib.sha256()
    for arr in (data["reference"], windows):
        h.update(np.ascontiguousarray(arr).tobytes())
    h.update("\n".join(labels).encode())
    return h.hexdigest()


def parse_alibi(stdout: Path, log: Any) -> dict[str, Any]:
    lines = [ln for ln in stdout.read_text().splitlines() if ln.startswith(MARKER)]
    if not lines:
        raise RuntimeError(f"no result line in {stdout}")
    got = json.loads(lines[-1][len(MARKER):])
    out: dict[str, Any] = {"versions": {k: got[k] for k in ("version", "torch", "numpy")}}
    for short, r in got["detectors"].items():
        rule = ("drift when min p-value < alpha / 784 (Bonferroni), alibi's rule" if short == "ks"
                else "drift when the permutation p-value < alpha, alibi's rule")
        out[f"alibi_{short}"] = {"p_values": r["p_values"], "seconds": r["seconds"],
                                 "fit_seconds": r["fit_seconds"], "rule": rule,
                                 "n_features": r["n_features"]}
    log(f"alibi-detect {got['version']} (torch {got['torch']}, numpy {got['numpy']}) done")
    return out


def reuse_alibi(stdout: Path, print_: str, log: Any) -> dict[str, Any]:
    """alibi's results from an earlier run, only if it saw exactly these windows."""
    saved = stdout.with_suffix(".fingerprint")
    if not saved.exists() or saved.read_text().strip() != print_:
        raise SystemExit(f"{stdout} was not made on these windows (fingerprint {saved} differs or "
                         "is missing): run alibi again")
    log(f"reusing alibi's results from {stdout} (same reference and windows)")
    return parse_alibi(stdout, log)


def run_alibi(names: list[str], data: dict[str, np.ndarray], windows: np.ndarray, timeout: float,
              print_: str, log: Any) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-alibi-"))
    (LOGS / "alibi.fingerprint").unlink(missing_ok=True)
    try:
        np.save(tmp / "reference.npy", (data["reference"] / 255.0).astype(np.float32))
        np.save(tmp / "windows.npy", windows)
        argv = [str(venv_python()), str(BENCH / "peers" / "alibi_case.py"), "--data", str(tmp),
                "--detectors", ",".join(n.removeprefix("alibi_") for n in names),
                "--p-val", str(DEFAULT_ALPHA["alibi"])]
        LOGS.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SCANFLOW_")}
        with open(LOGS / "alibi.stdout", "w") as out, open(LOGS / "alibi.log", "w") as err:
            proc = subprocess.run(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env,
                                  timeout=timeout, check=False)
        if proc.returncode != 0:
            tail = "\n".join((LOGS / "alibi.log").read_text().splitlines()[-15:])
            raise RuntimeError(f"alibi worker failed (exit {proc.returncode}):\n{tail}")
        (LOGS / "alibi.fingerprint").write_text(print_ + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return parse_alibi(LOGS / "alibi.stdout", log)


def flags(name: str, raw: dict[str, Any], alpha: float) -> np.ndarray:
    p = np.asarray(raw["p_values"], dtype=np.float64)
    if name == "alibi_ks":
        return p < alpha / raw["n_features"]
    if name == "alibi_mmd":
        return p < alpha
    return p <= raw["p_thresholds"][str(alpha)] + 1e-12  # conformal p-values, PAC threshold


def summarise(name: str, raw: dict[str, Any], labels: list[str], alpha: float) -> dict[str, Any]:
    hit = flags(name, raw, alpha)
    lab = np.asarray(labels)
    cases = [c for c in dict.fromkeys(labels) if c != "clean"]
    secs = raw["seconds"]
    return {
        "false_alarm_rate": float(hit[lab == "clean"].mean()),
        "seconds_per_check": round(statistics.median(secs), 4),
        "detection_rate": {c: float(hit[lab == c].mean()) for c in cases},
        "alpha": alpha,
        "clean_windows": int((lab == "clean").sum()),
        "windows_per_case": int((lab == cases[0]).sum()) if cases else 0,
        "seconds_per_check_mean": round(statistics.fmean(secs), 4),
        "seconds_per_check_p95": round(float(np.quantile(secs, 0.95)), 4),
        "fit_seconds": round(raw["fit_seconds"], 2),
        **({"calibration_seconds": round(raw["calibration_seconds"], 2)}
           if "calibration_seconds" in raw else {}),
        "rule": raw["rule"],
        **({"p_threshold": raw["p_thresholds"][str(alpha)]} if "p_thresholds" in raw else {}),
        **({"calibration": raw["calibration"]} if "calibration" in raw else {}),
    }


def table(results: dict[str, Any], names: list[str]) -> str:
    cases = list(next(iter(results.values()))["detection_rate"])
    head = "| corruption@severity | " + " | ".join(names) + " |"
    lines = [head, "|---|" + "---:|" * len(names)]
    for c in cases:
        lines.append(f"| {c} | " + " | ".join(f"{results[n]['detection_rate'][c]:.2f}" for n in names) + " |")
    lines.append("| **false-alarm rate** | " + " | ".join(
        f"{results[n]['false_alarm_rate']:.3f}" for n in names) + " |")
    lines.append("| false-alarm rate, mean of other splits | " + " | ".join(
        f"{results[n]['false_alarm_rate_other_splits']['mean']:.3f}"
        if "false_alarm_rate_other_splits" in results[n] else "–" for n in names) + " |")
    lines.append("| **s per check (median)** | " + " | ".join(
        f"{results[n]['seconds_per_check']:.3f}" for n in names) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", type=Path, default=ROOT / ".scanflow",
                    help="holds downloads/ with the MNIST wheel (make data)")
    ap.add_argument("--systems", default=",".join([*SCANFLOW, *ALIBI]))
    ap.add_argument("--corruptions", nargs="*", default=list(CORRUPTIONS), choices=sorted(CORRUPTIONS))
    ap.add_argument("--severities", nargs="*", type=int, default=[1, 3])
    ap.add_argument("--windows", type=int, default=10, help="windows per corruption@severity")
    ap.add_argument("--clean-windows", type=int, default=200)
    ap.add_argument("--timeout", type=float, default=3600, help="seconds for the alibi worker")
    ap.add_argument("--quick", action="store_true", help="2 corruptions, 3 windows each, 40 clean")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--far-splits", type=int, default=5,
                    help="also measure scanflow's false-alarm rate on this many other splits "
                         "(200 clean windows each; 0: skip)")
    ap.add_argument("--reuse-alibi", action="store_true",
                    help="take alibi's results from bench/.logs/alibi.stdout if it was made on "
                         "exactly these windows (alibi takes ~30 of the ~35 minutes)")
    args = ap.parse_args()
    if args.quick:
        args.corruptions, args.windows, args.clean_windows = ["shot_noise", "rotate"], 3, 40
        args.far_splits = min(args.far_splits, 1)
    out = args.out or RESULTS / ("detectors.quick.json" if args.quick else "detectors.json")
    systems = args.systems.split(",")
    unknown = [s for s in systems if s not in SCANFLOW and s not in ALIBI]
    if unknown:
        ap.error(f"unknown systems {unknown}; known: {', '.join([*SCANFLOW, *ALIBI])}")
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f} s] {msg}", flush=True)

    meta: dict[str, Any] = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(),
                    "loadavg_start": [round(x, 2) for x in os.getloadavg()]},
        "protocol": {"reference": N_REFERENCE, "calibration_pool": N_CALIBRATION,
                     "calibration_windows": CAL_WINDOWS, "calibration_confidence": DEFAULT_CONFIDENCE,
                     "calibration_sampling": "pool_bootstrap",
                     "evaluation_pool": 10_000 - N_REFERENCE - N_CALIBRATION,
                     "window": WINDOW, "clean_windows": args.clean_windows,
                     "windows_per_case": args.windows, "severities": args.severities,
                     "corruptions": args.corruptions},
        "detectors": {k: v for k, v in {**SCANFLOW, **ALIBI}.items() if k in systems},
        "versions": {"numpy": np.__version__},
    }
    alibi_names = [s for s in systems if s in ALIBI]
    if alibi_names:
        meta["alibi_install"] = ensure_alibi_venv(log)
    data, labels, windows = build_windows(args, log)
    raw: dict[str, dict[str, Any]] = {}
    for name in systems:
        if name in SCANFLOW:
            raw[name] = run_scanflow(name, data, windows, log)
    if alibi_names:
        print_ = fingerprint(data, labels, windows)
        meta["windows_sha256"] = print_
        if args.reuse_alibi:
            got = reuse_alibi(LOGS / "alibi.stdout", print_, log)
            meta["alibi_reused"] = True
        else:
            got = run_alibi(alibi_names, data, windows, args.timeout, print_, log)
        meta["versions"]["alibi"] = got.pop("versions")
        raw.update(got)

    scanflow_names = [s for s in systems if s in SCANFLOW]
    splits = far_over_splits(scanflow_names, args.far_splits, log, args.workspace) \
        if args.far_splits and scanflow_names else {}

    results: dict[str, Any] = {}
    for name in systems:
        family = "alibi" if name in ALIBI else "scanflow"
        results[name] = summarise(name, raw[name], labels, DEFAULT_ALPHA[family])
    for name in systems:  # the same run at the other alpha
        family = "alibi" if name in ALIBI else "scanflow"
        for alpha in ALPHAS:
            if alpha != DEFAULT_ALPHA[family]:
                results[f"{name}@{alpha}"] = summarise(name, raw[name], labels, alpha)
    for name, by_alpha in splits.items():
        for key in (name, f"{name}@0.05"):
            rates = by_alpha[str(results[key]["alpha"])]
            results[key]["false_alarm_rate_other_splits"] = {
                "splits": len(rates), "mean": round(statistics.fmean(rates), 4),
                "max": max(rates), "per_split": rates}
    meta["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    meta["seconds"] = round(time.perf_counter() - start, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    out.with_name(out.stem + ".meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    for alpha in ALPHAS:
        names = [n for n in results if results[n]["alpha"] == alpha]
        print(f"\nalpha = {alpha}:\n" + table(results, names))
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
